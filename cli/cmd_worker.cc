// moepool worker: serve some experts of a model to a coordinator over gRPC.
//
//   moepool worker --model M.gguf (--experts 0-3 [--layers 0-31] | --placement FILE)
//                  --listen HOST:PORT [--threads N] [--cluster-token T] [--name NAME]
//                  [--tls-cert F --tls-key F [--tls-ca F]] [--max-message-mib N]
//                  [--device cpu|cuda:N|cuda:all] [--transport grpc|nccl] [--preload on|off]
//
// The experts are read into memory (--preload on, the default) before the worker listens, and a
// watch warns when the host evicts them (cli/weights_in_memory.h).
// --device cuda:* puts the experts on the GPU(s) (cuda:all spreads them over every device);
// a build without CUDA refuses it before the model is opened. --transport nccl offers the
// coordinator NCCL pipes for the rows (wire/transport.h); where NCCL cannot be used the
// worker says so in one line and serves over gRPC only.
// The cluster token may also come from the environment (MOEPOOL_CLUSTER_TOKEN), which keeps it
// out of the process list. SIGINT / SIGTERM stop the server (open streams get 5 s to finish).
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/cluster_flags.h"
#include "cli/commands.h"
#include "cli/device_flags.h"
#include "cli/service_notify.h"
#include "cli/weights_in_memory.h"
#include "coordinator/planner.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/gguf.h"
#include "engine/host_memory.h"
#include "engine/model.h"
#include "engine/status_macros.h"
#include "wire/nccl_peer.h"
#include "wire/transport.h"
#include "worker/expert_service.h"
#include "worker/expert_set.h"
#include "worker/joiner.h"
#include "worker/worker_core.h"

namespace moepool::cli {
namespace {

constexpr double kShutdownGraceSeconds = 5.0;

int Fail(const absl::Status& s) { return PrintError(s, "moepool worker"); }

absl::StatusOr<worker::ExpertSet> ExpertsFromArgs(const Args& args, const std::string& model) {
  const bool by_flags = args.Has("experts");
  const bool by_file = args.Has("placement");
  if (by_flags == by_file) {
    return absl::InvalidArgumentError(
        "give either --experts (with optional --layers) or --placement");
  }
  if (by_file && args.Has("layers")) {
    return absl::InvalidArgumentError("--layers goes with --experts, not with --placement");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model));
  ASSIGN_OR_RETURN(ModelConfig config, ReadModelConfig(*file));
  if (by_file) {
    return worker::ReadPlacementFile(args.Get("placement"), config.n_layer, config.n_expert);
  }
  return worker::ExpertSetFromFlags(args.Get("experts"), args.Get("layers"), config.n_layer,
                                    config.n_expert);
}

absl::StatusOr<std::string> ReadPem(const Args& args, const std::string& flag) {
  if (!args.Has(flag)) return std::string();
  const std::string path = args.Get(flag);
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path));
  if (pem.empty())
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is empty"));
  return pem;
}

// The host part of HOST:PORT (brackets of an IPv6 literal kept).
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

// --memory SIZE, else the free memory of the worker's device (the host's, or the sum over its
// GPUs) less a reserve (max(1 GiB, 10% of the total)), printed.
absl::StatusOr<uint64_t> MemoryBudget(const Args& args, const DeviceSpec& device) {
  if (args.Has("memory")) {
    ASSIGN_OR_RETURN(const uint64_t bytes, ParseByteSize(args.Get("memory")));
    if (bytes == 0) return absl::InvalidArgumentError("--memory must be > 0");
    return bytes;
  }
  uint64_t free = 0, total = 0;
  if (device.cuda) {
    ASSIGN_OR_RETURN(const std::vector<CudaDeviceInfo> gpus, ListCudaDevices());
    for (const CudaDeviceInfo& g : gpus) {
      if (!device.all && std::find(device.ordinals.begin(), device.ordinals.end(), g.ordinal) ==
                             device.ordinals.end()) {
        continue;
      }
      free += g.free_bytes;
      total += g.total_bytes;
    }
  } else {
    const HostMemory host = ReadHostMemory();
    free = host.Available();  // in a container: the room under its memory limit
    total = host.Capacity();
  }
  const uint64_t reserve = std::max<uint64_t>(uint64_t{1} << 30, total / 10);
  const uint64_t budget = free > reserve ? free - reserve : 0;
  std::printf(
      "moepool worker: memory budget for experts %.1f GiB (free %s %.1f GiB less a %.1f GiB "
      "reserve; --memory SIZE to change)\n",
      static_cast<double>(budget) / (1 << 30), device.cuda ? "GPU memory" : "memory",
      static_cast<double>(free) / (1 << 30), static_cast<double>(reserve) / (1 << 30));
  if (budget == 0) {
    return absl::ResourceExhaustedError("no free memory for experts; give --memory SIZE");
  }
  return budget;
}

// The server's options from the flags: address, message limit, token, TLS, NCCL sessions.
absl::StatusOr<worker::WorkerServerOptions> ServerOptionsFromArgs(const Args& args,
                                                                  const std::string& listen,
                                                                  const DeviceSpec& device) {
  ASSIGN_OR_RETURN(const wire::TransportKind transport,
                   wire::ParseTransport(args.Get("transport", "grpc")));
  ASSIGN_OR_RETURN(int64_t max_message_mib, args.GetInt("max-message-mib", 64));
  if (max_message_mib < 1 || max_message_mib > 2047) {
    return absl::InvalidArgumentError("--max-message-mib must be in [1, 2047]");
  }
  worker::WorkerServerOptions server_options;
  server_options.listen_address = listen;
  server_options.max_message_bytes = static_cast<int>(max_message_mib << 20);
  // Result chunks stay well inside the message limit (header fields add a few bytes).
  server_options.service.response_chunk_bytes =
      std::min<size_t>(size_t{4} << 20, static_cast<size_t>(server_options.max_message_bytes) / 2);
  ASSIGN_OR_RETURN(server_options.service.cluster_token, ClusterTokenFromArgs(args));
  RETURN_IF_ERROR(RequireTokenOffLoopback({listen}, server_options.service.cluster_token,
                                          args.Has("insecure"), "--listen"));
  ASSIGN_OR_RETURN(server_options.tls_cert_pem, ReadPem(args, "tls-cert"));
  ASSIGN_OR_RETURN(server_options.tls_key_pem, ReadPem(args, "tls-key"));
  ASSIGN_OR_RETURN(server_options.tls_client_ca_pem, ReadPem(args, "tls-ca"));
  const std::string data_port = args.Get("data-port", "0");
  if (data_port == "off") {
    server_options.data_port = -1;
  } else {
    ASSIGN_OR_RETURN(const int64_t port, args.GetInt("data-port", 0));
    if (port < 0 || port > 65535) {
      return absl::InvalidArgumentError("--data-port must be a port in [0, 65535] or off");
    }
    server_options.data_port = static_cast<int>(port);
  }
  ASSIGN_OR_RETURN(server_options.data_spin_us,
                   args.GetInt("data-spin-us", server_options.data_spin_us));
  if (server_options.data_spin_us < 0 || server_options.data_spin_us > 1000000) {
    return absl::InvalidArgumentError("--data-spin-us must be in [0, 1000000]");
  }
  if (transport == wire::TransportKind::kNccl) {
    // The pipes use the worker's first GPU (cuda:0 for a CPU worker on a GPU machine).
    const int nccl_device = device.cuda ? device.ordinals.front() : 0;
    wire::NcclOptions nccl;
    const absl::Status usable = wire::NcclUsable(nccl, nccl_device);
    if (usable.ok()) {
      server_options.service.nccl = std::make_shared<worker::NcclSessions>(nccl_device, nccl);
    } else {
      std::fprintf(stderr,
                   "moepool worker: --transport nccl: NCCL cannot be used here (%s); rows travel "
                   "over gRPC\n",
                   std::string(usable.message()).c_str());
    }
  }
  return server_options;
}

// `moepool worker --join`: no model file, no expert list (worker/joiner.h).
absl::Status ServeJoined(const Args& args, const sigset_t& stop_signals) {
  for (const char* f : {"model", "experts", "layers", "placement", "name"}) {
    if (args.Has(f)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", f, " does not go with --join: the coordinator assigns the experts and sends them"));
    }
  }
  const std::string listen = args.Get("listen");
  if (listen.empty()) return absl::InvalidArgumentError("--listen HOST:PORT is required");
  if (absl::EndsWith(listen, ":0")) {
    return absl::InvalidArgumentError("--listen with --join needs a fixed port, not 0");
  }
  ASSIGN_OR_RETURN(const DeviceSpec device, DeviceFromArgs(args));
  worker::JoinOptions o;
  o.coordinator = args.Get("join");
  o.advertise = args.Get("advertise", listen);
  o.cache_dir = args.Get("cache-dir", "moepool-cache");
  ASSIGN_OR_RETURN(o.server, ServerOptionsFromArgs(args, listen, device));
  o.cluster_token = o.server.service.cluster_token;
  RETURN_IF_ERROR(
      RequireTokenOffLoopback({o.coordinator}, o.cluster_token, args.Has("insecure"), "--join"));
  ASSIGN_OR_RETURN(o.coordinator_ca_pem, ReadPem(args, "join-tls-ca"));
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  o.threads = static_cast<int>(threads);
  o.device = device.ToString();
  o.cuda_devices = device.ordinals;
  ASSIGN_OR_RETURN(o.memory_bytes, MemoryBudget(args, device));
  ASSIGN_OR_RETURN(const bool preload, PreloadFromArgs(args));
  if (preload && !device.cuda) {
    o.preload = [](const Model& m) { return PreloadWeights(m, "moepool worker"); };
  }
  o.on_ready = [](const std::string& status) { NotifyReady(status); };
  std::atomic<bool> stop{false};
  std::thread signals([&] {
    int signal_number = 0;
    sigwait(&stop_signals, &signal_number);
    if (signal_number == SIGUSR2) return;  // the loop ended by itself
    std::fprintf(stderr, "moepool worker: %s, leaving the cluster\n",
                 signal_number == SIGINT ? "interrupted" : "terminated");
    NotifyStopping("leaving the cluster (the coordinator drains this worker)");
    stop.store(true);
  });
  const absl::Status s = worker::RunJoinedWorker(o, stop);
  if (!stop.load()) pthread_kill(signals.native_handle(), SIGUSR2);
  signals.join();
  return s;
}

absl::Status Serve(const Args& args, const sigset_t& stop_signals) {
  if (args.Has("join")) return ServeJoined(args, stop_signals);
  for (const char* f : {"advertise", "cache-dir", "memory", "join-tls-ca"}) {
    if (args.Has(f)) return absl::InvalidArgumentError(absl::StrCat("--", f, " needs --join"));
  }
  const std::string model = args.Get("model");
  if (model.empty()) return absl::InvalidArgumentError("--model is required");
  const std::string listen = args.Get("listen");
  if (listen.empty()) return absl::InvalidArgumentError("--listen HOST:PORT is required");
  ASSIGN_OR_RETURN(const DeviceSpec device, DeviceFromArgs(args));
  ASSIGN_OR_RETURN(const worker::WorkerServerOptions server_options,
                   ServerOptionsFromArgs(args, listen, device));
  ASSIGN_OR_RETURN(worker::ExpertSet experts, ExpertsFromArgs(args, model));
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  ASSIGN_OR_RETURN(const bool preload, PreloadFromArgs(args));

  worker::WorkerCoreOptions core_options;
  core_options.model_path = model;
  core_options.experts = experts;
  core_options.threads = static_cast<int>(threads);
  core_options.worker_id = args.Get("name", listen);
  core_options.cuda_devices = device.ordinals;
  ASSIGN_OR_RETURN(std::unique_ptr<worker::WorkerCore> core,
                   worker::WorkerCore::Create(core_options));
  // Experts on a GPU were copied there: their host pages are not read again.
  const bool host_weights = !device.cuda;
  if (preload && host_weights) RETURN_IF_ERROR(PreloadWeights(core->model(), "moepool worker"));
  ASSIGN_OR_RETURN(std::unique_ptr<worker::WorkerServer> server,
                   worker::WorkerServer::Start(core.get(), server_options));

  const std::string bound = absl::StrCat(HostOf(listen), ":", server->port());
  if (server_options.service.cluster_token.empty()) {
    std::fprintf(stderr,
                 "moepool worker: warning: no cluster token (--cluster-token or "
                 "MOEPOOL_CLUSTER_TOKEN); any client that reaches %s can use this worker\n",
                 bound.c_str());
  }
  std::printf("moepool worker: serving %zu experts (%.1f MiB) of %s on %s%s%s\n", experts.size(),
              static_cast<double>(core->expert_bytes()) / (1 << 20), model.c_str(), bound.c_str(),
              server->tls() ? " (TLS)" : "",
              device.cuda ? absl::StrCat(" on ", device.ToString()).c_str() : "");
  std::fflush(stdout);
  NotifyReady(absl::StrFormat("serving %zu experts on %s", experts.size(), bound));
  if (server->data_port() > 0) {
    std::fprintf(stderr, "moepool worker: data channel on %s:%d (rows, one frame per layer)\n",
                 HostOf(listen).c_str(), server->data_port());
  }

  std::unique_ptr<ResidencyWatch> watch;
  if (preload && host_weights)
    watch = std::make_unique<ResidencyWatch>(&core->model(), "moepool worker");
  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  std::fprintf(stderr, "moepool worker: %s, shutting down\n",
               signal_number == SIGINT ? "interrupted" : "terminated");
  NotifyStopping("shutting down");
  server->Shutdown(kShutdownGraceSeconds);
  server->Wait();
  return absl::OkStatus();
}

FlagSpec WorkerFlags() {
  FlagSpec spec = {{"model",       "experts",   "layers",        "placement",
                    "listen",      "threads",   "cluster-token", "cluster-token-file",
                    "tls-cert",    "tls-key",   "tls-ca",        "max-message-mib",
                    "name",        "transport", "join",          "advertise",
                    "cache-dir",   "memory",    "join-tls-ca",   "data-port",
                    "data-spin-us"},
                   {"insecure"}};
  AddDeviceFlag(&spec);
  AddPreloadFlag(&spec);
  spec.usage =
      "moepool worker --model M.gguf --experts LIST --listen HOST:PORT [flags]\n"
      "       moepool worker --join HOST:PORT --listen HOST:PORT [--cache-dir DIR] [flags]";
  spec.summary = "serve some experts of a model to a coordinator over gRPC";
  std::map<std::string, std::string>& help = spec.help;
  help["model"] = "PATH  the GGUF model file (required without --join)";
  help["join"] =
      "HOST:PORT  join the coordinator's --cluster-listen: no model file or expert list; the "
      "coordinator assigns experts and this worker fetches them into --cache-dir";
  help["advertise"] =
      "HOST:PORT  where the coordinator reaches this worker (default --listen; a 0.0.0.0 host is "
      "replaced by the address the coordinator sees)";
  help["cache-dir"] =
      "DIR  shard files fetched from the coordinator (GGUF, verified); a restart with a complete "
      "cache fetches nothing (default ./moepool-cache)";
  help["memory"] =
      "SIZE  memory for experts, e.g. 12GiB (default the free memory less max(1 GiB, 10%), "
      "printed at startup)";
  help["join-tls-ca"] =
      "PATH  CA certificate (PEM) to verify the coordinator's --cluster-tls-cert with (TLS to the "
      "control port)";
  help["experts"] =
      "LIST  experts to serve, e.g. 0-3 or 0,2,5-7, on every layer or on the --layers "
      "(this or --placement is required)";
  help["layers"] = "LIST  the layers whose --experts this worker serves (default all layers)";
  help["placement"] =
      "PATH  file of the (layer, expert) pairs to serve, as moepool plan writes it; instead of "
      "--experts";
  help["listen"] =
      "HOST:PORT  where to serve (required); port 0 picks a free one; off loopback a cluster "
      "token is required (or --insecure)";
  help["cluster-token-file"] = "PATH  file holding the cluster token, instead of --cluster-token";
  help["insecure"] =
      "serve off loopback without a cluster token: anyone who reaches --listen can use this "
      "worker";
  help["threads"] = "N  compute threads (default all cores)";
  help["cluster-token"] =
      "TOKEN  bearer token every RPC must carry (default $MOEPOOL_CLUSTER_TOKEN; without one any "
      "client that reaches the worker can use it)";
  help["tls-cert"] = "PATH  server certificate (PEM); with --tls-key the worker speaks TLS only";
  help["tls-key"] = "PATH  private key (PEM) of --tls-cert";
  help["tls-ca"] =
      "PATH  CA certificate (PEM) that must have signed every client's certificate (mutual TLS)";
  help["max-message-mib"] =
      "N  largest gRPC message received or sent, in MiB, 1..2047 (default 64)";
  help["name"] = "NAME  worker id reported to the coordinator (default the --listen address)";
  help["device"] =
      "cpu|cuda:N|cuda:all  where the experts live: cuda:N on CUDA device N, cuda:all spread "
      "over every device, balanced by bytes (default cpu)";
  help["transport"] =
      "tcp|grpc|nccl  nccl also offers the coordinator NCCL pipes for the rows, on the first "
      "--device GPU (else cuda:0); where NCCL cannot be used the worker says so (default tcp: "
      "the data channel of --data-port and gRPC)";
  help["data-spin-us"] =
      "N  how long a data-channel connection polls for the coordinator's next request before it "
      "sleeps (saves a thread wake-up per layer, costs a busy core while waiting); 0 never "
      "polls (default 2000)";
  help["data-port"] =
      "N|off  port of the data channel on the --listen host: a plain TCP connection per "
      "coordinator link that carries each layer's rows as one frame each way, with the cluster "
      "token and the --tls-* of the gRPC port; 0 picks a free port, reported to the coordinator "
      "over gRPC; off: rows over gRPC only (default 0)";
  return spec;
}

}  // namespace

int RunWorker(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, WorkerFlags());
  if (!args.ok()) return Fail(args.status());
  // Block the stop signals before any thread starts (the pool, gRPC), so every thread inherits
  // the mask and the signals wait for sigwait in Serve.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGUSR2);  // wakes the --join signal thread when the loop ends
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a closed stdout is not a reason to die
  const absl::Status s = Serve(*args, stop_signals);
  return s.ok() ? 0 : Fail(s);
}

}  // namespace moepool::cli
