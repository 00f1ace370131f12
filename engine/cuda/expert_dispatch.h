// The host side of the CUDA expert backend's dispatch: engine/moe_dispatch.h's plan with a
// destination per device, packed for one upload per device. The device combine kernel adds a
// row's slots r * k .. r * k + k - 1 in order: moe_dispatch.h's Combine rule on the device.
// Plain C++ (no CUDA), built and tested in every build.
#ifndef MOEPOOL_ENGINE_CUDA_EXPERT_DISPATCH_H_
#define MOEPOOL_ENGINE_CUDA_EXPERT_DISPATCH_H_

#include <cstdint>
#include <vector>

namespace moepool::cuda {

// One expert's share of a device's entries: entries [begin, begin + count).
struct ExpertGroup {
  int32_t expert = 0;
  int64_t begin = 0;
  int64_t count = 0;
};

// What one device computes in a call: m entries (row, slot, weight), grouped by ascending expert
// id, packed for a single upload as rows [m] | slots [m] | weights [m] (f32 bits).
struct DeviceDispatch {
  std::vector<ExpertGroup> groups;
  std::vector<int32_t> packed;  // [3 x m]
  int64_t m() const { return static_cast<int64_t>(packed.size() / 3); }
  const int32_t* rows() const { return packed.data(); }
  const int32_t* slots() const { return packed.data() + m(); }
  const float* weights() const { return reinterpret_cast<const float*>(packed.data() + 2 * m()); }
};

// For n rows of k (expert, weight) pairs (expert -1 = none): pair j of row r becomes the entry
// (r, r * k + rank, weight), rank = its position among the row's valid pairs ordered by
// (expert id, j), on device device_of[expert] (every valid expert must have one in
// [0, out->size())). Entries of one expert keep row order. `out` must have one element per
// device; their previous contents are replaced.
void PlanExpertDispatch(const int32_t* expert, const float* weight, int64_t n, int k,
                        const std::vector<int>& device_of, std::vector<DeviceDispatch>* out);

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_EXPERT_DISPATCH_H_
