#include "engine/model.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

absl::Status BadConfig(const GgufFile& f, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(f.path(), ": ", what));
}

absl::StatusOr<int64_t> ReadCount(const GgufFile& f, const std::string& key, int64_t max) {
  ASSIGN_OR_RETURN(uint64_t v, f.GetUint(key));
  if (v == 0 || v > static_cast<uint64_t>(max)) {
    return BadConfig(f, absl::StrCat("metadata key '", key, "' has implausible value ", v));
  }
  return static_cast<int64_t>(v);
}

std::string Dims(const GgufTensorInfo& t) { return t.ShapeString(); }

// Binds a 2-D matrix [cols, rows] (ggml order), or the `index`-th 2-D slice of a 3-D tensor.
absl::StatusOr<WeightMatrix> BindMatrix(const GgufFile& f, const std::string& name, int64_t cols,
                                        int64_t rows, int64_t n_slices = 0, int64_t index = 0) {
  const GgufTensorInfo* t = f.FindTensor(name);
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": missing tensor '", name, "'"));
  }
  const bool want3 = n_slices > 0;
  const bool ok = t->dims[0] == cols && t->dims[1] == rows &&
                  (want3 ? (t->n_dims == 3 && t->dims[2] == n_slices) : t->n_dims <= 2);
  if (!ok) {
    std::string expected = absl::StrCat("[", cols, ", ", rows);
    if (want3) absl::StrAppend(&expected, ", ", n_slices);
    absl::StrAppend(&expected, "]");
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tensor '", name, "' has shape ",
                                                   Dims(*t), ", expected ", expected,
                                                   " from the model hyperparameters"));
  }
  WeightMatrix m;
  m.name = t->name.c_str();
  m.type = t->type;
  m.cols = cols;
  m.rows = rows;
  m.row_bytes = RowBytes(t->type, cols);
  m.data = t->data + static_cast<size_t>(index) * m.row_bytes * static_cast<size_t>(rows);
  return m;
}

absl::StatusOr<std::vector<float>> BindVector(const GgufFile& f, const std::string& name,
                                              int64_t n) {
  const GgufTensorInfo* t = f.FindTensor(name);
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": missing tensor '", name, "'"));
  }
  if (t->dims[0] != n || t->NumElements() != n) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tensor '", name, "' has shape ",
                                                   Dims(*t), ", expected [", n, "]"));
  }
  std::vector<float> v(static_cast<size_t>(n));
  GetTypeTraits(t->type).dequantize(t->data, v.data(), n);
  for (float x : v) {
    if (!std::isfinite(x)) {
      return absl::InvalidArgumentError(
          absl::StrCat(f.path(), ": tensor '", name, "' holds non-finite values"));
    }
  }
  return v;
}

}  // namespace

absl::StatusOr<ModelConfig> ReadModelConfig(const GgufFile& f) {
  ModelConfig c;
  ASSIGN_OR_RETURN(c.architecture, f.GetString("general.architecture"));
  if (c.architecture != "llama") {
    return BadConfig(f, absl::StrCat("unsupported architecture '", c.architecture,
                                     "' (moepool runs llama/Mixtral-architecture files)"));
  }
  c.name = f.GetString("general.name").value_or("");
  const std::string a = c.architecture + ".";
  ASSIGN_OR_RETURN(c.n_embd, ReadCount(f, a + "embedding_length", 1 << 17));
  ASSIGN_OR_RETURN(c.n_layer, ReadCount(f, a + "block_count", 1 << 12));
  ASSIGN_OR_RETURN(c.n_head, ReadCount(f, a + "attention.head_count", 1 << 12));
  c.n_head_kv = c.n_head;
  if (f.Has(a + "attention.head_count_kv")) {
    ASSIGN_OR_RETURN(c.n_head_kv, ReadCount(f, a + "attention.head_count_kv", 1 << 12));
  }
  ASSIGN_OR_RETURN(c.n_ff, ReadCount(f, a + "feed_forward_length", 1 << 20));
  ASSIGN_OR_RETURN(c.n_ctx_train, ReadCount(f, a + "context_length", int64_t{1} << 24));
  if (c.n_embd % c.n_head != 0) {
    return BadConfig(f, absl::StrCat("embedding_length ", c.n_embd,
                                     " is not a multiple of head_count ", c.n_head));
  }
  if (c.n_head % c.n_head_kv != 0) {
    return BadConfig(f, absl::StrCat("head_count ", c.n_head,
                                     " is not a multiple of head_count_kv ", c.n_head_kv));
  }
  c.head_dim = c.n_embd / c.n_head;
  c.n_rot = c.head_dim;
  if (f.Has(a + "rope.dimension_count")) {
    ASSIGN_OR_RETURN(c.n_rot, ReadCount(f, a + "rope.dimension_count", c.head_dim));
    if (c.n_rot % 2 != 0) return BadConfig(f, "rope.dimension_count must be even");
  }
  if (f.Has(a + "rope.freq_base")) {
    ASSIGN_OR_RETURN(double base, f.GetFloat(a + "rope.freq_base"));
    if (!(base > 1.0) || !std::isfinite(base)) return BadConfig(f, "rope.freq_base must be > 1");
    c.rope_base = static_cast<float>(base);
  }
  ASSIGN_OR_RETURN(double eps, f.GetFloat(a + "attention.layer_norm_rms_epsilon"));
  if (!(eps > 0.0) || eps > 1e-1) return BadConfig(f, "layer_norm_rms_epsilon out of range");
  c.rms_eps = static_cast<float>(eps);
  c.n_expert = 1;
  c.n_expert_used = 1;
  if (f.Has(a + "expert_count")) {
    ASSIGN_OR_RETURN(c.n_expert, ReadCount(f, a + "expert_count", 1024));
    ASSIGN_OR_RETURN(c.n_expert_used, ReadCount(f, a + "expert_used_count", c.n_expert));
  }
  const GgufTensorInfo* embd = f.FindTensor("token_embd.weight");
  if (embd == nullptr) {
    // A worker's shard file (worker/shard_cache.h) holds experts only: the vocabulary size
    // comes from the metadata there.
    if (!f.Has(a + "vocab_size")) {
      return absl::InvalidArgumentError(
          absl::StrCat(f.path(), ": missing tensor 'token_embd.weight'"));
    }
    ASSIGN_OR_RETURN(c.n_vocab, ReadCount(f, a + "vocab_size", int64_t{1} << 24));
    return c;
  }
  c.n_vocab = embd->dims[1];
  if (f.Has(a + "vocab_size")) {
    ASSIGN_OR_RETURN(uint64_t nv, f.GetUint(a + "vocab_size"));
    if (static_cast<int64_t>(nv) != c.n_vocab) {
      return BadConfig(f, absl::StrCat("vocab_size ", nv, " disagrees with token_embd.weight ",
                                       embd->ShapeString()));
    }
  }
  return c;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path,
                                                   const ExpertFilter& filter) {
  ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
  return FromFile(std::shared_ptr<GgufFile>(std::move(file)), filter);
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromFile(std::shared_ptr<GgufFile> file,
                                                       const ExpertFilter& filter) {
  auto model = std::unique_ptr<Model>(new Model);
  model->file_ = std::move(file);
  ASSIGN_OR_RETURN(model->config_, ReadModelConfig(*model->file_));
  RETURN_IF_ERROR(model->Bind(filter));
  return model;
}

absl::Status Model::Bind(const ExpertFilter& filter) {
  const GgufFile& f = *file_;
  const ModelConfig& c = config_;
  const bool dense = !f.Has(c.architecture + ".expert_count");
  if (filter.non_expert) {
    ASSIGN_OR_RETURN(token_embd_, BindMatrix(f, "token_embd.weight", c.n_embd, c.n_vocab));
    ASSIGN_OR_RETURN(output_norm_, BindVector(f, "output_norm.weight", c.n_embd));
    if (f.FindTensor("output.weight") != nullptr) {
      ASSIGN_OR_RETURN(output_, BindMatrix(f, "output.weight", c.n_embd, c.n_vocab));
    } else {
      output_ = token_embd_;  // tied embeddings
    }
  }
  per_expert_layout_ = f.FindTensor("blk.0.ffn_gate_exps.weight") == nullptr && !dense;
  // Layers are added as they bind, so a block_count the file does not back costs nothing.
  layers_.clear();
  for (int64_t il = 0; il < c.n_layer; ++il) {
    LayerWeights& L = layers_.emplace_back();
    const std::string p = absl::StrCat("blk.", il, ".");
    if (filter.non_expert) {
      ASSIGN_OR_RETURN(L.attn_norm, BindVector(f, p + "attn_norm.weight", c.n_embd));
      ASSIGN_OR_RETURN(L.wq, BindMatrix(f, p + "attn_q.weight", c.n_embd, c.n_embd));
      ASSIGN_OR_RETURN(L.wk, BindMatrix(f, p + "attn_k.weight", c.n_embd, c.kv_dim()));
      ASSIGN_OR_RETURN(L.wv, BindMatrix(f, p + "attn_v.weight", c.n_embd, c.kv_dim()));
      ASSIGN_OR_RETURN(L.wo, BindMatrix(f, p + "attn_output.weight", c.n_embd, c.n_embd));
      ASSIGN_OR_RETURN(L.ffn_norm, BindVector(f, p + "ffn_norm.weight", c.n_embd));
      if (!dense) {
        ASSIGN_OR_RETURN(L.router, BindMatrix(f, p + "ffn_gate_inp.weight", c.n_embd, c.n_expert));
      }
    }
    L.experts.resize(static_cast<size_t>(c.n_expert));
    for (int64_t e = 0; e < c.n_expert; ++e) {
      if (filter.keep && !filter.keep(static_cast<int>(il), static_cast<int>(e))) continue;
      ExpertWeights& E = L.experts[static_cast<size_t>(e)];
      if (dense) {
        ASSIGN_OR_RETURN(E.gate, BindMatrix(f, p + "ffn_gate.weight", c.n_embd, c.n_ff));
        ASSIGN_OR_RETURN(E.up, BindMatrix(f, p + "ffn_up.weight", c.n_embd, c.n_ff));
        ASSIGN_OR_RETURN(E.down, BindMatrix(f, p + "ffn_down.weight", c.n_ff, c.n_embd));
      } else if (per_expert_layout_) {
        const std::string s = absl::StrCat(".", e, ".weight");
        ASSIGN_OR_RETURN(E.gate, BindMatrix(f, p + "ffn_gate" + s, c.n_embd, c.n_ff));
        ASSIGN_OR_RETURN(E.up, BindMatrix(f, p + "ffn_up" + s, c.n_embd, c.n_ff));
        ASSIGN_OR_RETURN(E.down, BindMatrix(f, p + "ffn_down" + s, c.n_ff, c.n_embd));
      } else {
        ASSIGN_OR_RETURN(
            E.gate, BindMatrix(f, p + "ffn_gate_exps.weight", c.n_embd, c.n_ff, c.n_expert, e));
        ASSIGN_OR_RETURN(E.up,
                         BindMatrix(f, p + "ffn_up_exps.weight", c.n_embd, c.n_ff, c.n_expert, e));
        ASSIGN_OR_RETURN(
            E.down, BindMatrix(f, p + "ffn_down_exps.weight", c.n_ff, c.n_embd, c.n_expert, e));
      }
    }
  }
  return absl::OkStatus();
}

uint64_t Model::ExpertBytes() const {
  uint64_t n = 0;
  for (const auto& L : layers_) {
    for (const auto& E : L.experts) {
      if (E.present()) n += E.gate.SizeBytes() + E.up.SizeBytes() + E.down.SizeBytes();
    }
  }
  return n;
}

uint64_t Model::NonExpertBytes() const {
  uint64_t n = token_embd_.SizeBytes();
  if (output_.data != token_embd_.data) n += output_.SizeBytes();
  for (const auto& L : layers_) {
    n += L.wq.SizeBytes() + L.wk.SizeBytes() + L.wv.SizeBytes() + L.wo.SizeBytes() +
         L.router.SizeBytes();
  }
  return n;
}

std::vector<const WeightMatrix*> Model::BoundMatrices() const {
  std::vector<const WeightMatrix*> out;
  const auto add = [&](const WeightMatrix& m) {
    if (m.data != nullptr) out.push_back(&m);
  };
  add(token_embd_);
  if (output_.data != token_embd_.data) add(output_);
  for (const LayerWeights& L : layers_) {
    for (const WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.router}) add(*m);
    for (const ExpertWeights& E : L.experts) {
      for (const WeightMatrix* m : {&E.gate, &E.up, &E.down}) add(*m);
    }
  }
  return out;
}

absl::Status Model::Preload(const std::function<void(uint64_t, uint64_t)>& progress) const {
  const std::vector<const WeightMatrix*> matrices = BoundMatrices();
  uint64_t total = 0, done = 0;
  for (const WeightMatrix* m : matrices) total += m->SizeBytes();
  for (const WeightMatrix* m : matrices) {
    RETURN_IF_ERROR(file_->Populate(m->data, m->SizeBytes()));
    done += m->SizeBytes();
    if (progress) progress(done, total);
  }
  return absl::OkStatus();
}

uint64_t Model::ResidentWeightBytes() const {
  uint64_t n = 0;
  for (const WeightMatrix* m : BoundMatrices()) n += file_->ResidentBytes(m->data, m->SizeBytes());
  return n;
}

}  // namespace moepool
