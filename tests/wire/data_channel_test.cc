// The data channel's framing, handshake and failure handling, over real loopback sockets.
#include "wire/data_channel.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool::wire {
namespace {

namespace pb = ::moepool::v1;
using ::testing::HasSubstr;

// A listener whose handler answers every ForwardRequest frame with a ForwardResponse carrying
// the same step, layer and rows, and records how its streams ended.
class EchoListener {
 public:
  ~EchoListener() {
    if (listener_ != nullptr) listener_->Stop();  // before the members its threads use
  }
  explicit EchoListener(DataListenerOptions o) {
    o.host = "127.0.0.1";
    auto l = DataListener::Start(o, [this](DataStream* stream) { Serve(stream); });
    EXPECT_TRUE(l.ok()) << l.status();
    if (l.ok()) listener_ = *std::move(l);
  }
  int port() const { return listener_->port(); }
  DataListener& listener() { return *listener_; }
  int served() const { return served_.load(); }
  int ended() const { return ended_.load(); }
  std::string last_error() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_error_;
  }

 private:
  void Serve(DataStream* stream) {
    pb::ForwardRequest request;
    absl::Status s;
    while ((s = stream->Read(&request)).ok()) {
      pb::ForwardResponse response;
      response.set_step_id(request.step_id());
      response.set_layer(request.layer());
      response.set_rows(request.rows());
      ++served_;
      if (!stream->Write(response).ok()) break;
    }
    std::lock_guard<std::mutex> lock(mu_);
    last_error_ = std::string(s.message());
    ++ended_;
  }

  std::unique_ptr<DataListener> listener_;
  std::atomic<int> served_{0};
  std::atomic<int> ended_{0};
  std::mutex mu_;
  std::string last_error_;
};

DataListenerOptions WithToken(const std::string& token) {
  DataListenerOptions o;
  o.token = token;
  o.handshake_timeout_s = 0.3;
  o.max_frame_bytes = 1 << 20;
  return o;
}

DataDialOptions Dial(const std::string& token) {
  DataDialOptions d;
  d.token = token;
  d.timeout_s = 2;
  return d;
}

// A raw TCP connection to the listener, for peers that do not follow the protocol.
int RawConnect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

void SendFrame(int fd, const std::string& body, uint32_t claimed_length) {
  char header[4];
  for (int i = 0; i < 4; ++i) header[i] = static_cast<char>(claimed_length >> (8 * i));
  ASSERT_EQ(send(fd, header, 4, MSG_NOSIGNAL), 4);
  if (!body.empty()) {
    ASSERT_EQ(send(fd, body.data(), body.size(), MSG_NOSIGNAL), static_cast<ssize_t>(body.size()));
  }
}

std::string Hello(const std::string& token) {
  pb::DataChannelHello hello;
  hello.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  hello.set_token(token);
  return hello.SerializeAsString();
}

template <typename Pred>
bool WaitFor(Pred pred) {
  for (int i = 0; i < 300 && !pred(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

TEST(DataChannelTest, FramesRoundTripWithTheToken) {
  EchoListener echo(WithToken("s3cret"));
  for (const int64_t spin : {int64_t{0}, int64_t{2000}}) {
    DataDialOptions d = Dial("s3cret");
    d.spin_max_us = spin;
    auto stream = DialDataChannel("127.0.0.1", echo.port(), d);
    ASSERT_TRUE(stream.ok()) << stream.status();
    for (int step = 1; step <= 50; ++step) {
      pb::ForwardRequest request;
      request.set_step_id(static_cast<uint64_t>(step));
      request.set_layer(step % 7);
      request.set_rows(std::string(static_cast<size_t>(step) * 997, static_cast<char>(step)));
      uint64_t sent = 0;
      ASSERT_TRUE((*stream)->Write(request, &sent).ok());
      EXPECT_EQ(sent, 4 + request.ByteSizeLong());
      pb::ForwardResponse response;
      ASSERT_TRUE((*stream)->Read(&response).ok());
      EXPECT_EQ(response.step_id(), static_cast<uint64_t>(step));
      EXPECT_EQ(response.layer(), step % 7);
      EXPECT_EQ(response.rows(), request.rows());
    }
  }
  EXPECT_EQ(echo.served(), 100);
}

TEST(DataChannelTest, APeerWithoutTheTokenIsRefused) {
  EchoListener echo(WithToken("s3cret"));
  for (const std::string token : {"", "wrong", "s3cret-and-more"}) {
    auto stream = DialDataChannel("127.0.0.1", echo.port(), Dial(token));
    ASSERT_FALSE(stream.ok()) << "token '" << token << "'";
    EXPECT_EQ(stream.status().code(), absl::StatusCode::kUnauthenticated) << stream.status();
    EXPECT_THAT(std::string(stream.status().message()), HasSubstr("wrong cluster token"));
  }
  EXPECT_TRUE(WaitFor([&] { return echo.listener().refused() == 3; }));
  EXPECT_EQ(echo.served(), 0);
  // A refused peer gets the refusal and the connection closed; nothing is served.
  const int fd = RawConnect(echo.port());
  SendFrame(fd, Hello("wrong"), static_cast<uint32_t>(Hello("wrong").size()));
  std::string got;
  char buf[256];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) got.append(buf, static_cast<size_t>(n));
  ASSERT_GT(got.size(), 4u);
  pb::DataChannelWelcome welcome;
  ASSERT_TRUE(welcome.ParseFromString(got.substr(4)));
  EXPECT_EQ(welcome.error_code(), static_cast<int>(absl::StatusCode::kUnauthenticated));
  EXPECT_EQ(echo.served(), 0);
  close(fd);
}

TEST(DataChannelTest, SilentOrGarbledHandshakesAreDropped) {
  EchoListener echo(WithToken(""));
  const int silent = RawConnect(echo.port());  // says nothing: dropped after the timeout
  const int garbage = RawConnect(echo.port());
  SendFrame(garbage, "\xff\xff\xff\xff\xff", 5);  // not a hello
  const int huge = RawConnect(echo.port());
  SendFrame(huge, "", 1u << 31);  // claims a 2 GiB hello
  EXPECT_TRUE(WaitFor([&] { return echo.listener().refused() == 3; })) << echo.listener().refused();
  char byte;
  EXPECT_EQ(recv(silent, &byte, 1, 0), 0);  // closed by the listener
  for (const int fd : {silent, garbage, huge}) close(fd);
  // The listener keeps serving.
  auto stream = DialDataChannel("127.0.0.1", echo.port(), Dial(""));
  ASSERT_TRUE(stream.ok()) << stream.status();
}

TEST(DataChannelTest, APeerThatVanishesMidFrameEndsOnlyItsStream) {
  EchoListener echo(WithToken("t"));
  const int fd = RawConnect(echo.port());
  SendFrame(fd, Hello("t"), static_cast<uint32_t>(Hello("t").size()));
  char welcome[64];
  ASSERT_GT(recv(fd, welcome, sizeof(welcome), 0), 0);
  SendFrame(fd, std::string(10, 'x'), 1000);  // announces 1000 bytes, sends 10, goes away
  close(fd);
  ASSERT_TRUE(WaitFor([&] { return echo.ended() == 1; }));
  EXPECT_THAT(echo.last_error(), HasSubstr("closed by the peer"));
  auto stream = DialDataChannel("127.0.0.1", echo.port(), Dial("t"));
  ASSERT_TRUE(stream.ok()) << stream.status();
  pb::ForwardRequest request;
  request.set_step_id(1);
  ASSERT_TRUE((*stream)->Write(request).ok());
  pb::ForwardResponse response;
  EXPECT_TRUE((*stream)->Read(&response).ok());
}

TEST(DataChannelTest, OversizedAndUnparsableFramesFailTheStream) {
  EchoListener echo(WithToken(""));
  {
    const int fd = RawConnect(echo.port());
    SendFrame(fd, Hello(""), static_cast<uint32_t>(Hello("").size()));
    char welcome[64];
    ASSERT_GT(recv(fd, welcome, sizeof(welcome), 0), 0);
    SendFrame(fd, "", (1u << 20) + 1);  // over the listener's 1 MiB limit
    ASSERT_TRUE(WaitFor([&] { return echo.ended() == 1; }));
    EXPECT_THAT(echo.last_error(), HasSubstr("exceeds the limit"));
    close(fd);
  }
  {
    const int fd = RawConnect(echo.port());
    SendFrame(fd, Hello(""), static_cast<uint32_t>(Hello("").size()));
    char welcome[64];
    ASSERT_GT(recv(fd, welcome, sizeof(welcome), 0), 0);
    SendFrame(fd, "\x0a\xff\xff\xff\xff\x0f", 6);  // a length-delimited field past the end
    ASSERT_TRUE(WaitFor([&] { return echo.ended() == 2; }));
    EXPECT_THAT(echo.last_error(), HasSubstr("does not parse"));
    close(fd);
  }
  // The client side checks its own limit too.
  DataDialOptions d = Dial("");
  d.max_frame_bytes = 100;
  auto stream = DialDataChannel("127.0.0.1", echo.port(), d);
  ASSERT_TRUE(stream.ok()) << stream.status();
  pb::ForwardRequest big;
  big.set_rows(std::string(200, 'r'));
  EXPECT_EQ((*stream)->Write(big).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DataChannelTest, AbortUnblocksAReadAndStopEndsEveryStream) {
  // A listener that never answers.
  DataListenerOptions o = WithToken("");
  o.host = "127.0.0.1";
  std::atomic<int> started{0}, ended{0};
  auto listener = DataListener::Start(o, [&](DataStream* s) {
    ++started;
    pb::ForwardRequest r;
    while (s->Read(&r).ok()) {
    }
    ++ended;
  });
  ASSERT_TRUE(listener.ok()) << listener.status();
  auto stream = DialDataChannel("127.0.0.1", (*listener)->port(), Dial(""));
  ASSERT_TRUE(stream.ok()) << stream.status();
  pb::ForwardRequest request;
  ASSERT_TRUE((*stream)->Write(request).ok());
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    (*stream)->Abort();
  });
  pb::ForwardResponse response;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ((*stream)->Read(&response).code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  aborter.join();
  ASSERT_TRUE(WaitFor([&] { return ended.load() == 1; }));  // the worker's end saw it close
  auto second = DialDataChannel("127.0.0.1", (*listener)->port(), Dial(""));
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(WaitFor([&] { return started.load() == 2; }));
  (*listener)->Stop();  // aborts the second stream's handler and joins it
  EXPECT_EQ(ended.load(), 2);
}

TEST(DataChannelTest, APeerThatStopsReadingLosesItsConnection) {
  DataListenerOptions o = WithToken("");
  o.write_timeout_s = 0.2;
  o.max_frame_bytes = 4 << 20;
  EchoListener echo(o);
  DataDialOptions d = Dial("");
  d.max_frame_bytes = 4 << 20;
  auto stream = DialDataChannel("127.0.0.1", echo.port(), d);
  ASSERT_TRUE(stream.ok()) << stream.status();
  // Requests with 1 MiB of rows each, answers never read: the worker's writes fill the socket
  // buffers and time out, and the worker drops the connection (the client's writes then fail).
  pb::ForwardRequest request;
  request.set_rows(std::string(1 << 20, 'r'));
  (*stream)->SetWriteTimeout(5);
  for (int i = 0; i < 64 && echo.ended() == 0; ++i) {
    if (!(*stream)->Write(request).ok()) break;
  }
  ASSERT_TRUE(WaitFor([&] { return echo.ended() == 1; }));
  EXPECT_GT(echo.served(), 0);
}

TEST(DataChannelTest, DialErrorsNameTheAddress) {
  EchoListener echo(WithToken(""));
  const int port = echo.port();
  echo.listener().Stop();
  auto stream = DialDataChannel("127.0.0.1", port, Dial(""));
  ASSERT_FALSE(stream.ok());
  EXPECT_EQ(stream.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(stream.status().message()),
              HasSubstr("data channel 127.0.0.1:" + std::to_string(port)));
  EXPECT_EQ(HostOfAddress("[::1]:80"), "::1");
  EXPECT_EQ(HostOfAddress("10.0.0.2:7002"), "10.0.0.2");
}

}  // namespace
}  // namespace moepool::wire
