#include "cli/device_flags.h"

#include <algorithm>
#include <utility>

#include "engine/cuda/device_attention.h"
#include "engine/model.h"
#include "engine/status_macros.h"

namespace moepool::cli {
namespace {

// A device backend together with the (experts-only) model it was uploaded from.
class OwningDeviceExperts : public ExpertBackend {
 public:
  OwningDeviceExperts(std::unique_ptr<Model> model, std::unique_ptr<ExpertBackend> backend)
      : model_(std::move(model)), backend_(std::move(backend)) {}
  ~OwningDeviceExperts() override { backend_.reset(); }  // the backend borrows model_

  absl::Status Compute(const ExpertRoutes& routes, float* out) override {
    return backend_->Compute(routes, out);
  }

 private:
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertBackend> backend_;
};

}  // namespace

void AddDeviceFlag(FlagSpec* spec) {
  spec->valued.insert("device");
  spec->help["device"] =
      "cpu|cuda:N|cuda:all  where this process computes: cuda:N puts its experts (all of them, or "
      "the --local-experts with --workers) and the attention, KV cache, router and output head on "
      "CUDA device N; cuda:all spreads the experts over every device, attention on the first "
      "(default cpu)";
}

absl::StatusOr<DeviceSpec> DeviceFromArgs(const Args& args) {
  ASSIGN_OR_RETURN(DeviceSpec spec, ParseDeviceSpec(args.Get("device", "cpu")));
  return ResolveDeviceSpec(spec);
}

absl::StatusOr<std::unique_ptr<ExpertBackend>> OpenDeviceExperts(const std::string& model_path,
                                                                 const std::vector<int>& experts,
                                                                 const DeviceSpec& device,
                                                                 bool show_progress) {
  if (!device.cuda || device.ordinals.empty()) {
    return absl::InvalidArgumentError("OpenDeviceExperts needs a resolved cuda:* device");
  }
  ExpertFilter filter;
  filter.non_expert = false;
  if (!experts.empty()) {
    std::vector<int> sorted = experts;
    std::sort(sorted.begin(), sorted.end());
    filter.keep = [sorted](int, int expert) {
      return std::binary_search(sorted.begin(), sorted.end(), expert);
    };
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_path, filter));
  CudaExpertOptions options;
  options.devices = device.ordinals;
  options.show_progress = show_progress;
  ASSIGN_OR_RETURN(std::unique_ptr<ExpertBackend> backend,
                   CreateCudaExpertBackend(model.get(), options));
  return std::make_unique<OwningDeviceExperts>(std::move(model), std::move(backend));
}

std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(const Model&)> AttentionOnDevice(
    const DeviceSpec& device) {
  if (!device.cuda || device.ordinals.empty()) return {};
  const int ordinal = device.ordinals.front();
  return [ordinal](const Model& model) {
    DeviceAttentionOptions options;
    options.show_progress = true;
    return CreateCudaAttentionBackend(&model, ordinal, options);
  };
}

}  // namespace moepool::cli
