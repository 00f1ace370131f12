// What this host can give a process's memory: MemTotal and MemAvailable (/proc/meminfo) and the
// memory limit and usage of the process's cgroup (v2 memory.max / memory.current, v1
// memory.limit_in_bytes / memory.usage_in_bytes). Used to warn
// when weights will not fit (cli/weights_in_memory.h) and reported by workers (Describe).
// Reads files only; thread-safe.
#ifndef MOEPOOL_ENGINE_HOST_MEMORY_H_
#define MOEPOOL_ENGINE_HOST_MEMORY_H_

#include <cstdint>
#include <string>

namespace moepool {

// Bytes; 0 where unknown or unlimited.
struct HostMemory {
  uint64_t total = 0;
  uint64_t available = 0;
  uint64_t cgroup_limit = 0;
  uint64_t cgroup_usage = 0;  // what the cgroup holds now (v2 memory.current, v1 usage_in_bytes)

  // The most this process can occupy: MemTotal, or the cgroup limit when lower.
  uint64_t Capacity() const;
  // What it can still take: MemAvailable, or the room left under the cgroup limit when less (a
  // container's limit, not the node's free memory).
  uint64_t Available() const;
};

// Reads /proc and /sys under `root` ("" for the real ones; tests give a directory of fakes).
HostMemory ReadHostMemory(const std::string& root = "");

// Resident set of this process (/proc/self/statm), bytes; 0 if it cannot be read.
uint64_t ProcessResidentBytes();

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_HOST_MEMORY_H_
