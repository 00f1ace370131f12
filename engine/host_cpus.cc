#include "engine/host_cpus.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>

#include "engine/cgroup.h"

namespace moepool {
namespace {

// ceil(quota / period), or 0 for no quota (a negative or "max" quota, missing files).
int QuotaCpus(double quota, double period) {
  if (!(quota > 0) || !(period > 0)) return 0;
  const double cpus = quota / period;
  return static_cast<int>(cpus) + (cpus > static_cast<int>(cpus) ? 1 : 0);
}

}  // namespace

int CgroupCpuLimit(const std::string& root) {
  for (const CgroupEntry& c : ReadCgroups(root)) {
    if (c.controllers.empty()) {
      std::ifstream max(root + "/sys/fs/cgroup" + c.path + "/cpu.max");  // "200000 100000"
      std::string quota;
      double period = 0;
      if (max >> quota >> period && quota != "max") return QuotaCpus(std::stod(quota), period);
    } else if (c.Has("cpu")) {
      const std::string dir = root + "/sys/fs/cgroup/" + c.controllers + c.path;
      double quota = 0, period = 0;
      std::ifstream q(dir + "/cpu.cfs_quota_us"), p(dir + "/cpu.cfs_period_us");
      if (q >> quota && p >> period) return QuotaCpus(quota, period);
    }
  }
  return 0;
}

int UsableCpus() {
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  const int limit = CgroupCpuLimit();
  if (limit > 0) cpus = std::min(cpus, limit);
  return std::max(cpus, 1);
}

}  // namespace moepool
