// Model identity for the cluster: a digest that tells two GGUF files apart cheaply.
//
// The digest covers the whole GGUF header (all metadata and the tensor index, byte for byte)
// and four 256-byte samples of every weight matrix of the given (layer, expert) pairs, so a base
// file, an instruct file or another quantization of the same model all differ, while reading
// only a few pages of the weights. Thread-safe (reads the mapping only).
#ifndef MOEPOOL_ENGINE_FINGERPRINT_H_
#define MOEPOOL_ENGINE_FINGERPRINT_H_

#include <string>
#include <utility>
#include <vector>

#include "engine/model.h"

namespace moepool {

// 32 hex digits. `experts` lists (layer, expert) pairs; each must be bound in `model`
// (absent ones are hashed as absent, so such a fingerprint will not match a worker holding them).
std::string ModelFingerprint(const Model& model, const std::vector<std::pair<int, int>>& experts);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_FINGERPRINT_H_
