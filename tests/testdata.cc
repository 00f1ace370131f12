#include "tests/testdata.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
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

pid_t SpawnMoepool(const std::vector<std::string>& args, const std::string& log_path,
                   std::string* first_line) {
  first_line->clear();
  int out[2];
  if (pipe(out) != 0) return -1;
  std::vector<std::string> argv = {MOEPOOL_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargs;  // built before fork: the child only calls async-signal-safe code
  for (auto& a : argv) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    const int err = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(err, 2);
    close(out[0]);
    execv(cargs[0], cargs.data());
    _exit(127);
  }
  close(out[1]);
  std::string text;
  pollfd p{out[0], POLLIN, 0};
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (text.find('\n') == std::string::npos && std::chrono::steady_clock::now() < give_up) {
    if (poll(&p, 1, 200) <= 0) continue;
    char buf[256];
    const ssize_t n = read(out[0], buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  close(out[0]);
  const size_t nl = text.find('\n');
  if (nl != std::string::npos) *first_line = text.substr(0, nl);
  return pid;
}

}  // namespace moepool::testing
