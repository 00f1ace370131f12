#include "engine/synth.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf.h"
#include "engine/gguf_writer.h"
#include "engine/quant/types.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

// ---------------------------------------------------------------------------------------------
// Tensor types.
//
// A uniform type puts every matrix (token_embd, attention, experts, output) in that type. The
// mixes approximate llama.cpp's choices for an 8-expert model (llama_tensor_get_type):
//   base type      Q3_K_M: Q3_K   Q4_K_S / Q4_K_M: Q4_K   Q5_K_S / Q5_K_M: Q5_K
//   token_embd, attn_q, ffn_gate, ffn_up: base
//   output: Q6_K
//   attn_k, attn_v: Q8_0 (llama.cpp's 8-expert rule; with another expert count attn_k is the
//     base and attn_v follows the ffn_down rule below, Q3_K_M: Q5_K on layers < 2 else Q4_K)
//   attn_output: Q5_K (8 experts; otherwise Q4_K for Q3_K_M, the base for the others)
//   ffn_down: Q3_K_M: Q5_K on layers < n/16, else Q4_K; Q4_K_M / Q5_K_M: Q6_K on the
//     "more bits" layers (i < n/8, i >= 7n/8, (i - n/8) % 3 == 2), else the base;
//     Q4_K_S: Q5_K on layers < n/8, else Q4_K; Q5_K_S: Q5_K.
// For the tiny shape this reproduces the reference tiny-Q4_K_M.gguf tensor types exactly.
// Norms and the router (ffn_gate_inp) are always F32.
// ---------------------------------------------------------------------------------------------

enum class Role {
  kTokenEmbd,
  kAttnQ,
  kAttnK,
  kAttnV,
  kAttnOutput,
  kFfnGate,
  kFfnUp,
  kFfnDown,
  kOutput,
  kNorm,
  kRouter,
};

struct TypeChoice {
  std::string name;     // upper-case option value
  bool uniform = true;  // a plain tensor type
  TensorType base = TensorType::kF32;
  uint32_t file_type = 0;  // llama.cpp's general.file_type (llama_ftype)
};

absl::StatusOr<TypeChoice> ParseTypeChoice(std::string_view requested) {
  std::string upper;
  for (char c : requested)
    upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  struct Entry {
    const char* name;
    bool uniform;
    TensorType base;
    uint32_t file_type;
  };
  static constexpr Entry kEntries[] = {
      {"F32", true, TensorType::kF32, 0},       {"F16", true, TensorType::kF16, 1},
      {"BF16", true, TensorType::kBF16, 32},    {"Q4_0", true, TensorType::kQ4_0, 2},
      {"Q4_1", true, TensorType::kQ4_1, 3},     {"Q8_0", true, TensorType::kQ8_0, 7},
      {"Q5_0", true, TensorType::kQ5_0, 8},     {"Q5_1", true, TensorType::kQ5_1, 9},
      {"Q2_K", true, TensorType::kQ2_K, 10},    {"Q3_K", true, TensorType::kQ3_K, 11},
      {"Q4_K", true, TensorType::kQ4_K, 14},    {"Q5_K", true, TensorType::kQ5_K, 16},
      {"Q6_K", true, TensorType::kQ6_K, 18},    {"Q3_K_M", false, TensorType::kQ3_K, 12},
      {"Q4_K_S", false, TensorType::kQ4_K, 14}, {"Q4_K_M", false, TensorType::kQ4_K, 15},
      {"Q5_K_S", false, TensorType::kQ5_K, 16}, {"Q5_K_M", false, TensorType::kQ5_K, 17},
  };
  for (const Entry& e : kEntries) {
    if (upper == e.name) return TypeChoice{upper, e.uniform, e.base, e.file_type};
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown model type '", std::string(requested),
      "' (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q3_K_M, "
      "Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M)"));
}

bool UseMoreBits(int64_t layer, int64_t n_layer) {
  return layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer - n_layer / 8) % 3 == 2;
}

TensorType ChooseType(const TypeChoice& c, Role role, int64_t layer, int64_t n_layer,
                      int64_t n_expert) {
  if (role == Role::kNorm || role == Role::kRouter) return TensorType::kF32;
  if (c.uniform) return c.base;
  const std::string& m = c.name;
  switch (role) {
    case Role::kOutput:
      return TensorType::kQ6_K;
    case Role::kAttnK:
      return n_expert == 8 ? TensorType::kQ8_0 : c.base;
    case Role::kAttnV:
      if (n_expert == 8) return TensorType::kQ8_0;
      if (m == "Q3_K_M") return layer < 2 ? TensorType::kQ5_K : TensorType::kQ4_K;
      if (m == "Q4_K_M" || m == "Q5_K_M") {
        return UseMoreBits(layer, n_layer) ? TensorType::kQ6_K : c.base;
      }
      return c.base;
    case Role::kAttnOutput:
      if (n_expert == 8) return TensorType::kQ5_K;
      return m == "Q3_K_M" ? TensorType::kQ4_K : c.base;
    case Role::kFfnDown:
      if (m == "Q3_K_M") return layer < n_layer / 16 ? TensorType::kQ5_K : TensorType::kQ4_K;
      if (m == "Q4_K_M" || m == "Q5_K_M") {
        return UseMoreBits(layer, n_layer) ? TensorType::kQ6_K : c.base;
      }
      if (m == "Q4_K_S") return layer < n_layer / 8 ? TensorType::kQ5_K : c.base;
      return c.base;
    default:
      return c.base;
  }
}

// ---------------------------------------------------------------------------------------------
// Random numbers: splitmix64 streams keyed by (seed, name, row), Box-Muller normals.
// ---------------------------------------------------------------------------------------------

uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t HashName(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return h;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

// Fills `out` with n standard normal values of row `row` of the stream `key`.
void NormalRow(uint64_t key, int64_t row, float* out, int64_t n) {
  uint64_t state = Mix64(key ^ Mix64(static_cast<uint64_t>(row) + kGolden));
  constexpr float kTwoPi = 6.28318530717958647692f;
  constexpr float kInv24 = 1.0f / 16777216.0f;
  for (int64_t i = 0; i < n; i += 2) {
    state += kGolden;
    const uint64_t r = Mix64(state);
    // u1 in (0, 1], u2 in [0, 1), 24 bits each.
    const float u1 = static_cast<float>((r >> 40) + 1) * kInv24;
    const float u2 = static_cast<float>((r >> 8) & 0xffffff) * kInv24;
    const float radius = std::sqrt(-2.0f * std::log(u1));
    const float angle = kTwoPi * u2;
    out[i] = radius * std::cos(angle);
    if (i + 1 < n) out[i + 1] = radius * std::sin(angle);
  }
}

// ---------------------------------------------------------------------------------------------
// The tensor plan.
// ---------------------------------------------------------------------------------------------

struct PlannedTensor {
  std::string name;
  TensorType type;
  std::vector<int64_t> dims;
  float mean = 0;  // values are mean + stddev * N(0, 1)
  float stddev = 1;
  // Names of the per-expert tensors whose rows this merged tensor stacks (dims[1] rows each);
  // empty: rows are keyed by `name`.
  std::vector<std::string> slice_keys;
  // A router (ffn_gate_inp) of layer `layer` skewed by SynthOptions::router_skew.
  float router_skew = 0.0f;
  int64_t layer = 0;
};

// Expert e's router row under SynthOptions::router_skew (see synth.h): scaled when hot, plus the
// component it shares with its partner e ^ m.
void SkewRouterRow(const PlannedTensor& t, uint64_t key, int64_t e, float* row, int64_t n) {
  const int64_t n_expert = t.dims[1];
  const int64_t half = std::max<int64_t>(n_expert / 2, 1);
  const int64_t partner = e ^ (half + t.layer % half);
  const float s = t.router_skew;
  const float hot = std::max(0.0f, 1.0f - static_cast<float>(e) / 3.0f);
  std::vector<float> shared(static_cast<size_t>(n));
  NormalRow(Mix64(key ^ 0x5eed5eedULL), std::min(e, partner), shared.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    row[i] = row[i] * (1.0f + 2.0f * s * hot) +
             (partner < n_expert ? 2.0f * s * t.stddev * shared[i] : 0.0f);
  }
}

std::vector<PlannedTensor> PlanTensors(const SynthShape& s, const TypeChoice& tc, int64_t n_vocab,
                                       bool per_expert) {
  const int64_t head_dim = s.n_embd / s.n_head;
  const int64_t n_kv = s.n_head_kv * head_dim;
  std::vector<PlannedTensor> plan;
  auto linear = [&](std::string name, Role role, int64_t layer, std::vector<int64_t> dims) {
    const float stddev = 1.0f / std::sqrt(static_cast<float>(dims[0]));
    plan.push_back({std::move(name),
                    ChooseType(tc, role, layer, s.n_layer, s.n_expert),
                    std::move(dims),
                    0.0f,
                    stddev,
                    {}});
  };
  auto norm = [&](std::string name) {
    plan.push_back({std::move(name), TensorType::kF32, {s.n_embd}, 1.0f, 0.1f, {}});
  };
  const float embd = static_cast<float>(s.n_embd);
  plan.push_back({"token_embd.weight",
                  ChooseType(tc, Role::kTokenEmbd, 0, s.n_layer, s.n_expert),
                  {s.n_embd, n_vocab},
                  0.0f,
                  1.0f,
                  {}});
  for (int64_t l = 0; l < s.n_layer; ++l) {
    const std::string blk = absl::StrCat("blk.", l, ".");
    norm(blk + "attn_norm.weight");
    linear(blk + "attn_q.weight", Role::kAttnQ, l, {s.n_embd, s.n_embd});
    linear(blk + "attn_k.weight", Role::kAttnK, l, {s.n_embd, n_kv});
    linear(blk + "attn_v.weight", Role::kAttnV, l, {s.n_embd, n_kv});
    linear(blk + "attn_output.weight", Role::kAttnOutput, l, {s.n_embd, s.n_embd});
    norm(blk + "ffn_norm.weight");
    plan.push_back({blk + "ffn_gate_inp.weight",
                    TensorType::kF32,
                    {s.n_embd, s.n_expert},
                    0.0f,
                    2.0f / std::sqrt(embd),
                    {}});
    struct Ffn {
      const char* kind;
      Role role;
      int64_t rows_len, rows;
    };
    const Ffn ffns[3] = {{"gate", Role::kFfnGate, s.n_embd, s.n_ff},
                         {"down", Role::kFfnDown, s.n_ff, s.n_embd},
                         {"up", Role::kFfnUp, s.n_embd, s.n_ff}};
    auto expert_name = [&](const Ffn& f, int64_t e) {
      return absl::StrCat(blk, "ffn_", f.kind, ".", e, ".weight");
    };
    if (per_expert) {
      for (int64_t e = 0; e < s.n_expert; ++e) {
        for (const Ffn& f : ffns) linear(expert_name(f, e), f.role, l, {f.rows_len, f.rows});
      }
    } else {
      for (const Ffn& f : ffns) {
        linear(absl::StrCat(blk, "ffn_", f.kind, "_exps.weight"), f.role, l,
               {f.rows_len, f.rows, s.n_expert});
        for (int64_t e = 0; e < s.n_expert; ++e)
          plan.back().slice_keys.push_back(expert_name(f, e));
      }
    }
  }
  norm("output_norm.weight");
  plan.push_back({"output.weight",
                  ChooseType(tc, Role::kOutput, 0, s.n_layer, s.n_expert),
                  {s.n_embd, n_vocab},
                  0.0f,
                  4.0f / std::sqrt(embd),
                  {}});
  return plan;
}

absl::Status CheckShape(const SynthShape& s) {
  if (s.n_embd <= 0 || s.n_ff <= 0 || s.n_layer <= 0 || s.n_head <= 0 || s.n_head_kv <= 0 ||
      s.n_expert <= 0 || s.n_expert_used <= 0 || s.n_ctx <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape '", s.name, "': every dimension must be positive"));
  }
  if (s.n_embd % s.n_head != 0 || s.n_head % s.n_head_kv != 0 || (s.n_embd / s.n_head) % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape '", s.name,
                     "': n_embd must split into n_head heads of even size and n_head must "
                     "be a multiple of n_head_kv"));
  }
  if (s.n_expert_used > s.n_expert) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape '", s.name, "': n_expert_used > n_expert"));
  }
  return absl::OkStatus();
}

// Generates and quantizes all rows of `t` into `dst` on `n_threads` threads.
absl::Status FillTensor(const PlannedTensor& t, uint64_t seed, int n_threads, uint8_t* dst) {
  const TypeTraits& tr = GetTypeTraits(t.type);
  if (tr.quantize == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("cannot produce tensor type ", tr.name, " for '", t.name, "'"));
  }
  const int64_t row_len = t.dims[0];
  const size_t row_bytes = RowBytes(t.type, row_len);
  int64_t rows = 1;
  for (size_t d = 1; d < t.dims.size(); ++d) rows *= t.dims[d];
  const int64_t slice_rows = t.slice_keys.empty() ? rows : t.dims[1];
  std::vector<uint64_t> keys;
  if (t.slice_keys.empty()) {
    keys.push_back(Mix64(seed ^ HashName(t.name)));
  } else {
    for (const std::string& k : t.slice_keys) keys.push_back(Mix64(seed ^ HashName(k)));
  }
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(row_len));
    for (int64_t r = begin; r < end; ++r) {
      NormalRow(keys[r / slice_rows], r % slice_rows, row.data(), row_len);
      for (float& v : row) v = t.mean + t.stddev * v;
      if (t.router_skew > 0) SkewRouterRow(t, keys[0], r, row.data(), row_len);
      tr.quantize(row.data(), dst + static_cast<size_t>(r) * row_bytes, row_len);
    }
  };
  const int64_t elements = rows * row_len;
  const int threads =
      static_cast<int>(std::min<int64_t>(n_threads, std::max<int64_t>(1, elements >> 16)));
  if (threads <= 1) {
    work(0, rows);
    return absl::OkStatus();
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    pool.emplace_back(work, rows * i / threads, rows * (i + 1) / threads);
  }
  for (std::thread& th : pool) th.join();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SynthShape> SynthShapeByName(std::string_view name) {
  SynthShape s;
  s.name = std::string(name);
  if (name == "tiny") {
    s.n_embd = 256, s.n_ff = 768, s.n_layer = 4, s.n_head = 8, s.n_head_kv = 2;
    s.n_ctx = 4096;
  } else if (name == "mini") {
    s.n_embd = 1024, s.n_ff = 3584, s.n_layer = 8, s.n_head = 8, s.n_head_kv = 2;
    s.n_ctx = 4096;
  } else if (name == "mixtral-8x7b") {
    s.n_embd = 4096, s.n_ff = 14336, s.n_layer = 32, s.n_head = 32, s.n_head_kv = 8;
    s.n_ctx = 32768;
  } else {
    return absl::NotFoundError(
        absl::StrCat("unknown model shape '", std::string(name), "' (tiny, mini, mixtral-8x7b)"));
  }
  s.n_expert = 8;
  s.n_expert_used = 2;
  return s;
}

uint64_t SynthTensorSpec::SizeBytes() const {
  uint64_t rows = 1;
  for (size_t d = 1; d < dims.size(); ++d) rows *= static_cast<uint64_t>(dims[d]);
  return RowBytes(type, dims[0]) * rows;
}

absl::StatusOr<std::vector<SynthTensorSpec>> PlanSynthTensors(const SynthShape& shape,
                                                              std::string_view type,
                                                              int64_t n_vocab,
                                                              bool per_expert_layout) {
  RETURN_IF_ERROR(CheckShape(shape));
  ASSIGN_OR_RETURN(const TypeChoice tc, ParseTypeChoice(type));
  if (n_vocab <= 0) return absl::InvalidArgumentError("n_vocab must be positive");
  std::vector<SynthTensorSpec> specs;
  for (PlannedTensor& t : PlanTensors(shape, tc, n_vocab, per_expert_layout)) {
    const TypeTraits& tr = GetTypeTraits(t.type);
    if (t.dims[0] % tr.block_size != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape '", shape.name, "' with type ", tc.name, ": tensor '", t.name, "' has rows of ",
          t.dims[0], " elements, not a multiple of ", tr.name, "'s block of ", tr.block_size));
    }
    specs.push_back({std::move(t.name), t.type, std::move(t.dims)});
  }
  return specs;
}

absl::Status SynthesizeModel(const SynthOptions& options,
                             std::function<void(int done, int total)> progress) {
  const SynthShape& s = options.shape;
  RETURN_IF_ERROR(CheckShape(s));
  ASSIGN_OR_RETURN(const TypeChoice tc, ParseTypeChoice(options.type));
  const std::string vocab_path =
      options.vocab_path.empty() ? std::string(kDefaultSynthVocabPath) : options.vocab_path;
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> vocab, GgufFile::Open(vocab_path));
  ASSIGN_OR_RETURN(const std::vector<std::string> tokens,
                   vocab->GetStringArray("tokenizer.ggml.tokens"));
  const int64_t n_vocab = static_cast<int64_t>(tokens.size());
  if (n_vocab == 0) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": empty tokenizer.ggml.tokens"));
  }

  if (!(options.router_skew >= 0.0f && options.router_skew <= 1.0f)) {
    return absl::InvalidArgumentError("router_skew must be in [0, 1]");
  }
  std::vector<PlannedTensor> plan = PlanTensors(s, tc, n_vocab, options.per_expert_layout);
  for (PlannedTensor& t : plan) {
    if (t.name.size() > 19 && t.name.ends_with("ffn_gate_inp.weight")) {
      t.router_skew = options.router_skew;
      t.layer = std::stoll(t.name.substr(4));  // "blk.N.ffn_gate_inp.weight"
    }
  }
  GgufWriter writer;
  for (const PlannedTensor& t : plan) {
    const absl::Status st = writer.AddTensor(t.name, t.type, t.dims);
    if (!st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape '", s.name, "' with type ", tc.name, ": ", st.message()));
    }
  }
  const auto u32 = [](int64_t v) { return GgufValue::Uint32(static_cast<uint32_t>(v)); };
  writer.AddMetadata("general.architecture", GgufValue::String("llama"));
  writer.AddMetadata("general.name", GgufValue::String(absl::StrCat(
                                         "moepool-synth-", s.name, "-", tc.name, "-s", options.seed,
                                         options.per_expert_layout ? "-split" : "")));
  writer.AddMetadata("llama.context_length", u32(s.n_ctx));
  writer.AddMetadata("llama.embedding_length", u32(s.n_embd));
  writer.AddMetadata("llama.block_count", u32(s.n_layer));
  writer.AddMetadata("llama.feed_forward_length", u32(s.n_ff));
  writer.AddMetadata("llama.attention.head_count", u32(s.n_head));
  writer.AddMetadata("llama.attention.head_count_kv", u32(s.n_head_kv));
  writer.AddMetadata("llama.rope.dimension_count", u32(s.n_embd / s.n_head));
  writer.AddMetadata("llama.rope.freq_base", GgufValue::Float32(s.rope_base));
  writer.AddMetadata("llama.attention.layer_norm_rms_epsilon", GgufValue::Float32(s.rms_eps));
  writer.AddMetadata("llama.expert_count", u32(s.n_expert));
  writer.AddMetadata("llama.expert_used_count", u32(s.n_expert_used));
  writer.AddMetadata("llama.vocab_size", u32(n_vocab));
  writer.AddMetadata("general.file_type", GgufValue::Uint32(tc.file_type));
  for (const auto& [key, value] : vocab->metadata()) {
    if (key.rfind("tokenizer.", 0) == 0) writer.AddMetadata(key, value);
  }
  writer.AddMetadata("general.quantization_version", GgufValue::Uint32(2));
  vocab.reset();

  RETURN_IF_ERROR(writer.Begin(options.out_path));
  const int n_threads = std::max(1u, std::thread::hardware_concurrency());
  const int total = static_cast<int>(plan.size());
  if (progress) progress(0, total);
  std::vector<uint8_t> buffer;
  for (int i = 0; i < total; ++i) {
    const PlannedTensor& t = plan[i];
    int64_t rows = 1;
    for (size_t d = 1; d < t.dims.size(); ++d) rows *= t.dims[d];
    const size_t bytes = RowBytes(t.type, t.dims[0]) * static_cast<size_t>(rows);
    buffer.resize(bytes);
    RETURN_IF_ERROR(FillTensor(t, options.seed, n_threads, buffer.data()));
    RETURN_IF_ERROR(writer.WriteTensorData(t.name, buffer.data(), bytes));
    if (bytes > (size_t{64} << 20)) std::vector<uint8_t>().swap(buffer);  // release big ones
    if (progress) progress(i + 1, total);
  }
  return writer.Finish();
}

}  // namespace moepool
