#include "tests/engine/cuda/ffn_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/synth.h"
#include "tests/testdata.h"

namespace moepool::cuda {
namespace {

MatrixRef Ref(const WeightMatrix& w) {
  return MatrixRef{w.type, w.data, w.row_bytes, w.rows, w.cols};
}

class ReferenceExpertBackend : public ExpertBackend {
 public:
  explicit ReferenceExpertBackend(const Model* model) : model_(model) {}
  absl::Status Compute(const ExpertRoutes& routes, float* out) override {
    const ModelConfig& c = model_->config();
    if (routes.layer < 0 || routes.layer >= c.n_layer || routes.n_embd != c.n_embd) {
      return absl::InvalidArgumentError("bad layer or row width");
    }
    const LayerWeights& L = model_->layer(routes.layer);
    const int64_t d = routes.n_embd;
    std::fill(out, out + routes.n_rows * d, 0.0f);
    std::vector<float> y(static_cast<size_t>(d));
    // Ascending expert id, products rounded to f32 before they are added (the contract).
    for (int32_t e = 0; e < c.n_expert; ++e) {
      for (int64_t r = 0; r < routes.n_rows; ++r) {
        for (int j = 0; j < routes.k; ++j) {
          if (routes.expert[r * routes.k + j] != e) continue;
          const ExpertWeights& w = L.experts[static_cast<size_t>(e)];
          if (!w.present()) return absl::InvalidArgumentError("expert not held");
          absl::Status s =
              RefExpertFfn(Ref(w.gate), Ref(w.up), Ref(w.down), routes.x + r * d, 1, y.data());
          if (!s.ok()) return s;
          const float wt = routes.weight[r * routes.k + j];
          for (int64_t i = 0; i < d; ++i) {
            const float p = wt * y[static_cast<size_t>(i)];
            out[r * d + i] += p;
          }
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  const Model* model_;
};

}  // namespace

std::unique_ptr<ExpertBackend> CreateReferenceExpertBackend(const Model* model) {
  return std::make_unique<ReferenceExpertBackend>(model);
}

bool GpuRequired() {
  const char* v = std::getenv("MOEPOOL_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

absl::StatusOr<std::string> SynthModelForCudaTests(const std::string& shape,
                                                   const std::string& type) {
  static auto* made = new std::map<std::string, std::string>;
  const std::string key = absl::StrCat(shape, "-", type);
  if (auto it = made->find(key); it != made->end()) return it->second;
  absl::StatusOr<SynthShape> s = SynthShapeByName(shape);
  if (!s.ok()) return s.status();
  SynthOptions o;
  o.shape = *s;
  o.type = type;
  o.seed = 11;
  // The working directory's deploy/vocab, the source tree's, or the shared test data's (the
  // GPU bundle's testdata/vocab).
  o.vocab_path = kDefaultSynthVocabPath;
  for (const std::string& candidate :
       {std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath,
        ::moepool::testing::SharedTestdataPath("vocab/mistral-vocab.gguf")}) {
    if (std::filesystem::exists(o.vocab_path)) break;
    o.vocab_path = candidate;
  }
  o.out_path = ::moepool::testing::TempDir() + "/cuda-" + key + ".gguf";
  if (absl::Status st = SynthesizeModel(o); !st.ok()) return st;
  return made->emplace(key, o.out_path).first->second;
}

double RelMaxError(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
    mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
  }
  return mag > 0.0 ? err / mag : err;
}

}  // namespace moepool::cuda
