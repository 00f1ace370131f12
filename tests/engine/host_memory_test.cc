// The host's memory and this process's cgroup limit, read from /proc and /sys (fakes under a
// temporary root: cgroup v2, v1, unlimited, absent).
#include "engine/host_memory.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::TempDir;

void Write(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << text;
}

TEST(HostMemoryTest, ReadsMeminfoAndTheCgroupLimit) {
  const std::string v2 = TempDir() + "/host-v2";
  Write(v2 + "/proc/meminfo",
        "MemTotal:       24684956 kB\nMemFree: 1 kB\n"
        "MemAvailable:   20000000 kB\n");
  Write(v2 + "/proc/self/cgroup", "0::/pool/worker\n");
  Write(v2 + "/sys/fs/cgroup/pool/worker/memory.max", "15032385536\n");
  HostMemory m = ReadHostMemory(v2);
  EXPECT_EQ(m.total, uint64_t{24684956} * 1024);
  EXPECT_EQ(m.available, uint64_t{20000000} * 1024);
  EXPECT_EQ(m.cgroup_limit, uint64_t{15032385536});
  EXPECT_EQ(m.Capacity(), uint64_t{15032385536});
  EXPECT_EQ(m.Available(), uint64_t{15032385536});  // no usage file: the whole limit
  // A container with a 14 GiB limit, 4 GiB of it used, on a node with 19 GiB available: 10 GiB.
  Write(v2 + "/sys/fs/cgroup/pool/worker/memory.current", "4294967296\n");
  EXPECT_EQ(ReadHostMemory(v2).Available(), uint64_t{15032385536} - uint64_t{4294967296});
  Write(v2 + "/sys/fs/cgroup/pool/worker/memory.current", "20000000000\n");  // over: none
  EXPECT_EQ(ReadHostMemory(v2).Available(), 0u);
  Write(v2 + "/sys/fs/cgroup/pool/worker/memory.max", "max\n");
  EXPECT_EQ(ReadHostMemory(v2).cgroup_limit, 0u);
  EXPECT_EQ(ReadHostMemory(v2).Capacity(), uint64_t{24684956} * 1024);
  EXPECT_EQ(ReadHostMemory(v2).Available(), uint64_t{20000000} * 1024);  // no limit: the node's

  const std::string v1 = TempDir() + "/host-v1";
  Write(v1 + "/proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 900 kB\n");
  Write(v1 + "/proc/self/cgroup", "7:cpu,cpuacct:/a\n4:memory:/svc\n");
  Write(v1 + "/sys/fs/cgroup/memory/svc/memory.limit_in_bytes", "512000\n");
  EXPECT_EQ(ReadHostMemory(v1).Capacity(), 512000u);
  // v1 writes "no limit" as a huge number.
  Write(v1 + "/sys/fs/cgroup/memory/svc/memory.limit_in_bytes", "9223372036854771712\n");
  EXPECT_EQ(ReadHostMemory(v1).cgroup_limit, 0u);
  EXPECT_EQ(ReadHostMemory(TempDir() + "/nowhere").Capacity(), 0u);
}

TEST(HostMemoryTest, ThisProcessHasAResidentSet) {
  EXPECT_GT(ProcessResidentBytes(), 0u);
  EXPECT_GT(ReadHostMemory().total, 0u);
}

}  // namespace
}  // namespace moepool
