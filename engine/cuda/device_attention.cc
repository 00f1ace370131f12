// DeviceAttentionBackend: attention, router and output head through DeviceOps
// (device_attention.h).
#include "engine/cuda/device_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/expert_math.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using cuda::AttnTile;
using cuda::DeviceMemory;
using cuda::DeviceOps;
using cuda::KvRowRef;
using cuda::MatrixRef;

// A weight matrix or vector in device memory.
struct DeviceMatrix {
  DeviceMemory mem;
  MatrixRef ref;
};

struct DeviceLayer {
  DeviceMatrix attn_norm, ffn_norm;  // [n_embd] f32
  DeviceMatrix wq, wk, wv, wo;
  DeviceMatrix router;  // ref.data == nullptr for a dense model
};

// The device copy of one KvBlockPool (same layout, same block ids).
struct DeviceKvMirror : KvPoolMirror {
  const void* owner = nullptr;  // the backend that fills it
  DeviceMemory k, v;            // [n_blocks x n_layer x block_size x kv_dim] halves
};

size_t AlignUp(size_t n) { return (n + 255) / 256 * 256; }

// Where one layer call's transfers live in the device buffer io_ (and the host staging buffer):
// [meta | x] go up in one copy, [x | h | expert | weight] come back in one. meta is the pass's
// KvRowRef rows, then its positions (int64), its block tables (int32) and its attention tiles.
struct IoLayout {
  IoLayout(size_t meta_bytes, int64_t n, int64_t n_embd, int64_t k) {
    const size_t rows_bytes = sizeof(float) * static_cast<size_t>(n * n_embd);
    const size_t pair_bytes = sizeof(float) * static_cast<size_t>(n * k);
    x = AlignUp(meta_bytes);
    h = x + AlignUp(rows_bytes);
    expert = h + AlignUp(rows_bytes);
    weight = expert + AlignUp(pair_bytes);
    up_end = x + rows_bytes;
    down_end = weight + pair_bytes;
  }
  size_t x, h, expert, weight;  // byte offsets (meta starts at 0)
  size_t up_end, down_end;      // ends of the two copies
};

// A buffer that grows to the largest size asked for.
struct Scratch {
  DeviceMemory mem;
  size_t bytes = 0;
  template <class T>
  T* as() const {
    return static_cast<T*>(mem.get());
  }
};

class DevicePass : public AttentionBackend::Pass {
 public:
  int64_t n = 0;
  // The per-row metadata, uploaded before each layer (WriteMeta): n KvRowRef, then n int64
  // positions, then the block tables (int32), row r's at table_at[r], then the attention tiles.
  // The KvRowRef block pointers are set when the image is written, for where it lands on the
  // device.
  std::vector<KvRowRef> rows;
  std::vector<int32_t> tables;
  std::vector<size_t> table_at;  // per row, index into tables
  // Attention runs in chunks of `chunk` rows (so that its scratch fits); chunk c's tiles are
  // tiles[chunk_tiles[c] .. chunk_tiles[c + 1]) and its rows need chunk_splits[c] splits.
  std::vector<AttnTile> tiles;
  int64_t chunk = 1;
  std::vector<size_t> chunk_tiles;
  std::vector<int64_t> chunk_splits;

  size_t tables_offset() const { return (sizeof(KvRowRef) + sizeof(int64_t)) * rows.size(); }
  size_t tiles_offset() const { return tables_offset() + sizeof(int32_t) * tables.size(); }
  size_t meta_bytes() const { return tiles_offset() + sizeof(AttnTile) * tiles.size(); }
  // Writes the metadata image for a device copy at `device` into `host` (meta_bytes()).
  void WriteMeta(const unsigned char* device, unsigned char* host) const {
    const size_t rows_bytes = sizeof(KvRowRef) * rows.size();
    const size_t pos_bytes = sizeof(int64_t) * rows.size();
    const auto* device_tables = reinterpret_cast<const int32_t*>(device + rows_bytes + pos_bytes);
    for (size_t r = 0; r < rows.size(); ++r) {
      KvRowRef row = rows[r];
      row.blocks = device_tables + table_at[r];
      std::memcpy(host + r * sizeof(KvRowRef), &row, sizeof(KvRowRef));
    }
    for (size_t r = 0; r < rows.size(); ++r) {  // the positions again, as RoPE's array
      std::memcpy(host + rows_bytes + r * sizeof(int64_t), &rows[r].pos, sizeof(int64_t));
    }
    std::memcpy(host + rows_bytes + pos_bytes, tables.data(), sizeof(int32_t) * tables.size());
    std::memcpy(host + tiles_offset(), tiles.data(), sizeof(AttnTile) * tiles.size());
  }
};

class DeviceAttentionBackend : public AttentionBackend {
 public:
  DeviceAttentionBackend(const Model* model, std::unique_ptr<DeviceOps> ops,
                         const DeviceAttentionOptions& options)
      : model_(model), c_(model->config()), ops_(std::move(ops)), options_(options) {}

  absl::Status Upload() {
    RETURN_IF_ERROR(ops_->Activate());
    RETURN_IF_ERROR(cuda::CheckAttentionShape(c_.n_head, c_.n_head_kv, c_.head_dim));
    if (c_.n_expert > cuda::kMaxRouted) {
      return absl::InvalidArgumentError(
          absl::StrCat(c_.n_expert, " experts exceed the router kernel's ", cuda::kMaxRouted));
    }
    for (int64_t il = 0; il < c_.n_layer; ++il) {
      const LayerWeights& L = model_->layer(il);
      DeviceLayer d;
      RETURN_IF_ERROR(UploadVector(L.attn_norm, &d.attn_norm));
      RETURN_IF_ERROR(UploadVector(L.ffn_norm, &d.ffn_norm));
      RETURN_IF_ERROR(UploadMatrix(L.wq, &d.wq));
      RETURN_IF_ERROR(UploadMatrix(L.wk, &d.wk));
      RETURN_IF_ERROR(UploadMatrix(L.wv, &d.wv));
      RETURN_IF_ERROR(UploadMatrix(L.wo, &d.wo));
      if (L.router.data != nullptr) RETURN_IF_ERROR(UploadMatrix(L.router, &d.router));
      layers_.push_back(std::move(d));
    }
    RETURN_IF_ERROR(UploadVector(model_->output_norm(), &output_norm_));
    RETURN_IF_ERROR(UploadMatrix(model_->output(), &output_));
    if (options_.show_progress) {
      std::fprintf(stderr, "moepool: attention, router and head on %s (%.1f MiB of weights)\n",
                   ops_->name().c_str(), static_cast<double>(uploaded_) / (1 << 20));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Pass>> BeginPass(absl::Span<const BatchRow> rows) override {
    RETURN_IF_ERROR(ops_->Activate());
    auto pass = std::make_unique<DevicePass>();
    pass->n = static_cast<int64_t>(rows.size());
    absl::flat_hash_map<const KvCache*, size_t> table_of;
    for (const BatchRow& row : rows) {
      ASSIGN_OR_RETURN(DeviceKvMirror * mirror, MirrorOf(row.cache->mutable_pool()));
      auto [it, added] = table_of.try_emplace(row.cache, pass->tables.size());
      if (added) {
        const std::vector<int32_t>& table = row.cache->block_table();
        pass->tables.insert(pass->tables.end(), table.begin(), table.end());
      }
      const KvBlockPool& pool = row.cache->pool();
      KvRowRef ref;
      ref.k = static_cast<uint16_t*>(mirror->k.get());
      ref.v = static_cast<uint16_t*>(mirror->v.get());
      ref.block_size = pool.block_size();
      ref.block_stride = pool.block_stride();
      ref.layer_stride = static_cast<size_t>(pool.block_size() * pool.kv_dim());
      ref.pos = row.pos;
      pass->rows.push_back(ref);
      pass->table_at.push_back(it->second);
    }
    PlanTiles(rows, pass.get());
    return pass;
  }

  absl::Status Layer(Pass* base, int64_t il, float* x, float* h, int32_t* expert,
                     float* weight) override {
    auto* pass = static_cast<DevicePass*>(base);
    const int64_t n = pass->n;
    if (n == 0) return absl::OkStatus();
    const DeviceLayer& L = layers_[static_cast<size_t>(il)];
    const int64_t d = c_.n_embd;
    const int64_t kvd = c_.kv_dim();
    const int k_used = static_cast<int>(c_.n_expert_used);
    // Every call: an expert backend on another device may have made that one current.
    RETURN_IF_ERROR(ops_->Activate());
    RETURN_IF_ERROR(EnsureRows(n));
    const IoLayout io(pass->meta_bytes(), n, d, k_used);
    RETURN_IF_ERROR(Ensure(&io_, io.down_end));
    unsigned char* dev = io_.as<unsigned char>();
    const auto* rows = reinterpret_cast<const KvRowRef*>(dev);
    const auto* pos = reinterpret_cast<const int64_t*>(rows + n);
    auto* xd = reinterpret_cast<float*>(dev + io.x);
    auto* hd = reinterpret_cast<float*>(dev + io.h);
    auto* expert_d = reinterpret_cast<int32_t*>(dev + io.expert);
    auto* weight_d = reinterpret_cast<float*>(dev + io.weight);
    float* q = q_.as<float>();
    float* kb = k_.as<float>();
    float* vb = v_.as<float>();
    float* attn = attn_.as<float>();
    const size_t x_bytes = sizeof(float) * static_cast<size_t>(n * d);
    // One copy up: the pass's metadata (block pointers rebased onto io_) and x.
    stage_.resize(std::max(stage_.size(), io.down_end));
    pass->WriteMeta(dev, stage_.data());
    std::memcpy(stage_.data() + io.x, x, x_bytes);
    RETURN_IF_ERROR(ops_->Upload(dev, stage_.data(), io.up_end));
    // Attention: norm, projections, RoPE, K/V store, attention, output projection, residual.
    RETURN_IF_ERROR(
        ops_->RmsNorm(xd, static_cast<const float*>(L.attn_norm.ref.data), n, d, c_.rms_eps, hd));
    RETURN_IF_ERROR(ops_->MatMul(L.wq.ref, hd, n, q));
    RETURN_IF_ERROR(ops_->MatMul(L.wk.ref, hd, n, kb));
    RETURN_IF_ERROR(ops_->MatMul(L.wv.ref, hd, n, vb));
    RETURN_IF_ERROR(ops_->RopeRows(q, d, n, c_.n_head, c_.head_dim, c_.n_rot, c_.rope_base, pos));
    RETURN_IF_ERROR(
        ops_->RopeRows(kb, kvd, n, c_.n_head_kv, c_.head_dim, c_.n_rot, c_.rope_base, pos));
    RETURN_IF_ERROR(ops_->StoreKvRows(rows, n, il, kvd, kb, vb));
    const float scale = 1.0f / std::sqrt(static_cast<float>(c_.head_dim));
    const auto* tiles = reinterpret_cast<const AttnTile*>(dev + pass->tiles_offset());
    // The scratch for the largest chunk first: re-allocating between queued launches would
    // free memory they still use.
    const size_t n_chunks = pass->chunk_tiles.size() - 1;
    int64_t partial_floats = 0;
    for (size_t ci = 0; ci < n_chunks; ++ci) {
      const int64_t m = std::min(pass->chunk, n - static_cast<int64_t>(ci) * pass->chunk);
      partial_floats = std::max(partial_floats, m * PartialFloatsPerRow(pass->chunk_splits[ci]));
    }
    RETURN_IF_ERROR(Ensure(&partial_, sizeof(float) * static_cast<size_t>(partial_floats)));
    for (size_t ci = 0; ci < n_chunks; ++ci) {
      const int64_t r0 = static_cast<int64_t>(ci) * pass->chunk;
      const int64_t m = std::min(pass->chunk, n - r0);
      const int64_t splits = pass->chunk_splits[ci];
      const size_t t0 = pass->chunk_tiles[ci];
      RETURN_IF_ERROR(ops_->AttentionTiles(
          q, rows, tiles + t0, static_cast<int64_t>(pass->chunk_tiles[ci + 1] - t0), r0, m, il,
          c_.n_head, c_.n_head_kv, c_.head_dim, scale, splits, partial_.as<float>(), attn));
    }
    RETURN_IF_ERROR(ops_->MatMul(L.wo.ref, attn, n, q));  // q is free again
    RETURN_IF_ERROR(ops_->AddInPlace(xd, q, n * d));
    // FFN norm and routing.
    RETURN_IF_ERROR(
        ops_->RmsNorm(xd, static_cast<const float*>(L.ffn_norm.ref.data), n, d, c_.rms_eps, hd));
    const size_t pairs = static_cast<size_t>(n * k_used);
    const bool routed = L.router.ref.data != nullptr;
    if (routed) {
      RETURN_IF_ERROR(ops_->MatMul(L.router.ref, hd, n, router_logits_.as<float>()));
      RETURN_IF_ERROR(ops_->RouteTopK(router_logits_.as<float>(), n, static_cast<int>(c_.n_expert),
                                      k_used, expert_d, weight_d));
    }
    // One copy down (it waits for the queued work): x, h and the routing.
    RETURN_IF_ERROR(ops_->Download(stage_.data() + io.x, dev + io.x, io.down_end - io.x));
    std::memcpy(x, stage_.data() + io.x, x_bytes);
    std::memcpy(h, stage_.data() + io.h, x_bytes);
    if (routed) {
      std::memcpy(expert, stage_.data() + io.expert, sizeof(int32_t) * pairs);
      std::memcpy(weight, stage_.data() + io.weight, sizeof(float) * pairs);
    } else {
      std::fill(expert, expert + pairs, 0);
      std::fill(weight, weight + pairs, 1.0f);
    }
    return absl::OkStatus();
  }

  absl::Status Head(const float* x, int64_t n, float* logits) override {
    if (n == 0) return absl::OkStatus();
    RETURN_IF_ERROR(ops_->Activate());
    RETURN_IF_ERROR(EnsureRows(n));
    const size_t out_bytes = sizeof(float) * static_cast<size_t>(n * c_.n_vocab);
    RETURN_IF_ERROR(Ensure(&logits_, out_bytes));
    const size_t in_bytes = sizeof(float) * static_cast<size_t>(n * c_.n_embd);
    RETURN_IF_ERROR(ops_->Upload(attn_.as<float>(), x, in_bytes));
    RETURN_IF_ERROR(ops_->RmsNorm(attn_.as<float>(),
                                  static_cast<const float*>(output_norm_.ref.data), n, c_.n_embd,
                                  c_.rms_eps, q_.as<float>()));
    RETURN_IF_ERROR(ops_->MatMul(output_.ref, q_.as<float>(), n, logits_.as<float>()));
    return ops_->Download(logits, logits_.as<float>(), out_bytes);
  }

  absl::Status PreparePool(KvBlockPool* pool) override {
    RETURN_IF_ERROR(ops_->Activate());
    return MirrorOf(pool).status();
  }

 private:
  int64_t PartialFloatsPerRow(int64_t splits) const {
    return c_.n_head * splits * (c_.head_dim + 2);
  }

  // Cuts the pass into attention chunks whose partials fit max_scratch_floats, and each chunk
  // into tiles: runs of consecutive rows of one cache at consecutive positions, at most
  // AttnTileRows rows. Neither depends on how a row's result is computed: a row's bits are the
  // same in any tile (expert_kernels.h).
  void PlanTiles(absl::Span<const BatchRow> rows, DevicePass* pass) const {
    const int64_t n = pass->n;
    int64_t max_splits = 1;
    for (const BatchRow& row : rows)
      max_splits = std::max(max_splits, row.pos / cuda::kAttnSplit + 1);
    pass->chunk = std::clamp<int64_t>(options_.max_scratch_floats / PartialFloatsPerRow(max_splits),
                                      1, std::max<int64_t>(n, 1));
    const int64_t tile_rows = cuda::AttnTileRows(c_.n_head / c_.n_head_kv, c_.head_dim);
    for (int64_t r = 0; r < n; ++r) {
      const BatchRow& row = rows[static_cast<size_t>(r)];
      if (r % pass->chunk == 0) {
        pass->chunk_tiles.push_back(pass->tiles.size());
        pass->chunk_splits.push_back(1);
      }
      AttnTile* last =
          pass->tiles.size() > pass->chunk_tiles.back() ? &pass->tiles.back() : nullptr;
      const bool extends = last != nullptr && last->count < tile_rows &&
                           rows[static_cast<size_t>(r - 1)].cache == row.cache &&
                           rows[static_cast<size_t>(r - 1)].pos + 1 == row.pos;
      if (extends) {
        ++last->count;
      } else {
        pass->tiles.push_back(AttnTile{static_cast<int32_t>(r), 1});
      }
      int64_t& splits = pass->chunk_splits.back();
      splits = std::max(splits, row.pos / cuda::kAttnSplit + 1);
    }
    pass->chunk_tiles.push_back(pass->tiles.size());
  }

  absl::Status UploadBytes(const void* host, size_t bytes, DeviceMemory* out) {
    ASSIGN_OR_RETURN(*out, ops_->Allocate(bytes));
    uploaded_ += bytes;
    return ops_->Upload(out->get(), host, bytes);
  }
  absl::Status UploadVector(const std::vector<float>& v, DeviceMatrix* out) {
    RETURN_IF_ERROR(UploadBytes(v.data(), sizeof(float) * v.size(), &out->mem));
    out->ref.type = TensorType::kF32;
    out->ref.data = out->mem.get();
    out->ref.rows = 1;
    out->ref.cols = static_cast<int64_t>(v.size());
    out->ref.row_bytes = sizeof(float) * v.size();
    return absl::OkStatus();
  }
  absl::Status UploadMatrix(const WeightMatrix& w, DeviceMatrix* out) {
    if (w.data == nullptr) {
      return absl::FailedPreconditionError(
          "the model does not bind the attention and head weights");
    }
    RETURN_IF_ERROR(UploadBytes(w.data, w.SizeBytes(), &out->mem));
    out->ref.type = w.type;
    out->ref.data = out->mem.get();
    out->ref.rows = w.rows;
    out->ref.cols = w.cols;
    out->ref.row_bytes = w.row_bytes;
    return absl::OkStatus();
  }

  absl::Status Ensure(Scratch* s, size_t bytes) {
    if (s->bytes >= bytes) return absl::OkStatus();
    s->mem.reset();  // free first: the old contents are not needed
    ASSIGN_OR_RETURN(s->mem, ops_->Allocate(bytes));
    s->bytes = bytes;
    return absl::OkStatus();
  }

  // Buffers for passes of up to n rows.
  absl::Status EnsureRows(int64_t n) {
    if (n <= rows_capacity_) return absl::OkStatus();
    const auto f = [n](int64_t width) { return sizeof(float) * static_cast<size_t>(n * width); };
    RETURN_IF_ERROR(Ensure(&q_, f(c_.n_embd)));
    RETURN_IF_ERROR(Ensure(&attn_, f(c_.n_embd)));
    RETURN_IF_ERROR(Ensure(&k_, f(c_.kv_dim())));
    RETURN_IF_ERROR(Ensure(&v_, f(c_.kv_dim())));
    RETURN_IF_ERROR(Ensure(&router_logits_, f(c_.n_expert)));
    rows_capacity_ = n;
    return absl::OkStatus();
  }

  // The device copy of `pool`, made on first use.
  absl::StatusOr<DeviceKvMirror*> MirrorOf(KvBlockPool* pool) {
    if (KvPoolMirror* m = pool->mirror(); m != nullptr) {
      auto* mine = dynamic_cast<DeviceKvMirror*>(m);
      if (mine == nullptr || mine->owner != this) {
        return absl::FailedPreconditionError(
            "this KV cache was filled by another attention backend");
      }
      return mine;
    }
    if (pool->n_layer() != c_.n_layer || pool->kv_dim() != c_.kv_dim()) {
      return absl::InvalidArgumentError("the KV cache was made for another model shape");
    }
    auto mirror = std::make_unique<DeviceKvMirror>();
    mirror->owner = this;
    const size_t bytes =
        sizeof(uint16_t) * pool->block_stride() * static_cast<size_t>(pool->n_blocks());
    for (DeviceMemory* half : {&mirror->k, &mirror->v}) {
      absl::StatusOr<DeviceMemory> mem = ops_->Allocate(bytes);
      if (!mem.ok()) {
        return absl::Status(
            mem.status().code(),
            absl::StrCat("the KV cache (", pool->n_blocks(), " blocks of ", pool->block_size(),
                         " positions, ", (2 * bytes) >> 20, " MiB for K and V) does not fit on ",
                         ops_->name(), " next to the weights; lower --parallel or --ctx: ",
                         mem.status().message()));
      }
      *half = std::move(*mem);
    }
    DeviceKvMirror* out = mirror.get();
    pool->set_mirror(std::move(mirror));
    return out;
  }

  const Model* model_;
  const ModelConfig& c_;
  std::unique_ptr<DeviceOps> ops_;
  DeviceAttentionOptions options_;
  std::vector<DeviceLayer> layers_;
  DeviceMatrix output_norm_, output_;
  uint64_t uploaded_ = 0;
  int64_t rows_capacity_ = 0;
  Scratch q_, attn_, k_, v_, router_logits_;  // [rows x width]
  Scratch io_;                                // a layer call's transfers (IoLayout)
  Scratch partial_;                           // attention partials (per split)
  Scratch logits_;                            // head output
  std::vector<unsigned char> stage_;          // host side of io_
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateDeviceAttentionBackend(
    const Model* model, std::unique_ptr<cuda::DeviceOps> ops,
    const DeviceAttentionOptions& options) {
  auto backend = std::make_unique<DeviceAttentionBackend>(model, std::move(ops), options);
  RETURN_IF_ERROR(backend->Upload());
  return backend;
}

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const Model* model, int device, const DeviceAttentionOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<cuda::DeviceOps> ops, cuda::CreateCudaDeviceOps(device));
  return CreateDeviceAttentionBackend(model, std::move(ops), options);
}

}  // namespace moepool
