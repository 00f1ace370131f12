#include "worker/joiner.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "moepool/v1/cluster_service.grpc.pb.h"
#include "worker/shard_cache.h"

namespace moepool::worker {
namespace {

namespace pb = moepool::v1;
using Clock = std::chrono::steady_clock;

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

// Errors that another attempt cannot fix.
bool Permanent(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kInvalidArgument:
      return true;
    default:
      return false;
  }
}

// Progress of a long transfer on stderr: bytes, rate, ETA.
void ShowProgress(const FetchProgress& p) {
  const double mib = 1 << 20;
  const double rate = p.seconds > 0 ? static_cast<double>(p.bytes_done) / p.seconds : 0;
  const double left = static_cast<double>(p.bytes_total - std::min(p.bytes_done, p.bytes_total));
  std::fprintf(stderr, "moepool worker: fetched %.1f of %.1f MiB (%.1f MiB/s, ETA %.0f s)\n",
               static_cast<double>(p.bytes_done) / mib, static_cast<double>(p.bytes_total) / mib,
               rate / mib, rate > 0 ? left / rate : 0.0);
}

// One membership at the coordinator: the channel, the worker id, the control stream.
class Session {
 public:
  Session(const JoinOptions& options) : options_(options) {
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!options.coordinator_ca_pem.empty()) {
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = options.coordinator_ca_pem;
      creds = grpc::SslCredentials(ssl);
    }
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(options.coordinator, creds, args);
    stub_ = pb::ClusterService::NewStub(channel_);
  }
  ~Session() { StopWatch(); }

  void Prepare(grpc::ClientContext* context, double deadline_s) const {
    if (!options_.cluster_token.empty()) {
      context->AddMetadata("authorization", "Bearer " + options_.cluster_token);
    }
    if (deadline_s > 0) {
      context->set_deadline(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)));
    }
  }

  absl::StatusOr<pb::JoinResponse> Join(const ShardCache& cache) {
    pb::JoinRequest request;
    request.set_protocol_version(pb::CLUSTER_PROTOCOL_VERSION_CURRENT);
    request.set_advertise_address(options_.advertise);
    request.mutable_capacity()->set_device(options_.device);
    request.mutable_capacity()->set_memory_bytes(options_.memory_bytes);
    request.mutable_capacity()->set_threads(options_.threads);
    for (const CachedShard& shard : cache.Inventory()) {
      pb::CachedModel* c = request.add_cache();
      c->set_model_fingerprint(shard.model_fingerprint);
      for (const auto& [l, e] : shard.pairs) c->mutable_experts()->add_packed(PackExpert(l, e));
    }
    grpc::ClientContext context;
    Prepare(&context, 600);  // checksumming a large share on the coordinator takes a while
    pb::JoinResponse response;
    RETURN_IF_ERROR(FromGrpc(stub_->Join(&context, request, &response),
                             absl::StrCat("joining ", options_.coordinator)));
    id_ = response.worker_id();
    return response;
  }

  // Fetches a tensor from `offset` into `sink`.
  absl::Status Fetch(const ShardTensor& tensor, uint64_t offset,
                     const std::function<absl::Status(const char*, size_t)>& sink) {
    pb::FetchRequest request;
    request.set_worker_id(id_);
    request.set_tensor(tensor.name);
    request.set_offset(offset);
    grpc::ClientContext context;
    Prepare(&context, 0);
    std::unique_ptr<grpc::ClientReader<pb::FetchChunk>> reader = stub_->Fetch(&context, request);
    pb::FetchChunk chunk;
    while (reader->Read(&chunk)) {
      if (absl::Status s = sink(chunk.data().data(), chunk.data().size()); !s.ok()) {
        context.TryCancel();
        reader->Finish().IgnoreError();
        return s;
      }
    }
    return FromGrpc(reader->Finish(), absl::StrCat("fetching ", tensor.name));
  }

  absl::Status Ready(uint64_t bytes_fetched) {
    pb::ReadyRequest request;
    request.set_worker_id(id_);
    request.set_bytes_fetched(bytes_fetched);
    grpc::ClientContext context;
    Prepare(&context, 120);
    pb::ReadyResponse response;
    return FromGrpc(stub_->Ready(&context, request, &response), "ready");
  }

  absl::Status Leave(const std::string& reason) {
    pb::LeaveRequest request;
    request.set_worker_id(id_);
    request.set_reason(reason);
    grpc::ClientContext context;
    Prepare(&context, 60);
    pb::LeaveResponse response;
    return FromGrpc(stub_->Leave(&context, request, &response), "leaving");
  }

  // The control stream, on its own thread: drained() or broken() once it ends; `release` is
  // called with the pairs of each KIND_RELEASED event.
  void StartWatch(std::function<void(const std::vector<std::pair<int, int>>&)> release) {
    watch_context_ = std::make_unique<grpc::ClientContext>();
    Prepare(watch_context_.get(), 0);
    watch_thread_ = std::thread([this, release] {
      pb::WatchRequest request;
      request.set_worker_id(id_);
      auto reader = stub_->Watch(watch_context_.get(), request);
      pb::WatchEvent event;
      bool drained = false;
      while (reader->Read(&event)) {
        drained = drained || event.kind() == pb::WatchEvent::KIND_DRAINED;
        if (event.kind() == pb::WatchEvent::KIND_REJOIN) {
          rejoin_.store(true);  // ends the session: the loop joins again
          break;
        }
        if (event.kind() == pb::WatchEvent::KIND_REASSIGN) {
          std::lock_guard<std::mutex> lock(assignment_mu_);
          assignment_ = std::make_unique<pb::JoinResponse>(event.assignment());
          continue;
        }
        if (event.kind() != pb::WatchEvent::KIND_RELEASED) continue;
        std::vector<std::pair<int, int>> pairs;
        for (const uint32_t p : event.experts().packed()) pairs.emplace_back(p >> 16, p & 0xffff);
        release(pairs);
      }
      if (rejoin_.load()) watch_context_->TryCancel();
      reader->Finish().IgnoreError();
      (drained ? drained_ : broken_).store(true);
    });
  }
  void StopWatch() {
    if (watch_context_ != nullptr) watch_context_->TryCancel();
    if (watch_thread_.joinable()) watch_thread_.join();
    watch_context_.reset();
  }
  bool drained() const { return drained_.load(); }
  bool broken() const { return broken_.load(); }
  bool rejoin() const { return rejoin_.load(); }
  const std::string& id() const { return id_; }
  // The latest KIND_REASSIGN's assignment, once (nullptr when none came).
  std::unique_ptr<pb::JoinResponse> TakeAssignment() {
    std::lock_guard<std::mutex> lock(assignment_mu_);
    return std::move(assignment_);
  }

 private:
  const JoinOptions& options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::ClusterService::Stub> stub_;
  std::string id_;
  std::unique_ptr<grpc::ClientContext> watch_context_;
  std::thread watch_thread_;
  std::atomic<bool> drained_{false};
  std::atomic<bool> broken_{false};
  std::atomic<bool> rejoin_{false};
  std::mutex assignment_mu_;
  std::unique_ptr<pb::JoinResponse> assignment_;
};

// What is being served: the shard, its core and server.
struct Serving {
  std::mutex mu;  // core and server, between the loop and the control stream's thread
  std::string path;
  std::vector<std::pair<int, int>> pairs;
  std::unique_ptr<WorkerCore> core;
  std::unique_ptr<WorkerServer> server;

  void Stop() {
    if (server != nullptr) {
      server->Shutdown(5.0);
      server->Wait();
    }
    server.reset();
    core.reset();
    path.clear();
  }
};

// Fetches the shard of `assigned` (a Join answer or a placement change's), serves it (a running
// server keeps running: its core adopts the new shard between two calls) and says Ready.
absl::Status ServeAssignment(const JoinOptions& options, const pb::JoinResponse& assigned,
                             ShardCache* cache, Session* session, Serving* serving,
                             const std::atomic<bool>& stop) {
  ASSIGN_OR_RETURN(const ShardManifest manifest, ManifestFromJoin(assigned));
  std::vector<std::pair<int, int>> pairs;
  for (const uint32_t p : assigned.experts().packed()) pairs.emplace_back(p >> 16, p & 0xffff);
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(
      const MaterializeResult shard,
      cache->Materialize(
          manifest,
          [&](const ShardTensor& t, uint64_t offset,
              const std::function<absl::Status(const char*, size_t)>& sink) -> absl::Status {
            if (stop.load()) return absl::CancelledError("stopping");
            return session->Fetch(t, offset, sink);
          },
          ShowProgress));
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("moepool worker: shard %s: fetched %.1f MiB in %.1f s, reused %.1f MiB%s\n",
              shard.path.c_str(), static_cast<double>(shard.bytes_fetched) / (1 << 20), seconds,
              static_cast<double>(shard.bytes_reused) / (1 << 20),
              shard.untouched ? " (cache complete, untouched)" : "");
  std::fflush(stdout);
  std::unique_lock<std::mutex> lock(serving->mu);
  if (serving->path != shard.path || serving->pairs != pairs) {
    if (serving->core != nullptr && serving->server != nullptr) {
      RETURN_IF_ERROR(serving->core->Adopt(shard.path, ExpertSet(pairs)));
    } else {
      serving->Stop();
      WorkerCoreOptions core_options;
      core_options.model_path = shard.path;
      core_options.experts = ExpertSet(pairs);
      core_options.threads = options.threads;
      core_options.worker_id = options.advertise;
      core_options.cuda_devices = options.cuda_devices;
      core_options.reported_fingerprint = assigned.model().fingerprint();
      ASSIGN_OR_RETURN(serving->core, WorkerCore::Create(core_options));
      ASSIGN_OR_RETURN(serving->server, WorkerServer::Start(serving->core.get(), options.server));
    }
    if (options.preload) RETURN_IF_ERROR(options.preload(serving->core->model()));
    serving->path = shard.path;
    serving->pairs = pairs;
  }
  const uint64_t expert_bytes = serving->core->expert_bytes();
  lock.unlock();
  RETURN_IF_ERROR(session->Ready(shard.bytes_fetched));
  const std::string status = absl::StrFormat(
      "ready as %s: serving %zu experts (%.1f MiB) on %s", session->id(), pairs.size(),
      static_cast<double>(expert_bytes) / (1 << 20), options.advertise);
  std::printf("moepool worker: %s\n", status.c_str());
  std::fflush(stdout);
  if (options.on_ready) options.on_ready(status);
  return absl::OkStatus();
}

// One attempt: join, fetch, serve (or keep serving), ready. Returns once ready.
absl::Status Attach(const JoinOptions& options, ShardCache* cache, Session* session,
                    Serving* serving, const std::atomic<bool>& stop) {
  ASSIGN_OR_RETURN(const pb::JoinResponse joined, session->Join(*cache));
  std::printf("moepool worker: joined %s as %s: %d experts assigned\n", options.coordinator.c_str(),
              session->id().c_str(), joined.experts().packed_size());
  std::fflush(stdout);
  // The coordinator sees a worker lost while fetching too.
  session->StartWatch([serving](const std::vector<std::pair<int, int>>& pairs) {
    std::lock_guard<std::mutex> lock(serving->mu);
    if (serving->core == nullptr) return;
    serving->core->Release(pairs);
    std::erase_if(serving->pairs, [&](const std::pair<int, int>& p) {
      return std::find(pairs.begin(), pairs.end(), p) != pairs.end();
    });
    std::printf("moepool worker: %zu experts handed to another worker; serving %zu\n", pairs.size(),
                serving->core->experts().size());
    std::fflush(stdout);
  });
  return ServeAssignment(options, joined, cache, session, serving, stop);
}

void SleepUnlessStopped(double seconds, const std::atomic<bool>& stop) {
  const auto until = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1e3));
  while (!stop.load() && Clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace

absl::StatusOr<ShardManifest> ManifestFromJoin(const pb::JoinResponse& r) {
  ShardManifest m;
  m.model_fingerprint = r.model().fingerprint();
  for (const pb::MetadataEntry& e : r.metadata()) {
    if (e.gguf_type() > static_cast<uint32_t>(GgufValueType::kFloat64) ||
        e.gguf_type() == static_cast<uint32_t>(GgufValueType::kArray)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata '", e.key().substr(0, 64), "' has type ", e.gguf_type()));
    }
    GgufValue v;
    v.type = static_cast<GgufValueType>(e.gguf_type());
    v.uint_value = e.uint_value();
    v.int_value = e.int_value();
    v.float_value = e.float_value();
    v.string_value = e.string_value();
    m.metadata.emplace_back(e.key(), std::move(v));
  }
  for (const pb::ShardTensorInfo& t : r.tensors()) {
    ShardTensor s;
    s.name = t.name();
    s.type = static_cast<TensorType>(t.type());
    s.dims.assign(t.dims().begin(), t.dims().end());
    s.bytes = t.bytes();
    s.checksum = {t.checksum().high(), t.checksum().low()};
    s.layer = t.layer();
    s.expert = t.expert();
    m.tensors.push_back(std::move(s));
  }
  RETURN_IF_ERROR(ValidateManifest(m));
  return m;
}

absl::Status RunJoinedWorker(const JoinOptions& options, const std::atomic<bool>& stop) {
  if (options.memory_bytes == 0) return absl::InvalidArgumentError("the memory budget is 0");
  ASSIGN_OR_RETURN(ShardCache cache, ShardCache::Open(options.cache_dir));
  Serving serving;
  double backoff = options.retry_initial_s;
  std::string last_error;
  while (!stop.load()) {
    auto session = std::make_unique<Session>(options);
    const absl::Status attached = Attach(options, &cache, session.get(), &serving, stop);
    if (!attached.ok()) {
      if (stop.load()) break;
      if (Permanent(attached)) {
        std::lock_guard<std::mutex> lock(serving.mu);
        serving.Stop();
        return attached;
      }
      const std::string message(attached.message());
      if (message != last_error) {  // one line per distinct failure, not per attempt
        std::fprintf(stderr, "moepool worker: %s; retrying\n", message.c_str());
        last_error = message;
      }
      session.reset();
      SleepUnlessStopped(backoff, stop);
      backoff = std::min(backoff * 2, options.retry_max_s);
      continue;
    }
    backoff = options.retry_initial_s;
    last_error.clear();
    while (!stop.load() && !session->drained() && !session->broken()) {
      if (std::unique_ptr<pb::JoinResponse> change = session->TakeAssignment()) {
        std::printf("moepool worker: placement change: %d experts to serve\n",
                    change->experts().packed_size());
        std::fflush(stdout);
        const absl::Status s =
            ServeAssignment(options, *change, &cache, session.get(), &serving, stop);
        if (!s.ok()) {  // it keeps serving what it had; the coordinator goes on without it
          std::fprintf(stderr, "moepool worker: placement change: %s\n",
                       std::string(s.message()).c_str());
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (session->drained()) {
      std::printf("moepool worker: drained by the coordinator; exiting\n");
      std::fflush(stdout);
      break;
    }
    if (stop.load()) {
      const absl::Status left = session->Leave("the worker was told to stop");
      std::printf("moepool worker: %s\n",
                  left.ok() ? "drained; exiting"
                            : absl::StrCat("leaving: ", left.message(), "; exiting").c_str());
      std::fflush(stdout);
      break;
    }
    if (session->rejoin()) {
      std::printf("moepool worker: the coordinator has experts for its room; joining again\n");
      std::fflush(stdout);
    } else {
      std::fprintf(stderr, "moepool worker: lost the coordinator %s; joining again\n",
                   options.coordinator.c_str());
    }
  }
  std::lock_guard<std::mutex> lock(serving.mu);
  serving.Stop();
  return absl::OkStatus();
}

}  // namespace moepool::worker
