// The coordinator flags shared by `moepool eval`, `run` and `bench`:
//   --workers host:port,...   experts run on these workers (ClusterExpertBackend)
//   --local-experts SPEC      experts kept in this process on every layer, e.g. 0,2,5-7
//   --wire-dtype f32|f16|bf16 row values on the wire (f32: bit-identical to a local run, k <= 2)
//   --step-timeout S          seconds a worker may take to answer one layer (default 30)
//   --connect-timeout S       seconds to wait for each worker at startup (default 10)
//   --cluster-token T         bearer token for every RPC (default: $MOEPOOL_CLUSTER_TOKEN)
//   --tls-ca/--tls-cert/--tls-key PEM files, --tls-server-name NAME: TLS / mutual TLS
//   --max-message-bytes N     largest message sent; larger batches are chunked (default 4 MiB)
//   --local-fallback on|off   experts no up worker holds are computed here (default on)
//   --insecure                allow workers off loopback without a cluster token
// Without --workers the engine runs every expert locally, as before. Also added here (they do
// not need --workers):
//   --device cpu|cuda:N|cuda:all  where this process's experts run (cli/device_flags.h): every
//                             expert without --workers, the --local-experts with them
//   --transport grpc|nccl     how token rows travel to workers (wire/transport.h); this
//                             one needs --workers
#ifndef MOEPOOL_CLI_CLUSTER_FLAGS_H_
#define MOEPOOL_CLI_CLUSTER_FLAGS_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "cli/device_flags.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/engine.h"

namespace moepool::cli {

// Adds the flags above to `spec`, with their help lines.
void AddClusterFlags(FlagSpec* spec);

// The cluster options, or nullopt without --workers. INVALID_ARGUMENT for bad values or
// cluster flags given without --workers. The token comes from --cluster-token, else from the
// environment variable MOEPOOL_CLUSTER_TOKEN.
absl::StatusOr<std::optional<ClusterOptions>> ClusterOptionsFromArgs(const Args& args);

// The cluster token: --cluster-token, else the contents of --cluster-token-file (trailing
// whitespace removed), else $MOEPOOL_CLUSTER_TOKEN, else empty. Errors: both flags given, an
// unreadable or empty file.
absl::StatusOr<std::string> ClusterTokenFromArgs(const Args& args);

// True for a HOST:PORT (or host) on the loopback interface: 127.0.0.0/8, ::1, localhost.
bool IsLoopbackAddress(const std::string& address);

// The rule for the expert link (a worker holds the model's weights and computes for whoever
// reaches it): off loopback a cluster token is required unless --insecure. `addresses` are the
// worker's --listen or the coordinator's --workers. INVALID_ARGUMENT naming the first address
// off loopback and what to do.
absl::Status RequireTokenOffLoopback(const std::vector<std::string>& addresses,
                                     const std::string& token, bool insecure,
                                     const std::string& what);

// Sets cluster->local_backend_factory so the local experts run on `device` (nothing for cpu),
// and the coordinator's NCCL device (the first of `device`, else cuda:0).
void ApplyDeviceToCluster(const std::string& model_path, const DeviceSpec& device,
                          ClusterOptions* cluster);

// An engine and, in cluster mode, the expert backend it borrows (destroyed after the engine).
struct LoadedEngine {
  std::unique_ptr<ExpertBackend> device_experts;  // --device cuda:* without --workers
  std::unique_ptr<ClusterExpertBackend> cluster;
  std::unique_ptr<Engine> engine;
};

// Loads `options.model_path`; with --workers, first connects to the workers (errors name them)
// and binds only the non-expert weights in the engine. --device is checked before anything is
// loaded (a cuda:* value fails here in a build without CUDA).
absl::StatusOr<LoadedEngine> LoadEngineForArgs(const Args& args, EngineOptions options);

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_CLUSTER_FLAGS_H_
