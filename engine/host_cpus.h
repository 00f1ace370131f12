// How many CPUs this process may use: the CPUs it may run on (sched_getaffinity, which a
// cpuset or `taskset` narrows) and its cgroup's CPU quota (v2 cpu.max, v1 cfs_quota_us /
// cfs_period_us, e.g. a container's --cpus or a pod's limits.cpu), rounded up. The default
// thread count of the engine's pools. Reads files only; thread-safe.
#ifndef MOEPOOL_ENGINE_HOST_CPUS_H_
#define MOEPOOL_ENGINE_HOST_CPUS_H_

#include <string>

namespace moepool {

// The cgroup's CPU quota in CPUs, rounded up; 0 when unlimited or unknown. Reads /proc and /sys
// under `root` ("" for the real ones; tests give a directory of fakes).
int CgroupCpuLimit(const std::string& root = "");

// min(CPUs in the affinity mask, CgroupCpuLimit()), at least 1.
int UsableCpus();

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_HOST_CPUS_H_
