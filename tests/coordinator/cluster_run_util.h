// Runs that compare a cluster engine with a local one: three sequences stepped together, their
// logits, and the bit-for-bit comparison.
#ifndef MOEPOOL_TESTS_COORDINATOR_CLUSTER_RUN_UTIL_H_
#define MOEPOOL_TESTS_COORDINATOR_CLUSTER_RUN_UTIL_H_

#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace moepool::testing {

// Three sequences (prompts of 30, 20 and 1 tokens, then `n_decode` tokens each, fed from the
// prompts' own ids) in one or three micro-batches per step; the logits of every step.
absl::StatusOr<std::vector<float>> RunThree(Engine& e, bool pipelined, int n_decode = 3);

// Same size and the same bits everywhere (a test failure counting the differing logits).
void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_COORDINATOR_CLUSTER_RUN_UTIL_H_
