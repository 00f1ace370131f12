// moepool_expert_bench: see bench/expert_bench.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "bench/expert_bench.h"
#include "bench/mixtral_moe_cpu.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/device_attention.h"
#include "engine/cuda/moe_ffn_cuda.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/synth.h"
#include "engine/thread_pool.h"
#include "engine/transformer.h"

namespace moepool {
namespace {

#define BENCH_RETURN_IF_ERROR(expr)      \
  do {                                   \
    const absl::Status _status = (expr); \
    if (!_status.ok()) return _status;   \
  } while (0)

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct DecodeRun {
  double prefill_s = 0.0;
  double decode_s = 0.0;
  std::vector<int32_t> tokens;  // greedy tokens
};

// Prefill `prompt` in one pass, then greedy-decode `n` tokens one at a time.
// attention: nullptr for the CPU.
absl::StatusOr<DecodeRun> Decode(const Model& model, ExpertBackend* experts, ThreadPool* pool,
                                 const std::vector<int32_t>& prompt, int n,
                                 AttentionBackend* attention = nullptr) {
  TransformerOptions options;
  options.attention = attention;
  Transformer transformer(&model, experts, pool, options);
  KvCache cache(model.config(), static_cast<int64_t>(prompt.size()) + n + 1);
  const int64_t n_vocab = model.config().n_vocab;
  std::vector<BatchRow> rows;
  for (size_t i = 0; i < prompt.size(); ++i) {
    rows.push_back(BatchRow{prompt[i], static_cast<int64_t>(i), &cache, i + 1 == prompt.size()});
  }
  DecodeRun run;
  std::vector<float> logits;
  const auto t0 = Clock::now();
  BENCH_RETURN_IF_ERROR(transformer.Forward(rows, &logits));
  const auto t1 = Clock::now();
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int i = 0; i < n; ++i) {
    const float* last = logits.data() + logits.size() - n_vocab;
    const int32_t next = static_cast<int32_t>(std::max_element(last, last + n_vocab) - last);
    run.tokens.push_back(next);
    logits.clear();
    const BatchRow row{next, pos++, &cache, true};
    BENCH_RETURN_IF_ERROR(transformer.Forward(absl::MakeConstSpan(&row, 1), &logits));
  }
  const auto t2 = Clock::now();
  run.prefill_s = Seconds(t0, t1);
  run.decode_s = Seconds(t1, t2);
  return run;
}

// Greedy decode of a whole model (`path`; empty: a Q4_K_M model of `shape_name` with `n_layer`
// layers (0: the shape's) synthesized into $TMPDIR) three ways: CPU engine, experts on the GPU,
// experts and attention/router/head on the GPU. `key` names the JSON object.
absl::StatusOr<std::string> ModelDecode(const ExpertBenchOptions& o, const std::string& key,
                                        std::string path, const std::string& shape_name,
                                        int64_t n_layer) {
  if (path.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    path = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/moepool-expert-bench-", shape_name,
                        n_layer > 0 ? absl::StrCat("-", n_layer, "l") : "", ".gguf");
    SynthOptions synth;
    auto shape = SynthShapeByName(shape_name);
    if (!shape.ok()) return shape.status();
    synth.shape = *shape;
    if (n_layer > 0) synth.shape.n_layer = n_layer;
    synth.type = "Q4_K_M";
    synth.out_path = path;
    BENCH_RETURN_IF_ERROR(SynthesizeModel(synth));
  }
  auto model = Model::Load(path);
  if (!model.ok()) return model.status();
  ThreadPool pool(o.cpu_threads);
  std::vector<int32_t> prompt = {1};
  std::mt19937 rng(3);
  for (int i = 1; i < o.prompt_tokens; ++i) {
    prompt.push_back(3 + static_cast<int32_t>(rng() % ((*model)->config().n_vocab - 3)));
  }
  LocalExpertBackend cpu(model->get(), &pool);
  auto cpu_run = Decode(**model, &cpu, &pool, prompt, o.decode_tokens);
  if (!cpu_run.ok()) return cpu_run.status();
  CudaExpertOptions copts;
  copts.devices = {o.device};
  copts.show_progress = false;
  const auto u0 = Clock::now();
  auto gpu = CreateCudaExpertBackend(model->get(), copts);
  if (!gpu.ok()) return gpu.status();
  const double upload_s = Seconds(u0, Clock::now());
  auto gpu_run = Decode(**model, gpu->get(), &pool, prompt, o.decode_tokens);
  if (!gpu_run.ok()) return gpu_run.status();
  // Everything but embedding and sampling on the GPU: attention, router and head too.
  auto attention = CreateCudaAttentionBackend(model->get(), o.device);
  if (!attention.ok()) return attention.status();
  auto all_run = Decode(**model, gpu->get(), &pool, prompt, o.decode_tokens, attention->get());
  if (!all_run.ok()) return all_run.status();
  const auto same_prefix = [&](const DecodeRun& run) {
    int same = 0;
    while (same < o.decode_tokens && cpu_run->tokens[same] == run.tokens[same]) ++same;
    return same;
  };
  const double cpu_tps = o.decode_tokens / cpu_run->decode_s;
  const double gpu_tps = o.decode_tokens / gpu_run->decode_s;
  const double all_tps = o.decode_tokens / all_run->decode_s;
  return absl::StrFormat(
      "  \"%s\": {\"model\": \"%s\", \"expert_bytes\": %d, \"cpu_threads\": %d, "
      "\"prompt_tokens\": %d, \"decode_tokens\": %d,\n"
      "    \"cpu_experts_tokens_per_s\": %.2f, \"cuda_experts_tokens_per_s\": %.2f, "
      "\"speedup\": %.2f,\n"
      "    \"cuda_experts_and_attention_tokens_per_s\": %.2f, \"speedup_all_on_gpu\": %.2f,\n"
      "    \"cpu_prefill_s\": %.3f, \"cuda_prefill_s\": %.3f, \"cuda_all_prefill_s\": %.3f, "
      "\"upload_s\": %.2f,\n"
      "    \"greedy_tokens_identical_prefix\": %d, \"all_on_gpu_identical_prefix\": %d}",
      key, path, (*model)->ExpertBytes(), pool.size(), o.prompt_tokens, o.decode_tokens, cpu_tps,
      gpu_tps, gpu_tps / cpu_tps, all_tps, all_tps / cpu_tps, cpu_run->prefill_s,
      gpu_run->prefill_s, all_run->prefill_s, upload_s, same_prefix(*gpu_run),
      same_prefix(*all_run));
}

// Random bytes whose every uint16 is a finite half below 1 (valid scales for every k-quant).
std::vector<uint8_t> RandomBlocks(size_t bytes, uint32_t seed) {
  std::vector<uint8_t> host(bytes);
  std::mt19937 rng(seed);
  for (uint8_t& b : host) b = static_cast<uint8_t>(rng() % 0x3c);
  return host;
}

absl::StatusOr<std::string> MixtralMoe(const ExpertBenchOptions& o) {
  constexpr int64_t kEmbd = 4096, kFf = 14336, kExperts = 8;
  constexpr int kTop = 2;
  const TensorType type = TensorType::kQ4_K;
  BENCH_RETURN_IF_ERROR(cuda::UseDevice(o.device));
  const size_t up_bytes = RowBytes(type, kEmbd) * kFf;    // gate / up: kFf rows of kEmbd
  const size_t down_bytes = RowBytes(type, kFf) * kEmbd;  // down: kEmbd rows of kFf
  const std::vector<uint8_t> host_up = RandomBlocks(up_bytes, 1);
  const std::vector<uint8_t> host_down = RandomBlocks(down_bytes, 2);
  std::vector<cuda::DeviceBuffer> buffers;
  DeviceResidentExperts experts;
  experts.device = o.device;
  experts.n_embd = kEmbd;
  experts.max_pairs_per_row = kTop;
  for (int l = 0; l < o.mixtral_layers; ++l) {
    experts.layers.emplace_back();
    for (int64_t e = 0; e < kExperts; ++e) {
      DeviceExpert de;
      cuda::MatrixRef* m[3] = {&de.gate, &de.up, &de.down};
      for (int j = 0; j < 3; ++j) {
        const bool down = j == 2;
        auto b = cuda::DeviceBuffer::Allocate(down ? down_bytes : up_bytes);
        if (!b.ok()) return b.status();
        BENCH_RETURN_IF_ERROR(
            b->Upload(down ? host_down.data() : host_up.data(), down ? down_bytes : up_bytes));
        *m[j] = cuda::MatrixRef{type, b->data(), RowBytes(type, down ? kFf : kEmbd),
                                down ? kEmbd : kFf, down ? kFf : kEmbd};
        buffers.push_back(std::move(*b));
      }
      experts.layers.back().push_back(de);
    }
  }
  CudaExpertOptions copts;
  copts.show_progress = false;
  copts.max_rows = 256;
  auto backend = CreateCudaExpertBackendOnDeviceExperts(experts, copts);
  if (!backend.ok()) return backend.status();
  copts.batch_invariant = false;
  auto tiled = CreateCudaExpertBackendOnDeviceExperts(experts, copts);
  if (!tiled.ok()) return tiled.status();
  copts.tensor_cores = true;
  auto tensor = CreateCudaExpertBackendOnDeviceExperts(experts, copts);
  if (!tensor.ok()) return tensor.status();

  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::string batches;
  double decode_ms = 0.0;
  struct Config {
    int64_t rows;
    bool invariant;
    bool tensor_cores;
  };
  for (const Config cfg : {Config{1, true, false}, Config{8, true, false}, Config{32, true, false},
                           Config{32, false, false}, Config{32, false, true},
                           Config{256, false, false}, Config{256, false, true}}) {
    const int64_t n = cfg.rows;
    ExpertBackend* b =
        cfg.invariant ? backend->get() : (cfg.tensor_cores ? tensor->get() : tiled->get());
    std::vector<float> x(static_cast<size_t>(n * kEmbd)), out(x.size());
    for (float& v : x) v = normal(rng);
    std::vector<int32_t> ex(static_cast<size_t>(n * kTop));
    std::vector<float> w(ex.size(), 0.5f);
    std::vector<double> token_ms;
    const int iters = n == 1 ? o.iterations : std::max(3, o.iterations / 4);
    for (int it = -2; it < iters; ++it) {
      const auto t0 = Clock::now();
      for (int l = 0; l < o.mixtral_layers; ++l) {
        for (int64_t r = 0; r < n; ++r) {  // two distinct experts, ascending
          const int32_t a = static_cast<int32_t>(rng() % kExperts);
          const int32_t c = static_cast<int32_t>((a + 1 + rng() % (kExperts - 1)) % kExperts);
          ex[static_cast<size_t>(r * kTop)] = std::min(a, c);
          ex[static_cast<size_t>(r * kTop + 1)] = std::max(a, c);
        }
        const ExpertRoutes routes{l, n, kEmbd, kTop, x.data(), ex.data(), w.data()};
        BENCH_RETURN_IF_ERROR(b->Compute(routes, out.data()));
      }
      if (it >= 0) token_ms.push_back(1e3 * Seconds(t0, Clock::now()));
    }
    std::sort(token_ms.begin(), token_ms.end());
    const double ms = token_ms[token_ms.size() / 2];
    if (n == 1) decode_ms = ms;
    absl::StrAppend(&batches, batches.empty() ? "" : ", ",
                    absl::StrFormat("{\"rows\": %d, \"batch_invariant\": %s, "
                                    "\"tensor_cores\": %s, \"ms_all_layers\": %.3f}",
                                    n, cfg.invariant ? "true" : "false",
                                    cfg.tensor_cores ? "true" : "false", ms));
  }
  // One decode token reads 2 experts x (gate + up + down) per layer.
  const double bytes = static_cast<double>(o.mixtral_layers) * kTop * (2 * up_bytes + down_bytes);
  std::string cpu = "null";
  double cpu_ms = 0.0;
  if (o.mixtral_cpu) {
    absl::StatusOr<double> ms = MixtralMoeCpuMs(o.mixtral_layers, kEmbd, kFf, kExperts, type,
                                                o.cpu_threads, std::max(3, o.iterations / 4));
    if (!ms.ok()) return ms.status();
    cpu_ms = *ms;
    cpu = absl::StrFormat(
        "{\"decode_ms_per_token\": %.2f, \"expert_weight_gbs\": %.1f, "
        "\"gpu_speedup\": %.1f}",
        cpu_ms, bytes / (cpu_ms * 1e6), cpu_ms / decode_ms);
  }
  return absl::StrFormat(
      "  \"mixtral_moe\": {\"layers\": %d, \"n_embd\": %d, \"n_ff\": %d, \"experts\": %d, "
      "\"top_k\": %d, \"type\": \"Q4_K\",\n"
      "    \"decode_ms_per_token\": %.3f, \"decode_ms_per_layer\": %.3f, "
      "\"decode_ms_per_token_32_layers\": %.2f, \"expert_weight_gbs\": %.1f,\n"
      "    \"batches\": [%s],\n"
      "    \"cpu_same_host\": %s}",
      o.mixtral_layers, kEmbd, kFf, kExperts, kTop, decode_ms, decode_ms / o.mixtral_layers,
      decode_ms * 32.0 / o.mixtral_layers, bytes / (decode_ms * 1e6), batches, cpu);
}

}  // namespace

absl::StatusOr<std::string> RunExpertBench(const ExpertBenchOptions& options) {
  auto devices = ListCudaDevices();
  if (!devices.ok()) return devices.status();
  std::string name;
  for (const CudaDeviceInfo& d : *devices) {
    if (d.ordinal == options.device) name = d.name;
  }
  std::string parts = absl::StrFormat("{\n  \"device\": \"%s\"", name);
  auto moe = MixtralMoe(options);
  if (!moe.ok()) return moe.status();
  absl::StrAppend(&parts, ",\n", *moe);
  if (options.mini_model_path != "-") {
    auto mini = ModelDecode(options, "mini_decode", options.mini_model_path, "mini", 0);
    if (!mini.ok()) return mini.status();
    absl::StrAppend(&parts, ",\n", *mini);
  }
  if (options.mixtral_decode_layers > 0) {
    auto mixtral = ModelDecode(options, "mixtral_layers_decode", "", "mixtral-8x7b",
                               options.mixtral_decode_layers);
    if (!mixtral.ok()) return mixtral.status();
    absl::StrAppend(&parts, ",\n", *mixtral);
  }
  absl::StrAppend(&parts, "\n}\n");
  return parts;
}

}  // namespace moepool
