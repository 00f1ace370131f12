// The worker's shard cache on disk: Open, Materialize and Inventory over a temporary directory,
// with the expert tensors of a small merged-layout model written here and served by an in-memory
// fetcher (shard_cache_test_util.h; repairing what is on disk: shard_cache_repair_test.cc;
// validation, names and checksums: shard_manifest_test.cc).
#include "worker/shard_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/worker/shard_cache_test_util.h"

namespace moepool::worker {
namespace {

using ::moepool::testing::FakeServer;
using ::moepool::testing::kExperts;
using ::moepool::testing::kFingerprint;
using ::moepool::testing::kLayers;
using ::moepool::testing::kMatrices;
using ::moepool::testing::kOtherFingerprint;
using ::moepool::testing::ListNames;
using ::moepool::testing::ManifestFor;
using ::moepool::testing::Pairs;
using ::moepool::testing::ShardCacheTest;
using ::moepool::testing::TempDirectory;
using ::moepool::testing::TotalBytes;

TEST_F(ShardCacheTest, MaterializesAShardThatModelLoadReadsWithTheSourceBytes) {
  FakeServer server;
  const Pairs pairs = {{1, 3}, {0, 1}, {1, 0}};
  const ShardManifest m = ManifestFor(*source_, pairs, &server);
  std::vector<FetchProgress> reports;
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->path, dir() + "/" + ShardCache::FileNameFor(m));
  EXPECT_FALSE(r->untouched);
  EXPECT_EQ(r->tensors_fetched, 9);
  EXPECT_EQ(r->bytes_fetched, TotalBytes(m));
  EXPECT_EQ(r->bytes_reused, 0u);
  EXPECT_EQ(server.calls, 9);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.back().bytes_total, TotalBytes(m));
  EXPECT_EQ(reports.back().bytes_done, TotalBytes(m));
  ExpectFileHolds(r->path, m, server);

  ExpertFilter filter;
  filter.non_expert = false;
  const std::set<std::pair<int, int>> keep(pairs.begin(), pairs.end());
  filter.keep = [&](int l, int e) { return keep.count({l, e}) > 0; };
  auto model = Model::Load(r->path, filter);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->config().n_vocab, 100);
  EXPECT_TRUE((*model)->per_expert_layout());
  for (int l = 0; l < kLayers; ++l) {
    for (int e = 0; e < kExperts; ++e) {
      const ExpertWeights& E = (*model)->layer(l).experts[static_cast<size_t>(e)];
      ASSERT_EQ(E.present(), keep.count({l, e}) > 0) << l << "/" << e;
      if (!E.present()) continue;
      const WeightMatrix* mats[] = {&E.gate, &E.up, &E.down};
      for (int k = 0; k < 3; ++k) {
        const std::string& want =
            server.bytes.at(absl::StrCat("blk.", l, ".ffn_", kMatrices[k].name, ".", e, ".weight"));
        ASSERT_EQ(mats[k]->SizeBytes(), want.size());
        EXPECT_EQ(std::memcmp(mats[k]->data, want.data(), want.size()), 0) << l << "/" << e;
      }
    }
  }

  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 1u);
  EXPECT_EQ(inv[0].path, r->path);
  EXPECT_EQ(inv[0].model_fingerprint, kFingerprint);
  EXPECT_TRUE(inv[0].complete);
  EXPECT_EQ(inv[0].pairs, (Pairs{{0, 1}, {1, 0}, {1, 3}}));
}

TEST_F(ShardCacheTest, AMatchingCompleteFileIsUsedUntouched) {
  FakeServer server;
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {1, 2}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  // An old mtime: any write or replacement would change it, however fast the test runs.
  const timespec old_times[2] = {{1000000000, 0}, {1000000000, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, first->path.c_str(), old_times, 0), 0);
  struct stat before, after;
  ASSERT_EQ(::stat(first->path.c_str(), &before), 0);

  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->untouched);
  EXPECT_EQ(second->path, first->path);
  EXPECT_EQ(second->tensors_fetched, 0);
  EXPECT_EQ(second->bytes_fetched, 0u);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m));
  EXPECT_EQ(server.calls, 0);
  ASSERT_EQ(::stat(first->path.c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(after.st_size, before.st_size);
}

TEST_F(ShardCacheTest, NewMetadataForTheSameTensorsRewritesTheFileFromTheOldOne) {
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{0, 2}, {1, 1}}, &server);
  auto first = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(first.ok()) << first.status();
  for (auto& [key, value] : m.metadata) {
    if (key == "general.name") value = GgufValue::String("renamed");
  }
  server.calls = 0;
  auto second = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->path, first->path);  // the name depends on the tensors only
  EXPECT_FALSE(second->untouched);
  EXPECT_EQ(server.calls, 0);
  EXPECT_EQ(second->bytes_reused, TotalBytes(m));
  ExpectFileHolds(second->path, m, server);
  EXPECT_EQ(ListNames(dir()), std::vector<std::string>{ShardCache::FileNameFor(m)});
}

TEST_F(ShardCacheTest, TensorsOfAnotherShardOfTheSameModelAreCopiedAndItIsDeletedAfter) {
  FakeServer server;
  const ShardManifest old_share = ManifestFor(*source_, {{0, 0}, {0, 1}}, &server);
  ASSERT_TRUE(cache_->Materialize(old_share, server.Fetcher()).ok());
  // The same tensors under another model's fingerprint must not be taken.
  const ShardManifest other_model =
      ManifestFor(*source_, {{1, 2}, {0, 1}}, &server, kOtherFingerprint);
  auto other = cache_->Materialize(other_model, server.Fetcher());
  ASSERT_TRUE(other.ok()) << other.status();
  std::ofstream(dir() + "/notes.gguf") << "not a GGUF file";
  std::ofstream(dir() + "/README") << "keep me";
  // A shard file of the model under a name the cache did not give it is not the cache's to delete.
  std::filesystem::copy_file(dir() + "/" + ShardCache::FileNameFor(old_share),
                             dir() + "/backup.gguf");

  server.calls = 0;
  server.fetched.clear();
  const ShardManifest new_share = ManifestFor(*source_, {{0, 1}, {1, 2}}, &server);
  auto r = cache_->Materialize(new_share, server.Fetcher());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(server.fetched,
            (std::vector<std::string>{"blk.1.ffn_gate.2.weight", "blk.1.ffn_up.2.weight",
                                      "blk.1.ffn_down.2.weight"}));
  EXPECT_EQ(r->tensors_fetched, 3);
  EXPECT_EQ(r->bytes_reused,
            new_share.tensors[0].bytes + new_share.tensors[1].bytes + new_share.tensors[2].bytes);
  ExpectFileHolds(r->path, new_share, server);

  std::vector<std::string> want = {"README", "backup.gguf", "notes.gguf",
                                   ShardCache::FileNameFor(new_share),
                                   ShardCache::FileNameFor(other_model)};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(ListNames(dir()), want);
  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 3u);
  for (const CachedShard& s : inv) {
    EXPECT_TRUE(s.complete);
    if (s.path == dir() + "/backup.gguf") {
      EXPECT_EQ(s.pairs, (Pairs{{0, 0}, {0, 1}}));
    } else if (s.path == r->path) {
      EXPECT_EQ(s.model_fingerprint, kFingerprint);
      EXPECT_EQ(s.pairs, (Pairs{{0, 1}, {1, 2}}));
    } else {
      EXPECT_EQ(s.path, other->path);
      EXPECT_EQ(s.model_fingerprint, kOtherFingerprint);
    }
  }
}

TEST_F(ShardCacheTest, InventoryLeavesOutFilesThatAreNotShardFiles) {
  // A valid GGUF without the fingerprint key, garbage, a shard file cut inside its header, and a
  // shard file whose names do not make a whole pair.
  std::filesystem::copy_file(source_->path(), dir() + "/model.gguf");
  std::ofstream(dir() + "/garbage.gguf") << "GGUF and then nothing useful";
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{1, 1}}, &server);
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string cut = dir() + "/" + std::string(kOtherFingerprint) + "-0000000000000000.gguf";
  std::filesystem::copy_file(r->path, cut);
  ASSERT_EQ(::truncate(cut.c_str(), 100), 0);
  m.tensors.pop_back();  // no ffn_down: (1, 1) is not whole
  m.model_fingerprint = kOtherFingerprint;
  ASSERT_TRUE(cache_->Materialize(m, server.Fetcher()).ok());

  const std::vector<CachedShard> inv = cache_->Inventory();
  ASSERT_EQ(inv.size(), 2u);
  EXPECT_EQ(inv[0].path, r->path);
  EXPECT_EQ(inv[0].pairs, (Pairs{{1, 1}}));
  EXPECT_EQ(inv[1].model_fingerprint, kOtherFingerprint);
  EXPECT_TRUE(inv[1].pairs.empty());
  // None of them was deleted.
  EXPECT_TRUE(std::filesystem::exists(dir() + "/model.gguf"));
  EXPECT_TRUE(std::filesystem::exists(dir() + "/garbage.gguf"));
  EXPECT_TRUE(std::filesystem::exists(cut));
}

TEST_F(ShardCacheTest, AnInvalidManifestWritesNothing) {
  FakeServer server;
  ShardManifest m = ManifestFor(*source_, {{0, 0}}, &server);
  m.model_fingerprint = "../../etc/passwd";
  auto r = cache_->Materialize(m, server.Fetcher());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server.calls, 0);
  EXPECT_TRUE(ListNames(dir()).empty());
}

TEST_F(ShardCacheTest, ProgressIsReportedAtMostEvery100MsAndAtTheEnd) {
  FakeServer server;
  server.chunk = 64;  // hundreds of sink calls
  const ShardManifest m = ManifestFor(*source_, {{0, 0}, {0, 1}, {1, 0}, {1, 1}}, &server);
  std::vector<FetchProgress> reports;
  const auto start = std::chrono::steady_clock::now();
  auto r = cache_->Materialize(m, server.Fetcher(),
                               [&](const FetchProgress& p) { reports.push_back(p); });
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(reports.empty());
  EXPECT_LE(reports.size(), static_cast<size_t>(ms / 100) + 1);
  for (size_t i = 1; i < reports.size(); ++i) {
    EXPECT_GE(reports[i].bytes_done, reports[i - 1].bytes_done);
  }
  EXPECT_EQ(reports.back().bytes_done, TotalBytes(m));
  EXPECT_EQ(reports.back().bytes_total, TotalBytes(m));
  EXPECT_GE(reports.back().seconds, 0.0);
}

TEST(ShardCacheOpenTest, CreatesTheDirectoryAndRejectsWhatIsNotOne) {
  TempDirectory tmp;
  const std::string nested = tmp.path() + "/a/b/cache/";
  auto cache = ShardCache::Open(nested);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->dir(), tmp.path() + "/a/b/cache");
  struct stat st;
  ASSERT_EQ(::stat(cache->dir().c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  EXPECT_TRUE(cache->Inventory().empty());

  EXPECT_EQ(ShardCache::Open("").status().code(), absl::StatusCode::kInvalidArgument);
  std::ofstream(tmp.path() + "/file") << "x";
  EXPECT_FALSE(ShardCache::Open(tmp.path() + "/file").ok());
  EXPECT_FALSE(ShardCache::Open(tmp.path() + "/file/sub").ok());
}

}  // namespace
}  // namespace moepool::worker
