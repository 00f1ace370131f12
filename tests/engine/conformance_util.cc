#include "tests/engine/conformance_util.h"

#include <algorithm>
#include <cstring>

#include "nlohmann/json.hpp"
#include "tests/testdata.h"

namespace moepool::testing {

ReferenceCase ReadReferenceCase(const std::string& model, const std::string& prompt) {
  ReferenceCase rc;
  const std::string base = SharedTestdataPath("conformance/" + model + "." + prompt);
  const auto j = nlohmann::json::parse(ReadFileOrDie(base + ".json"));
  rc.n_vocab = j.at("n_vocab").get<int64_t>();
  rc.prompt_tokens = j.at("prompt_tokens").get<std::vector<int32_t>>();
  rc.greedy_tokens = j.at("greedy_tokens").get<std::vector<int32_t>>();
  const std::string raw = ReadFileOrDie(base + ".logits.f32");
  rc.logits.resize(raw.size() / sizeof(float));
  std::memcpy(rc.logits.data(), raw.data(), rc.logits.size() * sizeof(float));
  return rc;
}

std::vector<double> RowNmse(const std::vector<float>& a, const std::vector<float>& b,
                            int64_t n_vocab) {
  std::vector<double> out;
  const size_t rows = std::min(a.size(), b.size()) / static_cast<size_t>(n_vocab);
  for (size_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n_vocab; ++i) {
      const double x = a[r * n_vocab + i], y = b[r * n_vocab + i];
      num += (x - y) * (x - y);
      den += y * y;
    }
    out.push_back(num / std::max(den, 1e-30));
  }
  return out;
}

int32_t Argmax(const float* row, int64_t n) {
  return static_cast<int32_t>(std::max_element(row, row + n) - row);
}

int Top1Agreement(const std::vector<float>& a, const std::vector<float>& b, int64_t n_vocab) {
  int agree = 0;
  const size_t rows = std::min(a.size(), b.size()) / static_cast<size_t>(n_vocab);
  for (size_t r = 0; r < rows; ++r) {
    agree += Argmax(&a[r * n_vocab], n_vocab) == Argmax(&b[r * n_vocab], n_vocab);
  }
  return agree;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

}  // namespace moepool::testing
