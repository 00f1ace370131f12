#include "engine/cgroup.h"

#include <fstream>

namespace moepool {

std::vector<CgroupEntry> ReadCgroups(const std::string& root) {
  std::vector<CgroupEntry> out;
  std::ifstream in(root + "/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    const size_t a = line.find(':');
    const size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    out.push_back({line.substr(a + 1, b - a - 1), line.substr(b + 1)});
  }
  return out;
}

}  // namespace moepool
