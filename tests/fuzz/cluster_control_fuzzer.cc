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
// fake WorkerLink that never touches the network. Lost workers' experts are offered at once
// (reassign_after_s = 0), so nothing depends on the clock.
//
// With clang in the fuzzing configuration (tests/fuzz/run_fuzz.sh ... control; coordinator/
// built with -fsanitize=fuzzer-no-link,address) this is a libFuzzer target. Otherwise it is a
// replay driver (ctest ClusterControlFuzzerReplay): it runs the target over the seeds it writes
// (valid exchanges and refusals; fixed-* ones reproduce fixed findings), their single-byte
// corruptions, and the files and directories named on the command line; --write-seeds DIR writes
// the seeds as files, --one FILE... runs just those inputs.
#include <xxhash.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/cluster_control.h"
#include "coordinator/cluster_expert_backend.h"
#include "coordinator/expert_placement.h"
#include "coordinator/worker_link.h"
#include "engine/model.h"
#include "engine/synth.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_model_util.h"

namespace {

namespace pb = ::moepool::v1;
using ::moepool::ClusterControl;
using ::moepool::ClusterExpertBackend;
using ::moepool::WeightMatrix;

constexpr char kTarget[] = "cluster_control_fuzzer";
// A whole tensor of the model (110592 bytes) takes 108 chunks: a Fetch from the start is cut
// off by the client, one from past 44 KiB runs to the end.
constexpr size_t kChunkBytes = 1024;
constexpr int kMaxChunks = 64;
constexpr char kPeerHost[] = "10.0.0.9";
constexpr const char* kKinds[] = {"gate", "up", "down"};

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
  kNumOps
};

void Check(bool ok, const std::string& what) {
  if (!ok) moepool::testing::FuzzFail(kTarget, what);
}

// What the fake workers answer to Describe, and whether the backend took one in (a link was
// started: AddWorker succeeded).
struct FakeWorkers {
  std::mutex mu;
  std::optional<pb::DescribeResponse> answer;  // none: UNAVAILABLE
  bool backend_changed = false;
};

FakeWorkers& Workers() {
  static auto* w = new FakeWorkers;
  return *w;
}

class FakeLink final : public moepool::WorkerLink {
 public:
  explicit FakeLink(std::string address) : address_(std::move(address)) {}

  const std::string& address() const override { return address_; }

  absl::StatusOr<pb::DescribeResponse> Describe(double, bool) override {
    FakeWorkers& w = Workers();
    std::lock_guard<std::mutex> lock(w.mu);
    if (!w.answer) return absl::UnavailableError(absl::StrCat("worker ", address_, ": refused"));
    return *w.answer;
  }

  void Start(const pb::DescribeResponse&, moepool::AcceptWorker) override {
    started_ = true;
    FakeWorkers& w = Workers();
    std::lock_guard<std::mutex> lock(w.mu);
    w.backend_changed = true;
  }

  bool up() const override { return started_; }
  void SetRowSession(std::shared_ptr<moepool::wire::RowSession>,
                     moepool::wire::RowSessionFactory) override {}

  // No step runs in this target; a job would fail as on a lost connection.
  void Post(moepool::LinkJob* job, moepool::RoundLatch* latch) override {
    RunInline(job);
    latch->CountDown();
  }
  void RunInline(moepool::LinkJob* job) override {
    job->status = absl::UnavailableError(absl::StrCat("worker ", address_, ": no rows here"));
  }
  void CancelRound(uint64_t) override {}

  moepool::WorkerStats Stats() const override {
    moepool::WorkerStats s;
    s.address = address_;
    s.up = started_;
    return s;
  }
  void ResetStats() override {}

 private:
  const std::string address_;
  std::atomic<bool> started_{false};
};

const std::string& ModelPath() {
  static const std::string* path = [] {
    const absl::StatusOr<moepool::SynthShape> tiny = moepool::SynthShapeByName("tiny");
    Check(tiny.ok(), "no tiny shape");
    return new std::string(
        moepool::testing::SynthFuzzModel(*tiny, "Q4_0", false, "control-tiny.gguf"));
  }();
  return *path;
}

std::unique_ptr<ClusterExpertBackend> MakeBackend() {
  moepool::ClusterOptions o;
  o.elastic = true;
  o.local_fallback = true;
  o.local_threads = 1;
  o.links_per_worker = 1;
  o.connect_timeout_s = 1;
  o.make_link = [](const moepool::WorkerLinkConfig& c) {
    return std::make_unique<FakeLink>(c.address);
  };
  absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> b =
      ClusterExpertBackend::Create(ModelPath(), o);
  Check(b.ok(), "cannot create the backend: " + b.status().ToString());
  return *std::move(b);
}

std::unique_ptr<ClusterExpertBackend>& Backend() {
  static auto* b = new std::unique_ptr<ClusterExpertBackend>;
  return *b;
}

std::string TensorName(int layer, const char* kind, int expert) {
  return absl::StrCat("blk.", layer, ".ffn_", kind, ".", expert, ".weight");
}

const WeightMatrix& MatrixOf(const moepool::Model& model, int layer, int kind, int expert) {
  const moepool::ExpertWeights& E = model.layer(layer).experts[static_cast<size_t>(expert)];
  return kind == 0 ? E.gate : kind == 1 ? E.up : E.down;
}

// The matrix of a canonical shard tensor name, or nullptr.
const WeightMatrix* FindMatrix(const moepool::Model& model, const std::string& name) {
  const moepool::ModelConfig& c = model.config();
  for (int l = 0; l < c.n_layer; ++l) {
    for (int e = 0; e < c.n_expert; ++e) {
      for (int k = 0; k < 3; ++k) {
        if (name == TensorName(l, kKinds[k], e)) return &MatrixOf(model, l, k, e);
      }
    }
  }
  return nullptr;
}

// This model's identity as a worker holding every pair would report it.
pb::DescribeResponse HonestAnswer(const ClusterControl& control, const moepool::Model& model) {
  const moepool::ModelConfig& c = model.config();
  pb::DescribeResponse d;
  d.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  d.mutable_model()->set_fingerprint(control.model_fingerprint());
  d.mutable_model()->set_name(c.name);
  pb::Hyperparameters* h = d.mutable_hparams();
  h->set_n_embd(c.n_embd);
  h->set_n_ff(c.n_ff);
  h->set_n_layer(c.n_layer);
  h->set_n_expert(c.n_expert);
  h->set_n_expert_used(c.n_expert_used);
  for (int l = 0; l < c.n_layer; ++l) {
    for (int e = 0; e < c.n_expert; ++e)
      d.mutable_experts()->add_packed(moepool::PackExpertPair(l, e));
  }
  d.set_device("cpu");
  d.set_worker_id("fake");
  return d;
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
      case kNumOps:
        break;
    }
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

#ifdef MOEPOOL_LIBFUZZER
// ClusterExpertBackend::Create makes gRPC channel credentials even with fake links, which
// starts gRPC's own threads; their thread objects (grpc_core::Thread, gpr_malloc) are still
// alive at exit and LeakSanitizer's exit check would report them for every run.
extern "C" const char* __lsan_default_suppressions() { return "leak:libgpr.so\n"; }
#endif

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzOne(data, size);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include <filesystem>
#include <fstream>
#include <sstream>

namespace {

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

std::vector<std::pair<std::string, std::string>> Seeds() {
  Init();
  const moepool::Model& model = Backend()->model();
  const pb::DescribeResponse& honest = Honest();
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

// The input and deterministic single-byte corruptions of it.
int Replay(const std::string& bytes) {
  FuzzOne(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  int n = 1;
  for (size_t i = 0; i < bytes.size(); i += 7, ++n) {
    std::string b = bytes;
    b[i] = static_cast<char>(b[i] ^ 0x5a);
    FuzzOne(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  }
  return n;
}

std::string ReadFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// Replays the seeds, then every file named (or inside a directory named) on the command line
// that is not one of them. With --one FILE..., runs only those inputs, without corruptions (to
// reproduce a finding; MOEPOOL_FUZZ_VERBOSE=1 traces each call).
// With --write-seeds DIR, writes the seeds there as files (a starting corpus for libFuzzer).
int main(int argc, char** argv) {
  const std::vector<std::pair<std::string, std::string>> seeds = Seeds();
  if (argc >= 2 && std::string(argv[1]) == "--one") {  // these inputs only, as they are
    for (int i = 2; i < argc; ++i) {
      if (!std::filesystem::is_regular_file(argv[i])) {
        moepool::testing::FuzzFail(kTarget, std::string("no such input ") + argv[i]);
      }
      const std::string bytes = ReadFile(argv[i]);
      std::printf("running %s\n", argv[i]);
      std::fflush(stdout);
      FuzzOne(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    }
    return 0;
  }
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    std::filesystem::create_directories(argv[2]);
    for (const auto& [name, bytes] : seeds) {
      std::ofstream(std::filesystem::path(argv[2]) / name, std::ios::binary) << bytes;
    }
    return 0;
  }
  int n = 0;
  // The committed corpus starts as these seeds: each input once.
  std::set<std::string> done;
  const auto replay_new = [&](const std::string& bytes) {
    return done.insert(bytes).second ? Replay(bytes) : 0;
  };
  for (const auto& seed : seeds) n += replay_new(seed.second);
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) n += replay_new(ReadFile(e.path()));
      }
    } else if (std::filesystem::exists(p)) {
      n += replay_new(ReadFile(p));
    } else {
      moepool::testing::FuzzFail(kTarget, "no such input " + p.string());
    }
  }
  std::printf("cluster_control_fuzzer: %d inputs, no failure\n", n);
  return 0;
}
#endif
