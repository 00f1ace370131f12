#include "tests/fuzz/cluster_control_seeds.h"

#include <algorithm>
#include <cstdint>

#include "coordinator/expert_placement.h"
#include "google/protobuf/message_lite.h"
#include "moepool/v1/cluster_service.pb.h"
#include "moepool/v1/expert_service.pb.h"
#include "tests/fuzz/cluster_control_fuzz_util.h"

namespace moepool::testing::control_fuzz {
namespace {

namespace pb = ::moepool::v1;

// Builds an input, operation by operation.
class Script {
 public:
  Script& Add(Op op, const google::protobuf::MessageLite& m) {
    return Raw(op, m.SerializeAsString());
  }
  Script& Raw(Op op, const std::string& payload) {
    const size_t len = std::min<size_t>(payload.size(), 0xffff);
    bytes_.push_back(static_cast<char>(op));
    bytes_.push_back(static_cast<char>(len & 0xff));
    bytes_.push_back(static_cast<char>(len >> 8));
    bytes_.append(payload, 0, len);
    return *this;
  }
  Script& Do(Op op) { return Raw(op, ""); }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

pb::JoinRequest JoinOf(const std::string& address, uint64_t memory) {
  pb::JoinRequest r;
  r.set_protocol_version(pb::CLUSTER_PROTOCOL_VERSION_CURRENT);
  r.set_advertise_address(address);
  r.mutable_capacity()->set_device("cpu");
  r.mutable_capacity()->set_memory_bytes(memory);
  r.mutable_capacity()->set_threads(4);
  return r;
}

pb::FetchRequest FetchOf(const std::string& id, const std::string& tensor, uint64_t offset) {
  pb::FetchRequest r;
  r.set_worker_id(id);
  r.set_tensor(tensor);
  r.set_offset(offset);
  return r;
}

template <typename M>
M WorkerMessage(const std::string& id) {
  M m;
  m.set_worker_id(id);
  return m;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> Seeds(const Model& model,
                                                       const pb::DescribeResponse& honest) {
  const std::string fingerprint = honest.model().fingerprint();
  const uint64_t pair_bytes = MatrixOf(model, 0, 0, 0).SizeBytes() +
                              MatrixOf(model, 0, 1, 0).SizeBytes() +
                              MatrixOf(model, 0, 2, 0).SizeBytes();
  const uint64_t gate_bytes = MatrixOf(model, 0, 0, 0).SizeBytes();
  const uint64_t down_bytes = MatrixOf(model, 3, 2, 7).SizeBytes();
  constexpr uint64_t kGiB = uint64_t{1} << 30;
  const auto ready = [](const std::string& id) { return WorkerMessage<pb::ReadyRequest>(id); };
  const auto watch = [](const std::string& id) { return WorkerMessage<pb::WatchRequest>(id); };
  std::vector<std::pair<std::string, std::string>> seeds;  // name, bytes

  // A join and the view.
  seeds.emplace_back("join-view",
                     Script().Add(kJoin, JoinOf("0.0.0.0:7001", kGiB)).Do(kView).bytes());
  // Fetches: whole, from an offset, at the end, past it, unassigned, unknown worker.
  seeds.emplace_back("fetch",
                     Script()
                         .Add(kJoin, JoinOf("0.0.0.0:7001", kGiB))
                         .Add(kFetch, FetchOf("w0", "blk.0.ffn_gate.0.weight", 0))
                         .Add(kFetch, FetchOf("w0", "blk.3.ffn_down.7.weight", 1000))
                         .Add(kFetch, FetchOf("w0", "blk.2.ffn_up.5.weight", 60000))
                         .Add(kFetch, FetchOf("w0", "blk.0.ffn_gate.0.weight", gate_bytes - 5))
                         .Add(kFetch, FetchOf("w0", "blk.3.ffn_down.7.weight", down_bytes))
                         .Add(kFetch, FetchOf("w0", "blk.3.ffn_down.7.weight", down_bytes + 1))
                         .Add(kFetch, FetchOf("w0", "blk.9.ffn_up.0.weight", 0))
                         .Add(kFetch, FetchOf("w0", "token_embd.weight", 0))
                         .Add(kFetch, FetchOf("w7", "blk.0.ffn_gate.0.weight", 0))
                         .Do(kView)
                         .bytes());
  // An unreachable worker: Ready fails, it is gone, joins again under its id.
  seeds.emplace_back("ready-unreachable",
                     Script()
                         .Add(kJoin, JoinOf("10.0.0.5:7001", kGiB))
                         .Add(kReady, ready("w0"))
                         .Add(kFetch, FetchOf("w0", "blk.0.ffn_up.0.weight", 0))
                         .Add(kWatch, watch("w0"))
                         .Add(kJoin, JoinOf("10.0.0.5:7001", kGiB))
                         .Add(kReady, ready("w0"))
                         .Add(kReady, ready("w1"))
                         .Do(kView)
                         .bytes());
  // A worker that serves: Ready, then its control stream breaks.
  seeds.emplace_back("ready-then-stream-breaks", Script()
                                                     .Add(kJoin, JoinOf("[::]:7001", kGiB))
                                                     .Do(kHonest)
                                                     .Add(kReady, ready("w0"))
                                                     .Add(kReady, ready("w0"))
                                                     .Do(kView)
                                                     .Add(kWatch, watch("w0"))
                                                     .Do(kView)
                                                     .bytes());
  // Two workers: the second takes half of the first's pairs, which hands them over at its
  // Ready; then both leave.
  pb::LeaveRequest leave = WorkerMessage<pb::LeaveRequest>("w0");
  leave.set_reason("SIGTERM");
  seeds.emplace_back("handover-then-leave",
                     Script()
                         .Add(kJoin, JoinOf("10.0.0.1:7001", kGiB))
                         .Do(kHonest)
                         .Add(kReady, ready("w0"))
                         .Add(kJoin, JoinOf("10.0.0.2:7002", kGiB))
                         .Add(kFetch, FetchOf("w1", "blk.0.ffn_gate.7.weight", 0))
                         .Add(kReady, ready("w1"))
                         .Do(kView)
                         .Add(kLeave, leave)
                         .Add(kWatch, watch("w0"))
                         .Raw(kDrain, "w1")
                         .Add(kWatch, watch("w1"))
                         .Do(kView)
                         .bytes());
  // The donor's control stream hears which pairs it released, then breaks.
  seeds.emplace_back("released-then-stream-breaks",
                     Script()
                         .Add(kJoin, JoinOf("10.0.0.1:7001", kGiB))
                         .Do(kHonest)
                         .Add(kReady, ready("w0"))
                         .Add(kJoin, JoinOf("10.0.0.2:7002", 6 * pair_bytes))
                         .Add(kReady, ready("w1"))
                         .Add(kWatch, watch("w0"))
                         .Do(kView)
                         .bytes());
  // A ready worker is lost (its stream breaks); the other, with room in its budget, is asked to
  // join again for the lost experts.
  seeds.emplace_back("lost-then-rejoin-offer", Script()
                                                   .Add(kJoin, JoinOf("10.0.0.1:7001", kGiB))
                                                   .Do(kHonest)
                                                   .Add(kReady, ready("w0"))
                                                   .Add(kJoin, JoinOf("10.0.0.2:7002", kGiB))
                                                   .Add(kReady, ready("w1"))
                                                   .Add(kWatch, watch("w0"))
                                                   .Add(kWatch, watch("w1"))
                                                   .Do(kView)
                                                   .bytes());
  // A cache: its pairs first (beyond the fair share when memory allows), another model's
  // ignored, a pair outside the model refused.
  pb::JoinRequest cached = JoinOf("10.0.0.3:7003", 3 * pair_bytes);
  pb::CachedModel* entry = cached.add_cache();
  entry->set_model_fingerprint(fingerprint);
  for (const auto& [l, e] : std::vector<std::pair<int, int>>{{0, 0}, {1, 2}, {3, 7}}) {
    entry->mutable_experts()->add_packed(moepool::PackExpertPair(l, e));
  }
  pb::JoinRequest other = JoinOf("10.0.0.4:7004", kGiB);
  other.add_cache()->set_model_fingerprint("0123456789abcdef0123456789abcdef");
  other.mutable_cache(0)->mutable_experts()->add_packed(moepool::PackExpertPair(2, 2));
  pb::JoinRequest outside = JoinOf("10.0.0.6:7006", kGiB);
  outside.add_cache()->set_model_fingerprint(fingerprint);
  outside.mutable_cache(0)->mutable_experts()->add_packed(moepool::PackExpertPair(9, 0));
  seeds.emplace_back(
      "cache", Script().Add(kJoin, outside).Add(kJoin, cached).Add(kJoin, other).Do(kView).bytes());
  // Refusals: protocol versions, addresses, budgets, sizes.
  pb::JoinRequest v0 = JoinOf("0.0.0.0:7001", kGiB);
  v0.set_protocol_version(pb::CLUSTER_PROTOCOL_VERSION_UNSPECIFIED);
  pb::JoinRequest v2 = JoinOf("0.0.0.0:7001", kGiB);
  v2.set_protocol_version(static_cast<pb::ClusterProtocolVersion>(2));
  pb::JoinRequest many = JoinOf("0.0.0.0:7001", kGiB);
  for (int i = 0; i < 17; ++i) many.add_cache()->set_model_fingerprint(fingerprint);
  seeds.emplace_back("join-refusals", Script()
                                          .Add(kJoin, v0)
                                          .Add(kJoin, v2)
                                          .Add(kJoin, JoinOf("nohost", kGiB))
                                          .Add(kJoin, JoinOf("h:0", kGiB))
                                          .Add(kJoin, JoinOf("h:70000", kGiB))
                                          .Add(kJoin, JoinOf("h:-1", kGiB))
                                          .Add(kJoin, JoinOf(std::string(300, 'a') + ":1", kGiB))
                                          .Add(kJoin, JoinOf("h:1", 0))
                                          .Add(kJoin, JoinOf("h:1", 1))
                                          .Add(kJoin, many)
                                          .Do(kView)
                                          .bytes());
  // Nothing left to assign while the first worker fetches everything.
  seeds.emplace_back("nothing-to-assign", Script()
                                              .Add(kJoin, JoinOf("10.0.0.1:7001", kGiB))
                                              .Add(kJoin, JoinOf("10.0.0.2:7001", kGiB))
                                              .Do(kView)
                                              .bytes());
  // Describe answers the check refuses: a missing pair, another model, other hyperparameters,
  // another protocol version.
  pb::DescribeResponse missing = honest;
  missing.mutable_experts()->mutable_packed()->erase(missing.mutable_experts()->packed().begin());
  pb::DescribeResponse another = honest;
  another.mutable_model()->set_fingerprint("0123456789abcdef0123456789abcdef");
  pb::DescribeResponse hparams = honest;
  hparams.mutable_hparams()->set_n_expert(honest.hparams().n_expert() + 1);
  pb::DescribeResponse protocol = honest;
  protocol.set_protocol_version(pb::PROTOCOL_VERSION_UNSPECIFIED);
  Script hostile;  // the same address each time: the same id
  for (const pb::DescribeResponse* d : {&missing, &another, &hparams, &protocol}) {
    hostile.Add(kJoin, JoinOf("10.0.0.7:7007", kGiB)).Add(kDescribe, *d).Add(kReady, ready("w0"));
  }
  seeds.emplace_back("describe-refused", hostile.Raw(kDescribe, "").Do(kView).bytes());
  // Drains by id: known, repeated, empty, not UTF-8; then the drained worker's Watch and Leave.
  seeds.emplace_back("drain-ids", Script()
                                      .Add(kJoin, JoinOf("10.0.0.8:7008", kGiB))
                                      .Raw(kDrain, "w0")
                                      .Raw(kDrain, "w0")
                                      .Raw(kDrain, "")
                                      .Raw(kDrain, "w\xff\xfe")
                                      .Add(kWatch, watch("w0"))
                                      .Add(kLeave, WorkerMessage<pb::LeaveRequest>("w0"))
                                      .Do(kView)
                                      .bytes());
  // A serving worker joins again from the same address (a restart not yet noticed): the old
  // registration is drained and its index reused.
  seeds.emplace_back("rejoin-while-serving",
                     Script()
                         .Add(kJoin, JoinOf("10.0.0.9:7009", kGiB))
                         .Do(kHonest)
                         .Add(kReady, ready("w0"))
                         .Add(kJoin, JoinOf("0.0.0.0:7009", kGiB))
                         .Add(kFetch, FetchOf("w0", "blk.1.ffn_down.3.weight", 0))
                         .Add(kReady, ready("w0"))
                         .Do(kView)
                         .Raw(kDrain, "w0")
                         .Do(kView)
                         .bytes());
  // Findings, failing until cluster_control.cc is fixed (last: the others run first). Three workers
  // join while the first serves everything, each taking its share from it before the others are
  // ready: together they take all of its pairs, and it is left ready with none.
  Script emptied;
  emptied.Add(kJoin, JoinOf("10.0.0.1:7001", kGiB)).Do(kHonest).Add(kReady, ready("w0"));
  emptied.Add(kJoin, JoinOf("10.0.0.2:7002", kGiB)).Add(kJoin, JoinOf("10.0.0.3:7003", kGiB));
  emptied.Add(kJoin, JoinOf("10.0.0.4:7004", kGiB));
  emptied.Add(kReady, ready("w1")).Add(kReady, ready("w2")).Add(kReady, ready("w3"));
  seeds.emplace_back("fixed-donor-left-without-experts", Script(emptied).Do(kView).bytes());
  // Then it is lost: every ready worker is asked to join again for its experts, of which there
  // are none.
  seeds.emplace_back("fixed-rejoin-for-lost-worker-without-experts",
                     Script(emptied).Add(kWatch, watch("w0")).Add(kWatch, watch("w1")).bytes());
  return seeds;
}

}  // namespace moepool::testing::control_fuzz
