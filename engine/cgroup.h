// The cgroups of this process, from /proc/self/cgroup: for cgroup v2 one entry with empty
// controllers ("0::/path"), for v1 one per hierarchy ("4:memory:/path"). host_memory.cc and
// host_cpus.cc read their limits under these paths. Reads files only; thread-safe.
#ifndef MOEPOOL_ENGINE_CGROUP_H_
#define MOEPOOL_ENGINE_CGROUP_H_

#include <string>
#include <vector>

namespace moepool {

struct CgroupEntry {
  std::string controllers;  // "" for v2, else e.g. "cpu,cpuacct"
  std::string path;         // "/kubepods/pod1/c1"

  // True for v1 entries whose controller list holds `controller`.
  bool Has(const std::string& controller) const {
    return ("," + controllers + ",").find("," + controller + ",") != std::string::npos;
  }
};

// The entries of `root`/proc/self/cgroup ("" for the real one; tests give a directory of
// fakes); empty when the file cannot be read.
std::vector<CgroupEntry> ReadCgroups(const std::string& root);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_CGROUP_H_
