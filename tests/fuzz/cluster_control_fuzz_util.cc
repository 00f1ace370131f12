#include "tests/fuzz/cluster_control_fuzz_util.h"

#include <atomic>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/expert_placement.h"
#include "coordinator/worker_link.h"
#include "engine/synth.h"
#include "tests/fuzz/fuzz_model_util.h"

namespace moepool::testing::control_fuzz {
namespace {

namespace pb = ::moepool::v1;

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

}  // namespace

void Check(bool ok, const std::string& what) {
  if (!ok) moepool::testing::FuzzFail(kTarget, what);
}

FakeWorkers& Workers() {
  static auto* w = new FakeWorkers;
  return *w;
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

}  // namespace moepool::testing::control_fuzz
