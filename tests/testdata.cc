#include "tests/testdata.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
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

CommandResult RunMoepool(const std::string& args, const std::string& env) {
  static std::atomic<int> n{0};
  const std::string base = TempDir() + "/moepool_cmd" + std::to_string(++n);
  const std::string cmd =
      env + "'" + MOEPOOL_BINARY + "' " + args + " >'" + base + ".out' 2>'" + base + ".err'";
  const int status = std::system(cmd.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadFileOrDie(base + ".out");
  r.err = ReadFileOrDie(base + ".err");
  return r;
}

}  // namespace moepool::testing
