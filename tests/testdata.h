// Locating the reference files of ../shared/testdata for tests.
#ifndef MOEPOOL_TESTS_TESTDATA_H_
#define MOEPOOL_TESTS_TESTDATA_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moepool::testing {

// Absolute path of `rel` under ../shared/testdata (relative to the project root).
std::string SharedTestdataPath(const std::string& rel);

// A scratch directory unique to this test process, created on first use and removed with its
// contents when the process exits (kept if MOEPOOL_KEEP_TEST_FILES is set, for debugging).
std::string TempDir();

// True if the file exists. Under CI (CI=true) a missing reference file is a failure.
bool HaveTestdata(const std::string& path);

std::string ReadFileOrDie(const std::string& path);

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `ENV moepool ARGS` through the shell (the built binary; the caller quotes arguments
// where needed; `env` is an optional prefix such as "VAR=x ").
CommandResult RunMoepool(const std::string& args, const std::string& env = "");

// Starts `moepool ARGS...` in the background (stderr to `log_path`) and waits up to 60 s for the
// first line it prints on stdout, stored in `first_line` (empty if none came). Returns the pid.
pid_t SpawnMoepool(const std::vector<std::string>& args, const std::string& log_path,
                   std::string* first_line);

// Starts the moepool binary with `args`, stdout and stderr both appended to `log_path`, and
// returns its pid (-1 on failure). For children that print many lines (serve --cluster-listen,
// worker --join): wait for a line with WaitForLog.
pid_t SpawnMoepoolLogged(const std::vector<std::string>& args, const std::string& log_path);

// Waits up to `timeout_s` for a line of the file at `path` containing `needle`, at or after
// line `from_line` (0-based); true and the line in `*line` (may be null) if one appears.
bool WaitForLog(const std::string& path, const std::string& needle, double timeout_s,
                std::string* line = nullptr, size_t from_line = 0);

// Lines in the file at `path` now (for WaitForLog's from_line).
size_t LogLines(const std::string& path);

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and released).
int FreeLoopbackPort();

}  // namespace moepool::testing

// Skips the test (or fails it under CI) if the reference file is missing.
#define REQUIRE_TESTDATA(path)                                                      \
  do {                                                                              \
    if (!::moepool::testing::HaveTestdata(path)) {                                  \
      if (std::getenv("CI") != nullptr && std::string(std::getenv("CI")) == "true") \
        FAIL() << "missing reference file " << (path);                              \
      GTEST_SKIP() << "missing reference file " << (path);                          \
    }                                                                               \
  } while (0)

#endif  // MOEPOOL_TESTS_TESTDATA_H_
