// Fuzz target for the worker's data channel (wire/data_channel.h, worker/data_server.h) under a
// peer it cannot trust: a real DataServer over a WorkerCore on a synthesized model, reached over
// loopback TCP. An input's first byte chooses whether a valid hello (with the cluster token)
// goes first; the rest is written to the connection as it is, then the connection is half-closed
// and everything the worker sends back is read. The worker must never crash or hang; every frame
// it sends must parse as a ForwardResponse whose rows hold exactly n_rows x n_embd values of its
// dtype (or carry an error and no rows); and the next connection must be served as usual.
//
// With clang in the fuzzing configuration (tests/fuzz/run_fuzz.sh data) this is a libFuzzer
// target over instrumented wire/ and worker/. Otherwise it is a replay driver (ctest
// DataChannelFuzzerReplay; tests/fuzz/replay_driver.h): seeds written from the coordinator's own
// request writer (every dtype, return dtype, whole and chunked), a wrong token, and their
// single-byte corruptions.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "moepool/v1/expert_service.pb.h"
#include "tests/fuzz/fuzz_model_util.h"
#include "wire/forward_chunks.h"
#include "wire/row_codec.h"
#include "worker/data_server.h"
#include "worker/worker_core.h"

namespace {

namespace pb = ::moepool::v1;
constexpr char kTarget[] = "data_channel_fuzzer";
constexpr char kToken[] = "fuzz-token";

void Check(bool ok, const std::string& what) {
  if (!ok) moepool::testing::FuzzFail(kTarget, what);
}

moepool::SynthShape MicroShape() {
  moepool::SynthShape s;
  s.name = "fuzz-data";
  s.n_embd = 64;  // a multiple of 32: q8_0 rows are accepted
  s.n_ff = 64;
  s.n_layer = 2;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.n_expert = 4;
  s.n_expert_used = 2;
  s.n_ctx = 64;
  return s;
}

struct Fixture {
  std::unique_ptr<moepool::worker::WorkerCore> core;
  std::unique_ptr<moepool::worker::DataServer> server;
  int64_t n_embd = 0;
};

const Fixture& Setup() {
  static const Fixture* fixture = [] {
    moepool::testing::QuietStderr();
    google::protobuf::SetLogHandler(nullptr);  // hostile strings are not UTF-8
    auto* f = new Fixture;
    moepool::worker::WorkerCoreOptions o;
    o.model_path = moepool::testing::SynthFuzzModel(MicroShape(), "Q8_0", false, "data.gguf");
    auto experts = moepool::worker::ExpertSetFromFlags("0-3", "", 2, 4);
    Check(experts.ok(), "expert set");
    o.experts = *experts;
    o.threads = 1;
    o.max_rows = 64;
    auto core = moepool::worker::WorkerCore::Create(o);
    Check(core.ok(), "cannot load the model: " + core.status().ToString());
    f->core = *std::move(core);
    f->n_embd = f->core->config().n_embd;
    moepool::wire::DataListenerOptions l;
    l.host = "127.0.0.1";
    l.token = kToken;
    l.max_frame_bytes = 1 << 20;
    l.handshake_timeout_s = 1;
    l.spin_max_us = 0;
    auto server = moepool::worker::DataServer::Start(f->core.get(), l, 1 << 16);
    Check(server.ok(), "cannot start the data server: " + server.status().ToString());
    f->server = *std::move(server);
    return f;
  }();
  return *fixture;
}

std::string Frame(const google::protobuf::MessageLite& m) {
  const std::string body = m.SerializeAsString();
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>(body.size() >> (8 * i));
  return out + body;
}

std::string Hello(const std::string& token) {
  pb::DataChannelHello hello;
  hello.set_protocol_version(pb::PROTOCOL_VERSION_CURRENT);
  hello.set_token(token);
  return Frame(hello);
}

// Sends `bytes` on a new connection, half-closes it and returns what the worker sent back.
std::string Exchange(int port, const std::string& bytes) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  Check(fd >= 0, "socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  // Closed with a reset, not a FIN: this side would otherwise keep every connection in
  // TIME_WAIT for a minute and run out of ephemeral ports at thousands of inputs a second.
  const linger reset{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
  // libFuzzer's timers interrupt system calls (EINTR): a connect then completes on its own.
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && errno != EINTR) {
    Check(false, std::string("cannot connect to the worker: ") + std::strerror(errno));
  }
  timeval tv{10, 0};  // a hang is a finding
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == ENOTCONN)) continue;  // still connecting
    if (n <= 0) break;  // the worker closed the connection: fine
    sent += static_cast<size_t>(n);
  }
  shutdown(fd, SHUT_WR);
  std::string got;
  char buf[65536];
  while (true) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != ECONNRESET) {
      fprintf(stdout, "HANG pid %d\n", getpid());
      fflush(stdout);
      sleep(900);
    }
    if (n < 0) Check(errno == ECONNRESET, "the worker neither answered nor closed in 10 s");
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return got;
}

// Every frame the worker sent after the welcome parses and is consistent.
void CheckAnswers(const std::string& got, int64_t n_embd) {
  size_t pos = 0;
  bool welcome = true;
  int answered = 0, refused = 0;
  while (pos + 4 <= got.size()) {
    const uint32_t len = static_cast<uint8_t>(got[pos]) | static_cast<uint8_t>(got[pos + 1]) << 8 |
                         static_cast<uint8_t>(got[pos + 2]) << 16 |
                         static_cast<uint32_t>(static_cast<uint8_t>(got[pos + 3])) << 24;
    Check(pos + 4 + len <= got.size(), "a truncated frame from the worker");
    const char* body = got.data() + pos + 4;
    if (welcome) {
      pb::DataChannelWelcome w;
      Check(w.ParseFromArray(body, static_cast<int>(len)), "a welcome that does not parse");
      welcome = false;
    } else {
      pb::ForwardResponse r;
      Check(r.ParseFromArray(body, static_cast<int>(len)), "an answer that does not parse");
      if (r.error_code() == 0) {
        Check(moepool::wire::KnownDType(r.dtype()), "an answer in an unknown dtype");
        Check(static_cast<int64_t>(r.rows().size()) ==
                  moepool::wire::EncodedBytes(r.dtype(), int64_t{r.n_rows()} * n_embd),
              "answer rows do not match n_rows x n_embd");
        ++answered;
      } else {
        Check(r.rows().empty(), "a refusal with rows");
        ++refused;
      }
    }
    pos += 4 + len;
  }
  Check(pos == got.size(), "trailing bytes after the worker's last frame");
  if (moepool::testing::FuzzVerbose()) {
    moepool::testing::FuzzTrace(
        kTarget, std::to_string(answered) + " answers, " + std::to_string(refused) + " refusals");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = Setup();
  if (size == 0) return 0;
  const bool hello_first = (data[0] & 1) != 0;
  std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  if (hello_first) bytes = Hello(kToken) + bytes;
  CheckAnswers(Exchange(f.server->port(), bytes), f.n_embd);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/replay_driver.h"

namespace {

// Valid sessions (flag byte 1, then request frames): 1-3 rows in every dtype and return dtype,
// whole and in chunks of one row; one with the token in the raw bytes (flag 0) and one wrong.
std::vector<std::string> Seeds(int64_t n_embd) {
  std::vector<float> x(static_cast<size_t>(3 * n_embd));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97) - 0.4f;
  const std::vector<int64_t> rows = {2, 0, 1};
  const std::vector<int32_t> expert = {0, 3, 1, -1, 2, 3};
  const std::vector<float> weight = {0.5f, 0.5f, 1, 0, 0.25f, 0.75f};
  std::vector<std::string> seeds;
  uint64_t round = 1;
  for (const pb::DType dtype : {pb::DTYPE_F32, pb::DTYPE_F16, pb::DTYPE_BF16, pb::DTYPE_Q8_0}) {
    for (const pb::DType back : {dtype, pb::DTYPE_F16, pb::DTYPE_Q8_0}) {
      for (int64_t per = 1; per <= 3; per += 2) {
        std::string seed = "\x01";
        const moepool::wire::RequestRows r{x.data(), rows, expert, weight};
        pb::ForwardRequest scratch;
        uint64_t bytes = 0;
        moepool::wire::WriteRequestChunks(
            {round++, static_cast<int>(round % 2), dtype, back, n_embd, 3, 2}, r, per,
            [&](const pb::ForwardRequest& c) {
              seed += Frame(c);
              return true;
            },
            &scratch, &bytes);
        seeds.push_back(seed);
      }
    }
  }
  seeds.push_back(std::string("\x00", 1) + Hello(kToken));
  seeds.push_back(std::string("\x00", 1) + Hello("wrong") + seeds.front().substr(1));
  return seeds;
}

}  // namespace

int main(int argc, char** argv) {
  moepool::testing::ReplayOptions o;
  o.target = kTarget;
  const std::vector<std::string> seeds = Seeds(MicroShape().n_embd);
  for (size_t i = 0; i < seeds.size(); ++i) {
    o.seeds.emplace_back("seed-" + std::to_string(i), seeds[i]);
  }
  o.fail = [](const std::string& what) { moepool::testing::FuzzFail(kTarget, what); };
  return moepool::testing::RunReplayDriver(argc, argv, o);
}
#endif
