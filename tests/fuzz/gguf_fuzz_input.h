// The GGUF fuzz target's work on one input, shared by the libFuzzer entry point, the replay
// driver that ctest runs and the allocation test: the reader, the model binder and the
// tokenizer over arbitrary bytes.
#ifndef MOEPOOL_TESTS_FUZZ_GGUF_FUZZ_INPUT_H_
#define MOEPOOL_TESTS_FUZZ_GGUF_FUZZ_INPUT_H_

#include <cstdint>
#include <string_view>

namespace moepool::testing {

// Parses `bytes` as a GGUF image; where that succeeds, checks that every tensor lies inside the
// image, then reads the model config, binds the model and builds the tokenizer (their errors
// are expected for most inputs). Returns false only if an accepted file has a tensor outside
// the image, which is a bug. Must never crash, hang or allocate past GgufAllocationBound.
bool ParseGgufInput(std::string_view bytes);

// The most ParseGgufInput may allocate for `size` bytes of input, the copy of the image
// included: a small multiple of the size plus a constant. Each item a header declares takes at
// least a few bytes of it, and the reader checks every count against the bytes left before
// allocating, so a large claim in a small file is an error, not a large allocation
// (docs/engine.md, "Robustness").
uint64_t GgufAllocationBound(uint64_t size);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_FUZZ_GGUF_FUZZ_INPUT_H_
