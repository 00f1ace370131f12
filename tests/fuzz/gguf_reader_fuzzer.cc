// Fuzz target for the GGUF reader and the model binder: any byte string must give either a valid
// file (every tensor inside the image) or an error status, never a crash or a hang.
//
// With clang: built with -fsanitize=fuzzer,address (libFuzzer); run
//   ./build/tests/fuzz/gguf_reader_fuzzer -max_total_time=60 CORPUS_DIR
// With gcc: built with the replay driver below, which runs the target over the files and
// directories named on the command line (seed corpus regression, run by ctest).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = moepool::GgufFile::FromBuffer(
      std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.gguf");
  if (!file.ok()) return 0;
  for (const auto& t : (*file)->tensors()) {
    if (t.data + t.size_bytes > (*file)->base() + (*file)->file_size()) __builtin_trap();
  }
  std::shared_ptr<moepool::GgufFile> shared(std::move(*file));
  (void)moepool::ReadModelConfig(*shared);
  (void)moepool::Model::FromFile(shared);
  (void)moepool::Tokenizer::FromGguf(*shared);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
namespace {
int RunFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  // The file itself and a few deterministic corruptions of its header.
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  const size_t head = std::min<size_t>(bytes.size(), 1 << 16);
  for (size_t i = 0; i < head; i += 97) {
    std::string b = bytes.substr(0, head);
    b[i] = static_cast<char>(b[i] ^ 0x5a);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  }
  return 1;
}
}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file() && e.path().extension() == ".gguf") n += RunFile(e.path());
      }
    } else if (std::filesystem::exists(p)) {
      n += RunFile(p);
    }
  }
  std::printf("gguf_reader_fuzzer: replayed %d inputs without a crash\n", n);
  return 0;
}
#endif
