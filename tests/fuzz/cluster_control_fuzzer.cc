// Fuzz target for the coordinator's control-service handlers (coordinator/cluster_control.h)
// under hostile workers: a byte string is a sequence of operations, each one selector byte, a
// 2-byte little-endian length and that many bytes, run against a fresh ClusterControl over an
// elastic ClusterExpertBackend (no static workers, local fallback on) of a synthesized "tiny"
// model (Q4_0: quick to synthesize). Selector (byte % 9) and payload:
//
//   0 Join      JoinRequest (from peer host 10.0.0.9)
//   1 Fetch     FetchRequest; the stream is read for 64 chunks, then the client goes away
//   2 Ready     ReadyRequest; the backend Describes the worker through a fake link (below)
//   3 Watch     WatchRequest; the client is gone at once (the call never blocks)
//   4 Leave     LeaveRequest, handed to Drain as the gRPC service does
//   5 Drain     the raw bytes as a worker id (POST /v1/cluster/workers/{id}/drain)
//   6 View      none (GET /v1/cluster)
//   7 Describe  DescribeResponse: what the fake workers answer from now on (empty: UNAVAILABLE,
//               the start of every input)
//   8 Honest    none: the fake workers answer with this model's identity and every pair
//
// A payload that does not parse skips the operation. Every call must return one of its
// documented codes, never crash, hang or leak, and what it returns must hold: a Join's
// assignment fits the worker's memory and its tensors are this model's (names, shapes, XXH3
// checksums), a Fetch streams the tensor's own bytes in order from the offset asked for, the
// placement version never goes down, a Watch writes releases of pairs inside the model, a
// rejoin offer only once some gone worker had experts, and a drained event last exactly when it
// returns OK, and View() is valid JSON (placement_version >= 1, every state one of joining/
// fetching/ready/draining/gone, pairs inside the model, a ready worker with experts: a donor
// keeps at least a share).
//
// The backend is made once per process and made again after an input in which a worker was
// added to it (a successful Ready), so every input starts from the same state; its links are a
// fake WorkerLink that never touches the network (cluster_control_fuzz_util.h). Lost workers'
// experts are offered at once (reassign_after_s = 0), so nothing depends on the clock.
//
// With clang in the fuzzing configuration (tests/fuzz/run_fuzz.sh ... control; coordinator/
// built with -fsanitize=fuzzer-no-link,address) this is a libFuzzer target. Otherwise it is a
// replay driver (ctest ClusterControlFuzzerReplay; tests/fuzz/replay_driver.h): it runs the
// target over the seeds of cluster_control_seeds.h (valid exchanges and refusals; fixed-* ones
// reproduce fixed findings), their single-byte corruptions, and the files and directories named
// on the command line; --write-seeds DIR writes the seeds as files, --one FILE... runs just those
// inputs.
#include <xxhash.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/cluster_control.h"
#include "coordinator/cluster_expert_backend.h"
#include "coordinator/expert_placement.h"
#include "engine/model.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/cluster_control_fuzz_util.h"
#include "tests/fuzz/fuzz_model_util.h"

namespace moepool::testing::control_fuzz {
namespace {

namespace pb = ::moepool::v1;

// A whole tensor of the model (110592 bytes) takes 108 chunks: a Fetch from the start is cut
// off by the client, one from past 44 KiB runs to the end.
constexpr size_t kChunkBytes = 1024;
constexpr int kMaxChunks = 64;
constexpr char kPeerHost[] = "10.0.0.9";

std::unique_ptr<ClusterExpertBackend>& Backend() {
  static auto* b = new std::unique_ptr<ClusterExpertBackend>;
  return *b;
}

void CheckCode(const absl::Status& s, std::initializer_list<absl::StatusCode> allowed,
               const char* call) {
  moepool::testing::FuzzTrace(kTarget, absl::StrCat(call, ": ", s.ToString()));
  for (const absl::StatusCode code : allowed) {
    if (s.code() == code) return;
  }
  moepool::testing::FuzzFail(kTarget, absl::StrCat(call, " returned ", s.ToString()));
}

// One input's run: a fresh registry over the process's backend.
class Session {
 public:
  Session(ClusterExpertBackend* backend, const pb::DescribeResponse* honest)
      : model_(backend->model()), control_(backend, ControlOptions()), honest_(honest) {}

  static moepool::ClusterControlOptions ControlOptions() {
    moepool::ClusterControlOptions o;
    o.fetch_chunk_bytes = kChunkBytes;
    // A lost worker's experts are offered at once (KIND_REJOIN), not after a wall-clock delay:
    // the same input does the same thing every time.
    o.reassign_after_s = 0;
    return o;
  }

  const ClusterControl& control() const { return control_; }

  void Run(uint8_t selector, const uint8_t* p, size_t n) {
    const int size = static_cast<int>(n);
    switch (static_cast<Op>(selector % kNumOps)) {
      case kJoin:
        if (pb::JoinRequest r; r.ParseFromArray(p, size)) Join(Trace("Join", r));
        break;
      case kFetch:
        if (pb::FetchRequest r; r.ParseFromArray(p, size)) Fetch(Trace("Fetch", r));
        break;
      case kReady:
        if (pb::ReadyRequest r; r.ParseFromArray(p, size)) Ready(Trace("Ready", r));
        break;
      case kWatch:
        if (pb::WatchRequest r; r.ParseFromArray(p, size)) Watch(Trace("Watch", r));
        break;
      case kLeave:
        if (pb::LeaveRequest r; r.ParseFromArray(p, size)) {
          Trace("Leave", r);
          // As ClusterServer's Leave.
          const std::string reason =
              r.reason().empty() ? "the worker asked to leave" : r.reason().substr(0, 200);
          CheckCode(control_.Drain(r.worker_id(), reason),
                    {absl::StatusCode::kOk, absl::StatusCode::kNotFound}, "Leave");
        }
        break;
      case kDrain:
        CheckCode(control_.Drain(std::string(reinterpret_cast<const char*>(p), n),
                                 "drain requested over HTTP"),
                  {absl::StatusCode::kOk, absl::StatusCode::kNotFound}, "Drain");
        break;
      case kView:
        moepool::testing::FuzzTrace(kTarget, "View");
        View();
        break;
      case kDescribe: {
        FakeWorkers& w = Workers();
        pb::DescribeResponse d;
        if (n > 0 && !d.ParseFromArray(p, size)) break;
        Trace("Describe answers", d);
        std::lock_guard<std::mutex> lock(w.mu);
        if (n == 0) {
          w.answer.reset();
        } else {
          w.answer = std::move(d);
        }
        break;
      }
      case kHonest: {
        FakeWorkers& w = Workers();
        moepool::testing::FuzzTrace(kTarget, "Describe answers honestly");
        std::lock_guard<std::mutex> lock(w.mu);
        w.answer = *honest_;
        break;
      }
      case kRebalance:
        Rebalance(p, n);
        break;
      case kNumOps:
        break;
    }
  }

  // A placement change to a target read from the input: each two bytes move one pair of a
  // worker to another (what the rebalancer plans), then the change advances as far as it can.
  void Rebalance(const uint8_t* p, size_t n) {
    const std::vector<moepool::RebalanceWorker> workers = control_.RebalanceWorkers();
    std::vector<std::vector<moepool::ExpertPair>> target;
    for (const auto& w : workers) target.push_back(w.pairs);
    for (size_t i = 0; i + 1 < n && !target.empty(); i += 2) {
      auto& from = target[p[i] % target.size()];
      if (from.empty()) continue;
      const auto at = from.begin() + static_cast<std::ptrdiff_t>(p[i + 1] % from.size());
      const moepool::ExpertPair pair = *at;
      from.erase(at);
      target[(p[i] / target.size()) % target.size()].push_back(pair);
    }
    moepool::testing::FuzzTrace(kTarget, absl::StrCat("Rebalance over ", workers.size()));
    CheckCode(control_.StartPlacementChange(workers, target),
              {absl::StatusCode::kOk, absl::StatusCode::kFailedPrecondition}, "Rebalance");
    control_.AdvancePlacementChange();
  }

  // GET /v1/cluster: valid JSON, and what it says is possible.
  void View() {
    const nlohmann::json view = control_.View();
    std::string text;
    try {
      text = view.dump();
    } catch (const nlohmann::json::exception& e) {
      moepool::testing::FuzzFail(kTarget, absl::StrCat("View() does not serialize: ", e.what()));
    }
    const nlohmann::json back = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    Check(!back.is_discarded() && back == view, "View() is not valid JSON: " + text);
    Check(view.is_object(), "View() is not an object");
    const auto version = view.find("placement_version");
    Check(version != view.end() && version->is_number_unsigned(), "no placement_version");
    SeeVersion(version->get<uint64_t>(), "View");
    Check(view.value("model_fingerprint", "") == control_.model_fingerprint(),
          "View() names another model");
    Check(view.value("local_fallback", false), "local_fallback off");
    const moepool::ModelConfig& c = model_.config();
    const auto fallback = view.find("fallback_expert_pairs");
    Check(fallback != view.end() && fallback->is_number_unsigned() &&
              fallback->get<uint64_t>() <= static_cast<uint64_t>(c.n_layer * c.n_expert),
          "fallback_expert_pairs out of range");
    const auto workers = view.find("workers");
    Check(workers != view.end() && workers->is_array(), "no workers array");
    static const std::set<std::string> kStates = {"joining", "fetching", "ready", "draining",
                                                  "gone"};
    std::set<std::string> ids;
    for (const nlohmann::json& w : *workers) {
      Check(w.is_object() && w.contains("id") && w["id"].is_string(), "a worker without an id");
      Check(ids.insert(w["id"].get<std::string>()).second, "two workers with one id");
      Check(w.contains("state") && w["state"].is_string() &&
                kStates.count(w["state"].get<std::string>()) > 0,
            "a worker in state " + w.value("state", std::string("(none)")));
      Check(w.value("joined", false), "a joined-only cluster lists a static worker");
      Check(w.contains("experts") && w["experts"].is_array(), "a worker without experts");
      // A donor keeps at least a share (cluster_control.h), so a serving worker has experts.
      Check(w["state"] != "ready" || !w["experts"].empty(),
            "worker " + w["id"].get<std::string>() + " is ready with no experts: " + view.dump());
      for (const nlohmann::json& pair : w["experts"]) {
        Check(pair.is_array() && pair.size() == 2 && pair[0].is_number_integer() &&
                  pair[1].is_number_integer(),
              "an expert pair that is not [layer, expert]");
        const int64_t l = pair[0].get<int64_t>(), e = pair[1].get<int64_t>();
        Check(l >= 0 && l < c.n_layer && e >= 0 && e < c.n_expert,
              absl::StrCat("a worker holds pair (", l, ", ", e, ") outside the model"));
      }
    }
  }

 private:
  template <typename M>
  static const M& Trace(const char* what, const M& m) {
    if (moepool::testing::FuzzVerbose()) {
      moepool::testing::FuzzTrace(kTarget, absl::StrCat(what, " ", m.ShortDebugString()));
    }
    return m;
  }

  void SeeVersion(uint64_t v, const char* where) {
    Check(v >= 1, absl::StrCat(where, ": placement version ", v));
    Check(v >= version_,
          absl::StrCat(where, ": placement version went from ", version_, " to ", v));
    version_ = v;
  }

  void Join(const pb::JoinRequest& r) {
    const absl::StatusOr<pb::JoinResponse> got = control_.Join(r, kPeerHost);
    if (!got.ok()) {
      CheckCode(got.status(),
                {absl::StatusCode::kFailedPrecondition, absl::StatusCode::kInvalidArgument,
                 absl::StatusCode::kResourceExhausted, absl::StatusCode::kUnavailable},
                "Join");
      return;
    }
    const pb::JoinResponse& j = *got;
    moepool::testing::FuzzTrace(kTarget, absl::StrCat("Join: OK, ", j.worker_id(), ", ",
                                                      j.experts().packed_size(), " pairs"));
    const moepool::ModelConfig& c = model_.config();
    Check(j.worker_id().size() >= 2 && j.worker_id()[0] == 'w', "worker id " + j.worker_id());
    Check(j.model().fingerprint() == control_.model_fingerprint(), "Join names another model");
    Check(j.hparams().n_embd() == c.n_embd && j.hparams().n_ff() == c.n_ff &&
              j.hparams().n_layer() == c.n_layer && j.hparams().n_expert() == c.n_expert &&
              j.hparams().n_expert_used() == c.n_expert_used,
          "Join sends other hyperparameters");
    SeeVersion(j.placement_version(), "Join");
    const auto& packed = j.experts().packed();
    Check(!packed.empty(), "an accepted Join with no experts");
    Check(j.tensors_size() == 3 * packed.size(), "Join: not 3 tensors per pair");
    uint64_t bytes = 0;
    for (int i = 0; i < packed.size(); ++i) {
      Check(i == 0 || packed[i - 1] < packed[i], "Join: pairs not ascending");
      const int l = moepool::PackedLayer(packed[i]), e = moepool::PackedExpert(packed[i]);
      Check(l < c.n_layer && e < c.n_expert, "Join assigns a pair outside the model");
      for (int k = 0; k < 3; ++k) {
        const pb::ShardTensorInfo& t = j.tensors(3 * i + k);
        const WeightMatrix& m = MatrixOf(model_, l, k, e);
        Check(t.name() == TensorName(l, kKinds[k], e) && t.layer() == l && t.expert() == e,
              "Join: tensor " + t.name() + " out of order");
        Check(t.type() == static_cast<uint32_t>(m.type) && t.dims_size() == 2 &&
                  t.dims(0) == m.cols && t.dims(1) == m.rows && t.bytes() == m.SizeBytes(),
              "Join: tensor " + t.name() + " has another shape");
        const XXH128_hash_t h = XXH3_128bits(m.data, m.SizeBytes());
        Check(t.checksum().high() == h.high64 && t.checksum().low() == h.low64,
              "Join: tensor " + t.name() + " has another checksum");
        bytes += t.bytes();
      }
    }
    Check(bytes <= r.capacity().memory_bytes(),
          absl::StrCat("Join assigns ", bytes, " bytes to a budget of ",
                       r.capacity().memory_bytes()));
  }

  void Fetch(const pb::FetchRequest& r) {
    const WeightMatrix* source = nullptr;
    uint64_t next = r.offset();
    int chunks = 0;
    bool went_away = false;
    const absl::Status s = control_.Fetch(r, [&](const pb::FetchChunk& chunk) {
      if (source == nullptr) source = FindMatrix(model_, r.tensor());
      Check(source != nullptr, "Fetch streams " + r.tensor() + ", not a tensor of the model");
      const size_t n = chunk.data().size();
      Check(chunk.offset() == next,
            absl::StrCat("Fetch: chunk at ", chunk.offset(), ", not ", next));
      Check(n >= 1 && n <= kChunkBytes && next + n <= source->SizeBytes(),
            absl::StrCat("Fetch: a chunk of ", n, " bytes at ", next));
      Check(std::memcmp(chunk.data().data(), source->data + next, n) == 0,
            absl::StrCat("Fetch: other bytes at ", next, " of ", r.tensor()));
      next += n;
      if (++chunks < kMaxChunks) return true;
      went_away = true;
      return false;
    });
    moepool::testing::FuzzTrace(kTarget, absl::StrCat("Fetch: ", chunks, " chunks"));
    if (s.ok()) {
      if (source == nullptr) source = FindMatrix(model_, r.tensor());
      Check(source != nullptr && next == source->SizeBytes() && !went_away,
            absl::StrCat("Fetch of ", r.tensor(), " ended at ", next));
      return;
    }
    if (went_away) {
      CheckCode(s, {absl::StatusCode::kCancelled}, "Fetch (client gone)");
      return;
    }
    Check(chunks == 0, "Fetch failed half-way: " + s.ToString());
    CheckCode(s,
              {absl::StatusCode::kNotFound, absl::StatusCode::kPermissionDenied,
               absl::StatusCode::kOutOfRange, absl::StatusCode::kFailedPrecondition},
              "Fetch");
  }

  void Ready(const pb::ReadyRequest& r) {
    const absl::StatusOr<pb::ReadyResponse> got = control_.Ready(r);
    if (got.ok()) {
      moepool::testing::FuzzTrace(
          kTarget, absl::StrCat("Ready: OK, placement version ", got->placement_version()));
      SeeVersion(got->placement_version(), "Ready");
      return;
    }
    // Describe's error (the fake's UNAVAILABLE) or the check of its answer.
    CheckCode(got.status(),
              {absl::StatusCode::kNotFound, absl::StatusCode::kFailedPrecondition,
               absl::StatusCode::kUnavailable},
              "Ready");
  }

  // Whether the view lists a gone worker that still names experts (a lost worker whose
  // experts could be offered to others; a drained one looks the same).
  bool GoneWorkerWithExperts() const {
    const nlohmann::json view = control_.View();
    for (const nlohmann::json& w : view.value("workers", nlohmann::json::array())) {
      if (w.value("state", "") == "gone" && !w.value("experts", nlohmann::json::array()).empty()) {
        return true;
      }
    }
    return false;
  }

  // Events: KIND_RELEASED (pairs inside the model, ascending) and KIND_REJOIN (only once some
  // worker was gone with experts to offer) while the worker serves, and KIND_DRAINED last,
  // exactly when the call says OK.
  void Watch(const pb::WatchRequest& r) {
    lost_experts_seen_ = lost_experts_seen_ || GoneWorkerWithExperts();
    int drained = 0;
    const moepool::ModelConfig& c = model_.config();
    const absl::Status s = control_.Watch(
        r,
        [&](const pb::WatchEvent& e) {
          moepool::testing::FuzzTrace(kTarget, "Watch event " + e.ShortDebugString());
          Check(drained == 0, "Watch: an event after the drained one");
          if (e.kind() == pb::WatchEvent::KIND_DRAINED) {
            ++drained;
            return true;
          }
          if (e.kind() == pb::WatchEvent::KIND_REJOIN) {
            Check(lost_experts_seen_,
                  "Watch: KIND_REJOIN, but no gone worker had experts to offer");
            return true;
          }
          if (e.kind() == pb::WatchEvent::KIND_REASSIGN) {  // after a Rebalance
            const auto& packed = e.assignment().experts().packed();
            Check(!packed.empty() && e.assignment().tensors_size() == 3 * packed.size(),
                  "Watch: a malformed assignment");
            return true;
          }
          Check(e.kind() == pb::WatchEvent::KIND_RELEASED, "Watch: " + e.ShortDebugString());
          const auto& packed = e.experts().packed();
          Check(!packed.empty(), "Watch: an empty release");
          for (int i = 0; i < packed.size(); ++i) {
            Check(i == 0 || packed[i - 1] < packed[i], "Watch: released pairs not ascending");
            Check(moepool::PackedLayer(packed[i]) < c.n_layer &&
                      moepool::PackedExpert(packed[i]) < c.n_expert,
                  "Watch releases a pair outside the model");
          }
          return true;
        },
        [] { return true; });
    Check(drained == (s.ok() ? 1 : 0),
          absl::StrCat("Watch wrote ", drained, " drained events and said ", s.ToString()));
    CheckCode(s, {absl::StatusCode::kOk, absl::StatusCode::kNotFound, absl::StatusCode::kCancelled},
              "Watch");
  }

  const moepool::Model& model_;
  ClusterControl control_;
  const pb::DescribeResponse* const honest_;
  uint64_t version_ = 1;
  bool lost_experts_seen_ = false;  // some Watch began with a gone worker naming experts
};

const pb::DescribeResponse& Honest() {
  static const pb::DescribeResponse* d = [] {
    const ClusterControl control(Backend().get());
    return new pb::DescribeResponse(HonestAnswer(control, Backend()->model()));
  }();
  return *d;
}

void Init() {
  static const bool done = [] {
    moepool::testing::QuietStderr();
    Backend() = MakeBackend();
    Honest();
    return true;
  }();
  (void)done;
}

void FuzzOne(const uint8_t* data, size_t size) {
  Init();
  {
    std::lock_guard<std::mutex> lock(Workers().mu);
    Workers().answer.reset();
  }
  {
    Session session(Backend().get(), &Honest());
    size_t pos = 0;
    while (pos + 3 <= size) {
      const uint8_t selector = data[pos];
      size_t len = static_cast<size_t>(data[pos + 1]) | (static_cast<size_t>(data[pos + 2]) << 8);
      pos += 3;
      len = std::min(len, size - pos);
      session.Run(selector, data + pos, len);
      pos += len;
    }
    session.View();
  }
  // A worker was added: start the next input from a backend without one.
  FakeWorkers& w = Workers();
  bool changed;
  {
    std::lock_guard<std::mutex> lock(w.mu);
    changed = std::exchange(w.backend_changed, false);
  }
  if (changed) {
    Backend().reset();
    Backend() = MakeBackend();
  }
}

}  // namespace
}  // namespace moepool::testing::control_fuzz

#ifdef MOEPOOL_LIBFUZZER
// ClusterExpertBackend::Create makes gRPC channel credentials even with fake links, which
// starts gRPC's own threads; their thread objects (grpc_core::Thread, gpr_malloc) are still
// alive at exit and LeakSanitizer's exit check would report them for every run.
extern "C" const char* __lsan_default_suppressions() { return "leak:libgpr.so\n"; }
#endif

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moepool::testing::control_fuzz::Init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moepool::testing::control_fuzz::FuzzOne(data, size);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/cluster_control_seeds.h"
#include "tests/fuzz/replay_driver.h"

int main(int argc, char** argv) {
  namespace cf = ::moepool::testing::control_fuzz;
  cf::Init();
  moepool::testing::ReplayOptions o;
  o.target = cf::kTarget;
  o.seeds = cf::Seeds(cf::Backend()->model(), cf::Honest());
  o.fail = [](const std::string& what) { moepool::testing::FuzzFail(cf::kTarget, what); };
  return moepool::testing::RunReplayDriver(argc, argv, o);
}
#endif
