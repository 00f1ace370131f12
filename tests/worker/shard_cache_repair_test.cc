// The worker's shard cache repairing what it finds or is sent: an interrupted transfer resumed,
// an altered or truncated shard file mended from what still verifies, bytes that do not verify
// fetched again, a fetcher sending too many or too few bytes refused (shard_cache_test_util.h;
// the rest of the cache: shard_cache_test.cc).
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "gtest/gtest.h"
#include "tests/worker/shard_cache_test_util.h"
#include "worker/shard_cache.h"

namespace moepool::worker {
namespace {

using ::moepool::testing::FakeServer;
using ::moepool::testing::ListNames;
using ::moepool::testing::ManifestFor;
using ::moepool::testing::Pairs;
using ::moepool::testing::ShardCacheTest;
using ::moepool::testing::TotalBytes;

#define EXPECT_MESSAGE_HAS(status, needle) \
  EXPECT_PRED_FORMAT2(::testing::IsSubstring, needle, std::string((status).message()))

TEST_F(ShardCacheTest, AnInterruptedTransferResumesWithTheMissingTensors) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {0, 3}, {1, 1}}, &server);
  server.fail_on_call = 4;  // four tensors arrive, the fifth breaks off half-way
  auto failed = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(server.calls, 5);

  const std::string partial = dir() + "/" + ShardCache::FileNameFor(m) + ".partial";
  std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_EQ(inv[0].path, partial);
  EXPECT_FALSE(inv[0].complete);
  EXPECT_EQ(inv[0].pairs, (Pairs{{0, 0}, {0, 3}, {1, 1}}));

  server = FakeServer{server.bytes};
  auto resumed = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(server.calls, 5);
  EXPECT_EQ(resumed->tensors_fetched, 5);
  std::vector<std::string> rest;
  uint64_t reused = 0;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    if (i >= 4) rest.push_back(m.tensors[i].name);
    if (i < 4) reused += m.tensors[i].bytes;
  }
  EXPECT_EQ(server.fetched, rest);
  EXPECT_EQ(resumed->bytes_reused, reused);
  EXPECT_EQ(resumed->bytes_fetched, TotalBytes(m) - reused);
  ExpectFileHolds(resumed->path, m, server);
  inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_TRUE(inv[0].complete);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, AnAlteredTensorIsFetchedAgainAlone) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 2}, {1, 3}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  uint64_t offset = 0;
  {
    auto file = GgufFile::Open(first->path);
    ASSERT_TRUE(file.ok()) << file.status();
    const GgufTensorInfo* t = (*file)->FindTensor(m.tensors[4].name);
    ASSERT_NE(t, nullptr);
    offset = (*file)->data_offset() + t->offset + t->size_bytes / 2;
  }
  const int fd = ::open(first->path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char byte = 0;
  ASSERT_EQ(::pread(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  byte = static_cast<char>(byte ^ 0x01);
  ASSERT_EQ(::pwrite(fd, &byte, 1, static_cast<off_t>(offset)), 1);
  ::close(fd);

  server.calls = 0;
  server.fetched.clear();
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(second->untouched);
  EXPECT_EQ(server.calls, 1);
  EXPECT_EQ(server.fetched, std::vector<std::string>{m.tensors[4].name});
  EXPECT_EQ(second->tensors_fetched, 1);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m) - m.tensors[4].bytes);
  ExpectFileHolds(second->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, ATruncatedCompleteFileIsRebuilt) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 1}, {1, 1}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  uint64_t cut = 0;
  {
    auto file = GgufFile::Open(first->path);
    ASSERT_TRUE(file.ok()) << file.status();
    const GgufTensorInfo* t = (*file)->FindTensor(m.tensors[3].name);
    ASSERT_NE(t, nullptr);
    cut = (*file)->data_offset() + t->offset + 10;
  }
  // Cut inside tensor 3: the three before it still verify and are kept.
  ASSERT_EQ(::truncate(first->path.c_str(), static_cast<off_t>(cut)), 0);
  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(server.calls, 3);
  ExpectFileHolds(second->path, m, server);

  // Cut inside the header: nothing is left to keep.
  ASSERT_EQ(::truncate(first->path.c_str(), 40), 0);
  server.calls = 0;
  auto third = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(server.calls, 6);
  ExpectFileHolds(third->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, BytesThatNeverVerifyAreDataLossAfterTwoFetches) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{1, 2}}, &server);
  server.corrupt_calls = 1000;
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(server.calls, 2);
  EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].name);
  EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].checksum.Hex());
  std::string bad = server.bytes.at(m.tensors[0].name);
  bad[bad.size() / 3] ^= 0x5a;
  EXPECT_MESSAGE_HAS(r.status(), ChecksumOf(bad.data(), bad.size()).Hex());
  EXPECT_FALSE(std::filesystem::exists(dir() + "/" + ShardCache::FileNameFor(m)));
}

TEST_F(ShardCacheTest, BytesThatVerifyOnTheSecondFetchAreAccepted) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{1, 2}}, &server);
  server.corrupt_calls = 1;
  std::vector<FetchProgress> reports;
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(server.calls, 4);
  EXPECT_EQ(r->tensors_fetched, 3);
  EXPECT_EQ(r->bytes_fetched, TotalBytes(m) + m.tensors[0].bytes);
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.back().bytes_done, reports.back().bytes_total);
  ExpectFileHolds(r->path, m, server);
}

TEST_F(ShardCacheTest, AFetcherSendingTooManyOrTooFewBytesFails) {
  const struct {
    int extra, missing;
    bool ignore_sink_errors;
  } cases[] = {{1, 0, false}, {1, 0, true}, {0, 1, false}};
  for (const auto& c : cases) {
    for (const std::string& name : ListNames(dir())) std::filesystem::remove(dir() + "/" + name);
    FakeServer server;
    const ShardManifest m = ManifestFor(*source_, {{0, 3}}, &server);
    server.extra_bytes = c.extra;
    server.missing_bytes = c.missing;
    server.ignore_sink_errors = c.ignore_sink_errors;
    auto r = cache_->Materialize(m, server.Fetcher());
    ASSERT_FALSE(r.ok()) << c.extra << " " << c.missing;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
    EXPECT_MESSAGE_HAS(r.status(), m.tensors[0].name);
    EXPECT_EQ(server.calls, 1);
    // The sink itself refuses the byte too many (it would land on the next tensor).
    EXPECT_EQ(server.sink_errors, c.extra > 0 ? 1 : 0);
    EXPECT_FALSE(std::filesystem::exists(dir() + "/" + ShardCache::FileNameFor(m)));
  }
}

}  // namespace
}  // namespace moepool::worker
