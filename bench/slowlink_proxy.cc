// moepool_slowlink: a userspace TCP proxy that makes a loopback connection behave like a slower
// network link, for measuring the cluster where `tc netem` is unavailable.
//
//   moepool_slowlink --listen 127.0.0.1:0 --target 127.0.0.1:7070 --delay-us 100 --rate-mbit 1000
//
// Every accepted connection gets its own connection to --target. Each direction is a separate
// simulated link: a chunk read at time t leaves the link's "wire" at
//   depart = max(t, previous depart) + bytes * 8 / rate     (serialization at --rate-mbit)
// and is written to the other side at depart + --delay-us (one-way propagation delay), so a
// request/response pair sees about 2 * delay of extra round trip. --rate-mbit 0 means no cap.
// At most kMaxQueuedBytes are in flight per direction; the reader then waits (backpressure).
//
// Prints "moepool_slowlink: listening on HOST:PORT" (the actual port when --listen asks for 0)
// once it accepts connections; exits 0 on SIGTERM or SIGINT. Errors on one connection close that
// connection only. Threads: one acceptor plus two per direction of each connection.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kChunkBytes = 16 * 1024;
constexpr size_t kMaxQueuedBytes = 4 * 1024 * 1024;

struct LinkOptions {
  std::chrono::nanoseconds delay{0};
  double rate_mbit = 0;  // 0: unlimited
};

struct HostPort {
  std::string host;
  std::string port;
};

bool SplitHostPort(const std::string& s, HostPort* out) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size()) return false;
  out->host = s.substr(0, colon);
  out->port = s.substr(colon + 1);
  if (out->host.size() > 2 && out->host.front() == '[' && out->host.back() == ']') {
    out->host = out->host.substr(1, out->host.size() - 2);
  }
  return true;
}

void SetNoDelay(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Returns a connected socket to `target`, or -1.
int ConnectTo(const HostPort& target) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(target.host.c_str(), target.port.c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd >= 0) SetNoDelay(fd);
  return fd;
}

// Returns a listening socket bound to `listen`, or -1 (with a message on stderr).
int ListenOn(const HostPort& listen_at) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const int gai = getaddrinfo(listen_at.host.c_str(), listen_at.port.c_str(), &hints, &res);
  if (gai != 0) {
    std::fprintf(stderr, "moepool_slowlink: %s: %s\n", listen_at.host.c_str(), gai_strerror(gai));
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 128) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) std::perror("moepool_slowlink: bind/listen");
  return fd;
}

// Both sockets of one proxied connection; closed when the last direction lets go of it.
struct Connection {
  int client_fd = -1;
  int target_fd = -1;
  ~Connection() {
    close(client_fd);
    close(target_fd);
  }
};

// One direction of a connection: a reader thread stamps chunks with their delivery time and a
// writer thread delivers them at that time.
class Direction {
 public:
  Direction(std::shared_ptr<Connection> conn, int from, int to, const LinkOptions& link)
      : conn_(std::move(conn)), from_(from), to_(to), link_(link) {}

  void Run() {
    std::thread writer([this] { WriteLoop(); });
    ReadLoop();
    writer.join();
  }

 private:
  struct Chunk {
    Clock::time_point deliver_at;
    std::string bytes;  // empty: end of stream
  };

  void ReadLoop() {
    Clock::time_point wire_free = Clock::now();
    std::vector<char> buf(kChunkBytes);
    while (true) {
      const ssize_t n = recv(from_, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      const Clock::time_point now = Clock::now();
      Chunk c;
      if (n > 0) {
        c.bytes.assign(buf.data(), static_cast<size_t>(n));
        Clock::time_point depart = wire_free > now ? wire_free : now;
        if (link_.rate_mbit > 0) {
          // 1 Mbit/s moves one bit per microsecond: 1000 / rate ns per bit.
          depart += std::chrono::nanoseconds(
              static_cast<int64_t>(static_cast<double>(n) * 8.0 * 1000.0 / link_.rate_mbit));
        }
        wire_free = depart;
        c.deliver_at = depart + link_.delay;
      } else {
        c.deliver_at = (wire_free > now ? wire_free : now) + link_.delay;
      }
      std::unique_lock<std::mutex> lock(mu_);
      space_.wait(lock, [&] { return queued_bytes_ < kMaxQueuedBytes || writer_done_; });
      if (writer_done_) break;
      queued_bytes_ += c.bytes.size();
      const bool end = c.bytes.empty();
      queue_.push_back(std::move(c));
      ready_.notify_one();
      if (end) break;
    }
  }

  void WriteLoop() {
    bool ok = true;
    while (true) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [&] { return !queue_.empty(); });
        c = std::move(queue_.front());
        queue_.pop_front();
        queued_bytes_ -= c.bytes.size();
        space_.notify_one();
      }
      std::this_thread::sleep_until(c.deliver_at);
      if (c.bytes.empty()) break;
      size_t off = 0;
      while (off < c.bytes.size()) {
        const ssize_t n = send(to_, c.bytes.data() + off, c.bytes.size() - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          ok = false;
          break;
        }
        off += static_cast<size_t>(n);
      }
      if (!ok) break;
    }
    if (ok) {
      shutdown(to_, SHUT_WR);  // pass the end of stream on
    } else {
      // The receiving side is gone: stop reading and tear down both directions.
      shutdown(from_, SHUT_RDWR);
      shutdown(to_, SHUT_RDWR);
    }
    std::lock_guard<std::mutex> lock(mu_);
    writer_done_ = true;
    space_.notify_all();
  }

  std::shared_ptr<Connection> conn_;
  const int from_, to_;
  const LinkOptions link_;
  std::mutex mu_;
  std::condition_variable ready_, space_;
  std::deque<Chunk> queue_;
  size_t queued_bytes_ = 0;
  bool writer_done_ = false;
};

void ServeConnection(int client_fd, const HostPort& target, const LinkOptions& link) {
  SetNoDelay(client_fd);
  auto conn = std::make_shared<Connection>();
  conn->client_fd = client_fd;
  conn->target_fd = ConnectTo(target);
  if (conn->target_fd < 0) {
    std::fprintf(stderr, "moepool_slowlink: cannot connect to %s:%s\n", target.host.c_str(),
                 target.port.c_str());
    return;  // closes client_fd
  }
  auto up = std::make_shared<Direction>(conn, conn->client_fd, conn->target_fd, link);
  auto down = std::make_shared<Direction>(conn, conn->target_fd, conn->client_fd, link);
  std::thread([up] { up->Run(); }).detach();
  std::thread([down] { down->Run(); }).detach();
}

std::string LocalAddress(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    port = ntohs(a->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
  inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
  port = ntohs(a->sin6_port);
  return "[" + std::string(host) + "]:" + std::to_string(port);
}

int Usage() {
  std::fprintf(stderr,
               "usage: moepool_slowlink --listen HOST:PORT --target HOST:PORT "
               "[--delay-us N] [--rate-mbit N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  HostPort listen_at, target;
  bool have_listen = false, have_target = false;
  LinkOptions link;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return Usage();
    const std::string value = argv[++i];
    char* end = nullptr;
    if (flag == "--listen") {
      have_listen = SplitHostPort(value, &listen_at);
      if (!have_listen) return Usage();
    } else if (flag == "--target") {
      have_target = SplitHostPort(value, &target);
      if (!have_target) return Usage();
    } else if (flag == "--delay-us") {
      const double us = std::strtod(value.c_str(), &end);
      if (*end != '\0' || us < 0) return Usage();
      link.delay = std::chrono::nanoseconds(static_cast<int64_t>(us * 1000.0));
    } else if (flag == "--rate-mbit") {
      link.rate_mbit = std::strtod(value.c_str(), &end);
      if (*end != '\0' || link.rate_mbit < 0) return Usage();
    } else {
      return Usage();
    }
  }
  if (!have_listen || !have_target) return Usage();

  // Signals are taken by sigwait in the main thread; every other thread inherits the block.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  signal(SIGPIPE, SIG_IGN);

  const int listen_fd = ListenOn(listen_at);
  if (listen_fd < 0) return 1;
  std::printf("moepool_slowlink: listening on %s\n", LocalAddress(listen_fd).c_str());
  std::fflush(stdout);

  std::thread([listen_fd, target, link] {
    while (true) {
      const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
          if (errno == EMFILE || errno == ENFILE) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
          }
          continue;
        }
        std::perror("moepool_slowlink: accept");
        std::_Exit(1);
      }
      ServeConnection(fd, target, link);
    }
  }).detach();

  int sig = 0;
  sigwait(&stop, &sig);
  // Detached connection threads may be blocked in I/O: leave without running destructors.
  std::fflush(stdout);
  std::_Exit(0);
}
