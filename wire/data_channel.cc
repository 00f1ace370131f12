#include "wire/data_channel.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/data_tls.h"

namespace moepool::wire {
namespace {

namespace pb = ::moepool::v1;

constexpr size_t kHandshakeFrameBytes = 64 << 10;  // hello and welcome frames

void IgnoreSigpipeOnce() {
  static const bool done = [] {
    std::signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)done;
}

// Latency is the point: no Nagle delay on the small frames of a decode step.
void SetNoDelay(int fd) {
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

bool ConstantTimeSame(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

struct AddrInfoFree {
  void operator()(addrinfo* a) const { freeaddrinfo(a); }
};

absl::StatusOr<std::unique_ptr<addrinfo, AddrInfoFree>> Resolve(const std::string& host, int port,
                                                                bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const int rc =
      getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rc)));
  }
  return std::unique_ptr<addrinfo, AddrInfoFree>(found);
}

// Connects within timeout_s; the socket is blocking again on return.
absl::StatusOr<int> Connect(const std::string& host, int port, double timeout_s) {
  auto addrs = Resolve(host, port, false);
  if (!addrs.ok()) return addrs.status();
  std::string last = "no address";
  for (addrinfo* a = addrs->get(); a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int rc = connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      do {
        rc = poll(&p, 1, static_cast<int>(timeout_s * 1000));
      } while (rc < 0 && errno == EINTR);
      int err = 0;
      socklen_t len = sizeof(err);
      if (rc == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
        rc = 0;
      } else {
        last = rc == 0 ? "connect timed out" : std::strerror(err != 0 ? err : errno);
        rc = -1;
      }
    } else if (rc != 0) {
      last = std::strerror(errno);
    }
    if (rc == 0) {
      fcntl(fd, F_SETFL, flags);
      SetNoDelay(fd);
      return fd;
    }
    close(fd);
  }
  return absl::UnavailableError(last);
}

}  // namespace

std::string HostOfAddress(const std::string& address) {
  std::string host = address.substr(0, address.rfind(':'));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return host;
}

DataStream::DataStream(int fd, SSL* ssl, size_t max_frame_bytes)
    : fd_(fd), ssl_(ssl), max_frame_bytes_(max_frame_bytes) {}

void DataStream::AttachTls(SSL* ssl) { ssl_ = ssl; }

DataStream::~DataStream() {
  if (ssl_ != nullptr) SSL_free(ssl_);
  close(fd_);
}

void DataStream::Abort() {
  if (!aborted_.exchange(true)) shutdown(fd_, SHUT_RDWR);
}

namespace {

void SetTimeout(int fd, int option, double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
}

}  // namespace

void DataStream::SetReadTimeout(double seconds) { SetTimeout(fd_, SO_RCVTIMEO, seconds); }

void DataStream::SetWriteTimeout(double seconds) { SetTimeout(fd_, SO_SNDTIMEO, seconds); }

ssize_t DataStream::WaitAndRecv(char* data, size_t n) {
  if (spin_max_us_ <= 0 || !written_) return -1;
  // Poll for the answer instead of sleeping in recv: a thread woken on an idle core pays the
  // core's wake-up (about 100 us on a virtual machine, the size of the whole exchange). Polling
  // stops after the usual gap between our write and the peer's frame (learned per stream) has
  // passed twice over, or after spin_max_us_; then the read blocks.
  const auto since_write = [&] {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - last_write_)
        .count();
  };
  double until = since_write() + static_cast<double>(spin_max_us_);
  if (gap_us_ > 0) until = std::min(until, 2 * gap_us_ + 200);
  ssize_t got;
  do {
    got = recv(fd_, data, n, MSG_DONTWAIT);
    if (got >= 0 || errno != EAGAIN) break;
    sched_yield();  // a runnable thread on this core (a worker computing) goes first
  } while (since_write() < until && !aborted_.load());
  return got;
}

void DataStream::NoteFrameArrived() {
  if (!written_) return;
  const double gap =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - last_write_)
          .count();
  // Idle periods (seconds between requests) are not the rhythm of a step: leave them out.
  if (gap > 100000) return;
  gap_us_ = gap_us_ <= 0 ? gap : 0.8 * gap_us_ + 0.2 * gap;
}

absl::Status DataStream::SendAll(const char* data, size_t n) {
  while (n > 0) {
    if (aborted_.load()) return absl::UnavailableError("data channel aborted");
    ssize_t sent;
    if (ssl_ != nullptr) {
      sent = SSL_write(ssl_, data, static_cast<int>(std::min<size_t>(n, 1 << 30)));
      if (sent <= 0) return absl::UnavailableError(TakeTlsError("TLS write failed"));
    } else {
      sent = send(fd_, data, n, MSG_NOSIGNAL);
      if (sent < 0 && errno == EINTR) continue;
      if (sent <= 0) {
        return absl::UnavailableError(absl::StrCat("send failed: ", std::strerror(errno)));
      }
    }
    data += sent;
    n -= static_cast<size_t>(sent);
  }
  return absl::OkStatus();
}

absl::Status DataStream::RecvAll(char* data, size_t n) {
  bool first = true;  // only the first bytes of a frame are waited for
  while (n > 0) {
    if (aborted_.load()) return absl::UnavailableError("data channel aborted");
    ssize_t got;
    if (ssl_ != nullptr) {
      got = SSL_read(ssl_, data, static_cast<int>(std::min<size_t>(n, 1 << 30)));
      if (got <= 0) {
        return absl::UnavailableError(TakeTlsError("TLS connection closed or failed"));
      }
    } else {
      got = first ? WaitAndRecv(data, n) : -1;
      first = false;
      if (got < 0) got = recv(fd_, data, n, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got == 0) return absl::UnavailableError("connection closed by the peer");
      if (got < 0) {
        return absl::UnavailableError(absl::StrCat("receive failed: ", std::strerror(errno)));
      }
    }
    data += got;
    n -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

absl::Status DataStream::Write(const google::protobuf::MessageLite& message, uint64_t* bytes) {
  const size_t n = message.ByteSizeLong();
  if (n > max_frame_bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame of ", n, " bytes exceeds the limit of ", max_frame_bytes_));
  }
  out_.resize(4 + n);
  const uint32_t len = static_cast<uint32_t>(n);
  for (int i = 0; i < 4; ++i) out_[static_cast<size_t>(i)] = static_cast<char>(len >> (8 * i));
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out_.data() + 4));
  if (bytes != nullptr) *bytes = out_.size();
  absl::Status s = SendAll(out_.data(), out_.size());
  last_write_ = std::chrono::steady_clock::now();
  written_ = true;
  return s;
}

absl::Status DataStream::Read(google::protobuf::MessageLite* message, uint64_t* bytes) {
  unsigned char header[4];
  if (absl::Status s = RecvAll(reinterpret_cast<char*>(header), 4); !s.ok()) return s;
  NoteFrameArrived();
  written_ = false;  // the next wait is timed from the next write
  const uint32_t len = static_cast<uint32_t>(header[0]) | static_cast<uint32_t>(header[1]) << 8 |
                       static_cast<uint32_t>(header[2]) << 16 |
                       static_cast<uint32_t>(header[3]) << 24;
  if (len > max_frame_bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame of ", len, " bytes exceeds the limit of ", max_frame_bytes_));
  }
  in_.resize(len);
  if (absl::Status s = RecvAll(in_.data(), len); !s.ok()) return s;
  if (!message->ParseFromArray(in_.data(), static_cast<int>(len))) {
    return absl::InvalidArgumentError(absl::StrCat("a frame of ", len, " bytes does not parse"));
  }
  if (bytes != nullptr) *bytes = 4 + len;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DataStream>> DialDataChannel(const std::string& host, int port,
                                                            const DataDialOptions& options) {
  IgnoreSigpipeOnce();
  const std::string where = absl::StrCat("data channel ", host, ":", port);
  auto fail = [&](absl::StatusCode code, const std::string& why) {
    return absl::Status(code, absl::StrCat(where, ": ", why));
  };
  absl::StatusOr<int> fd = Connect(host, port, options.timeout_s);
  if (!fd.ok()) return fail(absl::StatusCode::kUnavailable, std::string(fd.status().message()));
  SSL* ssl = nullptr;
  if (options.tls) {
    absl::StatusOr<SSL_CTX*> ctx =
        NewDataClientContext(options.tls_ca_pem, options.tls_cert_pem, options.tls_key_pem);
    if (!ctx.ok()) {
      close(*fd);
      return fail(ctx.status().code(), std::string(ctx.status().message()));
    }
    ssl = SSL_new(*ctx);
    SSL_CTX_free(*ctx);  // the SSL keeps its own reference
    SSL_set_fd(ssl, *fd);
    const std::string name = options.tls_server_name.empty() ? host : options.tls_server_name;
    absl::Status named = ExpectPeerName(ssl, name);
    if (!named.ok() || SSL_connect(ssl) != 1) {
      const std::string why =
          named.ok() ? TakeTlsError("TLS handshake failed") : std::string(named.message());
      SSL_free(ssl);
      close(*fd);
      return fail(absl::StatusCode::kUnavailable, why);
    }
  }
  auto stream = std::make_unique<DataStream>(*fd, ssl, options.max_frame_bytes);
  stream->SetReadTimeout(options.timeout_s);
  pb::DataChannelHello hello;
  hello.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  hello.set_token(options.token);
  pb::DataChannelWelcome welcome;
  absl::Status s = stream->Write(hello);
  if (s.ok()) s = stream->Read(&welcome);
  if (!s.ok()) return fail(absl::StatusCode::kUnavailable, std::string(s.message()));
  if (welcome.error_code() != 0) {
    return fail(static_cast<absl::StatusCode>(welcome.error_code()), welcome.error_message());
  }
  stream->SetReadTimeout(0);
  stream->set_spin_max_us(options.spin_max_us);
  return stream;
}

absl::StatusOr<std::unique_ptr<DataListener>> DataListener::Start(
    const DataListenerOptions& options, DataHandler handler) {
  IgnoreSigpipeOnce();
  auto l = std::unique_ptr<DataListener>(new DataListener);
  l->options_ = options;
  l->handler_ = std::move(handler);
  if (!options.tls_cert_pem.empty()) {
    absl::StatusOr<SSL_CTX*> ctx =
        NewDataServerContext(options.tls_cert_pem, options.tls_key_pem, options.tls_client_ca_pem);
    if (!ctx.ok()) return ctx.status();
    l->tls_ = *ctx;
  }
  auto addrs = Resolve(options.host, options.port, true);
  if (!addrs.ok()) return addrs.status();
  std::string last = "no address";
  for (addrinfo* a = addrs->get(); a != nullptr && l->listen_fd_ < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 128) == 0) {
      l->listen_fd_ = fd;
    } else {
      last = std::strerror(errno);
      close(fd);
    }
  }
  if (l->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("data channel: cannot listen on ", options.host, ":",
                                               options.port, ": ", last));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(l->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
  l->port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  l->accept_thread_ = std::thread([p = l.get()] { p->AcceptLoop(); });
  return l;
}

DataListener::~DataListener() {
  Stop();
  if (tls_ != nullptr) SSL_CTX_free(tls_);
}

void DataListener::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& [id, stream] : live_) stream->Abort();
    for (auto& [id, stream] : handshaking_) stream->Abort();
  }
  if (listen_fd_ >= 0) shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
  if (accept_thread_.joinable()) accept_thread_.join();
  std::map<uint64_t, std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    threads.swap(threads_);
  }
  for (auto& [id, t] : threads) t.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
}

void DataListener::ReapFinished() {
  std::vector<std::thread> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const uint64_t id : finished_) {
      auto it = threads_.find(id);
      if (it == threads_.end()) continue;
      done.push_back(std::move(it->second));
      threads_.erase(it);
    }
    finished_.clear();
  }
  for (auto& t : done) t.join();
}

void DataListener::AcceptLoop() {
  while (true) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    ReapFinished();
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      if (fd >= 0) close(fd);
      return;
    }
    if (fd < 0) {
      // Only Stop ends the loop: a peer that reset before accept (ECONNABORTED), no descriptors
      // or memory for a moment (EMFILE, ENFILE, ENOBUFS, ENOMEM) and the like pass.
      if (errno != EINTR && errno != ECONNABORTED) usleep(10000);
      continue;
    }
    if (static_cast<int>(threads_.size()) >= options_.max_connections) {
      close(fd);
      ++refused_;
      continue;
    }
    SetNoDelay(fd);
    const uint64_t id = next_id_++;
    auto* stream = new DataStream(fd, nullptr, kHandshakeFrameBytes);  // owned by Serve
    handshaking_[id] = stream;
    threads_[id] = std::thread([this, id, stream] { Serve(id, stream); });
  }
}

bool DataListener::Handshake(int fd, DataStream* stream) {
  stream->SetReadTimeout(options_.handshake_timeout_s);
  if (tls_ != nullptr) {
    SSL* ssl = SSL_new(tls_);
    SSL_set_fd(ssl, fd);
    stream->AttachTls(ssl);
    if (SSL_accept(ssl) != 1) {
      TakeTlsError("");
      return false;
    }
  }
  pb::DataChannelHello hello;
  if (!stream->Read(&hello).ok()) return false;
  pb::DataChannelWelcome welcome;
  if (hello.protocol_version() != pb::PROTOCOL_VERSION_CURRENT) {
    welcome.set_error_code(static_cast<int>(absl::StatusCode::kFailedPrecondition));
    welcome.set_error_message(absl::StrCat("protocol version ", hello.protocol_version(),
                                           " is not this worker's (", pb::PROTOCOL_VERSION_CURRENT,
                                           ")"));
  } else if (!ConstantTimeSame(hello.token(), options_.token)) {
    welcome.set_error_code(static_cast<int>(absl::StatusCode::kUnauthenticated));
    welcome.set_error_message("wrong cluster token");
  }
  if (!stream->Write(welcome).ok() || welcome.error_code() != 0) return false;
  stream->SetReadTimeout(0);
  stream->set_max_frame_bytes(options_.max_frame_bytes);  // past the handshake: the real limit
  stream->set_spin_max_us(options_.spin_max_us);
  stream->SetWriteTimeout(options_.write_timeout_s);
  return true;
}

void DataListener::Serve(uint64_t id, DataStream* stream) {
  const std::unique_ptr<DataStream> owned(stream);
  const bool accepted = Handshake(stream->fd(), stream);
  bool serve = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    handshaking_.erase(id);
    if (!accepted) ++refused_;
    serve = accepted && !stopping_;
    if (serve) live_[id] = stream;
  }
  if (serve) handler_(stream);
  std::lock_guard<std::mutex> lock(mu_);
  live_.erase(id);
  finished_.push_back(id);
}

}  // namespace moepool::wire
