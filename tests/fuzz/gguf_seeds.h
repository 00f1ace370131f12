// Inputs for the GGUF fuzz target, made by the project's own writer: small valid files (a toy
// vocabulary, micro models in both expert layouts) and hostile ones (counts that claim far more
// than the file holds, arrays of arrays). The committed seed corpus (tests/fuzz/corpus/gguf) is
// what WriteGgufSeeds writes; the allocation test checks the hostile ones.
#ifndef MOEPOOL_TESTS_FUZZ_GGUF_SEEDS_H_
#define MOEPOOL_TESTS_FUZZ_GGUF_SEEDS_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace moepool::testing {

// A metadata-only GGUF holding a 40-token SentencePiece vocabulary (control, normal and byte
// tokens, scores, types, BOS/EOS ids).
absl::StatusOr<std::string> ToyVocabImage();

// (name, image) of files the reader must refuse without allocating more than a small multiple
// of their size: the toy vocabulary with its token array claiming 2^26 - 1 strings (the kind of
// 684-byte file that once made `moepool inspect` allocate 316 MB), a metadata count and a tensor
// count of 2^20 in a header of a few bytes, a uint8 array longer than the file, an array of
// arrays.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> HostileGgufImages();

// Writes the seed corpus into `dir` (which must exist): toy-vocab.gguf, micro-Q4_0.gguf (one
// layer, 4 experts, merged layout), micro-Q8_0-per-expert.gguf and the hostile images, each a
// few KB. `scratch` is a directory for the temporary vocabulary file.
absl::Status WriteGgufSeeds(const std::string& dir, const std::string& scratch);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_FUZZ_GGUF_SEEDS_H_
