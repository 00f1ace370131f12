// The in-memory WorkerLink (coordinator/worker_link.h) for tests: each link calls a WorkerCore of
// this process directly, with the rows through the wire codec of the round's dtype, so the
// cluster backend's dispatch, retry, links and combine run without sockets, gRPC or timing.
// Faults are switched per worker: down (the next job fails UNAVAILABLE, as on a lost connection,
// and the link is down from then on; it is back up, after the AcceptWorker check, once the
// worker is up again) and stalled (jobs wait until the step watchdog cancels them:
// DEADLINE_EXCEEDED). A worker's reported pace (SetPace) stands in for a slower machine or link.
//
// Threading: the links may be used from any thread (the backend's forward thread and the
// watchdog's). A posted job is computed on the posting thread unless the worker is stalled.
#ifndef MOEPOOL_TESTS_CLUSTER_IN_PROCESS_LINK_UTIL_H_
#define MOEPOOL_TESTS_CLUSTER_IN_PROCESS_LINK_UTIL_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "coordinator/worker_link.h"
#include "worker/worker_core.h"

namespace moepool::testing {

class InProcessWorkers {
 public:
  // Registers `core` (borrowed) under `address`, a name the links are made for.
  void Add(const std::string& address, worker::WorkerCore* core);
  void SetDown(const std::string& address, bool down);
  void SetStalled(const std::string& address, bool stalled);
  // The timing its links report for each exchange (as a real link measures it): the worker's
  // compute time per row and the link's part; until set, exchanges report no timing.
  void SetPace(const std::string& address, double compute_micros_per_row, double link_micros);

  // Jobs the links of `address` computed, per link in creation order (a worker's links).
  std::vector<int> JobsPerLink(const std::string& address) const;

  // For ClusterOptions::make_link. The registry must outlive the links.
  WorkerLinkFactory Factory();

  struct Worker {
    worker::WorkerCore* core = nullptr;
    bool down = false;
    bool stalled = false;
    double compute_micros_per_row = 0;
    double link_micros = 0;
    std::vector<int> jobs;  // per link
  };

 private:
  friend class InProcessLink;
  mutable std::mutex mu_;
  std::map<std::string, Worker> workers_;
};

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_CLUSTER_IN_PROCESS_LINK_UTIL_H_
