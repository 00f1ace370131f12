// Fuzz target for the GGUF reader, the model binder and the tokenizer: any byte string must give
// either a valid file (every tensor inside the image) or an error status, never a crash, a hang
// or an allocation out of proportion to the input (ParseGgufInput).
//
// With clang, in the fuzzing configuration (tests/fuzz/run_fuzz.sh: the engine library itself
// built with -fsanitize=fuzzer-no-link,address), this is a libFuzzer target run over the seed
// corpus tests/fuzz/corpus/gguf with -malloc_limit_mb and -rss_limit_mb.
// Otherwise it is a replay driver (ctest GgufReaderFuzzerReplay): it runs the target over the
// files and directories named on the command line and single-byte corruptions of their headers,
// counting what each allocates (alloc_counter.h), and fails when an input crashes the check or
// allocates more than GgufAllocationBound of its size.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "tests/fuzz/gguf_fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (!moepool::testing::ParseGgufInput(
          std::string_view(reinterpret_cast<const char*>(data), size))) {
    __builtin_trap();
  }
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/alloc_counter.h"

namespace {

// Runs one input; false (with a message) if it broke a rule.
bool Replay(const std::string& name, std::string_view bytes) {
  bool ok = true;
  const uint64_t peak =
      moepool::testing::PeakAllocatedDuring([&] { ok = moepool::testing::ParseGgufInput(bytes); });
  if (!ok) std::fprintf(stderr, "%s: an accepted file has a tensor outside it\n", name.c_str());
  const uint64_t bound = moepool::testing::GgufAllocationBound(bytes.size());
  if (peak > bound) {
    std::fprintf(stderr, "%s: %zu bytes of input allocated %llu bytes (bound %llu)\n", name.c_str(),
                 bytes.size(), static_cast<unsigned long long>(peak),
                 static_cast<unsigned long long>(bound));
    ok = false;
  }
  return ok;
}

// The file itself and deterministic single-byte corruptions of its first 64 KiB.
int ReplayFile(const std::filesystem::path& p, int* failures) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  int n = 1;
  if (!Replay(p.string(), bytes)) ++*failures;
  const size_t head = std::min<size_t>(bytes.size(), 1 << 16);
  for (size_t i = 0; i < head; i += 97, ++n) {
    std::string b = bytes.substr(0, head);
    b[i] = static_cast<char>(b[i] ^ 0x5a);
    if (!Replay(p.string() + " with byte " + std::to_string(i) + " flipped", b)) ++*failures;
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0, failures = 0;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        // *.gguf, and libFuzzer's corpus entries (named by their hash, no extension).
        const std::string ext = e.path().extension().string();
        if (e.is_regular_file() && (ext == ".gguf" || ext.empty())) {
          n += ReplayFile(e.path(), &failures);
        }
      }
    } else if (std::filesystem::exists(p)) {
      n += ReplayFile(p, &failures);
    } else {
      std::fprintf(stderr, "gguf_reader_fuzzer: no such input %s\n", argv[i]);
      ++failures;
    }
  }
  std::printf("gguf_reader_fuzzer: replayed %d inputs, %d failures\n", n, failures);
  return failures == 0 ? 0 : 1;
}
#endif
