// The transport seam: --transport parsing, and ConnectNcclSessions falling back to gRPC (null
// pipes, one line on stderr) wherever NCCL cannot be set up: here it never can (a CPU build, or
// a library name that does not exist).
#include "wire/transport.h"

#include <string>

#include "gtest/gtest.h"

namespace moepool::wire {
namespace {

TEST(TransportTest, ParsesGrpcAndNcclOnly) {
  EXPECT_EQ(*ParseTransport("grpc"), TransportKind::kGrpc);
  EXPECT_EQ(*ParseTransport("nccl"), TransportKind::kNccl);
  EXPECT_STREQ(TransportName(TransportKind::kNccl), "nccl");
  const auto bad = ParseTransport("NCCL ");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'NCCL '"), absl::string_view::npos);
}

TEST(TransportTest, UnusableNcclFallsBackToGrpcWithOneLine) {
  std::vector<TransportEndpoint> endpoints(2);
  endpoints[0].address = "127.0.0.1:1";
  endpoints[0].describe.add_transports(kNcclTransportName);
  endpoints[1].address = "127.0.0.1:2";
  NcclSessionOptions options;
  options.nccl.library = "libnccl-that-does-not-exist.so.2";
  ::testing::internal::CaptureStderr();
  const auto pipes = ConnectNcclSessions(endpoints, options);
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_EQ(pipes.size(), 2u);
  EXPECT_EQ(pipes[0], nullptr);
  EXPECT_EQ(pipes[1], nullptr);
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;  // exactly one line
  EXPECT_NE(err.find("NCCL cannot be used here"), std::string::npos) << err;
  EXPECT_NE(err.find("rows travel over gRPC"), std::string::npos) << err;
}

}  // namespace
}  // namespace moepool::wire
