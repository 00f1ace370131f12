#include "tests/engine/cuda/ffn_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "engine/synth.h"
#include "tests/testdata.h"

namespace moepool::cuda {

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
