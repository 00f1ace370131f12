// `--device` on worker, serve, run, eval and bench: cpu works as before; every cuda:* value fails
// at startup, before the model is opened, with the CUDA seam's message when this build (or this
// machine) has no CUDA device. Nothing crashes (the exit status is 1, not a signal).
#include <string>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::RunMoepool;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

// The error every cuda:* value must produce here, or "" when this machine has a CUDA device.
std::string ExpectedCudaError() {
  absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
  if (devices.ok() && !devices->empty()) return "";
  return devices.ok() ? "CUDA device" : std::string(devices.status().message());
}

// Commands with the arguments they need apart from --device (the model does not exist: the
// device check must come first).
std::vector<std::string> Commands(const std::string& model) {
  return {
      "worker --model " + model + " --experts 0-1 --listen 127.0.0.1:0",
      "serve --model " + model + " --listen 127.0.0.1:0",
      "run --model " + model + " --prompt hi -n 1",
      "eval --model " + model + " --prompt hi --logits-out " + TempDir() + "/l.bin",
      "bench --model " + model,
  };
}

TEST(DeviceFlagTest, CudaFailsAtStartupWithTheSeamMessageOnEveryCommand) {
  const std::string expected = ExpectedCudaError();
  if (expected.empty()) GTEST_SKIP() << "this machine has a CUDA device";
  if (!BuiltWithCuda()) {
    EXPECT_NE(expected.find("built without CUDA"), std::string::npos) << expected;
  }
  const std::string missing_model = TempDir() + "/no-such-model.gguf";
  for (const std::string& command : Commands(missing_model)) {
    for (const char* device : {"cuda:0", "cuda:all", "cuda:3"}) {
      SCOPED_TRACE(command + " --device " + device);
      const auto r = RunMoepool(command + " --device " + device);
      EXPECT_EQ(r.exit_code, 1);
      EXPECT_NE(r.err.find(expected), std::string::npos) << r.err;
      EXPECT_EQ(r.err.find("no-such-model"), std::string::npos) << r.err;
      EXPECT_TRUE(r.out.empty()) << r.out;
    }
  }
}

TEST(DeviceFlagTest, MalformedDeviceIsRefusedWithTheText) {
  const std::string missing_model = TempDir() + "/no-such-model.gguf";
  for (const std::string& command : Commands(missing_model)) {
    for (const char* device : {"gpu", "cuda:", "cuda:-1", "cuda:x"}) {
      SCOPED_TRACE(command + " --device " + device);
      const auto r = RunMoepool(command + " --device '" + device + "'");
      EXPECT_EQ(r.exit_code, 1);
      EXPECT_NE(r.err.find("--device"), std::string::npos) << r.err;
      EXPECT_NE(r.err.find(device), std::string::npos) << r.err;
    }
  }
}

TEST(DeviceFlagTest, CpuIsTheDefaultAndMayBeGiven) {
  const std::string& model = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(model.empty());
  const std::string args = "run --model " + model + " --prompt hi -n 3 --temperature 0 --json";
  const auto by_default = RunMoepool(args);
  const auto given = RunMoepool(args + " --device cpu");
  ASSERT_EQ(by_default.exit_code, 0) << by_default.err;
  ASSERT_EQ(given.exit_code, 0) << given.err;
  EXPECT_EQ(by_default.out, given.out);
}

}  // namespace
}  // namespace moepool
