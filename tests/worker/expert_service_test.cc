// The worker's gRPC service end to end: an in-process server on 127.0.0.1 and a real client stub.
// Describe, Forward (bit-identical round trip, chunked requests and responses, errors answered
// on a stream that keeps serving), the cluster token, the health service and TLS / mutual TLS.
#include "worker/expert_service.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"
#include "tests/worker/worker_test_util.h"
#include "wire/row_codec.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;
using ::moepool::testing::EncodeRows;
using ::moepool::testing::LocalResult;
using ::moepool::testing::MakeRoutes;
using ::moepool::testing::TestRoutes;
using ::moepool::testing::TinyModelPath;

using Stream = grpc::ClientReaderWriter<pb::ForwardRequest, pb::ForwardResponse>;

// The request for rows [begin, end) of `r`, rows already encoded as `rows` (all rows).
pb::ForwardRequest Chunk(const TestRoutes& r, pb::DType dtype, const std::string& rows,
                         uint64_t step, int64_t begin, int64_t end) {
  const size_t row_bytes = static_cast<size_t>(wire::EncodedBytes(dtype, r.n_embd));
  pb::ForwardRequest c;
  c.set_step_id(step);
  c.set_layer(r.layer);
  c.set_dtype(dtype);
  c.set_n_embd(static_cast<int32_t>(r.n_embd));
  c.set_total_rows(static_cast<int32_t>(r.n_rows));
  c.set_row_offset(static_cast<int32_t>(begin));
  c.set_n_rows(static_cast<int32_t>(end - begin));
  c.set_k(r.k);
  c.set_rows(rows.substr(static_cast<size_t>(begin) * row_bytes,
                         static_cast<size_t>(end - begin) * row_bytes));
  for (int64_t i = begin * r.k; i < end * r.k; ++i) {
    c.add_expert(r.expert[static_cast<size_t>(i)]);
    c.add_weight(r.weight[static_cast<size_t>(i)]);
  }
  return c;
}

std::vector<pb::ForwardRequest> Chunks(const TestRoutes& r, pb::DType dtype, uint64_t step,
                                       int64_t rows_per_chunk) {
  const std::string rows = EncodeRows(r.x, dtype);
  std::vector<pb::ForwardRequest> chunks;
  int64_t begin = 0;
  do {
    const int64_t end = std::min(r.n_rows, begin + rows_per_chunk);
    chunks.push_back(Chunk(r, dtype, rows, step, begin, end));
    begin = end;
  } while (begin < r.n_rows);
  return chunks;
}

// One request's answer, reassembled from its response messages.
struct Answer {
  bool complete = false;
  uint64_t step_id = 0;
  int layer = 0;
  int error_code = 0;
  std::string error_message;
  std::string rows;
  int messages = 0;
  uint64_t compute_micros = 0;
};

// Reads the response messages of one request: until an error or its last row.
Answer ReadAnswer(Stream* stream) {
  Answer a;
  pb::ForwardResponse r;
  while (stream->Read(&r)) {
    if (a.messages == 0) {
      a.step_id = r.step_id();
      a.layer = r.layer();
    }
    EXPECT_EQ(r.step_id(), a.step_id);
    ++a.messages;
    if (r.error_code() != 0) {
      EXPECT_EQ(a.messages, 1);
      a.error_code = r.error_code();
      a.error_message = r.error_message();
      a.complete = true;
      return a;
    }
    if (r.n_rows() > 0) {
      const size_t row_bytes = r.rows().size() / static_cast<size_t>(r.n_rows());
      EXPECT_EQ(a.rows.size(), static_cast<size_t>(r.row_offset()) * row_bytes) << "row order";
    }
    a.rows += r.rows();
    a.compute_micros = r.compute_micros();
    if (r.row_offset() + r.n_rows() == r.total_rows()) {
      a.complete = true;
      return a;
    }
  }
  return a;
}

std::string FloatBytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

class ExpertServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string& path = TinyModelPath("Q4_K_M");
    ASSERT_FALSE(path.empty());
    WorkerCoreOptions o;
    o.model_path = path;
    o.experts = ExpertSet({{1, 0}, {1, 1}, {1, 2}, {1, 3}, {3, 6}});
    o.threads = 2;
    o.max_rows = 256;
    o.worker_id = "svc-test";
    auto core = WorkerCore::Create(o);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = core->release();
    auto full = Model::Load(path);
    ASSERT_TRUE(full.ok()) << full.status();
    full_ = full->release();
  }
  static void TearDownTestSuite() {
    delete core_;
    core_ = nullptr;
    delete full_;
    full_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(core_, nullptr); }

  // Starts a server on a free port of 127.0.0.1.
  std::unique_ptr<WorkerServer> Start(WorkerServerOptions options = {}) {
    options.listen_address = "127.0.0.1:0";
    auto server = WorkerServer::Start(core_, options);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? *std::move(server) : nullptr;
  }
  static std::shared_ptr<grpc::Channel> Channel(
      int port,
      std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials()) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), creds, args);
  }
  static std::unique_ptr<pb::ExpertService::Stub> Stub(
      int port,
      std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials()) {
    return pb::ExpertService::NewStub(Channel(port, std::move(creds)));
  }
  int64_t n_embd() const { return core_->config().n_embd; }

  static WorkerCore* core_;
  static Model* full_;
};

WorkerCore* ExpertServiceTest::core_ = nullptr;
Model* ExpertServiceTest::full_ = nullptr;

TEST_F(ExpertServiceTest, DescribeReportsTheWorker) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  grpc::ClientContext context;
  pb::DescribeResponse d;
  const grpc::Status s = stub->Describe(&context, pb::DescribeRequest(), &d);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const WorkerDescription want = *core_->Describe();
  EXPECT_EQ(d.protocol_version(), pb::PROTOCOL_VERSION_CURRENT);
  EXPECT_EQ(d.model().fingerprint(), want.fingerprint);
  EXPECT_EQ(d.model().fingerprint().size(), 32u);
  EXPECT_EQ(d.model().name(), want.model_name);
  EXPECT_EQ(d.model().file_bytes(), full_->file().file_size());
  EXPECT_EQ(d.hparams().n_embd(), 256);
  EXPECT_EQ(d.hparams().n_ff(), full_->config().n_ff);
  EXPECT_EQ(d.hparams().n_layer(), 4);
  EXPECT_EQ(d.hparams().n_expert(), 8);
  EXPECT_EQ(d.hparams().n_expert_used(), 2);
  EXPECT_EQ(std::vector<uint32_t>(d.experts().packed().begin(), d.experts().packed().end()),
            (std::vector<uint32_t>{65536, 65537, 65538, 65539, 3 * 65536 + 6}));
  EXPECT_EQ(d.device(), "cpu");
  EXPECT_EQ(d.expert_bytes(), want.expert_bytes);
  EXPECT_GT(d.memory_used_bytes(), 0u);
  EXPECT_GT(d.memory_free_bytes(), 0u);
  EXPECT_EQ(d.worker_id(), "svc-test");
  EXPECT_EQ(d.threads(), 2);
}

TEST_F(ExpertServiceTest, ForwardRoundTripIsBitIdenticalToLocalCompute) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  grpc::ClientContext context;
  std::unique_ptr<Stream> stream = stub->Forward(&context);
  const TestRoutes a = MakeRoutes(1, 21, n_embd(), 2, {0, 1, 2, 3}, 11);
  const TestRoutes b = MakeRoutes(3, 6, n_embd(), 2, {6}, 12);
  // Two requests written before any answer is read: answered in order.
  ASSERT_TRUE(stream->Write(Chunks(a, pb::DTYPE_F32, 100, a.n_rows)[0]));
  ASSERT_TRUE(stream->Write(Chunks(b, pb::DTYPE_F32, 101, b.n_rows)[0]));
  const Answer first = ReadAnswer(stream.get());
  const Answer second = ReadAnswer(stream.get());
  ASSERT_TRUE(first.complete && second.complete);
  EXPECT_EQ(first.step_id, 100u);
  EXPECT_EQ(first.layer, 1);
  EXPECT_EQ(first.error_code, 0) << first.error_message;
  EXPECT_EQ(first.messages, 1);
  EXPECT_EQ(first.rows, FloatBytes(LocalResult(*full_, a)));
  EXPECT_EQ(second.step_id, 101u);
  EXPECT_EQ(second.layer, 3);
  EXPECT_EQ(second.rows, FloatBytes(LocalResult(*full_, b)));
  // f16 / bf16 rows come back as the f32 result on the exactly widened rows, rounded to the
  // request's dtype (nearest even).
  uint64_t step = 102;
  for (const pb::DType dtype : {pb::DTYPE_BF16, pb::DTYPE_F16}) {
    TestRoutes c = MakeRoutes(1, 5, n_embd(), 2, {0, 3}, 13);
    ASSERT_TRUE(stream->Write(Chunks(c, dtype, step++, c.n_rows)[0]));
    const Answer half = ReadAnswer(stream.get());
    EXPECT_EQ(half.error_code, 0) << half.error_message;
    c.x = ::moepool::testing::DecodeRows(EncodeRows(c.x, dtype), dtype);
    EXPECT_EQ(half.rows, EncodeRows(LocalResult(*full_, c), dtype)) << wire::DTypeName(dtype);
    EXPECT_NE(half.rows, std::string(half.rows.size(), '\0'));
  }
  stream->WritesDone();
  const grpc::Status s = stream->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(ExpertServiceTest, ChunkedRequestAndChunkedResponseReassembleExactly) {
  WorkerServerOptions options;
  const size_t row_bytes = static_cast<size_t>(n_embd()) * sizeof(float);
  options.service.response_chunk_bytes = 3 * row_bytes + 100;  // 3 rows per response message
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  grpc::ClientContext context;
  std::unique_ptr<Stream> stream = stub->Forward(&context);
  const TestRoutes r = MakeRoutes(1, 19, n_embd(), 2, {0, 1, 2, 3}, 21);
  const std::vector<pb::ForwardRequest> chunks = Chunks(r, pb::DTYPE_F32, 7, 4);
  ASSERT_EQ(chunks.size(), 5u);
  for (const auto& c : chunks) ASSERT_TRUE(stream->Write(c));
  const Answer answer = ReadAnswer(stream.get());
  ASSERT_TRUE(answer.complete);
  EXPECT_EQ(answer.error_code, 0) << answer.error_message;
  EXPECT_EQ(answer.messages, 7);  // 6 x 3 rows + 1
  EXPECT_EQ(answer.rows, FloatBytes(LocalResult(*full_, r)));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ExpertServiceTest, RefusedRequestsAreAnsweredAndTheSameStreamKeepsServing) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  grpc::ClientContext context;
  std::unique_ptr<Stream> stream = stub->Forward(&context);
  const TestRoutes good = MakeRoutes(1, 9, n_embd(), 2, {0, 1, 2, 3}, 31);
  const std::string want = FloatBytes(LocalResult(*full_, good));
  std::vector<pb::ForwardRequest> sent;
  // 1: an expert this worker does not hold.
  TestRoutes foreign = good;
  foreign.expert[1] = 7;
  foreign.expert[0] = 0;
  sent.push_back(Chunks(foreign, pb::DTYPE_F32, 1, 9)[0]);
  // 2: good.
  sent.push_back(Chunks(good, pb::DTYPE_F32, 2, 9)[0]);
  // 3: chunked, second chunk skips rows; its third chunk must be dropped silently.
  std::vector<pb::ForwardRequest> c3 = Chunks(good, pb::DTYPE_F32, 3, 3);
  c3[1].set_row_offset(4);
  for (const auto& c : c3) sent.push_back(c);
  // 4: an unknown dtype; 5: a first chunk whose sizes do not match, with two more chunks.
  pb::ForwardRequest bad_dtype = Chunks(good, pb::DTYPE_F32, 4, 9)[0];
  bad_dtype.set_dtype(static_cast<pb::DType>(9));
  sent.push_back(bad_dtype);
  std::vector<pb::ForwardRequest> c5 = Chunks(good, pb::DTYPE_F32, 5, 3);
  c5[0].mutable_rows()->resize(10);
  for (const auto& c : c5) sent.push_back(c);
  // 6: abandoned after its first chunk; 7: good, in chunks.
  sent.push_back(Chunks(good, pb::DTYPE_F32, 6, 4)[0]);
  for (const auto& c : Chunks(good, pb::DTYPE_F32, 7, 4)) sent.push_back(c);
  for (const auto& c : sent) ASSERT_TRUE(stream->Write(c));
  stream->WritesDone();

  struct Want {
    uint64_t step;
    int code;
    const char* message;
  };
  const Want wants[] = {
      {1, static_cast<int>(absl::StatusCode::kFailedPrecondition), "expert 7 of layer 1"},
      {2, 0, ""},
      {3, static_cast<int>(absl::StatusCode::kInvalidArgument), "expected row 3"},
      {4, static_cast<int>(absl::StatusCode::kInvalidArgument), "unknown dtype 9"},
      {5, static_cast<int>(absl::StatusCode::kInvalidArgument), "chunk rows hold 10 bytes"},
      {6, static_cast<int>(absl::StatusCode::kInvalidArgument), "next chunk belongs to step 7"},
      {7, 0, ""},
  };
  for (const Want& w : wants) {
    const Answer a = ReadAnswer(stream.get());
    ASSERT_TRUE(a.complete) << "step " << w.step;
    EXPECT_EQ(a.step_id, w.step);
    EXPECT_EQ(a.error_code, w.code) << "step " << w.step << ": " << a.error_message;
    EXPECT_PRED_FORMAT2(::testing::IsSubstring, w.message, a.error_message) << "step " << w.step;
    if (w.code == 0) {
      EXPECT_EQ(a.layer, 1);
      EXPECT_EQ(a.rows, want) << "step " << w.step;
    }
  }
  pb::ForwardResponse extra;
  EXPECT_FALSE(stream->Read(&extra)) << "unexpected response for step " << extra.step_id();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ExpertServiceTest, ClusterTokenIsRequiredOnEveryRpcWhenConfigured) {
  WorkerServerOptions options;
  options.service.cluster_token = "s3cret-token";
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  const char* refused[] = {nullptr,
                           "Bearer wrong-token",
                           "s3cret-token",
                           "Bearer s3cret-toke",
                           "Bearer s3cret-token2",
                           "bearer s3cret-token"};
  for (const char* value : refused) {
    grpc::ClientContext context;
    if (value != nullptr) context.AddMetadata("authorization", value);
    pb::DescribeResponse d;
    const grpc::Status s = stub->Describe(&context, pb::DescribeRequest(), &d);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << (value ? value : "(none)");
  }
  {
    grpc::ClientContext context;
    auto stream = stub->Forward(&context);
    stream->Write(Chunks(MakeRoutes(1, 2, n_embd(), 2, {0, 1}, 41), pb::DTYPE_F32, 1, 2)[0]);
    stream->WritesDone();
    pb::ForwardResponse r;
    EXPECT_FALSE(stream->Read(&r));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::ClientContext describe_context;
  describe_context.AddMetadata("authorization", "Bearer s3cret-token");
  pb::DescribeResponse d;
  EXPECT_TRUE(stub->Describe(&describe_context, pb::DescribeRequest(), &d).ok());
  grpc::ClientContext forward_context;
  forward_context.AddMetadata("authorization", "Bearer s3cret-token");
  auto stream = stub->Forward(&forward_context);
  const TestRoutes r = MakeRoutes(1, 2, n_embd(), 2, {0, 1}, 42);
  ASSERT_TRUE(stream->Write(Chunks(r, pb::DTYPE_F32, 9, 2)[0]));
  const Answer a = ReadAnswer(stream.get());
  EXPECT_EQ(a.error_code, 0) << a.error_message;
  EXPECT_EQ(a.rows, FloatBytes(LocalResult(*full_, r)));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ExpertServiceTest, ShutdownEndsOpenStreams) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());
  grpc::ClientContext context;
  std::unique_ptr<Stream> stream = stub->Forward(&context);
  const TestRoutes r = MakeRoutes(1, 2, n_embd(), 2, {0, 1}, 51);
  ASSERT_TRUE(stream->Write(Chunks(r, pb::DTYPE_F32, 1, 2)[0]));
  EXPECT_TRUE(ReadAnswer(stream.get()).complete);
  // The stream is open and idle; shutting down cancels it instead of waiting for the client.
  server->Shutdown(0);
  server->Wait();
  pb::ForwardResponse response;
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_FALSE(stream->Finish().ok());
}

TEST(ConstantTimeEqualsTest, ComparesContentAndLength) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("Bearer abc", "Bearer abc"));
  EXPECT_FALSE(ConstantTimeEquals("Bearer abd", "Bearer abc"));
  EXPECT_FALSE(ConstantTimeEquals("Bearer ab", "Bearer abc"));
  EXPECT_FALSE(ConstantTimeEquals("Bearer abcd", "Bearer abc"));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0", 2), "a"));
}

// grpc.health.v1.Health/Check for the whole server (empty request): SERVING is field 1 = 1.
grpc::Status HealthCheck(const std::shared_ptr<grpc::Channel>& channel, std::string* response) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  grpc::CompletionQueue cq;
  const grpc::Slice empty(std::string{});
  const grpc::ByteBuffer request(&empty, 1);
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::ByteBuffer reply;
  grpc::Status status;
  call->Finish(&reply, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  grpc::Slice slice;
  if (status.ok() && reply.DumpToSingleSlice(&slice).ok()) {
    response->assign(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return status;
}

TEST_F(ExpertServiceTest, HealthServiceReportsServingWithoutTheToken) {
  WorkerServerOptions options;
  options.service.cluster_token = "t";
  auto server = Start(options);
  ASSERT_NE(server, nullptr);
  std::string response;
  const grpc::Status s = HealthCheck(Channel(server->port()), &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response, std::string("\x08\x01", 2));  // status: SERVING
}

// Check names the service; Watch sends the status and stays open until the server shuts down.
TEST_F(ExpertServiceTest, HealthCheckNamesServicesAndWatchLastsUntilShutdown) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = grpc::health::v1::Health::NewStub(Channel(server->port()));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  {
    grpc::ClientContext context;
    request.set_service("moepool.v1.ExpertService");
    ASSERT_TRUE(stub->Check(&context, request, &response).ok());
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  {
    grpc::ClientContext context;
    request.set_service("no.such.Service");
    EXPECT_EQ(stub->Check(&context, request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  grpc::ClientContext watch_context;
  request.set_service("");
  auto watch = stub->Watch(&watch_context, request);
  ASSERT_TRUE(watch->Read(&response));
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  // A second watch that the client cancels is cleaned up while the server keeps running.
  {
    grpc::ClientContext context;
    auto other = stub->Watch(&context, request);
    ASSERT_TRUE(other->Read(&response));
    context.TryCancel();
    EXPECT_FALSE(other->Read(&response));
  }
  server->Shutdown(0);
  EXPECT_FALSE(watch->Read(&response));  // the open watch ends with the server
  server->Wait();
}

// Certificates made with the openssl command line, once per process.
struct TestCerts {
  std::string ca, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key;
};

const TestCerts* Certs() {
  static const TestCerts* certs = []() -> const TestCerts* {
    if (std::system("openssl version > /dev/null 2>&1") != 0) return nullptr;
    const std::string dir = moepool::testing::TempDir() + "/tls";
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string script = absl::StrCat(
        "set -e; mkdir -p ", dir, "; cd ", dir, "\n", "openssl req -x509 ", key,
        " -keyout ca.key -out ca.pem -days 2 -subj '/CN=test CA'",
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign\n",
        "openssl req ", key, " -keyout server.key -out server.csr -subj /CN=localhost\n",
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth\\n'",
        " > server.ext\n",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial",
        " -out server.pem -days 2 -extfile server.ext\n", "openssl req ", key,
        " -keyout client.key -out client.csr -subj /CN=coordinator\n",
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial",
        " -out client.pem -days 2 -extfile client.ext\n", "openssl req -x509 ", key,
        " -keyout rogue.key -out rogue.pem -days 2 -subj /CN=rogue\n");
    if (std::system(absl::StrCat("( ", script, ") > ", dir, ".log 2>&1").c_str()) != 0) {
      ADD_FAILURE() << "openssl failed; see " << dir << ".log";
      return nullptr;
    }
    auto* c = new TestCerts;
    auto read = [&](const char* name) { return moepool::testing::ReadFileOrDie(dir + "/" + name); };
    c->ca = read("ca.pem");
    c->server_cert = read("server.pem");
    c->server_key = read("server.key");
    c->client_cert = read("client.pem");
    c->client_key = read("client.key");
    c->rogue_cert = read("rogue.pem");
    c->rogue_key = read("rogue.key");
    return c;
  }();
  return certs;
}

grpc::Status DescribeOver(int port, std::shared_ptr<grpc::ChannelCredentials> creds) {
  auto stub = pb::ExpertService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), std::move(creds)));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  pb::DescribeResponse d;
  return stub->Describe(&context, pb::DescribeRequest(), &d);
}

std::shared_ptr<grpc::ChannelCredentials> TlsClient(const std::string& ca, const std::string& cert,
                                                    const std::string& key) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ca;
  o.pem_cert_chain = cert;
  o.pem_private_key = key;
  return grpc::SslCredentials(o);
}

TEST_F(ExpertServiceTest, TlsServesVerifiedClientsAndMutualTlsRefusesClientsWithoutACert) {
  const TestCerts* certs = Certs();
  if (certs == nullptr) GTEST_SKIP() << "the openssl command is not available";
  WorkerServerOptions options;
  options.tls_cert_pem = certs->server_cert;
  options.tls_key_pem = certs->server_key;
  auto tls = Start(options);
  ASSERT_NE(tls, nullptr);
  EXPECT_TRUE(tls->tls());
  EXPECT_TRUE(DescribeOver(tls->port(), TlsClient(certs->ca, "", "")).ok());
  EXPECT_FALSE(DescribeOver(tls->port(), grpc::InsecureChannelCredentials()).ok());
  // A client that does not trust the server's CA refuses it.
  EXPECT_FALSE(DescribeOver(tls->port(), TlsClient(certs->rogue_cert, "", "")).ok());

  options.tls_client_ca_pem = certs->ca;
  auto mtls = Start(options);
  ASSERT_NE(mtls, nullptr);
  const grpc::Status with_cert =
      DescribeOver(mtls->port(), TlsClient(certs->ca, certs->client_cert, certs->client_key));
  EXPECT_TRUE(with_cert.ok()) << with_cert.error_message();
  EXPECT_FALSE(DescribeOver(mtls->port(), TlsClient(certs->ca, "", "")).ok());
  EXPECT_FALSE(
      DescribeOver(mtls->port(), TlsClient(certs->ca, certs->rogue_cert, certs->rogue_key)).ok());
  EXPECT_FALSE(DescribeOver(mtls->port(), grpc::InsecureChannelCredentials()).ok());
}

TEST_F(ExpertServiceTest, StartRefusesInconsistentOptions) {
  WorkerServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.tls_cert_pem = "cert";
  EXPECT_EQ(WorkerServer::Start(core_, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.tls_cert_pem.clear();
  options.tls_client_ca_pem = "ca";
  EXPECT_EQ(WorkerServer::Start(core_, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.tls_client_ca_pem.clear();
  options.max_message_bytes = 1000;
  EXPECT_EQ(WorkerServer::Start(core_, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.max_message_bytes = 64 << 20;
  options.listen_address = "not an address";
  EXPECT_EQ(WorkerServer::Start(core_, options).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace moepool::worker
