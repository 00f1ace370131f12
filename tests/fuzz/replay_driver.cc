#include "tests/fuzz/replay_driver.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

namespace moepool::testing {
namespace {

std::string ReadFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void RunOne(const std::string& bytes) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

class Driver {
 public:
  explicit Driver(const ReplayOptions& o) : o_(o) {}

  [[noreturn]] void Fail(const std::string& what) const {
    if (o_.fail) o_.fail(what);
    std::fprintf(stderr, "%s: %s\n", o_.target.c_str(), what.c_str());
    std::abort();
  }

  // --one FILE...: these inputs only, as they are.
  void RunFiles(int argc, char** argv) const {
    for (int i = 2; i < argc; ++i) {
      if (!std::filesystem::is_regular_file(argv[i])) {
        Fail(std::string("no such input ") + argv[i]);
      }
      const std::string bytes = ReadFile(argv[i]);
      std::printf("running %s\n", argv[i]);
      std::fflush(stdout);
      RunOne(bytes);
    }
  }

  // --write-seeds DIR.
  void WriteSeeds(const std::filesystem::path& dir) const {
    std::filesystem::create_directories(dir);
    for (const auto& [name, bytes] : o_.seeds) {
      std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      if (!out.good()) Fail("cannot write " + (dir / name).string());
    }
  }

  // The seeds, then every input named on the command line, each once (the committed corpus
  // starts as the seeds); returns how many inputs ran, corruptions included.
  int ReplayAll(int argc, char** argv) {
    int n = 0;
    for (const auto& seed : o_.seeds) n += ReplayNew(seed.second);
    for (int i = 1; i < argc; ++i) {
      const std::filesystem::path p(argv[i]);
      if (std::filesystem::is_directory(p)) {
        for (const auto& e : std::filesystem::directory_iterator(p)) {
          if (e.is_regular_file()) n += ReplayNew(ReadFile(e.path()));
        }
      } else if (std::filesystem::exists(p)) {
        n += ReplayNew(ReadFile(p));
      } else {
        Fail("no such input " + p.string());
      }
    }
    return n;
  }

 private:
  // The input and its single-byte corruptions, unless it ran already.
  int ReplayNew(const std::string& bytes) {
    if (!done_.insert(bytes).second) return 0;
    RunOne(bytes);
    int n = 1;
    for (size_t i = 0; i < bytes.size(); i = Next(i), ++n) {
      std::string b = bytes;
      b[i] = static_cast<char>(b[i] ^ 0x5a);
      RunOne(b);
    }
    return n;
  }

  size_t Next(size_t at) const { return o_.next_corruption ? o_.next_corruption(at) : at + 7; }

  const ReplayOptions& o_;
  std::set<std::string> done_;
};

}  // namespace

int RunReplayDriver(int argc, char** argv, const ReplayOptions& options) {
  Driver driver(options);
  if (argc >= 2 && std::string(argv[1]) == "--one") {
    driver.RunFiles(argc, argv);
    return 0;
  }
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    driver.WriteSeeds(argv[2]);
    return 0;
  }
  const int n = driver.ReplayAll(argc, argv);
  std::printf("%s: %d inputs, no failure\n", options.target.c_str(), n);
  return 0;
}

}  // namespace moepool::testing
