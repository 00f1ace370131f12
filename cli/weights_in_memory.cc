#include "cli/weights_in_memory.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/time.h"

namespace moepool::cli {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kResidentFloor = 0.9;

std::string Gib(uint64_t bytes) { return absl::StrFormat("%.1f GiB", bytes / kGiB); }

}  // namespace

void AddPreloadFlag(FlagSpec* spec) {
  spec->valued.insert("preload");
  spec->help["preload"] =
      "on|off  read the weights into memory before saying ready, so that the first request "
      "does not wait for the disk (default on)";
}

absl::StatusOr<bool> PreloadFromArgs(const Args& args) {
  const std::string v = args.Get("preload", "on");
  if (v != "on" && v != "off") return absl::InvalidArgumentError("--preload must be on or off");
  return v == "on";
}

absl::Status PreloadWeights(const Model& model, const std::string& who) {
  const uint64_t bytes = model.ExpertBytes() + model.NonExpertBytes();
  const HostMemory host = ReadHostMemory();
  if (host.Capacity() != 0 && bytes > host.Capacity()) {
    std::fprintf(stderr,
                 "%s: warning: its %s of weights exceed the %s this host can hold (%s); the "
                 "kernel will evict weights the next token needs again, and tokens will wait "
                 "for the disk. Give it fewer experts (moepool plan sizes a cluster)\n",
                 who.c_str(), Gib(bytes).c_str(), Gib(host.Capacity()).c_str(),
                 host.cgroup_limit != 0 && host.cgroup_limit == host.Capacity()
                     ? "its cgroup's memory limit"
                     : "MemTotal");
  }
  std::fprintf(stderr, "%s: reading %s of weights into memory\n", who.c_str(), Gib(bytes).c_str());
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = model.Preload();
  if (!s.ok()) return s;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "%s: weights in memory after %.1f s (%.0f MB/s)\n", who.c_str(), secs,
               bytes / 1e6 / std::max(secs, 1e-3));
  return absl::OkStatus();
}

ResidencyWatch::ResidencyWatch(const Model* model, std::string who, double period_s, Sink say)
    : model_(model),
      who_(std::move(who)),
      period_s_(period_s),
      say_(say ? std::move(say)
               : Sink([](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); })),
      thread_([this] { Run(); }) {}

ResidencyWatch::~ResidencyWatch() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void ResidencyWatch::Run() {
  const uint64_t bytes = model_->ExpertBytes() + model_->NonExpertBytes();
  if (bytes == 0) return;
  bool low = false;
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Seconds(period_s_))) {
    const double share = static_cast<double>(model_->ResidentWeightBytes()) / bytes;
    if (!low && share < kResidentFloor) {
      const HostMemory host = ReadHostMemory();
      say_(absl::StrFormat(
          "%s: warning: only %.0f%% of its %s of weights stay in memory (host: %s, %s "
          "available): too little memory for what runs on this host, so tokens wait for the "
          "disk. Run fewer experts or processes here (moepool plan)",
          who_, 100 * share, Gib(bytes), Gib(host.Capacity()), Gib(host.available)));
      low = true;
    } else if (low && share >= kResidentFloor) {
      say_(absl::StrFormat("%s: %.0f%% of its weights are in memory again", who_, 100 * share));
      low = false;
    }
  }
}

}  // namespace moepool::cli
