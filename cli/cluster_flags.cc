#include "cli/cluster_flags.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "coordinator/expert_placement.h"
#include "engine/status_macros.h"
#include "wire/row_codec.h"

namespace moepool::cli {
namespace {

const char* const kClusterValued[] = {
    "workers",         "local-experts",     "wire-dtype", "wire-return-dtype", "step-timeout",
    "connect-timeout", "cluster-token",     "tls-ca",     "tls-cert",          "tls-key",
    "tls-server-name", "max-message-bytes", "transport",  "local-fallback",    "data-spin-us"};

}  // namespace

absl::StatusOr<std::string> ClusterTokenFromArgs(const Args& args) {
  if (args.Has("cluster-token") && args.Has("cluster-token-file")) {
    return absl::InvalidArgumentError("give --cluster-token or --cluster-token-file, not both");
  }
  if (args.Has("cluster-token")) return args.Get("cluster-token");
  if (args.Has("cluster-token-file")) {
    const std::string path = args.Get("cluster-token-file");
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError("--cluster-token-file " + path + ": cannot read");
    std::stringstream ss;
    ss << in.rdbuf();
    std::string token(absl::StripTrailingAsciiWhitespace(ss.str()));
    if (token.empty()) {
      return absl::InvalidArgumentError("--cluster-token-file " + path + " is empty");
    }
    return token;
  }
  const char* env = std::getenv("MOEPOOL_CLUSTER_TOKEN");
  return std::string(env != nullptr ? env : "");
}

bool IsLoopbackAddress(const std::string& address) {
  std::string host = address;
  if (!host.empty() && host.front() == '[') {  // [v6]:port
    const size_t close = host.find(']');
    host = close == std::string::npos ? host.substr(1) : host.substr(1, close - 1);
  } else if (std::count(host.begin(), host.end(), ':') == 1) {  // host:port
    host = host.substr(0, host.find(':'));
  }
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::Status RequireTokenOffLoopback(const std::vector<std::string>& addresses,
                                     const std::string& token, bool insecure,
                                     const std::string& what) {
  if (!token.empty() || insecure) return absl::OkStatus();
  for (const std::string& a : addresses) {
    if (IsLoopbackAddress(a)) continue;
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", a,
        " is not on loopback: give a cluster token (--cluster-token T or "
        "MOEPOOL_CLUSTER_TOKEN=T, the same on the coordinator and every worker), or --insecure "
        "to run without one"));
  }
  return absl::OkStatus();
}

void AddClusterFlags(FlagSpec* spec) {
  for (const char* f : kClusterValued) spec->valued.insert(f);
  spec->boolean.insert("insecure");
  std::map<std::string, std::string>& help = spec->help;
  help["workers"] =
      "LIST  comma-separated HOST:PORT of the workers that compute the experts, each checked at "
      "startup (default: every expert in this process); --local-experts, --wire-dtype, the "
      "timeouts, --cluster-token, --tls-*, --max-message-bytes, --transport and --local-fallback "
      "need it";
  help["local-experts"] =
      "LIST  experts computed in this process on every layer, e.g. 0,2,5-7 (default none)";
  help["wire-dtype"] =
      "f32|f16|bf16|q8_0  row values sent to the workers; f32 gives a local run's results bit "
      "for bit with top-2 routing; q8_0 (blocks of 32 values and an f16 scale, 1.06 bytes a "
      "value) is the engine's own activation format for Q4_0/Q5_0/Q8_0 weights (default f32)";
  help["wire-return-dtype"] =
      "f32|f16|bf16|q8_0  the sums the workers return (default f16 with --wire-dtype q8_0, else "
      "the --wire-dtype)";
  help["step-timeout"] = "X  seconds a worker may take to answer one layer (default 30)";
  help["connect-timeout"] = "X  seconds to wait for each worker at startup (default 10)";
  help["cluster-token"] =
      "TOKEN  bearer token sent to the workers on every RPC (default $MOEPOOL_CLUSTER_TOKEN, "
      "else none)";
  help["tls-ca"] =
      "PATH  CA certificate (PEM) the workers' certificates are checked against (default the "
      "system roots); this, --tls-cert or --tls-key turns TLS on";
  help["tls-cert"] = "PATH  client certificate (PEM) for mutual TLS, with --tls-key";
  help["tls-key"] = "PATH  private key (PEM) of --tls-cert";
  help["tls-server-name"] =
      "NAME  name expected in the workers' certificates when it differs from the host";
  help["max-message-bytes"] =
      "N  largest message sent to a worker; larger batches go in chunks (default 4194304, "
      "4 MiB)";
  help["transport"] =
      "tcp|grpc|nccl  how token rows travel to the workers: tcp on each worker's data channel "
      "(one frame each way per layer, the same token and TLS as gRPC), grpc inside gRPC "
      "streams, nccl GPU to GPU to workers that offer it; a worker that cannot be reached the "
      "chosen way is reached over gRPC, with a line on stderr (default tcp)";
  help["data-spin-us"] =
      "N  with --transport tcp, how long a link polls for a worker's answer before it sleeps: "
      "polling saves the wake-up of a sleeping thread (about 100 us on a VM) at the cost of a "
      "busy core while waiting; 0 never polls (default 2000)";
  help["cluster-token-file"] =
      "PATH  file holding the cluster token (e.g. made by `head -c 32 /dev/urandom | base64`), "
      "instead of --cluster-token";
  help["insecure"] =
      "allow --workers off loopback without a cluster token (the expert link then takes no "
      "credentials: anyone on the network can use or impersonate a worker)";
  help["local-fallback"] =
      "on|off  experts that no up worker holds are computed in this process, with the same "
      "bits: workers may hold part of the model and come and go without failing a request; "
      "off: a step that needs such an expert fails (503) and every expert must be held at "
      "startup (default on)";
  AddDeviceFlag(spec);
}

void ApplyDeviceToCluster(const std::string& model_path, const DeviceSpec& device,
                          ClusterOptions* cluster) {
  cluster->nccl.device = device.cuda ? device.ordinals.front() : 0;
  if (!device.cuda) return;
  const std::vector<int> local = cluster->local_experts;
  cluster->local_backend_factory = [model_path, local, device] {
    return OpenDeviceExperts(model_path, local, device, /*show_progress=*/true);
  };
}

absl::StatusOr<std::optional<ClusterOptions>> ClusterOptionsFromArgs(const Args& args) {
  const bool elastic = args.Has("cluster-listen");  // moepool serve only
  if (!args.Has("workers") && !elastic) {
    for (const char* f : kClusterValued) {
      if (args.Has(f)) {
        return absl::InvalidArgumentError(std::string("--") + f +
                                          " needs --workers (or, on serve, --cluster-listen)");
      }
    }
    if (args.Has("insecure")) return absl::InvalidArgumentError("--insecure needs --workers");
    return std::nullopt;
  }
  ClusterOptions o;
  o.elastic = elastic;
  for (absl::string_view w : absl::StrSplit(args.Get("workers"), ',', absl::SkipWhitespace())) {
    o.workers.emplace_back(absl::StripAsciiWhitespace(w));
  }
  if (o.workers.empty() && !elastic) {
    return absl::InvalidArgumentError("--workers lists no worker");
  }
  // The model's expert count is checked when the backend opens the model.
  ASSIGN_OR_RETURN(o.local_experts, ParseExpertList(args.Get("local-experts"), 65536));
  ASSIGN_OR_RETURN(o.wire_dtype, wire::ParseDType(args.Get("wire-dtype", "f32")));
  if (args.Has("wire-return-dtype")) {
    ASSIGN_OR_RETURN(o.wire_return_dtype, wire::ParseDType(args.Get("wire-return-dtype")));
  }
  ASSIGN_OR_RETURN(o.step_timeout_s, args.GetDouble("step-timeout", o.step_timeout_s));
  ASSIGN_OR_RETURN(o.connect_timeout_s, args.GetDouble("connect-timeout", o.connect_timeout_s));
  if (o.step_timeout_s <= 0 || o.connect_timeout_s <= 0) {
    return absl::InvalidArgumentError("--step-timeout and --connect-timeout must be > 0");
  }
  ASSIGN_OR_RETURN(o.max_message_bytes, args.GetInt("max-message-bytes", o.max_message_bytes));
  ASSIGN_OR_RETURN(o.transport, wire::ParseTransport(args.Get("transport", "tcp")));
  ASSIGN_OR_RETURN(o.data_spin_us, args.GetInt("data-spin-us", o.data_spin_us));
  if (o.data_spin_us < 0 || o.data_spin_us > 1000000) {
    return absl::InvalidArgumentError("--data-spin-us must be in [0, 1000000]");
  }
  const std::string fallback = args.Get("local-fallback", "on");
  if (fallback != "on" && fallback != "off") {
    return absl::InvalidArgumentError("--local-fallback must be on or off, not '" + fallback + "'");
  }
  o.local_fallback = fallback == "on";
  o.nccl.nccl.timeout_s = o.step_timeout_s;
  ASSIGN_OR_RETURN(o.cluster_token, ClusterTokenFromArgs(args));
  RETURN_IF_ERROR(
      RequireTokenOffLoopback(o.workers, o.cluster_token, args.Has("insecure"), "worker"));
  o.tls_ca_path = args.Get("tls-ca");
  o.tls_cert_path = args.Get("tls-cert");
  o.tls_key_path = args.Get("tls-key");
  o.tls_server_name = args.Get("tls-server-name");
  return o;
}

absl::StatusOr<LoadedEngine> LoadEngineForArgs(const Args& args, EngineOptions options) {
  ASSIGN_OR_RETURN(const DeviceSpec device, DeviceFromArgs(args));
  ASSIGN_OR_RETURN(std::optional<ClusterOptions> cluster, ClusterOptionsFromArgs(args));
  LoadedEngine loaded;
  if (!cluster.has_value() && device.cuda) {
    ASSIGN_OR_RETURN(loaded.device_experts, OpenDeviceExperts(options.model_path, {}, device,
                                                              /*show_progress=*/true));
    options.experts = loaded.device_experts.get();
  }
  if (cluster.has_value()) {
    cluster->local_threads = options.threads;
    ApplyDeviceToCluster(options.model_path, device, &*cluster);
    ASSIGN_OR_RETURN(loaded.cluster, ClusterExpertBackend::Create(options.model_path, *cluster));
    options.experts = loaded.cluster.get();
  }
  options.attention = AttentionOnDevice(device);
  ASSIGN_OR_RETURN(loaded.engine, Engine::Load(options));
  return loaded;
}

}  // namespace moepool::cli
