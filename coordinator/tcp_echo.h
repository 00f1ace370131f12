// Raw TCP round trips, to compare gRPC's per-layer dispatch with what the network itself costs:
// a small echo server and a ping-pong client (both with TCP_NODELAY).
//
// Ownership: TcpEchoServer owns its sockets and threads (one per connection).
// Threading: Start/destructor on one thread; the server serves on its own threads.
#ifndef MOEPOOL_COORDINATOR_TCP_ECHO_H_
#define MOEPOOL_COORDINATOR_TCP_ECHO_H_

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace moepool {

// Echoes every byte it receives back on the same connection.
class TcpEchoServer {
 public:
  // Listens on host:port (port 0: any free port). UNAVAILABLE if it cannot listen.
  static absl::StatusOr<std::unique_ptr<TcpEchoServer>> Start(const std::string& host, int port);
  ~TcpEchoServer();  // closes every socket and joins the threads
  TcpEchoServer(const TcpEchoServer&) = delete;
  TcpEchoServer& operator=(const TcpEchoServer&) = delete;

  int port() const { return port_; }

 private:
  TcpEchoServer() = default;
  void AcceptLoop();

  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<int> conn_fds_;
  std::vector<std::thread> threads_;
  std::thread accept_thread_;
};

// Connects to host:port, then `iterations` times sends `bytes` bytes and reads them back;
// returns each round trip in microseconds. UNAVAILABLE naming the address on socket errors.
absl::StatusOr<std::vector<double>> TcpPingPong(const std::string& host, int port, size_t bytes,
                                                int iterations);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_TCP_ECHO_H_
