// The rows-outside-gRPC protocol (--transport nccl) end to end without GPUs: a real worker
// (WorkerCore + WorkerServer over gRPC) whose session is an in-memory pipe instead of NCCL, and
// WorkerLinks with and without that pipe. The answers must equal the all-gRPC ones bit for bit,
// the rows must really cross the pipe, and refusals must keep both ends in step.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/grpc_worker_link.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "wire/transport.h"
#include "worker/expert_service.h"
#include "worker/nccl_sessions.h"
#include "worker/worker_core.h"

namespace moepool {
namespace {

using ::moepool::testing::TinyModelPath;

// Two connected in-memory pipe ends (unbounded queues; Recv waits up to 10 s).
struct PipeWire {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<char> queue[2];  // queue[i]: bytes for end i
  size_t sent[2] = {0, 0};    // bytes sent by end i
};

class MemoryPipe : public wire::RowPipe {
 public:
  MemoryPipe(std::shared_ptr<PipeWire> wire, int end) : wire_(std::move(wire)), end_(end) {}
  bool broken() const override { return broken_; }
  absl::Status Send(const void* data, size_t bytes) override {
    std::lock_guard<std::mutex> lock(wire_->mu);
    const char* p = static_cast<const char*>(data);
    wire_->queue[1 - end_].insert(wire_->queue[1 - end_].end(), p, p + bytes);
    wire_->sent[end_] += bytes;
    wire_->cv.notify_all();
    return absl::OkStatus();
  }
  absl::Status Recv(void* data, size_t bytes) override {
    std::unique_lock<std::mutex> lock(wire_->mu);
    std::deque<char>& q = wire_->queue[end_];
    if (!wire_->cv.wait_for(lock, std::chrono::seconds(10), [&] { return q.size() >= bytes; })) {
      broken_ = true;
      return absl::DeadlineExceededError("memory pipe: nothing came");
    }
    std::copy(q.begin(), q.begin() + static_cast<std::ptrdiff_t>(bytes), static_cast<char*>(data));
    q.erase(q.begin(), q.begin() + static_cast<std::ptrdiff_t>(bytes));
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<PipeWire> wire_;
  int end_;
  bool broken_ = false;
};

class WorkerLinkRowsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    worker::WorkerCoreOptions o;
    o.model_path = TinyModelPath("Q4_K_M");
    ASSERT_FALSE(o.model_path.empty());
    auto experts = worker::ExpertSetFromFlags("0-7", "0-1", 64, 8);
    ASSERT_TRUE(experts.ok()) << experts.status();
    o.experts = *experts;
    o.threads = 2;
    auto core = worker::WorkerCore::Create(o);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = *std::move(core);
    wire_ = std::make_shared<PipeWire>();
    sessions_ = std::make_shared<worker::NcclSessions>(0, wire::NcclOptions{});
    session_ = sessions_->Add(std::make_unique<MemoryPipe>(wire_, 1));
    worker::WorkerServerOptions so;
    so.listen_address = "127.0.0.1:0";
    so.service.nccl = sessions_;
    auto server = worker::WorkerServer::Start(core_.get(), so);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  std::unique_ptr<GrpcWorkerLink> Link(std::shared_ptr<wire::RowSession> rows) {
    WorkerLinkConfig c;
    c.address = "127.0.0.1:" + std::to_string(server_->port());
    c.credentials = grpc::InsecureChannelCredentials();
    auto link = std::make_unique<GrpcWorkerLink>(std::move(c));
    auto d = link->Describe(10, true);
    EXPECT_TRUE(d.ok()) << d.status();
    if (!d.ok()) return nullptr;
    describe_ = *d;
    link->SetRowSession(std::move(rows), nullptr);
    link->Start(*d, [](const moepool::v1::DescribeResponse&) { return absl::OkStatus(); });
    return link;
  }

  // A job of `n` rows of layer `layer`, two experts per row.
  void MakeJob(int layer, int64_t n, moepool::v1::DType dtype, uint64_t step, LinkJob* job) {
    const int64_t d = core_->config().n_embd;
    std::mt19937 rng(static_cast<uint32_t>(n * 31 + layer));
    std::uniform_real_distribution<float> u(-1, 1);
    x_.resize(static_cast<size_t>(n * d));
    for (float& v : x_) v = u(rng);
    rows_.clear();
    expert_.clear();
    weight_.clear();
    for (int64_t r = 0; r < n; ++r) {
      rows_.push_back(r);
      const int a = static_cast<int>(r % 7);
      expert_.push_back(a);
      expert_.push_back(a + 1);
      weight_.push_back(0.75f);
      weight_.push_back(0.25f);
    }
    job->round = step;
    job->layer = layer;
    job->dtype = dtype;
    job->n_embd = d;
    job->k = 2;
    job->x = x_.data();
    job->rows = &rows_;
    job->expert = &expert_;
    job->weight = &weight_;
  }

  std::unique_ptr<worker::WorkerCore> core_;
  std::shared_ptr<PipeWire> wire_;
  std::shared_ptr<worker::NcclSessions> sessions_;
  uint64_t session_ = 0;
  std::unique_ptr<worker::WorkerServer> server_;
  moepool::v1::DescribeResponse describe_;
  std::vector<float> x_;
  std::vector<int64_t> rows_;
  std::vector<int32_t> expert_;
  std::vector<float> weight_;
};

TEST_F(WorkerLinkRowsTest, RowsOverThePipeEqualGrpcBitForBit) {
  auto grpc_link = Link(nullptr);
  ASSERT_NE(grpc_link, nullptr);
  EXPECT_THAT(describe_.transports(), ::testing::Contains("nccl"));
  auto pipe_link =
      Link(std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_));
  ASSERT_NE(pipe_link, nullptr);
  uint64_t step = 1;
  for (const auto dtype : {moepool::v1::DTYPE_F32, moepool::v1::DTYPE_F16}) {
    for (const int64_t n : {int64_t{1}, int64_t{5}, int64_t{64}}) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype << ", " << n << " rows");
      LinkJob by_grpc, by_pipe;
      MakeJob(1, n, dtype, step++, &by_grpc);
      grpc_link->RunInline(&by_grpc);
      ASSERT_TRUE(by_grpc.status.ok()) << by_grpc.status;
      const size_t sent_before = wire_->sent[0];
      MakeJob(1, n, dtype, step++, &by_pipe);
      pipe_link->RunInline(&by_pipe);
      ASSERT_TRUE(by_pipe.status.ok()) << by_pipe.status;
      ASSERT_EQ(by_pipe.partial.size(), by_grpc.partial.size());
      EXPECT_EQ(std::memcmp(by_pipe.partial.data(), by_grpc.partial.data(),
                            by_grpc.partial.size() * sizeof(float)),
                0);
      const size_t elem = dtype == moepool::v1::DTYPE_F32 ? 4 : 2;
      const size_t row_bytes = static_cast<size_t>(n * core_->config().n_embd) * elem;
      EXPECT_EQ(wire_->sent[0] - sent_before, row_bytes);              // the rows crossed the pipe
      EXPECT_LT(by_pipe.sample.request_bytes - row_bytes, row_bytes);  // not in the message
    }
  }
  EXPECT_EQ(wire_->sent[1], wire_->sent[0]);  // every answer came back on the pipe
}

TEST_F(WorkerLinkRowsTest, RefusalsKeepBothEndsInStep) {
  auto pipe_link =
      Link(std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_));
  ASSERT_NE(pipe_link, nullptr);
  LinkJob bad;
  MakeJob(99, 3, moepool::v1::DTYPE_F32, 1, &bad);  // no such layer
  pipe_link->RunInline(&bad);
  EXPECT_EQ(bad.status.code(), absl::StatusCode::kInvalidArgument) << bad.status;
  LinkJob good;
  MakeJob(0, 3, moepool::v1::DTYPE_F32, 2, &good);
  pipe_link->RunInline(&good);
  EXPECT_TRUE(good.status.ok()) << good.status;
  EXPECT_TRUE(pipe_link->up());
}

TEST_F(WorkerLinkRowsTest, UnknownSessionIsRefusedByName) {
  auto pipe_link = Link(
      std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_ + 41));
  ASSERT_NE(pipe_link, nullptr);
  LinkJob job;
  MakeJob(0, 2, moepool::v1::DTYPE_F32, 1, &job);
  pipe_link->RunInline(&job);
  EXPECT_EQ(job.status.code(), absl::StatusCode::kFailedPrecondition) << job.status;
  EXPECT_NE(job.status.message().find("NCCL session"), absl::string_view::npos) << job.status;
}

// Post writes one-message requests on the caller's thread when the stream is open; a link with a
// working row transport must still send its rows on the pipe (the whole exchange on its thread).
TEST_F(WorkerLinkRowsTest, PostedJobsSendTheirRowsOnThePipe) {
  auto grpc_link = Link(nullptr);
  ASSERT_NE(grpc_link, nullptr);
  auto pipe_link =
      Link(std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_));
  ASSERT_NE(pipe_link, nullptr);
  uint64_t step = 1;
  LinkJob warm;  // opens the stream, so the next Post could write on this thread
  MakeJob(0, 2, moepool::v1::DTYPE_F32, step++, &warm);
  pipe_link->RunInline(&warm);
  ASSERT_TRUE(warm.status.ok()) << warm.status;
  for (int i = 0; i < 3; ++i) {
    LinkJob by_grpc, by_pipe;
    MakeJob(1, 4, moepool::v1::DTYPE_F32, step++, &by_grpc);
    grpc_link->RunInline(&by_grpc);
    ASSERT_TRUE(by_grpc.status.ok()) << by_grpc.status;
    const size_t sent_before = wire_->sent[0];
    MakeJob(1, 4, moepool::v1::DTYPE_F32, step++, &by_pipe);
    RoundLatch latch(1);
    pipe_link->Post(&by_pipe, &latch);
    latch.Wait();
    ASSERT_TRUE(by_pipe.status.ok()) << by_pipe.status;
    EXPECT_EQ(wire_->sent[0] - sent_before,
              static_cast<size_t>(4 * core_->config().n_embd) * sizeof(float));
    ASSERT_EQ(by_pipe.partial.size(), by_grpc.partial.size());
    EXPECT_EQ(std::memcmp(by_pipe.partial.data(), by_grpc.partial.data(),
                          by_grpc.partial.size() * sizeof(float)),
              0);
  }
  EXPECT_EQ(wire_->sent[1], wire_->sent[0]);
}

// A restarted worker has lost its sessions: on reconnect the link asks its factory for a new row
// transport, and the rows then cross the new pipe with the same answers as before the restart.
TEST_F(WorkerLinkRowsTest, ReconnectedLinkGetsANewRowSession) {
  const int port = server_->port();
  WorkerLinkConfig c;
  c.address = "127.0.0.1:" + std::to_string(port);
  c.credentials = grpc::InsecureChannelCredentials();
  c.backoff_initial_s = 0.02;
  c.backoff_max_s = 0.1;
  GrpcWorkerLink link(std::move(c));
  auto d = link.Describe(10, true);
  ASSERT_TRUE(d.ok()) << d.status();
  auto sessions2 = std::make_shared<worker::NcclSessions>(0, wire::NcclOptions{});
  std::shared_ptr<PipeWire> wire2;
  std::atomic<int> renewals{0};
  link.SetRowSession(
      std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_),
      [&](const moepool::v1::DescribeResponse& answer,
          uint64_t replaces_session) -> std::shared_ptr<wire::RowSession> {
        EXPECT_THAT(answer.transports(), ::testing::Contains("nccl"));
        EXPECT_EQ(replaces_session, session_);  // the worker is asked to close the old one
        wire2 = std::make_shared<PipeWire>();
        const uint64_t session = sessions2->Add(std::make_unique<MemoryPipe>(wire2, 1));
        ++renewals;
        return std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire2, 0), session);
      });
  link.Start(*d, [](const moepool::v1::DescribeResponse&) { return absl::OkStatus(); });
  LinkJob before;
  MakeJob(1, 4, moepool::v1::DTYPE_F32, 1, &before);
  link.RunInline(&before);
  ASSERT_TRUE(before.status.ok()) << before.status;
  ASSERT_GT(wire_->sent[0], 0u);

  // The worker restarts on the same port with no sessions but the factory's.
  server_.reset();
  worker::WorkerServerOptions so;
  so.listen_address = "127.0.0.1:" + std::to_string(port);
  so.service.nccl = sessions2;
  auto server = worker::WorkerServer::Start(core_.get(), so);
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  LinkJob lost;  // finds the old stream gone: the link goes down and reconnects
  MakeJob(1, 4, moepool::v1::DTYPE_F32, 2, &lost);
  link.RunInline(&lost);
  EXPECT_FALSE(lost.status.ok());
  for (int i = 0; i < 500 && (!link.up() || renewals == 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(link.up());
  EXPECT_EQ(renewals, 1);

  LinkJob after;
  MakeJob(1, 4, moepool::v1::DTYPE_F32, 3, &after);
  link.RunInline(&after);
  ASSERT_TRUE(after.status.ok()) << after.status;
  EXPECT_EQ(wire2->sent[0], static_cast<size_t>(4 * core_->config().n_embd) * sizeof(float));
  EXPECT_EQ(wire2->sent[1], wire2->sent[0]);
  ASSERT_EQ(after.partial.size(), before.partial.size());
  EXPECT_EQ(std::memcmp(after.partial.data(), before.partial.data(),
                        before.partial.size() * sizeof(float)),
            0);
}

// SetupNccl naming the session it replaces closes that session on the worker, even when the new
// one cannot be joined (here: no usable NCCL device and a made-up id); other sessions stay.
TEST_F(WorkerLinkRowsTest, SetupNcclClosesTheSessionItReplaces) {
  const uint64_t other = sessions_->Add(std::make_unique<MemoryPipe>(wire_, 1));
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = moepool::v1::ExpertService::NewStub(channel);
  grpc::ClientContext context;
  moepool::v1::NcclSetupRequest request;
  request.set_unique_id(std::string(128, '\x01'));
  request.set_timeout_s(1);
  request.set_replaces_session(session_);
  moepool::v1::NcclSetupResponse response;
  const grpc::Status s = stub->SetupNccl(&context, request, &response);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(sessions_->Lock(session_).peer, nullptr);
  EXPECT_NE(sessions_->Lock(other).peer, nullptr);
  // Rows for the closed session are refused with a clear error.
  LinkJob job;
  MakeJob(1, 4, moepool::v1::DTYPE_F32, 1, &job);
  auto link =
      Link(std::make_shared<wire::RowSession>(std::make_unique<MemoryPipe>(wire_, 0), session_));
  ASSERT_NE(link, nullptr);
  link->RunInline(&job);
  EXPECT_FALSE(job.status.ok());
  EXPECT_NE(job.status.ToString().find("unknown"), std::string::npos) << job.status;
}

// SetupNccl on a worker started without NCCL is refused with FAILED_PRECONDITION (and Describe
// offers no transport beyond gRPC).
TEST_F(WorkerLinkRowsTest, SetupNcclWithoutNcclIsAFailedPrecondition) {
  worker::WorkerServerOptions so;
  so.listen_address = "127.0.0.1:0";
  auto server = worker::WorkerServer::Start(core_.get(), so);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string((*server)->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = moepool::v1::ExpertService::NewStub(channel);
  {
    grpc::ClientContext context;
    moepool::v1::DescribeRequest request;
    moepool::v1::DescribeResponse response;
    ASSERT_TRUE(stub->Describe(&context, request, &response).ok());
    EXPECT_THAT(response.transports(), ::testing::Not(::testing::Contains("nccl")));
  }
  grpc::ClientContext context;
  moepool::v1::NcclSetupRequest request;
  request.set_timeout_s(1);
  moepool::v1::NcclSetupResponse response;
  const grpc::Status s = stub->SetupNccl(&context, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
}

}  // namespace
}  // namespace moepool
