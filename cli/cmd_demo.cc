// moepool demo: the embedded default. Synthesizes a demo model on first use (random weights,
// real Mistral vocabulary), starts two local worker processes (experts 0-3 and 4-7) and the
// coordinator (`moepool serve --workers ...`), prints the ready line and a curl example, and
// stops everything on Ctrl-C. With --model, the same with a real GGUF file.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "engine/status_macros.h"
#include "engine/synth.h"

namespace moepool::cli {
namespace {

int Fail(const absl::Status& s) { return PrintError(s, "moepool demo"); }

struct Child {
  std::string name;
  pid_t pid = -1;
  FILE* out = nullptr;  // the child's stdout
};

// Starts this binary with `args`, stdout piped back; other streams inherited.
absl::StatusOr<Child> Spawn(const std::string& name, const std::vector<std::string>& args) {
  int fds[2];
  if (pipe(fds) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    dup2(fds[1], 1);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> argv;
    std::string self = "/proc/self/exe";
    argv.push_back(self.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  close(fds[1]);
  Child c;
  c.name = name;
  c.pid = pid;
  c.out = fdopen(fds[0], "r");
  return c;
}

// Reads the child's stdout until a line starting with `prefix`; returns that line.
absl::StatusOr<std::string> WaitForLine(Child& c, const std::string& prefix) {
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), c.out) != nullptr) {
    std::string line(buf);
    if (line.rfind(prefix, 0) == 0) {
      while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
      return line;
    }
  }
  return absl::UnavailableError(absl::StrCat(c.name, " exited before it was ready"));
}

void StopAll(std::vector<Child>& children) {
  for (auto& c : children) {
    if (c.pid > 0) kill(c.pid, SIGTERM);
  }
  for (auto& c : children) {
    if (c.pid > 0) waitpid(c.pid, nullptr, 0);
    if (c.out != nullptr) std::fclose(c.out);
    c.pid = -1;
    c.out = nullptr;
  }
}

std::string CacheDir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x) {
    return std::string(x) + "/moepool";
  }
  if (const char* h = std::getenv("HOME"); h != nullptr && *h) {
    return std::string(h) + "/.cache/moepool";
  }
  return "models";
}

absl::Status Demo(const Args& args) {
  std::string model = args.Get("model");
  bool synthetic = false;
  if (model.empty()) {
    const std::string shape = args.Get("shape", "tiny");
    model = absl::StrCat(CacheDir(), "/demo-", shape, "-Q4_K_M.gguf");
    synthetic = true;
    if (!std::filesystem::exists(model)) {
      std::filesystem::create_directories(std::filesystem::path(model).parent_path());
      std::fprintf(stderr,
                   "moepool demo: synthesizing a %s Mixtral-architecture model with RANDOM "
                   "weights (real Mistral vocabulary) at %s\n",
                   shape.c_str(), model.c_str());
      SynthOptions o;
      ASSIGN_OR_RETURN(o.shape, SynthShapeByName(shape));
      o.type = "Q4_K_M";
      o.seed = 1;
      o.vocab_path = FindDefaultVocab();
      o.out_path = model;
      RETURN_IF_ERROR(SynthesizeModel(o));
    }
  }
  const std::string threads = args.Get("threads", "1");
  const std::string listen = args.Get("listen", "127.0.0.1:8080");
  // A fresh cluster token for this demo's private cluster, passed through the environment.
  std::random_device rd;
  const std::string token = absl::StrCat(rd(), rd(), rd(), rd());
  setenv("MOEPOOL_CLUSTER_TOKEN", token.c_str(), 1);

  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGCHLD);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  std::vector<Child> children;
  std::vector<std::string> endpoints;
  for (const char* experts : {"0-3", "4-7"}) {
    auto child = Spawn(absl::StrCat("worker ", experts),
                       {"worker", "--model", model, "--experts", experts, "--listen", "127.0.0.1:0",
                        "--threads", threads, "--name", absl::StrCat("demo-", experts)});
    if (!child.ok()) {
      StopAll(children);
      return child.status();
    }
    children.push_back(*child);
    auto line = WaitForLine(children.back(), "moepool worker: serving");
    if (!line.ok()) {
      StopAll(children);
      return line.status();
    }
    const size_t at = line->rfind(" on ");
    std::string endpoint = line->substr(at + 4);
    if (const size_t sp = endpoint.find(' '); sp != std::string::npos) endpoint.resize(sp);
    endpoints.push_back(endpoint);
    std::fprintf(stderr, "%s\n", line->c_str());
  }
  auto serve = Spawn("coordinator", {"serve", "--model", model, "--workers",
                                     absl::StrCat(endpoints[0], ",", endpoints[1]), "--listen",
                                     listen, "--threads", threads});
  if (!serve.ok()) {
    StopAll(children);
    return serve.status();
  }
  children.push_back(*serve);
  auto ready = WaitForLine(children.back(), "moepool: serving on ");
  if (!ready.ok()) {
    StopAll(children);
    return ready.status();
  }
  const std::string url = ready->substr(std::string("moepool: serving on ").size());
  std::printf("%s\n", ready->c_str());
  std::printf("web console (workers, experts, chat): %s/\n", url.c_str());
  std::printf(
      "try:\n  curl %s/v1/chat/completions -H 'Content-Type: application/json' \\\n"
      "    -d '{\"model\": \"moepool\", \"messages\": [{\"role\": \"user\", \"content\": "
      "\"Hello!\"}], \"max_tokens\": 32}'\n",
      url.c_str());
  if (synthetic) {
    std::printf("(the demo model has random weights: its replies are gibberish by design)\n");
  }
  std::printf("Ctrl-C stops the coordinator and both workers.\n");
  std::fflush(stdout);

  int sig = 0;
  for (;;) {
    sigwait(&stop, &sig);
    if (sig != SIGCHLD) break;
    // A child exited on its own: stop the rest.
    bool lost = false;
    for (auto& c : children) {
      if (c.pid > 0 && waitpid(c.pid, nullptr, WNOHANG) == c.pid) {
        std::fprintf(stderr, "moepool demo: %s exited; stopping\n", c.name.c_str());
        c.pid = -1;
        lost = true;
      }
    }
    if (lost) {
      StopAll(children);
      return absl::UnavailableError("a demo process exited");
    }
  }
  std::fprintf(stderr, "moepool demo: stopping\n");
  StopAll(children);
  return absl::OkStatus();
}

}  // namespace

int RunDemo(int argc, char** argv) {
  FlagSpec spec = {{"model", "listen", "threads", "shape"}, {}};
  spec.usage = "moepool demo [flags]";
  spec.summary =
      "synthesize a demo model on first use, start two workers (experts 0-3, 4-7) and serve it";
  spec.help = {
      {"model", "PATH  serve this GGUF file instead of the synthetic demo model"},
      {"shape",
       "NAME  shape of the synthetic model: tiny, mini or mixtral-8x7b, made once and kept in "
       "$XDG_CACHE_HOME/moepool or ~/.cache/moepool (default tiny; not used with --model)"},
      {"listen", "HOST:PORT  where the coordinator's HTTP API listens (default 127.0.0.1:8080)"},
      {"threads", "N  compute threads of each worker and of the coordinator (default 1)"},
  };
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok()) return Fail(args.status());
  const absl::Status s = Demo(*args);
  return s.ok() ? 0 : Fail(s);
}

}  // namespace moepool::cli
