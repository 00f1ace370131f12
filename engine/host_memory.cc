#include "engine/host_memory.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "absl/strings/numbers.h"
#include "engine/cgroup.h"

namespace moepool {
namespace {

// A number from the first line of `path` ("max" and errors give 0).
uint64_t ReadNumber(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  uint64_t v = 0;
  if (!(in >> word) || !absl::SimpleAtoi(word, &v)) return 0;
  return v;
}

// The memory limit of this process's cgroup (v2, else v1), 0 when none, and its usage.
uint64_t CgroupLimit(const std::string& root, uint64_t* usage) {
  for (const CgroupEntry& c : ReadCgroups(root)) {
    const std::string& path = c.path;
    uint64_t limit = 0;
    if (c.controllers.empty()) {
      limit = ReadNumber(root + "/sys/fs/cgroup" + path + "/memory.max");
      *usage = ReadNumber(root + "/sys/fs/cgroup" + path + "/memory.current");
    } else if (c.Has("memory")) {
      limit = ReadNumber(root + "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes");
      *usage = ReadNumber(root + "/sys/fs/cgroup/memory" + path + "/memory.usage_in_bytes");
    }
    // v1 reports "no limit" as a huge page-rounded number.
    if (limit != 0 && limit < (uint64_t{1} << 60)) return limit;
  }
  return 0;
}

}  // namespace

uint64_t HostMemory::Capacity() const {
  if (cgroup_limit != 0 && (total == 0 || cgroup_limit < total)) return cgroup_limit;
  return total;
}

uint64_t HostMemory::Available() const {
  if (cgroup_limit == 0) return available;
  const uint64_t room = cgroup_limit > cgroup_usage ? cgroup_limit - cgroup_usage : 0;
  return available == 0 ? room : std::min(available, room);
}

HostMemory ReadHostMemory(const std::string& root) {
  HostMemory m;
  std::ifstream in(root + "/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemTotal:") m.total = kib * 1024;
    if (key == "MemAvailable:") m.available = kib * 1024;
  }
  m.cgroup_limit = CgroupLimit(root, &m.cgroup_usage);
  if (m.cgroup_limit == 0) m.cgroup_usage = 0;
  return m;
}

uint64_t ProcessResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size_pages = 0, resident_pages = 0;
  if (!(statm >> size_pages >> resident_pages)) return 0;
  const long page = sysconf(_SC_PAGESIZE);
  return resident_pages * static_cast<uint64_t>(page > 0 ? page : 4096);
}

}  // namespace moepool
