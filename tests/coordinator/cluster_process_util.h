// Real `moepool worker` and `moepool serve` child processes for the end-to-end tests. Each reads
// its port from the process's ready line and is killed when the object goes away.
#ifndef MOEPOOL_TESTS_COORDINATOR_CLUSTER_PROCESS_UTIL_H_
#define MOEPOOL_TESTS_COORDINATOR_CLUSTER_PROCESS_UTIL_H_

#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

#include "httplib.h"
#include "nlohmann/json.hpp"

namespace moepool::testing {

// A `moepool worker` child ("serving ... on HOST:PORT").
class WorkerProcess {
 public:
  ~WorkerProcess() { Kill(); }

  // Starts a worker for `experts` of `model` on 127.0.0.1:port (0: any) with one thread and the
  // extra flags; false (with a test failure showing its log) if it does not come up.
  bool Start(const std::string& model, const std::string& experts, int port = 0,
             const std::vector<std::string>& extra = {});
  void Kill();  // SIGKILL

  int port() const { return port_; }
  std::string address() const;

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

// A `moepool serve` child ("moepool: serving on http://HOST:PORT") on 127.0.0.1 with one thread.
class ServeProcess {
 public:
  ServeProcess() = default;
  // A view of a server started elsewhere (not stopped by this object).
  explicit ServeProcess(int port) : port_(port) {}
  ~ServeProcess() { Stop(); }

  // `flags` follow `serve --listen 127.0.0.1:0 --threads 1`; give --parallel etc. there (the
  // default --parallel is 1 unless given).
  bool Start(const std::vector<std::string>& flags);
  void Stop();  // SIGTERM, then waits
  bool alive() const;
  int port() const { return port_; }
  void set_port(int port) { port_ = port; }
  const std::string& log_path() const { return log_; }
  httplib::Client Client() const;

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_;
};

// `moepool serve --cluster-listen 127.0.0.1:0` (an elastic coordinator) with stdout and stderr
// in one log; its HTTP and control ports are read from the log.
class ElasticServeProcess {
 public:
  ~ElasticServeProcess() { Stop(); }
  // `flags` follow `serve --listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 --threads 1`.
  bool Start(const std::string& model, const std::vector<std::string>& flags = {});
  void Stop();  // SIGTERM, then waits
  int port() const { return port_; }
  std::string control_address() const;
  const std::string& log_path() const { return log_; }
  httplib::Client Client() const;
  ServeProcess& as_serve() { return serve_view_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int control_port_ = 0;
  std::string log_;
  ServeProcess serve_view_;  // for GetJson / MetricValue (shares the port)
};

// `moepool worker --join` on 127.0.0.1:<a free port>, one thread, its cache in `cache_dir`.
class JoinedWorkerProcess {
 public:
  ~JoinedWorkerProcess() { Kill(); }
  // Starts it and waits up to `timeout_s` for "ready as"; false (with a failure) otherwise.
  bool Start(const std::string& coordinator, const std::string& cache_dir,
             const std::vector<std::string>& extra = {}, double timeout_s = 60);
  // Starts it without waiting (for workers expected to fail).
  bool Spawn(const std::string& coordinator, const std::string& cache_dir,
             const std::vector<std::string>& extra = {});
  void Kill();       // SIGKILL
  void Terminate();  // SIGTERM (a drain), without waiting
  // Waits up to `timeout_s` for the process to exit; its exit code, or -1 if it did not.
  int Wait(double timeout_s);
  bool running() const { return pid_ > 0; }
  const std::string& log_path() const { return log_; }
  std::string address() const;

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_;
};

// A CA (ca.pem), a server certificate for 127.0.0.1 and localhost (server.pem, server.key) and
// a client certificate (client.pem, client.key), made once per process with the openssl tool;
// "" if it failed (its log in TempDir()/certs/log).
const std::string& TestCertDir();

// GET `path` on the server; (HTTP status or 0 if no answer, body parsed or discarded).
std::pair<int, nlohmann::json> GetJson(const ServeProcess& s, const std::string& path);

// The value of an unlabelled Prometheus sample `name` in /metrics, or -1 if absent.
double MetricValue(const ServeProcess& s, const std::string& name);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_COORDINATOR_CLUSTER_PROCESS_UTIL_H_
