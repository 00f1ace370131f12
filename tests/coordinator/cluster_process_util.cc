#include "tests/coordinator/cluster_process_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool::testing {
namespace {

// The port after the last ':' of a ready line, or 0.
int PortOf(const std::string& line) {
  const size_t colon = line.rfind(':');
  return colon == std::string::npos ? 0 : std::atoi(line.c_str() + colon + 1);
}

}  // namespace

bool WorkerProcess::Start(const std::string& model, const std::string& experts, int port,
                          const std::vector<std::string>& extra) {
  static int n = 0;
  const std::string log = absl::StrCat(TempDir(), "/worker-", experts, "-", ++n, ".log");
  std::vector<std::string> args = {"worker",
                                   "--model",
                                   model,
                                   "--experts",
                                   experts,
                                   "--listen",
                                   absl::StrCat("127.0.0.1:", port),
                                   "--threads",
                                   "1"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::string line;
  pid_ = SpawnMoepool(args, log, &line);
  port_ = PortOf(line);
  if (pid_ <= 0 || port_ <= 0) {
    ADD_FAILURE() << "worker did not start: " << line << ReadFileOrDie(log);
    return false;
  }
  return true;
}

void WorkerProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

std::string WorkerProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

bool ServeProcess::Start(const std::vector<std::string>& flags) {
  static int n = 0;
  log_ = absl::StrCat(TempDir(), "/serve", ++n, ".log");
  std::vector<std::string> args = {"serve", "--listen", "127.0.0.1:0", "--threads", "1"};
  bool parallel_given = false;
  for (const std::string& f : flags) parallel_given |= f == "--parallel";
  if (!parallel_given) args.insert(args.end(), {"--parallel", "1"});
  args.insert(args.end(), flags.begin(), flags.end());
  std::string line;
  pid_ = SpawnMoepool(args, log_, &line);
  port_ = PortOf(line);
  if (pid_ <= 0 || line.find("serving on") == std::string::npos || port_ <= 0) {
    ADD_FAILURE() << "serve did not start: " << line << ReadFileOrDie(log_);
    return false;
  }
  return true;
}

void ServeProcess::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

bool ServeProcess::alive() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

httplib::Client ServeProcess::Client() const {
  httplib::Client c("127.0.0.1", port_);
  c.set_read_timeout(300, 0);
  return c;
}

const std::string& TestCertDir() {
  static const std::string dir = [] {
    const std::string d = TempDir() + "/certs";
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string cmd = absl::StrCat(
        "mkdir -p ", d, " && cd ", d, " && (openssl req -x509 ", key,
        " -keyout ca.key -out ca.pem -days 2 -subj /CN=moepool-test-ca", " && openssl req ", key,
        " -keyout server.key -out server.csr -subj /CN=worker",
        " && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext",
        " && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial",
        " -out server.pem -days 2 -extfile san.ext", " && openssl req ", key,
        " -keyout client.key -out client.csr -subj /CN=coordinator",
        " && openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial",
        " -out client.pem -days 2) >log 2>&1");
    return std::system(cmd.c_str()) == 0 ? d : std::string();
  }();
  return dir;
}

bool ElasticServeProcess::Start(const std::string& model, const std::vector<std::string>& flags) {
  static int n = 0;
  log_ = absl::StrCat(TempDir(), "/elastic-serve", getpid(), "-", ++n, ".log");
  std::vector<std::string> args = {"serve",       "--model",     model,
                                   "--listen",    "127.0.0.1:0", "--cluster-listen",
                                   "127.0.0.1:0", "--threads",   "1"};
  args.insert(args.end(), flags.begin(), flags.end());
  pid_ = SpawnMoepoolLogged(args, log_);
  std::string control, serving;
  if (pid_ <= 0 || !WaitForLog(log_, "cluster control on", 60, &control) ||
      !WaitForLog(log_, "serving on http://", 60, &serving)) {
    ADD_FAILURE() << "elastic serve did not start:\n" << ReadFileOrDie(log_);
    return false;
  }
  control = control.substr(0, control.find(';'));
  control_port_ = PortOf(control);
  port_ = PortOf(serving);
  serve_view_.set_port(port_);
  return port_ > 0 && control_port_ > 0;
}

void ElasticServeProcess::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

std::string ElasticServeProcess::control_address() const {
  return absl::StrCat("127.0.0.1:", control_port_);
}

httplib::Client ElasticServeProcess::Client() const { return serve_view_.Client(); }

bool JoinedWorkerProcess::Spawn(const std::string& coordinator, const std::string& cache_dir,
                                const std::vector<std::string>& extra) {
  static int n = 0;
  if (port_ == 0) port_ = FreeLoopbackPort();
  log_ = absl::StrCat(TempDir(), "/joined-worker", getpid(), "-", ++n, ".log");
  std::vector<std::string> args = {"worker",  "--join",      coordinator, "--listen",
                                   address(), "--cache-dir", cache_dir,   "--threads",
                                   "1",       "--memory",    "1GiB"};
  args.insert(args.end(), extra.begin(), extra.end());
  pid_ = SpawnMoepoolLogged(args, log_);
  return pid_ > 0;
}

bool JoinedWorkerProcess::Start(const std::string& coordinator, const std::string& cache_dir,
                                const std::vector<std::string>& extra, double timeout_s) {
  if (!Spawn(coordinator, cache_dir, extra) || !WaitForLog(log_, "ready as", timeout_s)) {
    ADD_FAILURE() << "joined worker did not become ready:\n" << ReadFileOrDie(log_);
    return false;
  }
  return true;
}

void JoinedWorkerProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void JoinedWorkerProcess::Terminate() {
  if (pid_ > 0) kill(pid_, SIGTERM);
}

int JoinedWorkerProcess::Wait(double timeout_s) {
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int>(timeout_s * 1e3));
  while (pid_ > 0) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() > give_up) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

std::string JoinedWorkerProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

std::pair<int, nlohmann::json> GetJson(const ServeProcess& s, const std::string& path) {
  auto r = s.Client().Get(path);
  if (!r) return {0, nullptr};
  return {r->status, nlohmann::json::parse(r->body, nullptr, false)};
}

double MetricValue(const ServeProcess& s, const std::string& name) {
  auto r = s.Client().Get("/metrics");
  if (!r || r->status != 200) return -1;
  std::istringstream in(r->body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + " ", 0) == 0) return std::atof(line.c_str() + name.size() + 1);
  }
  return -1;
}

}  // namespace moepool::testing
