// The NCCL pipe: unusable NCCL is reported (never a crash), and, where two GPUs and NCCL exist,
// two ranks exchange bytes both ways intact. NCCL refuses two ranks on one device, so the
// exchange test needs two devices; it skips elsewhere unless MOEPOOL_REQUIRE_GPU=1, which turns
// the skip into a failure (for the GPU test machine).
#include "wire/nccl_peer.h"

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "gtest/gtest.h"

namespace moepool::wire {
namespace {

bool RequireGpu() {
  const char* v = std::getenv("MOEPOOL_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

TEST(NcclPeerTest, MissingLibraryOrCudaIsAnErrorNotACrash) {
  NcclOptions options;
  options.library = "libnccl-that-does-not-exist.so.2";
  const absl::Status s = NcclUsable(options, 0);
  ASSERT_FALSE(s.ok());
  if (BuiltWithCuda()) {
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_NE(s.message().find("libnccl-that-does-not-exist.so.2"), absl::string_view::npos) << s;
  } else {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  }
  EXPECT_FALSE(NcclNewUniqueId(options).ok());
  EXPECT_FALSE(NcclPeer::Connect(std::string(128, '\0'), 0, 0, options).ok());
}

TEST(NcclPeerTest, BadIdOrRankIsRefused) {
  if (!BuiltWithCuda()) GTEST_SKIP() << "no CUDA in this build";
  EXPECT_EQ(NcclPeer::Connect("short", 0, 0, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclPeer::Connect(std::string(128, '\0'), 2, 0, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(NcclPeerTest, TwoRanksOnTwoGpusExchangeBytesBothWays) {
  auto devices = ListCudaDevices();
  const NcclOptions options;
  std::string why;
  if (!devices.ok()) {
    why = std::string(devices.status().message());
  } else if (devices->size() < 2) {
    why = "needs two CUDA devices (NCCL refuses two ranks on one device)";
  } else if (absl::Status s = NcclUsable(options, 0); !s.ok()) {
    why = std::string(s.message());
  }
  if (!why.empty()) {
    if (RequireGpu()) FAIL() << "MOEPOOL_REQUIRE_GPU=1: " << why;
    GTEST_SKIP() << why;
  }
  auto id = NcclNewUniqueId(options);
  ASSERT_TRUE(id.ok()) << id.status();
  absl::StatusOr<std::unique_ptr<NcclPeer>> peers[2] = {absl::UnknownError("unset"),
                                                        absl::UnknownError("unset")};
  {
    std::thread other([&] { peers[1] = NcclPeer::Connect(*id, 1, 1, options); });
    peers[0] = NcclPeer::Connect(*id, 0, 0, options);
    other.join();
  }
  ASSERT_TRUE(peers[0].ok()) << peers[0].status();
  ASSERT_TRUE(peers[1].ok()) << peers[1].status();
  // Sizes around the staging buffer's growth, and an odd one.
  for (size_t bytes : {size_t{1}, size_t{4096}, size_t{3} << 20, size_t{12345}}) {
    std::string a(bytes, '\0'), b(bytes, '\0');
    for (size_t i = 0; i < bytes; ++i) {
      a[i] = static_cast<char>(i * 7 + 1);
      b[i] = static_cast<char>(i * 13 + 5);
    }
    std::string got_a(bytes, 'x'), got_b(bytes, 'x');
    absl::Status s1, s2;
    std::thread rank1([&] {
      s1 = (*peers[1])->Recv(got_a.data(), bytes);
      if (s1.ok()) s1 = (*peers[1])->Send(b.data(), bytes);
    });
    s2 = (*peers[0])->Send(a.data(), bytes);
    if (s2.ok()) s2 = (*peers[0])->Recv(got_b.data(), bytes);
    rank1.join();
    ASSERT_TRUE(s1.ok()) << s1;
    ASSERT_TRUE(s2.ok()) << s2;
    EXPECT_TRUE(got_a == a) << bytes << " bytes rank 0 -> 1";
    EXPECT_TRUE(got_b == b) << bytes << " bytes rank 1 -> 0";
  }
}

}  // namespace
}  // namespace moepool::wire
