// The data channel: Forward exchanges over a plain TCP connection (TLS when configured) instead
// of a gRPC stream (--transport tcp, the default). gRPC stays the control channel (Describe
// tells the coordinator the worker's data port, token-checked; reconnects, health, NCCL setup);
// the rows of every layer go as one length-prefixed ForwardRequest frame and come back as one
// ForwardResponse frame, written and read by the threads that need them, without the HTTP/2
// framing, completion queues and thread hand-offs of a gRPC stream. The frames and the hello /
// welcome handshake are specified in proto/moepool/v1/expert_service.proto (DataChannelHello).
//
// Security: the hello carries the cluster token, compared in constant time; a wrong or missing
// token gets an UNAUTHENTICATED welcome and the connection is closed. With TLS (the worker's
// gRPC certificate and key, and its client CA for mutual TLS) the handshake and every frame are
// encrypted and the coordinator checks the worker's certificate as its gRPC channel does. A peer
// that sends nothing is dropped after the handshake timeout; a frame over the size limit, a
// message that does not parse or a peer that vanishes mid-frame fails that stream only.
//
// Threading: a DataStream is used by one reader and one writer thread at a time (they may
// differ); Abort may be called from any thread. DataListener runs its accept loop and one thread
// per connection; Stop (or the destructor) aborts every stream and joins them all.
// Ownership: DataListener owns its streams; the handler borrows its stream for the call.
// SIGPIPE is ignored process-wide once a channel is opened (writes report EPIPE instead).
#ifndef MOEPOOL_WIRE_DATA_CHANNEL_H_
#define MOEPOOL_WIRE_DATA_CHANNEL_H_

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/message_lite.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

namespace moepool::wire {

// The transport name a worker lists in DescribeResponse.transports when it has a data channel.
inline constexpr char kTcpTransportName[] = "tcp";

// "host" of "host:port" ("[v6]:port" without the brackets).
std::string HostOfAddress(const std::string& address);

// One connected, authenticated data channel.
class DataStream {
 public:
  // Takes ownership of the connected socket `fd` and, with TLS, of the established `ssl`.
  DataStream(int fd, SSL* ssl, size_t max_frame_bytes);
  ~DataStream();
  DataStream(const DataStream&) = delete;
  DataStream& operator=(const DataStream&) = delete;

  // Writes one frame; *bytes (if given) gets the frame's size. UNAVAILABLE when the connection
  // failed or was aborted.
  absl::Status Write(const google::protobuf::MessageLite& message, uint64_t* bytes = nullptr);
  // Reads one frame into `message`. UNAVAILABLE when the peer closed, vanished or the stream was
  // aborted; INVALID_ARGUMENT for a frame over the size limit or one that does not parse (the
  // stream is then unusable: the caller drops it).
  absl::Status Read(google::protobuf::MessageLite* message, uint64_t* bytes = nullptr);
  // Makes blocked and later Reads and Writes fail at once. Thread-safe, idempotent.
  void Abort();
  bool aborted() const { return aborted_.load(); }
  bool tls() const { return ssl_ != nullptr; }
  int fd() const { return fd_; }
  // Takes ownership of `ssl` (set up on fd()), for a TLS handshake made after construction.
  void AttachTls(SSL* ssl);
  // Reads (writes) time out after `seconds` (0: never).
  void SetReadTimeout(double seconds);
  void SetWriteTimeout(double seconds);
  // The largest frame read or written from now on.
  void set_max_frame_bytes(size_t bytes) { max_frame_bytes_ = bytes; }
  // How a Read that follows a Write waits for the peer's frame (plain TCP only): it polls the
  // socket, yielding the core to runnable threads, for at most `us` microseconds (and at most
  // twice the usual gap between the two, learned per stream), then blocks. Polling catches the
  // answer without the wake-up of a sleeping thread on an idle core (about 100 us on a virtual
  // machine, as much as the rest of the exchange). 0: always block.
  void set_spin_max_us(int64_t us) { spin_max_us_ = us; }

 private:
  absl::Status SendAll(const char* data, size_t n);
  absl::Status RecvAll(char* data, size_t n);
  // The first bytes of a frame, waited for as set_spin_max_us says; -1 (errno EAGAIN): nothing
  // yet, block.
  ssize_t WaitAndRecv(char* data, size_t n);
  void NoteFrameArrived();

  const int fd_;
  SSL* ssl_;
  size_t max_frame_bytes_;
  std::atomic<bool> aborted_{false};
  int64_t spin_max_us_ = 0;
  bool written_ = false;  // a Write since the last Read: the next Read is an answer
  std::chrono::steady_clock::time_point last_write_;
  double gap_us_ = 0;  // moving average of write -> next frame
  std::string out_;    // the frame being written (reused)
  std::string in_;     // the frame being read (reused)
};

struct DataDialOptions {
  std::string token;     // sent in the hello; empty: none
  double timeout_s = 5;  // connect and handshake
  size_t max_frame_bytes = size_t{1} << 30;
  int64_t spin_max_us = 2000;  // DataStream::set_spin_max_us of the stream
  // TLS: on when `tls` is set. ca_pem checks the worker's certificate (empty: the system roots);
  // cert_pem + key_pem present a client certificate (mutual TLS); server_name overrides the
  // name checked (default: the host dialled; an IP address is checked against IP SANs).
  bool tls = false;
  std::string tls_ca_pem;
  std::string tls_cert_pem;
  std::string tls_key_pem;
  std::string tls_server_name;
};

// Connects to host:port, completes TLS if asked, sends the hello and waits for the welcome.
// UNAVAILABLE (cannot connect, TLS failed, timeout), UNAUTHENTICATED (token refused) or the
// worker's refusal; every message names host:port.
absl::StatusOr<std::unique_ptr<DataStream>> DialDataChannel(const std::string& host, int port,
                                                            const DataDialOptions& options);

struct DataListenerOptions {
  std::string host;   // address to bind ("0.0.0.0", "::", "127.0.0.1", a name, ...)
  int port = 0;       // 0: a free port (see port())
  std::string token;  // required in the hello; empty: none
  size_t max_frame_bytes = size_t{1} << 30;
  int64_t spin_max_us = 2000;  // DataStream::set_spin_max_us of every stream
  double handshake_timeout_s = 10;
  // A peer that stops reading for this long while the worker writes to it loses the connection
  // (its thread is freed); a coordinator always reads its answers.
  double write_timeout_s = 60;
  int max_connections = 64;  // further connections are closed at once
  // TLS (PEM contents): certificate and key turn it on; a client CA requires client certificates.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  std::string tls_client_ca_pem;
};

// Serves one accepted, authenticated stream until it fails or is aborted; runs on the
// connection's own thread.
using DataHandler = std::function<void(DataStream* stream)>;

class DataListener {
 public:
  // Binds, listens and starts accepting. INVALID_ARGUMENT for bad TLS material, UNAVAILABLE when
  // the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<DataListener>> Start(const DataListenerOptions& options,
                                                             DataHandler handler);
  ~DataListener();  // Stop()
  DataListener(const DataListener&) = delete;
  DataListener& operator=(const DataListener&) = delete;

  int port() const { return port_; }
  // Stops accepting, aborts every stream and joins every thread. Idempotent.
  void Stop();
  // Connections refused so far (bad handshake, wrong token, over max_connections).
  uint64_t refused() const { return refused_.load(); }

 private:
  DataListener() = default;
  void AcceptLoop();
  // Owns `stream` (a new connection): handshake, then the handler.
  void Serve(uint64_t id, DataStream* stream);
  // TLS accept, hello and welcome on the stream of socket `fd`; false: refused.
  bool Handshake(int fd, DataStream* stream);
  void ReapFinished();

  DataListenerOptions options_;
  DataHandler handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  SSL_CTX* tls_ = nullptr;
  std::atomic<uint64_t> refused_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  bool stopping_ = false;
  uint64_t next_id_ = 0;
  std::map<uint64_t, std::thread> threads_;
  std::map<uint64_t, DataStream*> live_;  // streams being served (borrowed from their threads)
  std::map<uint64_t, DataStream*> handshaking_;  // streams still in the handshake (borrowed)
  std::vector<uint64_t> finished_;               // threads to join
};

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_DATA_CHANNEL_H_
