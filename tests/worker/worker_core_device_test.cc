// WorkerCore on a CUDA device: where the device cannot be used (a build without CUDA, a machine
// without a GPU), Create fails with the CUDA seam's status instead of crashing; with a device
// Describe names it and reports the device's memory.
#include <string>

#include "engine/cuda/cuda_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "worker/worker_core.h"

namespace moepool::worker {
namespace {

using ::moepool::testing::TinyModelPath;

WorkerCoreOptions OnDevice(int ordinal) {
  WorkerCoreOptions o;
  o.model_path = TinyModelPath("Q4_K_M");
  auto experts = ExpertSetFromFlags("0-1", "", 2, 8);
  EXPECT_TRUE(experts.ok()) << experts.status();
  o.experts = *experts;
  o.threads = 1;
  o.cuda_devices = {ordinal};
  return o;
}

TEST(WorkerCoreDeviceTest, CpuByDefaultReportsCpu) {
  WorkerCoreOptions o = OnDevice(0);
  o.cuda_devices.clear();
  auto core = WorkerCore::Create(o);
  ASSERT_TRUE(core.ok()) << core.status();
  auto d = (*core)->Describe();
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->device, "cpu");
}

TEST(WorkerCoreDeviceTest, CudaWithoutADeviceFailsWithTheSeamStatus) {
  auto devices = ListCudaDevices();
  if (devices.ok() && !devices->empty()) GTEST_SKIP() << "this machine has a CUDA device";
  auto core = WorkerCore::Create(OnDevice(0));
  ASSERT_FALSE(core.ok());
  if (!BuiltWithCuda()) {
    EXPECT_EQ(core.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(core.status().message().find("built without CUDA"), absl::string_view::npos)
        << core.status();
  }
}

TEST(WorkerCoreDeviceTest, CudaDescribeNamesTheDeviceAndItsMemory) {
  auto devices = ListCudaDevices();
  if (!devices.ok() || devices->empty()) GTEST_SKIP() << "no CUDA device";
  auto core = WorkerCore::Create(OnDevice(0));
  if (!core.ok() && core.status().code() == absl::StatusCode::kUnimplemented) {
    GTEST_SKIP() << core.status();  // the CUDA expert backend is not in this build yet
  }
  ASSERT_TRUE(core.ok()) << core.status();
  auto d = (*core)->Describe();
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->device, "cuda:0");
  EXPECT_GT(d->memory_free_bytes, 0u);
  EXPECT_LE(d->memory_free_bytes + d->memory_used_bytes, devices->front().total_bytes);
}

}  // namespace
}  // namespace moepool::worker
