// A worker that joins a coordinator (`moepool worker --join HOST:PORT`): it needs no model file
// and no expert list. The loop, until told to stop:
//
//   Join (capacity, cache) -> assignment -> Materialize the shard file (fetching what the cache
//   lacks, with progress) -> WorkerCore over that file -> ExpertService on --listen -> Ready
//   -> serve, watching the control stream.
//
// A coordinator that cannot be reached, or has nothing to assign yet, is retried with backoff
// (1 s doubling to 10 s); a transfer it breaks off resumes from the cache on the next attempt.
// When the control stream breaks while serving (the coordinator restarted), the worker joins
// again and keeps its server when the new assignment is the same. Stop (SIGTERM/SIGINT):
// Leave (the coordinator drains it at a step boundary), then the server stops. A drain ordered
// on the coordinator (POST /v1/cluster/workers/{id}/drain) ends the loop the same way.
//
// Errors that retrying cannot fix end the loop: a refused token (UNAUTHENTICATED), another
// protocol version (FAILED_PRECONDITION), a memory budget that holds no expert
// (RESOURCE_EXHAUSTED), a manifest the cache refuses (INVALID_ARGUMENT), or the listen address
// in use. Threading: RunJoinedWorker blocks its caller; `stop` may be set from any thread.
#ifndef MOEPOOL_WORKER_JOINER_H_
#define MOEPOOL_WORKER_JOINER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "moepool/v1/cluster_service.pb.h"
#include "worker/expert_service.h"
#include "worker/shard_cache.h"
#include "worker/worker_core.h"

namespace moepool::worker {

struct JoinOptions {
  std::string coordinator;  // --join HOST:PORT
  std::string advertise;    // HOST:PORT the coordinator dials; host may be empty / 0.0.0.0
  std::string cache_dir;
  uint64_t memory_bytes = 0;  // budget for expert weights (> 0)
  std::string device = "cpu";
  std::vector<int> cuda_devices;
  int threads = 0;
  std::string cluster_token;       // sent to the coordinator, and required by the expert server
  std::string coordinator_ca_pem;  // non-empty: TLS to the coordinator, verified with this CA
  WorkerServerOptions server;      // the expert server (--listen with a fixed port)
  // Reads a loaded shard into memory before Ready (the CLI's --preload); may be empty.
  std::function<absl::Status(const Model&)> preload;
  // Called each time the worker is ready (serving its assignment), with a one-line status; may
  // be empty. The CLI tells systemd (READY=1).
  std::function<void(const std::string& status)> on_ready;
  double retry_initial_s = 1;
  double retry_max_s = 10;
};

// The shard manifest of a Join answer (metadata values, tensors with their checksums), checked
// by ValidateManifest: INVALID_ARGUMENT naming what a hostile or broken coordinator sent wrong.
absl::StatusOr<ShardManifest> ManifestFromJoin(const moepool::v1::JoinResponse& joined);

// Runs the loop described above until `stop` is set, the worker is drained, or an error that
// retrying cannot fix (returned). Lines on stdout: one per state (fetching, ready); progress of
// long transfers on stderr.
absl::Status RunJoinedWorker(const JoinOptions& options, const std::atomic<bool>& stop);

}  // namespace moepool::worker

#endif  // MOEPOOL_WORKER_JOINER_H_
