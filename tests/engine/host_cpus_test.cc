// The CPU quota of this process's cgroup, read from fakes under a temporary root (v2, v1,
// unlimited, absent), and the usable CPUs of this process.
#include "engine/host_cpus.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::TempDir;

void Write(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << text;
}

TEST(HostCpusTest, ReadsTheCgroupQuotaRoundedUp) {
  const std::string v2 = TempDir() + "/cpus-v2";
  Write(v2 + "/proc/self/cgroup", "0::/kubepods/pod1/c1\n");
  Write(v2 + "/sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "250000 100000\n");  // 2.5 CPUs
  EXPECT_EQ(CgroupCpuLimit(v2), 3);
  Write(v2 + "/sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "200000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(v2), 2);
  Write(v2 + "/sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "max 100000\n");
  EXPECT_EQ(CgroupCpuLimit(v2), 0);

  const std::string v1 = TempDir() + "/cpus-v1";
  Write(v1 + "/proc/self/cgroup", "4:memory:/svc\n3:cpu,cpuacct:/svc\n");
  Write(v1 + "/sys/fs/cgroup/cpu,cpuacct/svc/cpu.cfs_quota_us", "50000\n");
  Write(v1 + "/sys/fs/cgroup/cpu,cpuacct/svc/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(v1), 1);  // half a CPU: one thread
  Write(v1 + "/sys/fs/cgroup/cpu,cpuacct/svc/cpu.cfs_quota_us", "-1\n");
  EXPECT_EQ(CgroupCpuLimit(v1), 0);
  EXPECT_EQ(CgroupCpuLimit(TempDir() + "/nowhere"), 0);
}

TEST(HostCpusTest, UsableCpusIsWithinTheMachine) {
  const int n = UsableCpus();
  EXPECT_GE(n, 1);
  EXPECT_LE(n, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

}  // namespace
}  // namespace moepool
