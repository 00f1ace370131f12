// Writes the GGUF fuzz target's seed corpus: `gguf_seed_corpus DIR` (tests/fuzz/gguf_seeds.h).
#include <cstdio>
#include <filesystem>
#include <string>

#include "tests/fuzz/gguf_seeds.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gguf_seed_corpus DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  const std::string scratch = std::filesystem::temp_directory_path().string();
  std::filesystem::create_directories(dir);
  const absl::Status s = moepool::testing::WriteGgufSeeds(dir, scratch);
  std::filesystem::remove(scratch + "/toy-vocab.gguf");
  if (!s.ok()) {
    std::fprintf(stderr, "gguf_seed_corpus: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::printf("gguf_seed_corpus: wrote the seeds into %s\n", dir.c_str());
  return 0;
}
