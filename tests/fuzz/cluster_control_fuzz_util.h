// What cluster_control_fuzzer's target (cluster_control_fuzzer.cc) and its seeds
// (cluster_control_seeds.h) share: the operations of an input, the synthesized model and its
// expert tensors, and the fake workers the backend talks to instead of the network.
//
// Threading: one thread (the fuzz target's), except FakeWorkers, which the backend may reach
// from its own threads.
#ifndef MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_FUZZ_UTIL_H_
#define MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_FUZZ_UTIL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "coordinator/cluster_control.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/model.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool::testing::control_fuzz {

inline constexpr char kTarget[] = "cluster_control_fuzzer";
inline constexpr const char* kKinds[] = {"gate", "up", "down"};

// An input is a sequence of operations: a selector byte (an Op, modulo kNumOps), a 2-byte
// little-endian length and that many bytes of payload (cluster_control_fuzzer.cc).
enum Op : uint8_t {
  kJoin,
  kFetch,
  kReady,
  kWatch,
  kLeave,
  kDrain,
  kView,
  kDescribe,
  kHonest,
  kRebalance,  // a placement change read from the input (the rebalancer's moves)
  kNumOps
};

// Unless `ok`: FuzzFail(kTarget, `what`).
void Check(bool ok, const std::string& what);

// What the fake workers answer to Describe, and whether the backend took one in (a link was
// started: AddWorker succeeded).
struct FakeWorkers {
  std::mutex mu;
  std::optional<::moepool::v1::DescribeResponse> answer;  // none: UNAVAILABLE
  bool backend_changed = false;
};

// The process's one FakeWorkers.
FakeWorkers& Workers();

// An elastic ClusterExpertBackend (no static workers, local fallback on) of a synthesized "tiny"
// model (Q4_0: quick to synthesize, made once per process) whose links are fake: Describe
// answers as Workers() says, a started link marks Workers().backend_changed, and a job fails as
// on a lost connection. Aborts on failure.
std::unique_ptr<ClusterExpertBackend> MakeBackend();

// The canonical shard name of an expert tensor: blk.L.ffn_{kind}.E.weight.
std::string TensorName(int layer, const char* kind, int expert);

// The gate (kind 0), up (1) or down (2) matrix of expert `expert` in `layer`.
const WeightMatrix& MatrixOf(const Model& model, int layer, int kind, int expert);

// The matrix of a canonical shard tensor name, or nullptr.
const WeightMatrix* FindMatrix(const Model& model, const std::string& name);

// This model's identity as a worker holding every pair would report it.
::moepool::v1::DescribeResponse HonestAnswer(const ClusterControl& control, const Model& model);

}  // namespace moepool::testing::control_fuzz

#endif  // MOEPOOL_TESTS_FUZZ_CLUSTER_CONTROL_FUZZ_UTIL_H_
