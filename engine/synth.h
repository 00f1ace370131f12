// Synthetic Mixtral-architecture models: writes a GGUF file with random weights, the real tensor
// layout and metadata (`general.architecture = llama` with expert keys, like llama.cpp's Mixtral
// files) and the tokenizer copied from a vocab-only GGUF.
//
// Weights are deterministic: each row depends only on (seed, tensor name, row), so the same
// options give byte-identical files whatever the thread count, and the merged expert layout
// (blk.N.ffn_gate_exps.weight [n_embd, n_ff, n_expert]) holds exactly the same values as the
// per-expert layout (blk.N.ffn_gate.E.weight [n_embd, n_ff]) for the same seed.
//
// Distributions (as measured on the reference tiny model): linear weights N(0, 1/fan_in) with
// fan_in = dims[0]; token_embd N(0, 1); router (ffn_gate_inp, F32) N(0, 4/n_embd); output head
// N(0, 16/n_embd); norms 1 + N(0, 0.01).
//
// Memory: one tensor (quantized) plus one row of floats per thread at a time, so models larger
// than RAM can be written. Threading: SynthesizeModel uses all hardware threads internally; it
// is safe to call from any thread, and `progress` is called on the calling thread.
#ifndef MOEPOOL_ENGINE_SYNTH_H_
#define MOEPOOL_ENGINE_SYNTH_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/quant/types.h"

namespace moepool {

struct SynthShape {
  std::string name;
  int64_t n_embd = 0, n_ff = 0, n_layer = 0, n_head = 0, n_head_kv = 0, n_expert = 0,
          n_expert_used = 0, n_ctx = 0;
  float rope_base = 1e6f, rms_eps = 1e-5f;
};

// "tiny" (256/768, 4 layers), "mini" (1024/3584, 8 layers) or "mixtral-8x7b" (the real shape).
// NOT_FOUND for any other name.
absl::StatusOr<SynthShape> SynthShapeByName(std::string_view name);

// Vocabulary used when SynthOptions::vocab_path is empty (relative to the working directory).
inline constexpr char kDefaultSynthVocabPath[] = "deploy/vocab/mistral-vocab.gguf";

struct SynthOptions {
  SynthShape shape;
  // A tensor type name (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K,
  // Q6_K: every matrix that type, norms and router F32) or a llama.cpp-style mix (Q3_K_M,
  // Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M; see synth.cc). Case-insensitive.
  std::string type = "Q4_K_M";
  uint64_t seed = 1;
  std::string vocab_path;  // a GGUF whose tokenizer.* keys are copied; empty: the default
  bool per_expert_layout = false;
  std::string out_path;
  // In [0, 1]: 0 is an unbiased random router. Above 0 the router chooses some experts more
  // often and some pairs together: in each layer, expert e's router row is scaled by
  // 1 + 2 S max(0, 1 - e / 3) (experts 0, 1, 2 hot), and experts e and e ^ m, with
  // m = n_expert / 2 + layer % (n_expert / 2), share a common component of weight 2 S (pairs that
  // straddle the two halves of the experts, different per layer), so placement that follows
  // routing has something to find (`moepool synth --router-skew S`).
  float router_skew = 0.0f;
};

// Writes the model to options.out_path, calling progress(tensors_done, tensors_total) after
// each tensor. Errors: INVALID_ARGUMENT for an unknown type or an inconsistent shape, the
// reader's error for a bad vocab file, the writer's for I/O; no partial file is left behind.
absl::Status SynthesizeModel(const SynthOptions& options,
                             std::function<void(int done, int total)> progress = {});

// One tensor of a synthesized model as SynthesizeModel writes it, without its data.
struct SynthTensorSpec {
  std::string name;
  TensorType type = TensorType::kF32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the row length

  uint64_t SizeBytes() const;  // RowBytes(type, dims[0]) times the other dims
};

// The tensors, in file order, that SynthesizeModel writes for `shape` and `type` (a type name or
// mix, as SynthOptions::type) with a vocabulary of n_vocab tokens (32000 for the default vocab)
// and the given expert layout: the same names, types and dimensions, computed without writing
// anything. Errors: INVALID_ARGUMENT for an unknown type, an inconsistent shape or a row length
// that is not a multiple of a chosen type's block size.
absl::StatusOr<std::vector<SynthTensorSpec>> PlanSynthTensors(const SynthShape& shape,
                                                              std::string_view type,
                                                              int64_t n_vocab,
                                                              bool per_expert_layout);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_SYNTH_H_
