// Shared fixtures of the coordinator tests: a tiny random-weight model synthesized once per test
// process, and an engine over it.
#ifndef MOEPOOL_TESTS_COORDINATOR_SERVE_TEST_UTIL_H_
#define MOEPOOL_TESTS_COORDINATOR_SERVE_TEST_UTIL_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/scheduler.h"
#include "engine/engine.h"

namespace moepool::testing {

// Path of the tiny synthesized model (F16 weights, the bundled Mistral vocabulary, no chat
// template), written to TempDir() on first use.
const std::string& TinyModelPath();

// An engine over the tiny model with `n_ctx` positions per sequence and one thread (a spinning pool
// on a busy CI machine is slow).
std::unique_ptr<Engine> LoadTinyEngine(int64_t n_ctx);
// The same with attention, router and head behind the backend `attention` makes.
std::unique_ptr<Engine> LoadTinyEngine(int64_t n_ctx, decltype(EngineOptions::attention) attention);

// Everything a stream produced, up to its final event.
struct Drained {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<std::string> deltas;
  FinishReason finish = FinishReason::kNone;
  absl::Status error;
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;
  int64_t completion_tokens = 0;
  bool timed_out = false;
};

// Reads `stream` to its final event (giving up after `limit`).
Drained Drain(GenerationStream* stream, std::chrono::seconds limit = std::chrono::seconds(300));

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_COORDINATOR_SERVE_TEST_UTIL_H_
