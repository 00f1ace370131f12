// The worker's NCCL session table (worker/nccl_sessions.h): ids, closing, and a session closed
// while a Forward holds it.
#include "worker/nccl_sessions.h"

#include <atomic>
#include <memory>

#include "gtest/gtest.h"
#include "wire/row_pipe.h"

namespace moepool::worker {
namespace {

// A pipe that counts its own destruction.
class CountingPipe : public wire::RowPipe {
 public:
  explicit CountingPipe(std::atomic<int>* destroyed) : destroyed_(destroyed) {}
  ~CountingPipe() override { ++*destroyed_; }
  bool broken() const override { return false; }
  absl::Status Send(const void*, size_t) override { return absl::OkStatus(); }
  absl::Status Recv(void*, size_t) override { return absl::OkStatus(); }

 private:
  std::atomic<int>* destroyed_;
};

TEST(NcclSessionsTest, IdsAreNonZeroDistinctAndDifferBetweenRuns) {
  std::atomic<int> destroyed{0};
  NcclSessions a(0, wire::NcclOptions{});
  NcclSessions b(0, wire::NcclOptions{});  // a restarted worker
  const uint64_t a1 = a.Add(std::make_unique<CountingPipe>(&destroyed));
  const uint64_t a2 = a.Add(std::make_unique<CountingPipe>(&destroyed));
  const uint64_t b1 = b.Add(std::make_unique<CountingPipe>(&destroyed));
  EXPECT_NE(a1, 0u);
  EXPECT_NE(a1, a2);
  // A coordinator naming its session of the previous run must not hit the new run's first one.
  EXPECT_NE(a1, b1);
}

TEST(NcclSessionsTest, CloseForgetsTheSessionAndReleasesItsPipe) {
  std::atomic<int> destroyed{0};
  NcclSessions sessions(0, wire::NcclOptions{});
  const uint64_t kept = sessions.Add(std::make_unique<CountingPipe>(&destroyed));
  const uint64_t closed = sessions.Add(std::make_unique<CountingPipe>(&destroyed));
  EXPECT_TRUE(sessions.Close(closed));
  EXPECT_EQ(destroyed, 1);
  EXPECT_EQ(sessions.Lock(closed).peer, nullptr);
  EXPECT_FALSE(sessions.Close(closed));
  EXPECT_FALSE(sessions.Close(0));
  EXPECT_NE(sessions.Lock(kept).peer, nullptr);
}

// A Forward that holds a session while it is closed finishes on it; the pipe goes afterwards.
TEST(NcclSessionsTest, ClosingAHeldSessionWaitsForItsHolder) {
  std::atomic<int> destroyed{0};
  NcclSessions sessions(0, wire::NcclOptions{});
  const uint64_t id = sessions.Add(std::make_unique<CountingPipe>(&destroyed));
  {
    NcclSessions::Locked held = sessions.Lock(id);
    ASSERT_NE(held.peer, nullptr);
    EXPECT_TRUE(sessions.Close(id));
    EXPECT_EQ(destroyed, 0);
    EXPECT_TRUE(held.peer->Send(nullptr, 0).ok());
  }
  EXPECT_EQ(destroyed, 1);
}

}  // namespace
}  // namespace moepool::worker
