#include "tests/testdata.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace moepool::testing {

std::string SharedTestdataPath(const std::string& rel) {
  return std::string(MOEPOOL_SOURCE_DIR) + "/../shared/testdata/" + rel;
}

namespace {
// Removes the scratch directory when the process exits (models written there are large).
struct RemoveAtExit {
  std::string dir;
  ~RemoveAtExit() {
    if (std::getenv("MOEPOOL_KEEP_TEST_FILES") != nullptr) return;
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};
}  // namespace

std::string TempDir() {
  static const std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string d = std::string(base ? base : "/tmp") + "/moepool_test_" + std::to_string(getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  static const RemoveAtExit cleanup{dir};
  return dir;
}

bool HaveTestdata(const std::string& path) { return std::filesystem::exists(path); }

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace moepool::testing
