#include "tests/coordinator/fake_worker_util.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "coordinator/expert_placement.h"
#include "engine/fingerprint.h"
#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"
#include "wire/forward_chunks.h"

namespace moepool::testing {

std::vector<std::pair<int, int>> PairsForExperts(int n_layer, int lo, int hi) {
  std::vector<std::pair<int, int>> pairs;
  for (int l = 0; l < n_layer; ++l) {
    for (int e = lo; e <= hi; ++e) pairs.emplace_back(l, e);
  }
  return pairs;
}

absl::StatusOr<std::unique_ptr<FakeWorker>> FakeWorker::Start(const FakeWorkerOptions& options) {
  auto w = std::unique_ptr<FakeWorker>(new FakeWorker);
  w->options_ = options;
  const std::set<std::pair<int, int>> held(options.pairs.begin(), options.pairs.end());
  ExpertFilter filter;
  filter.non_expert = false;
  filter.keep = [held](int l, int e) { return held.count({l, e}) > 0; };
  auto model = Model::Load(options.model_path, filter);
  if (!model.ok()) return model.status();
  w->model_ = *std::move(model);
  w->pool_ = std::make_unique<ThreadPool>(2);
  w->experts_ = std::make_unique<LocalExpertBackend>(w->model_.get(), w->pool_.get());
  w->fingerprint_ = options.fingerprint_override.empty()
                        ? ModelFingerprint(*w->model_, options.pairs)
                        : options.fingerprint_override;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(
      absl::StrCat("127.0.0.1:", options.port),
      options.credentials ? options.credentials : grpc::InsecureServerCredentials(), &w->port_);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  builder.RegisterService(w.get());
  w->server_ = builder.BuildAndStart();
  if (w->server_ == nullptr || w->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on port ", options.port));
  }
  return w;
}

FakeWorker::~FakeWorker() { Kill(); }

void FakeWorker::Kill() {
  if (killed_.exchange(true)) return;
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
}

grpc::Status FakeWorker::CheckToken(grpc::ServerContext* context) const {
  if (options_.token.empty()) return grpc::Status::OK;
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end() ||
      std::string(it->second.data(), it->second.size()) != "Bearer " + options_.token) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "bad or missing cluster token");
  }
  return grpc::Status::OK;
}

grpc::Status FakeWorker::Describe(grpc::ServerContext* context, const moepool::v1::DescribeRequest*,
                                  moepool::v1::DescribeResponse* response) {
  const grpc::Status auth = CheckToken(context);
  if (!auth.ok()) return auth;
  const ModelConfig& c = model_->config();
  response->set_protocol_version(
      static_cast<moepool::v1::ProtocolVersion>(options_.protocol_version));
  response->mutable_model()->set_fingerprint(fingerprint_);
  response->mutable_model()->set_name(c.name);
  response->mutable_model()->set_file_bytes(model_->file().file_size());
  auto* h = response->mutable_hparams();
  h->set_n_embd(c.n_embd);
  h->set_n_ff(c.n_ff);
  h->set_n_layer(c.n_layer);
  h->set_n_expert(c.n_expert);
  h->set_n_expert_used(c.n_expert_used);
  for (const auto& [l, e] : options_.pairs)
    response->mutable_experts()->add_packed(PackExpertPair(l, e));
  response->set_device("cpu");
  response->set_worker_id(absl::StrCat("fake-", port_));
  response->set_threads(pool_->size());
  return grpc::Status::OK;
}

grpc::Status FakeWorker::Forward(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<moepool::v1::ForwardResponse, moepool::v1::ForwardRequest>* stream) {
  const grpc::Status auth = CheckToken(context);
  if (!auth.ok()) return auth;
  const ModelConfig& c = model_->config();
  wire::RequestAssembler assembler(
      wire::RequestLimits{c.n_embd, 1 << 20, static_cast<int>(c.n_expert)});
  moepool::v1::ForwardRequest chunk;
  std::vector<moepool::v1::ForwardResponse> out;
  auto refuse = [&](const moepool::v1::ForwardRequest& round, const absl::Status& s) {
    moepool::v1::ForwardResponse resp;
    wire::SetResponseHeader(round, &resp);
    resp.set_error_code(static_cast<int>(s.code()));
    resp.set_error_message(std::string(s.message()));
    return stream->Write(resp);
  };
  while (stream->Read(&chunk)) {
    if (options_.stall) continue;
    const wire::RequestAssembler::Outcome outcome = assembler.Add(chunk);
    for (const auto& r : assembler.refusals()) refuse(r.header, r.status);
    if (outcome != wire::RequestAssembler::Outcome::kComplete) continue;
    const moepool::v1::ForwardRequest& round = assembler.round();
    ++forward_requests_;
    const auto t0 = std::chrono::steady_clock::now();
    ExpertRoutes routes;
    routes.layer = round.layer();
    routes.n_rows = round.total_rows();
    routes.n_embd = round.n_embd();
    routes.k = round.k();
    routes.x = assembler.x().data();
    routes.expert = assembler.expert().data();
    routes.weight = assembler.weight().data();
    std::vector<float> y(static_cast<size_t>(routes.n_rows * routes.n_embd));
    const absl::Status s = experts_->Compute(routes, y.data());
    const auto micros =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    if (!s.ok()) {
      refuse(round, s);
      continue;
    }
    const wire::RoundHeader header = wire::HeaderOf(round);
    out.clear();
    wire::WriteResponseChunks(
        header, y.data(),
        wire::RowsPerChunk(options_.max_message_bytes, header.n_embd, header.dtype, 0),
        static_cast<uint64_t>(micros), [&] { return &out.emplace_back(); });
    for (const auto& resp : out) {
      if (!stream->Write(resp)) return grpc::Status::CANCELLED;
    }
  }
  return grpc::Status::OK;
}

const std::string& SmallModel(const std::string& type, int k, uint64_t seed, float router_skew) {
  static auto* cache = new std::map<std::string, std::string>;
  const std::string file =
      absl::StrCat("small-", type, "-k", k, "-s", seed,
                   router_skew > 0 ? absl::StrCat("-r", router_skew) : "", ".gguf");
  auto it = cache->find(file);
  if (it != cache->end()) return it->second;
  SynthOptions o;
  o.shape.name = "small";
  o.shape.n_embd = 64;
  o.shape.n_ff = 128;
  o.shape.n_layer = 2;
  o.shape.n_head = 4;
  o.shape.n_head_kv = 2;
  o.shape.n_expert = 8;
  o.shape.n_expert_used = k;
  o.shape.n_ctx = 512;
  o.type = type;
  o.seed = seed;
  o.router_skew = router_skew;
  o.vocab_path = std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath;
  o.out_path = TempDir() + "/" + file;
  const absl::Status s = SynthesizeModel(o);
  EXPECT_TRUE(s.ok()) << s;
  return cache->emplace(file, o.out_path).first->second;
}

ClusterOptions TestClusterOptions(const std::vector<std::string>& addresses) {
  ClusterOptions o;
  o.workers = addresses;
  o.local_threads = 2;
  o.connect_timeout_s = 5;
  o.reconnect_initial_s = 0.02;
  o.reconnect_max_s = 0.2;
  return o;
}

std::unique_ptr<Engine> LoadEngineWithExperts(const std::string& model, ExpertBackend* experts,
                                              int64_t n_ctx) {
  EngineOptions o;
  o.model_path = model;
  o.threads = 2;
  o.n_ctx = n_ctx;
  o.experts = experts;
  auto e = Engine::Load(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : nullptr;
}

}  // namespace moepool::testing
