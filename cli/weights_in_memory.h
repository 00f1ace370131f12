// The long-running commands (`serve`, `worker`) read their weights into memory before they say
// they are ready, and watch that the weights stay there.
//
// Without this a process is "ready" in a fraction of a second, but its first request reads every
// weight it touches from the disk and faults it in page by page: on a 21 GiB Mixtral-8x7B
// Q3_K_M that was 34 s to the first token from a cold page cache and 8.6 s from a warm one
// (docs/fullsize.md). When the host has less memory than what runs on it, the kernel evicts
// weights that the next token needs again (page-cache thrash: tokens wait for the disk);
// nothing said so before ResidencyWatch.
#ifndef MOEPOOL_CLI_WEIGHTS_IN_MEMORY_H_
#define MOEPOOL_CLI_WEIGHTS_IN_MEMORY_H_

#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "cli/args.h"
#include "engine/host_memory.h"
#include "engine/model.h"

namespace moepool::cli {

// `--preload on|off` (default on), with its --help line.
void AddPreloadFlag(FlagSpec* spec);
absl::StatusOr<bool> PreloadFromArgs(const Args& args);

// Reads the model's bound weights into memory (Model::Preload) with one line on stderr before
// ("<who>: reading 10.0 GiB of weights into memory") and one after (time and rate), and a
// warning first when they exceed what the host can hold. The model's error if it cannot be read.
absl::Status PreloadWeights(const Model& model, const std::string& who);

// After PreloadWeights: checks every `period_s` seconds, on its own thread, how much of the
// model's bound weights is still resident (Model::ResidentWeightBytes), and says so once when it
// falls below 90% (with what to do) and once when it is back: to `say`, by default a line on
// stderr. Destroying it stops the thread. `model` is borrowed and must outlive it.
class ResidencyWatch {
 public:
  using Sink = std::function<void(const std::string& line)>;
  ResidencyWatch(const Model* model, std::string who, double period_s = 10.0, Sink say = {});
  ~ResidencyWatch();
  ResidencyWatch(const ResidencyWatch&) = delete;
  ResidencyWatch& operator=(const ResidencyWatch&) = delete;

 private:
  void Run();

  const Model* model_;
  const std::string who_;
  const double period_s_;
  const Sink say_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_WEIGHTS_IN_MEMORY_H_
