// --device parsing, shared by CUDA and non-CUDA builds.
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_backend.h"

namespace moepool {

std::string DeviceSpec::ToString() const {
  if (!cuda) return "cpu";
  if (all) return "cuda:all";
  std::string s = "cuda:";
  for (size_t i = 0; i < ordinals.size(); ++i) {
    if (i > 0) s += ",";
    s += std::to_string(ordinals[i]);
  }
  return s;
}

absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text) {
  DeviceSpec spec;
  if (text == "cpu") return spec;
  const std::string_view prefix = "cuda:";
  if (text.substr(0, prefix.size()) != prefix || text.size() == prefix.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: expected cpu, cuda:N or cuda:all, got '", std::string(text), "'"));
  }
  spec.cuda = true;
  std::string_view rest = text.substr(prefix.size());
  if (rest == "all") {
    spec.all = true;
    return spec;
  }
  int ordinal = -1;
  if (!absl::SimpleAtoi(std::string(rest), &ordinal) || ordinal < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: bad CUDA device number in '", std::string(text), "'"));
  }
  spec.ordinals.push_back(ordinal);
  return spec;
}

absl::StatusOr<DeviceSpec> ResolveDeviceSpec(const DeviceSpec& spec) {
  if (!spec.cuda) return spec;
  absl::StatusOr<std::vector<CudaDeviceInfo>> devices = ListCudaDevices();
  if (!devices.ok()) return devices.status();
  DeviceSpec out = spec;
  if (spec.all) {
    out.all = false;
    out.ordinals.clear();
    for (const CudaDeviceInfo& d : *devices) out.ordinals.push_back(d.ordinal);
    return out;
  }
  for (int ordinal : spec.ordinals) {
    if (ordinal >= static_cast<int>(devices->size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--device cuda:", ordinal, ": this machine has ", devices->size(), " CUDA device(s)"));
    }
  }
  return out;
}

}  // namespace moepool
