#include "engine/cuda/expert_dispatch.h"

#include <cstring>

#include "engine/moe_dispatch.h"

namespace moepool::cuda {

void PlanExpertDispatch(const int32_t* expert, const float* weight, int64_t n, int k,
                        const std::vector<int>& device_of, std::vector<DeviceDispatch>* out) {
  DispatchPlan plan;
  PlanDispatch(expert, weight, n, k, device_of, static_cast<int>(out->size()), &plan);
  for (size_t di = 0; di < out->size(); ++di) {
    DeviceDispatch& d = (*out)[di];
    const std::vector<int32_t>& order = plan.by_destination[di];
    const size_t m = order.size();
    d.groups.clear();
    for (const DispatchRun& run : plan.runs[di]) {
      d.groups.push_back({run.expert, run.begin, run.count});
    }
    d.packed.resize(3 * m);
    for (size_t i = 0; i < m; ++i) {
      const DispatchPair& p = plan.pairs[static_cast<size_t>(order[i])];
      d.packed[i] = static_cast<int32_t>(p.row);
      d.packed[m + i] = p.slot;
      std::memcpy(&d.packed[2 * m + i], &p.weight, sizeof(float));
    }
  }
}

}  // namespace moepool::cuda
