// Shared pieces of the CUDA expert/FFN suites: the GPU-required switch and a small synthesized
// model that needs no files outside the source tree (also linked into moepool_gpu_tests).
#ifndef MOEPOOL_TESTS_ENGINE_CUDA_FFN_TEST_UTIL_H_
#define MOEPOOL_TESTS_ENGINE_CUDA_FFN_TEST_UTIL_H_

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "engine/model.h"

namespace moepool::cuda {

// True when MOEPOOL_REQUIRE_GPU=1: a missing CUDA device fails the CUDA instantiations instead
// of skipping them.
bool GpuRequired();

// Path of a synthesized model of `shape` ("tiny") and `type` written on first use into the test
// temp dir (per process). The vocabulary comes from deploy/vocab in the working directory or the
// source tree, else from <shared testdata>/vocab/mistral-vocab.gguf.
absl::StatusOr<std::string> SynthModelForCudaTests(const std::string& shape,
                                                   const std::string& type);

// The ExpertBackend contract evaluated with the kernels' host references (RefExpertFfn: f32
// activations, like the CUDA kernels, where the CPU engine rounds them to q8): what the CUDA
// expert backend computes, on the host. `model` is borrowed. Slow; for tiny models.
std::unique_ptr<ExpertBackend> CreateReferenceExpertBackend(const Model* model);

// max |a - b| / max |b| over equal-length vectors (|a - b| alone when b is all zeros).
double RelMaxError(const std::vector<float>& a, const std::vector<float>& b);

// Names the instantiations of a typed suite over {Reference, CUDA device}: "CpuReference" for
// `Reference`, "Cuda" for the other.
template <class Reference>
class ReferenceOrCudaNames {
 public:
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, Reference> ? "CpuReference" : "Cuda";
  }
};

}  // namespace moepool::cuda

#endif  // MOEPOOL_TESTS_ENGINE_CUDA_FFN_TEST_UTIL_H_
