#include "tests/fuzz/gguf_fuzz_input.h"

#include <memory>
#include <string>

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

namespace moepool::testing {

bool ParseGgufInput(std::string_view bytes) {
  auto file = GgufFile::FromBuffer(bytes, "fuzz.gguf");
  if (!file.ok()) return true;
  for (const GgufTensorInfo& t : (*file)->tensors()) {
    if (t.data < (*file)->base() ||
        t.data + t.size_bytes > (*file)->base() + (*file)->file_size()) {
      return false;
    }
  }
  std::shared_ptr<GgufFile> shared(std::move(*file));
  (void)ReadModelConfig(*shared);
  (void)Model::FromFile(shared);
  (void)Tokenizer::FromGguf(*shared);
  return true;
}

uint64_t GgufAllocationBound(uint64_t size) {
  // Measured worst cases (tests/fuzz/gguf_reader_memory_test.cc): about 12x for a file of
  // nothing but empty vocabulary strings, read and then copied by the tokenizer.
  return 24 * size + (uint64_t{4} << 20);
}

}  // namespace moepool::testing
