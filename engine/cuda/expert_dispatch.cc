#include "engine/cuda/expert_dispatch.h"

#include <cstring>

namespace moepool::cuda {

void PlanExpertDispatch(const int32_t* expert, const float* weight, int64_t n, int k,
                        const std::vector<int>& device_of, std::vector<DeviceDispatch>* out) {
  // Slot of every pair: r * k + its rank in the row's ascending (expert id, position) order.
  std::vector<int32_t> slot(static_cast<size_t>(n * k), -1);
  for (int64_t r = 0; r < n; ++r) {
    for (int j = 0; j < k; ++j) {
      const int32_t e = expert[r * k + j];
      if (e < 0) continue;
      int rank = 0;
      for (int i = 0; i < k; ++i) {
        const int32_t o = expert[r * k + i];
        if (o >= 0 && (o < e || (o == e && i < j))) ++rank;
      }
      slot[static_cast<size_t>(r * k + j)] = static_cast<int32_t>(r * k + rank);
    }
  }
  std::vector<std::vector<int32_t>> rows(out->size()), slots(out->size());
  std::vector<std::vector<float>> weights(out->size());
  for (DeviceDispatch& d : *out) d.groups.clear();
  for (size_t e = 0; e < device_of.size(); ++e) {
    const int dev = device_of[e];
    if (dev < 0) continue;
    const size_t di = static_cast<size_t>(dev);
    const int64_t begin = static_cast<int64_t>(rows[di].size());
    for (int64_t r = 0; r < n; ++r) {
      for (int j = 0; j < k; ++j) {
        if (expert[r * k + j] != static_cast<int32_t>(e)) continue;
        rows[di].push_back(static_cast<int32_t>(r));
        slots[di].push_back(slot[static_cast<size_t>(r * k + j)]);
        weights[di].push_back(weight[r * k + j]);
      }
    }
    const int64_t end = static_cast<int64_t>(rows[di].size());
    if (end > begin) (*out)[di].groups.push_back({static_cast<int32_t>(e), begin, end - begin});
  }
  for (size_t di = 0; di < out->size(); ++di) {
    const size_t m = rows[di].size();
    std::vector<int32_t>& packed = (*out)[di].packed;
    packed.resize(3 * m);
    if (m == 0) continue;
    std::memcpy(packed.data(), rows[di].data(), m * sizeof(int32_t));
    std::memcpy(packed.data() + m, slots[di].data(), m * sizeof(int32_t));
    std::memcpy(packed.data() + 2 * m, weights[di].data(), m * sizeof(float));
  }
}

}  // namespace moepool::cuda
