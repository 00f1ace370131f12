// The --device flag of `moepool worker`, `serve`, `run` and `eval`: where this process computes.
//   --device cpu        (default) everything on this process's thread pool
//   --device cuda:N     every expert of this process on CUDA device N; on serve, run and eval
//                       also the coordinator's attention (with its KV cache), router and output
//                       head (engine/cuda/device_attention.h)
//   --device cuda:all   experts spread over all CUDA devices of the machine, balanced by bytes;
//                       attention on the first
// Embedding, sampling and the residual after the experts stay on the CPU.
//
// A build without CUDA (or a machine without a usable device) refuses every cuda:* value at
// startup with the message of engine/cuda/cuda_backend.h; nothing is loaded before that check.
#ifndef MOEPOOL_CLI_DEVICE_FLAGS_H_
#define MOEPOOL_CLI_DEVICE_FLAGS_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "engine/attention_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/expert_backend.h"
#include "engine/model.h"

namespace moepool::cli {

// Adds "device" to the valued flags of `spec`, with its help line.
void AddDeviceFlag(FlagSpec* spec);

// Parses and resolves --device (default "cpu"): cuda:all becomes the present ordinals.
// INVALID_ARGUMENT for bad text or a missing ordinal; FAILED_PRECONDITION in a build without
// CUDA; UNAVAILABLE when the driver reports no device.
absl::StatusOr<DeviceSpec> DeviceFromArgs(const Args& args);

// The experts of `model_path` computed on the CUDA devices of `device` (resolved, cuda). Only
// the experts in `experts` are bound and uploaded (empty: every expert), on every layer. The
// returned backend owns the model it reads from. Errors: the model loader's and
// CreateCudaExpertBackend's. Threading: as CreateCudaExpertBackend's backend.
absl::StatusOr<std::unique_ptr<ExpertBackend>> OpenDeviceExperts(const std::string& model_path,
                                                                 const std::vector<int>& experts,
                                                                 const DeviceSpec& device,
                                                                 bool show_progress);

// The EngineOptions::attention factory for `device` (resolved): attention, router and head on
// its first CUDA device, with an upload line on stderr. Empty for cpu.
std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(const Model&)> AttentionOnDevice(
    const DeviceSpec& device);

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_DEVICE_FLAGS_H_
