// A Mixtral-architecture (llama + MoE) model bound to the tensors of a GGUF file.
//
// Hyperparameters come only from the file's metadata. Weights are not copied: WeightMatrix views
// point into the GgufFile mapping (except the tiny norm vectors, which are converted to f32).
// Both expert layouts are bound to the same ExpertWeights view:
//   merged      blk.N.ffn_{gate,up,down}_exps.weight   [n_embd, n_ff, n_expert] / [n_ff, n_embd,
//   n_expert] per-expert  blk.N.ffn_{gate,up,down}.E.weight      [n_embd, n_ff] / [n_ff, n_embd]
// A dense llama file (no expert_count) binds blk.N.ffn_{gate,up,down}.weight as one expert.
//
// Ownership: Model keeps the GgufFile alive (shared_ptr). Immutable after Load: thread-safe reads.
#ifndef MOEPOOL_ENGINE_MODEL_H_
#define MOEPOOL_ENGINE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gguf.h"
#include "engine/quant/types.h"

namespace moepool {

struct ModelConfig {
  std::string architecture;  // "llama"
  std::string name;
  int64_t n_vocab = 0;
  int64_t n_embd = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;  // n_embd / n_head
  int64_t n_rot = 0;     // rope dimension count (<= head_dim)
  int64_t n_ff = 0;
  int64_t n_expert = 0;       // 1 for a dense model
  int64_t n_expert_used = 0;  // 1 for a dense model
  int64_t n_ctx_train = 0;
  float rope_base = 10000.0f;
  float rms_eps = 1e-5f;

  int64_t kv_dim() const { return n_head_kv * head_dim; }
};

// Reads and checks the hyperparameters (INVALID_ARGUMENT naming the file and key on bad values).
absl::StatusOr<ModelConfig> ReadModelConfig(const GgufFile& file);

// A row-major weight matrix of `rows` rows of `cols` elements each, stored as `type` blocks.
// y = W x computes `rows` outputs from `cols` inputs.
struct WeightMatrix {
  const char* name = nullptr;  // tensor name (owned by the GgufFile)
  TensorType type = TensorType::kF32;
  int64_t cols = 0;  // input features (row length)
  int64_t rows = 0;  // output features
  size_t row_bytes = 0;
  const uint8_t* data = nullptr;  // rows * row_bytes bytes

  const uint8_t* Row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
  uint64_t SizeBytes() const { return static_cast<uint64_t>(rows) * row_bytes; }
};

struct ExpertWeights {
  WeightMatrix gate;  // [n_ff rows x n_embd]
  WeightMatrix up;    // [n_ff rows x n_embd]
  WeightMatrix down;  // [n_embd rows x n_ff]
  bool present() const { return gate.data != nullptr; }
};

struct LayerWeights {
  std::vector<float> attn_norm;  // [n_embd]
  WeightMatrix wq;               // [n_embd rows x n_embd]
  WeightMatrix wk;               // [kv_dim rows x n_embd]
  WeightMatrix wv;               // [kv_dim rows x n_embd]
  WeightMatrix wo;               // [n_embd rows x n_embd]
  std::vector<float> ffn_norm;   // [n_embd]
  WeightMatrix router;           // [n_expert rows x n_embd]; data == nullptr for a dense model
  std::vector<ExpertWeights> experts;  // [n_expert]; absent ones (not loaded) have data nullptr
};

// Which experts to bind. The default binds everything.
struct ExpertFilter {
  // Returns true if (layer, expert) should be bound. Empty: all.
  std::function<bool(int layer, int expert)> keep;
  // Bind the non-expert weights (embedding, attention, router, head).
  bool non_expert = true;
};

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& path,
                                                     const ExpertFilter& filter = {});
  static absl::StatusOr<std::unique_ptr<Model>> FromFile(std::shared_ptr<GgufFile> file,
                                                         const ExpertFilter& filter = {});

  const ModelConfig& config() const { return config_; }
  const GgufFile& file() const { return *file_; }
  std::shared_ptr<GgufFile> shared_file() const { return file_; }

  const WeightMatrix& token_embd() const { return token_embd_; }          // [n_vocab rows x n_embd]
  const std::vector<float>& output_norm() const { return output_norm_; }  // [n_embd]
  const WeightMatrix& output() const { return output_; }                  // [n_vocab rows x n_embd]
  const LayerWeights& layer(int64_t i) const { return layers_[static_cast<size_t>(i)]; }
  bool per_expert_layout() const { return per_expert_layout_; }

  // Bytes of bound weights: expert and non-expert.
  uint64_t ExpertBytes() const;
  uint64_t NonExpertBytes() const;

  // Reads every bound weight matrix into memory now (GgufFile::Populate), so that the first
  // request neither waits for the disk nor faults page by page; `progress(done, total)` (bytes)
  // is called after each matrix on the calling thread. The file's error if it cannot be read.
  absl::Status Preload(
      const std::function<void(uint64_t done, uint64_t total)>& progress = {}) const;
  // Bytes of the bound weights that are resident now (GgufFile::ResidentBytes): below
  // ExpertBytes() + NonExpertBytes() when the host has evicted some (too little memory for
  // what runs on it). Takes a few milliseconds per 10 GB.
  uint64_t ResidentWeightBytes() const;

 private:
  Model() = default;
  absl::Status Bind(const ExpertFilter& filter);
  // Every bound weight matrix (token embedding, head, attention, routers, present experts).
  std::vector<const WeightMatrix*> BoundMatrices() const;

  std::shared_ptr<GgufFile> file_;
  ModelConfig config_;
  WeightMatrix token_embd_;
  std::vector<float> output_norm_;
  WeightMatrix output_;
  std::vector<LayerWeights> layers_;
  bool per_expert_layout_ = false;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_MODEL_H_
