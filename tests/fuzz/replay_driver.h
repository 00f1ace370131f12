// The main() of a fuzz target outside the fuzzing configuration (the replay build, run by ctest):
// the target's seeds, single-byte corruptions of them and the files named on the command line go
// through LLVMFuzzerTestOneInput, which the target defines. The libFuzzer build does not link
// this: libFuzzer has its own main().
//
//   TARGET [PATH...]            replays the seeds, then every file named (or inside a directory
//                               named) that is not one of them, each input once, with its
//                               corruptions; a PATH that does not exist is a failure
//   TARGET --one FILE...        runs only those inputs, as they are, without corruptions (to
//                               reproduce a finding)
//   TARGET --write-seeds DIR    writes the seeds there as files named after them (a starting
//                               corpus for libFuzzer)
//
// Prints "TARGET: N inputs, no failure" at the end of a replay; a failing input aborts in the
// target itself.
#ifndef MOEPOOL_TESTS_FUZZ_REPLAY_DRIVER_H_
#define MOEPOOL_TESTS_FUZZ_REPLAY_DRIVER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace moepool::testing {

struct ReplayOptions {
  // The program's name in its messages.
  std::string target;
  // Named inputs: file names for --write-seeds, replayed first.
  std::vector<std::pair<std::string, std::string>> seeds;
  // The byte after `at` to corrupt (XOR 0x5a, one at a time): an input of n bytes is also run
  // with byte 0, NextCorruption(0), ... changed while below n. Every 7th byte when not set.
  std::function<size_t(size_t at)> next_corruption;
  // Reports a command-line error (a missing input, an unwritable seed) and does not return.
  // When not set: prints "`target`: `what`" on stderr and aborts (a target that silences stderr,
  // as fuzz_model_util.h's QuietStderr does, passes its own).
  std::function<void(const std::string& what)> fail;
};

// Runs the command line `argc`/`argv` as above; returns main()'s exit code.
int RunReplayDriver(int argc, char** argv, const ReplayOptions& options);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_FUZZ_REPLAY_DRIVER_H_
