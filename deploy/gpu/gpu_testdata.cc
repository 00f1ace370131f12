// tests/testdata.h for moepool_gpu_tests, which runs far from the source tree: reference files
// are looked up under $MOEPOOL_TESTDATA_DIR (run_gpu_checks.sh points it at the bundle's copy),
// else under the source tree's ../shared/testdata. There is no moepool binary in the bundle, so
// RunMoepool / SpawnMoepool are not provided (suites that need them do not belong in it).
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "tests/testdata.h"

namespace moepool::testing {

std::string SharedTestdataPath(const std::string& rel) {
  const char* dir = std::getenv("MOEPOOL_TESTDATA_DIR");
  if (dir != nullptr && *dir != '\0') return std::string(dir) + "/" + rel;
  return std::string(MOEPOOL_SOURCE_DIR) + "/../shared/testdata/" + rel;
}

std::string TempDir() {
  static const std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string path = std::string(base != nullptr ? base : "/tmp") + "/moepool_gpu_tests." +
                       std::to_string(getpid());
    std::filesystem::create_directories(path);
    return path;
  }();
  return dir;
}

bool HaveTestdata(const std::string& path) { return std::filesystem::exists(path); }

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) std::abort();
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace moepool::testing
