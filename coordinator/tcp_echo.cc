#include "coordinator/tcp_echo.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moepool {
namespace {

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void EchoConnection(int fd) {
  std::vector<char> buf(1 << 16);
  for (;;) {
    const ssize_t r = recv(fd, buf.data(), buf.size(), 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || !WriteAll(fd, buf.data(), static_cast<size_t>(r))) break;
  }
}

absl::StatusOr<addrinfo*> Resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", host, ":", port, ": ", gai_strerror(rc)));
  }
  return res;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpEchoServer>> TcpEchoServer::Start(const std::string& host,
                                                                    int port) {
  auto s = std::unique_ptr<TcpEchoServer>(new TcpEchoServer);
  absl::StatusOr<addrinfo*> ai = Resolve(host, port, true);
  if (!ai.ok()) return ai.status();
  const int fd = socket((*ai)->ai_family, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool ok =
      fd >= 0 && bind(fd, (*ai)->ai_addr, (*ai)->ai_addrlen) == 0 && listen(fd, 16) == 0;
  freeaddrinfo(*ai);
  if (!ok) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) close(fd);
    return absl::UnavailableError(
        absl::StrCat("echo server: cannot listen on ", host, ":", port, ": ", why));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  s->port_ = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                              : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  s->listen_fd_ = fd;
  s->accept_thread_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

void TcpEchoServer::AcceptLoop() {
  for (;;) {
    const int c = accept(listen_fd_, nullptr, nullptr);
    if (c < 0) {
      if (errno == EINTR) continue;
      return;  // closed by the destructor
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_.load()) {
      close(c);
      return;
    }
    SetNoDelay(c);
    conn_fds_.push_back(c);
    threads_.emplace_back(EchoConnection, c);
  }
}

TcpEchoServer::~TcpEchoServer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    shutdown(listen_fd_, SHUT_RDWR);
    for (const int fd : conn_fds_) shutdown(fd, SHUT_RDWR);
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  for (auto& t : threads_) t.join();
  for (const int fd : conn_fds_) close(fd);
  close(listen_fd_);
}

absl::StatusOr<std::vector<double>> TcpPingPong(const std::string& host, int port, size_t bytes,
                                                int iterations) {
  absl::StatusOr<addrinfo*> ai = Resolve(host, port, false);
  if (!ai.ok()) return ai.status();
  const int fd = socket((*ai)->ai_family, SOCK_STREAM, 0);
  const bool connected = fd >= 0 && connect(fd, (*ai)->ai_addr, (*ai)->ai_addrlen) == 0;
  freeaddrinfo(*ai);
  const std::string where = absl::StrCat(host, ":", port);
  if (!connected) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) close(fd);
    return absl::UnavailableError(absl::StrCat("ping-pong: cannot connect to ", where, ": ", why));
  }
  SetNoDelay(fd);
  std::vector<char> out(bytes, 'x'), in(bytes);
  std::vector<double> micros;
  micros.reserve(static_cast<size_t>(iterations));
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!WriteAll(fd, out.data(), bytes) || !ReadAll(fd, in.data(), bytes)) {
      close(fd);
      return absl::UnavailableError(absl::StrCat("ping-pong with ", where, " broke off"));
    }
    micros.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  close(fd);
  return micros;
}

}  // namespace moepool
