#include "tests/testdata.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

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

pid_t SpawnMoepoolLogged(const std::vector<std::string>& args, const std::string& log_path) {
  std::vector<std::string> argv = {MOEPOOL_BINARY};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargs;  // built before fork: the child only calls async-signal-safe code
  for (auto& a : argv) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  const int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (log < 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(log, 1);
    dup2(log, 2);
    execv(cargs[0], cargs.data());
    _exit(127);
  }
  close(log);
  return pid;
}

size_t LogLines(const std::string& path) {
  std::ifstream in(path);
  size_t n = 0;
  std::string line;
  while (std::getline(in, line)) ++n;
  return n;
}

bool WaitForLog(const std::string& path, const std::string& needle, double timeout_s,
                std::string* line, size_t from_line) {
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int>(timeout_s * 1e3));
  do {
    std::ifstream in(path);
    std::string l;
    for (size_t i = 0; std::getline(in, l); ++i) {
      if (i >= from_line && l.find(needle) != std::string::npos) {
        if (line != nullptr) *line = l;
        return true;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (std::chrono::steady_clock::now() < give_up);
  return false;
}

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace moepool::testing
