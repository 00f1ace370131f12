// The attention part of `moepool_gpu_tests --bench` (bench/gpu_bench.h): the tiled attention
// kernel of the device forward pass (LaunchAttentionTiles) on Mixtral's shape, as K/V bytes read
// per second against the device-to-device copy bandwidth of the same run.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/gpu_bench.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/quant/fp16.h"

namespace moepool {
namespace {

using cuda::AttnTile;
using cuda::DeviceBuffer;
using cuda::KvRowRef;

constexpr int64_t kHeads = 32, kHeadsKv = 8, kHeadDim = 128, kKvDim = kHeadsKv * kHeadDim;
constexpr int64_t kBlock = 16;

struct Case {
  const char* name;
  int64_t sequences;  // each with its own blocks in one pool
  int64_t context;    // positions per sequence
  int64_t rows;       // the last `rows` positions of each sequence are the batch's rows
};

// One case: the pool, the rows and tiles as the device pass makes them, timed.
absl::StatusOr<std::string> RunCase(const Case& c, double copy_gbs, int iterations,
                                    const AttentionTimer& time) {
  const int64_t blocks_per_seq = (c.context + kBlock - 1) / kBlock;
  const int64_t n_blocks = blocks_per_seq * c.sequences;
  const size_t pool_halves = static_cast<size_t>(n_blocks * kBlock * kKvDim);
  std::vector<uint16_t> host(pool_halves);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint16_t& h : host) h = Fp32ToFp16(normal(rng));
  auto k = DeviceBuffer::Allocate(pool_halves * 2);
  if (!k.ok()) return k.status();
  auto v = DeviceBuffer::Allocate(pool_halves * 2);
  if (!v.ok()) return v.status();
  if (absl::Status s = k->Upload(host.data(), pool_halves * 2); !s.ok()) return s;
  if (absl::Status s = v->Upload(host.data(), pool_halves * 2); !s.ok()) return s;
  // Sequence s owns blocks s, s + sequences, ... (interleaved, as a shared pool hands them out).
  std::vector<int32_t> tables;
  for (int64_t s = 0; s < c.sequences; ++s) {
    for (int64_t b = 0; b < blocks_per_seq; ++b) {
      tables.push_back(static_cast<int32_t>(b * c.sequences + s));
    }
  }
  auto dtables = DeviceBuffer::Allocate(tables.size() * sizeof(int32_t));
  if (!dtables.ok()) return dtables.status();
  if (absl::Status s = dtables->Upload(tables.data(), tables.size() * 4); !s.ok()) return s;
  std::vector<KvRowRef> rows;
  std::vector<AttnTile> tiles;
  const int64_t tile_rows = cuda::AttnTileRows(kHeads / kHeadsKv, kHeadDim);
  int64_t kv_bytes = 0;  // K and V bytes each tile's blocks read (positions x kv heads)
  for (int64_t s = 0; s < c.sequences; ++s) {
    for (int64_t p = c.context - c.rows; p < c.context; ++p) {
      KvRowRef r;
      r.k = static_cast<uint16_t*>(k->data());
      r.v = static_cast<uint16_t*>(v->data());
      r.blocks = static_cast<const int32_t*>(dtables->data()) + s * blocks_per_seq;
      r.block_size = kBlock;
      r.block_stride = static_cast<size_t>(kBlock * kKvDim);
      r.layer_stride = static_cast<size_t>(kBlock * kKvDim);
      r.pos = p;
      const int32_t index = static_cast<int32_t>(rows.size());
      if (!tiles.empty() && tiles.back().count < tile_rows && rows.back().blocks == r.blocks) {
        ++tiles.back().count;
      } else {
        tiles.push_back(AttnTile{index, 1});
      }
      rows.push_back(r);
    }
  }
  for (const AttnTile& t : tiles)
    kv_bytes += 2 * 2 * kKvDim * (rows[t.first + t.count - 1].pos + 1);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t splits = (c.context - 1) / cuda::kAttnSplit + 1;
  auto drows = DeviceBuffer::Allocate(rows.size() * sizeof(KvRowRef));
  auto dtiles = DeviceBuffer::Allocate(tiles.size() * sizeof(AttnTile));
  auto q = DeviceBuffer::Allocate(static_cast<size_t>(n * kHeads * kHeadDim) * 4);
  auto out = DeviceBuffer::Allocate(static_cast<size_t>(n * kHeads * kHeadDim) * 4);
  auto partial =
      DeviceBuffer::Allocate(static_cast<size_t>(n * kHeads * splits * (kHeadDim + 2)) * 4);
  for (auto* b : {&drows, &dtiles, &q, &out, &partial}) {
    if (!b->ok()) return b->status();
  }
  if (absl::Status s = drows->Upload(rows.data(), rows.size() * sizeof(KvRowRef)); !s.ok())
    return s;
  if (absl::Status s = dtiles->Upload(tiles.data(), tiles.size() * sizeof(AttnTile)); !s.ok()) {
    return s;
  }
  if (absl::Status s = q->Zero(); !s.ok()) return s;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  absl::StatusOr<double> ms = time(iterations, [&] {
    return cuda::LaunchAttentionTiles(
        q->floats(), static_cast<const KvRowRef*>(drows->data()),
        static_cast<const AttnTile*>(dtiles->data()), static_cast<int64_t>(tiles.size()), 0, n, 0,
        kHeads, kHeadsKv, kHeadDim, scale, splits, partial->floats(), out->floats(), nullptr);
  });
  if (!ms.ok()) return ms.status();
  const double gbs = static_cast<double>(kv_bytes) / (*ms * 1e6);
  return absl::StrFormat(
      "    {\"case\": \"%s\", \"sequences\": %d, \"context\": %d, \"rows\": %d, \"tiles\": %d, "
      "\"ms\": %.4f, \"kv_gbs\": %.1f, \"share_of_copy\": %.3f}",
      c.name, c.sequences, c.context, n, tiles.size(), *ms, gbs, gbs / copy_gbs);
}

}  // namespace

absl::StatusOr<std::string> RunAttentionBench(double copy_gbs, int iterations,
                                              const AttentionTimer& time) {
  // Decode (one row per sequence) and prompt chunks (512 rows of one sequence).
  const Case cases[] = {{"decode", 1, 4096, 1},
                        {"decode", 16, 2048, 1},
                        {"decode", 64, 1024, 1},
                        {"prompt", 1, 512, 512},
                        {"prompt", 1, 4096, 512}};
  std::string out;
  for (const Case& c : cases) {
    absl::StatusOr<std::string> one = RunCase(c, copy_gbs, iterations, time);
    if (!one.ok()) return one.status();
    absl::StrAppend(&out, out.empty() ? "" : ",\n", *one);
  }
  return out;
}

}  // namespace moepool
