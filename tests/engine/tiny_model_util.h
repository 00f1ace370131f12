// Synthesized tiny models shared by the engine tests of one test process.
#ifndef MOEPOOL_TESTS_ENGINE_TINY_MODEL_UTIL_H_
#define MOEPOOL_TESTS_ENGINE_TINY_MODEL_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/gguf.h"
#include "engine/synth.h"

namespace moepool::testing {

// Options for the "tiny" shape with the vocabulary bundled in deploy/vocab, writing to
// TempDir()/`file`.
SynthOptions TinySynthOptions(const std::string& type, uint64_t seed, bool per_expert,
                              const std::string& file);

// Path of the tiny model of this (type, seed, layout), synthesized on first use in this process
// into TempDir() (removed when the process exits). A failed synthesis is a test failure (and an
// empty path). Not thread-safe (tests run on one thread).
const std::string& TinyModelPath(const std::string& type, uint64_t seed = 7,
                                 bool per_expert = false);

// Changes applied while copying a GGUF file.
struct GgufEdits {
  // May add, change or remove metadata entries.
  std::function<void(std::vector<std::pair<std::string, GgufValue>>* metadata)> metadata;
  // Called for each tensor; may change its type, n_dims and dims (the data is then cut or padded
  // with zero bytes to the new size). Returns false to drop the tensor.
  std::function<bool(GgufTensorInfo* tensor)> tensor;
};

// Writes a copy of the GGUF file `src` with `edits` applied to `dst`.
absl::Status CopyGgufWithEdits(const std::string& src, const std::string& dst,
                               const GgufEdits& edits);

// `n` token ids in [3, n_vocab) after BOS (id 1), the same for every call with the same
// arguments.
std::vector<int32_t> PseudoRandomPrompt(int n, int64_t n_vocab, uint64_t seed = 1);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_ENGINE_TINY_MODEL_UTIL_H_
