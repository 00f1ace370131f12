// The seed inputs of cluster_control_fuzzer: valid exchanges and refusals, in the input format of
// cluster_control_fuzz_util.h (written by --write-seeds, committed under tests/fuzz/corpus/control
// and replayed by ctest ClusterControlFuzzerReplay with corruptions of them). fixed-* seeds
// reproduce fixed findings.
#ifndef MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_SEEDS_H_
#define MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_SEEDS_H_

#include <string>
#include <utility>
#include <vector>

#include "engine/model.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool::testing::control_fuzz {

// (name, bytes) of each seed, for the backend's `model`; `honest` is HonestAnswer() of it.
std::vector<std::pair<std::string, std::string>> Seeds(
    const Model& model, const ::moepool::v1::DescribeResponse& honest);

}  // namespace moepool::testing::control_fuzz

#endif  // MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_SEEDS_H_
