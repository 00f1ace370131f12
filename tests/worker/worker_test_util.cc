#include "tests/worker/worker_test_util.h"

#include <algorithm>
#include <random>

#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "gtest/gtest.h"
#include "wire/row_codec.h"

namespace moepool::testing {

TestRoutes MakeRoutes(int layer, int64_t n_rows, int64_t n_embd, int k,
                      const std::vector<int>& allowed, uint32_t seed) {
  TestRoutes r;
  r.layer = layer;
  r.n_rows = n_rows;
  r.n_embd = n_embd;
  r.k = k;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.05f, 1.0f);
  r.x.resize(static_cast<size_t>(n_rows * n_embd));
  for (float& v : r.x) v = normal(rng);
  for (int64_t row = 0; row < n_rows; ++row) {
    std::vector<int> pick = allowed;
    std::shuffle(pick.begin(), pick.end(), rng);
    const int used =
        std::max(1, std::min<int>(k - (row % 5 == 4 ? 1 : 0), static_cast<int>(pick.size())));
    pick.resize(static_cast<size_t>(used));
    std::sort(pick.begin(), pick.end());
    for (int j = 0; j < k; ++j) {
      r.expert.push_back(j < used ? pick[static_cast<size_t>(j)] : -1);
      r.weight.push_back(uniform(rng));
    }
    // The -1 slot first in some rows: "none" may sit anywhere.
    if (used < k && row % 2 == 0) {
      std::rotate(r.expert.end() - k, r.expert.end() - 1, r.expert.end());
    }
  }
  return r;
}

std::vector<float> LocalResult(const Model& model, const TestRoutes& routes) {
  ThreadPool pool(2);
  LocalExpertBackend backend(&model, &pool);
  ExpertRoutes er;
  er.layer = routes.layer;
  er.n_rows = routes.n_rows;
  er.n_embd = routes.n_embd;
  er.k = routes.k;
  er.x = routes.x.data();
  er.expert = routes.expert.data();
  er.weight = routes.weight.data();
  std::vector<float> out(routes.x.size());
  const absl::Status s = backend.Compute(er, out.data());
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

worker::ComputeRequest RequestFor(const TestRoutes& routes) {
  worker::ComputeRequest c;
  c.layer = routes.layer;
  c.x = routes.x.data();
  c.n_rows = routes.n_rows;
  c.n_embd = routes.n_embd;
  c.k = routes.k;
  c.expert = routes.expert.data();
  c.expert_count = routes.expert.size();
  c.weight = routes.weight.data();
  c.weight_count = routes.weight.size();
  return c;
}

std::string EncodeRows(const std::vector<float>& values, moepool::v1::DType dtype) {
  std::string out;
  wire::EncodeRows(dtype, values.data(), static_cast<int64_t>(values.size()), &out);
  return out;
}

std::vector<float> DecodeRows(const std::string& bytes, moepool::v1::DType dtype) {
  std::vector<float> out(bytes.size() * 32 / static_cast<size_t>(wire::EncodedBytes(dtype, 32)));
  EXPECT_TRUE(wire::DecodeRows(dtype, bytes, static_cast<int64_t>(out.size()), out.data()).ok());
  return out;
}

}  // namespace moepool::testing
