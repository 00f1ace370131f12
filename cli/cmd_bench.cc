// moepool bench: prompt-processing and decode throughput of the engine on a model. With
// --workers (see cli/cluster_flags.h) it also measures the distributed decode: per-layer dispatch
// overhead (round trip minus the worker's compute time), a raw TCP ping-pong of the same byte
// count for comparison, and bytes on the wire per token.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/cluster_flags.h"
#include "cli/commands.h"
#include "cli/engine_flags.h"
#include "coordinator/tcp_echo.h"
#include "engine/engine.h"
#include "engine/quant/types.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"
#include "wire/row_codec.h"

namespace moepool::cli {
namespace {

uint64_t PeakRssBytes() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The q-quantile (nearest rank) of `v`; 0 for an empty list.
double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

nlohmann::json Percentiles(const std::vector<double>& v) {
  return {{"p50", Quantile(v, 0.5)}, {"p99", Quantile(v, 0.99)}, {"samples", v.size()}};
}

// What the workers did during the decode phases.
struct DecodeWire {
  std::vector<std::vector<RoundTripSample>> samples;  // per worker
  uint64_t request_bytes = 0, response_bytes = 0;
  uint64_t exchanges = 0, rows = 0;  // one exchange: one worker, one layer, one step
  void Add(const ClusterStats& st) {
    samples.resize(st.workers.size());
    for (size_t w = 0; w < st.workers.size(); ++w) {
      const WorkerStats& ws = st.workers[w];
      samples[w].insert(samples[w].end(), ws.recent.begin(), ws.recent.end());
      request_bytes += ws.request_bytes;
      response_bytes += ws.response_bytes;
      exchanges += ws.requests;
      rows += ws.rows;
    }
  }
};

// The cluster part of `bench --json`.
absl::StatusOr<nlohmann::json> ClusterReport(const Args& args, const ClusterExpertBackend& cluster,
                                             const DecodeWire& wire, int64_t decode_tokens,
                                             uint64_t prompt_wire_bytes, int64_t prompt_tokens) {
  nlohmann::json j;
  const ClusterOptions& o = cluster.options();
  j["wire_dtype"] = wire::DTypeName(o.wire_dtype);
  j["local_experts"] = o.local_experts;
  std::vector<double> all_rtt, all_overhead, all_compute, req_bytes;
  nlohmann::json workers = nlohmann::json::array();
  for (size_t w = 0; w < wire.samples.size(); ++w) {
    std::vector<double> rtt, overhead, compute;
    for (const RoundTripSample& s : wire.samples[w]) {
      rtt.push_back(static_cast<double>(s.round_trip_micros));
      compute.push_back(static_cast<double>(s.compute_micros));
      overhead.push_back(static_cast<double>(s.round_trip_micros) -
                         static_cast<double>(s.compute_micros));
      req_bytes.push_back(static_cast<double>(s.request_bytes));
    }
    const moepool::v1::DescribeResponse d = cluster.workers()[w];
    workers.push_back({{"address", o.workers[w]},
                       {"worker_id", d.worker_id()},
                       {"device", d.device()},
                       {"experts", d.experts().packed_size()},
                       {"decode_round_trip_us", Percentiles(rtt)},
                       {"decode_worker_compute_us", Percentiles(compute)},
                       {"decode_dispatch_overhead_us", Percentiles(overhead)}});
    all_rtt.insert(all_rtt.end(), rtt.begin(), rtt.end());
    all_overhead.insert(all_overhead.end(), overhead.begin(), overhead.end());
    all_compute.insert(all_compute.end(), compute.begin(), compute.end());
  }
  j["workers"] = workers;
  // Per layer and worker exchange of a decode step.
  j["decode_round_trip_us"] = Percentiles(all_rtt);
  j["decode_worker_compute_us"] = Percentiles(all_compute);
  j["decode_dispatch_overhead_us"] = Percentiles(all_overhead);
  const double tokens = static_cast<double>(std::max<int64_t>(1, decode_tokens));
  j["decode_request_bytes_per_token"] = static_cast<double>(wire.request_bytes) / tokens;
  j["decode_response_bytes_per_token"] = static_cast<double>(wire.response_bytes) / tokens;
  j["decode_wire_bytes_per_token"] =
      static_cast<double>(wire.request_bytes + wire.response_bytes) / tokens;
  // Round trips (worker exchanges) and rows sent per token, all layers: what a placement that
  // keeps co-selected experts together lowers.
  j["decode_exchanges_per_token"] = static_cast<double>(wire.exchanges) / tokens;
  j["decode_rows_sent_per_token"] = static_cast<double>(wire.rows) / tokens;
  j["prompt_wire_bytes_per_token"] = static_cast<double>(prompt_wire_bytes) /
                                     static_cast<double>(std::max<int64_t>(1, prompt_tokens));
  j["wire_bytes_note"] = "serialized protobuf messages; HTTP/2 and TCP framing not counted";

  // Raw TCP ping-pong of the median decode request size, to the first worker's host on
  // --echo-port, else to an echo server this command starts on its own loopback.
  const size_t bytes = static_cast<size_t>(std::max(1.0, Quantile(req_bytes, 0.5)));
  ASSIGN_OR_RETURN(int64_t echo_port, args.GetInt("echo-port", 0));
  ASSIGN_OR_RETURN(int64_t pings, args.GetInt("pings", 2000));
  std::unique_ptr<TcpEchoServer> echo;
  std::string host = "127.0.0.1";
  std::string target_note;
  if (echo_port > 0) {
    const std::string& first = o.workers.front();
    host = first.substr(0, first.rfind(':'));
    if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
    target_note = "echo port of the first worker's host (--echo-port)";
  } else {
    ASSIGN_OR_RETURN(echo, TcpEchoServer::Start("127.0.0.1", 0));
    echo_port = echo->port();
    target_note =
        "echo server started by bench on the coordinator's loopback (no --echo-port): compare "
        "with workers on 127.0.0.1 only";
  }
  ASSIGN_OR_RETURN(std::vector<double> rtt,
                   TcpPingPong(host, static_cast<int>(echo_port), bytes, static_cast<int>(pings)));
  nlohmann::json ping = Percentiles(rtt);
  ping["bytes_each_way"] = bytes;
  ping["target"] = host + ":" + std::to_string(echo_port);
  ping["note"] = target_note;
  j["tcp_ping_pong_us"] = ping;
  return j;
}

struct BenchOptions {
  int64_t n_prompt = 512;
  int64_t n_decode = 128;
  int64_t reps = 1;
  int64_t n_seq = 1;
  int64_t micro_batches = 1;
};

absl::StatusOr<BenchOptions> ParseBenchOptions(const Args& args) {
  BenchOptions b;
  ASSIGN_OR_RETURN(b.n_prompt, args.GetInt("prompt-tokens", 512));
  ASSIGN_OR_RETURN(b.n_decode, args.GetInt("decode-tokens", 128));
  ASSIGN_OR_RETURN(b.reps, args.GetInt("repeat", 1));
  ASSIGN_OR_RETURN(b.n_seq, args.GetInt("sequences", 1));
  ASSIGN_OR_RETURN(b.micro_batches, args.GetInt("micro-batches", 1));
  if (b.n_prompt < 1 || b.n_decode < 1 || b.reps < 1 || b.n_seq < 1 || b.n_seq > 1024) {
    return absl::InvalidArgumentError(
        "--prompt-tokens, --decode-tokens, --repeat must be >= 1, --sequences in 1..1024");
  }
  if (b.micro_batches != 1 && b.micro_batches != 2) {
    return absl::InvalidArgumentError("--micro-batches must be 1 or 2");
  }
  return b;
}

// Deterministic pseudo-random token ids (the content does not matter for speed).
std::vector<int32_t> BenchTokens(int64_t n, int64_t n_vocab) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  uint64_t s = 12345;
  for (auto& t : tokens) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>(3 + (s >> 33) % static_cast<uint64_t>(n_vocab - 3));
  }
  return tokens;
}

// What the runs measured (the best of --repeat for speeds).
struct BenchResult {
  double best_pp = 0, best_tg = 0, best_single = 0;
  double idle_s = 0, decode_s = 0;
  size_t split = 0;  // > 0: two micro-batches, the first of `split` sequences
  DecodeWire wire;
  uint64_t prompt_wire_bytes = 0;
};

// The engine under test and what it runs on.
struct BenchRun {
  Transformer* tf;
  ClusterExpertBackend* cluster;  // null: experts in this process
  const std::vector<int32_t>* tokens;
  BenchOptions o;
};

// `n_decode` steps of one row per cache, in one pass or two micro-batches (the first `split`).
absl::Status DecodeSteps(const BenchRun& b, const std::vector<std::unique_ptr<KvCache>>& caches,
                         size_t split) {
  const std::vector<int32_t>& tokens = *b.tokens;
  std::vector<BatchRow> rows(caches.size());
  std::vector<float> logits;
  for (int64_t i = 0; i < b.o.n_decode; ++i) {
    for (size_t q = 0; q < caches.size(); ++q) {
      const size_t t = static_cast<size_t>((i + 7 * static_cast<int64_t>(q)) %
                                           static_cast<int64_t>(tokens.size()));
      rows[q] = {tokens[t], i, caches[q].get(), true};
    }
    logits.clear();
    if (split > 0) {
      const absl::Span<const BatchRow> all(rows);
      const absl::Span<const BatchRow> halves[] = {all.subspan(0, split), all.subspan(split)};
      RETURN_IF_ERROR(b.tf->ForwardMicroBatches(halves, &logits));
    } else {
      RETURN_IF_ERROR(b.tf->Forward(rows, &logits));
    }
  }
  return absl::OkStatus();
}

// One --repeat: the prompt pass, the decode of all sequences and, with several, one alone.
absl::Status RunOnce(const BenchRun& b, KvCache* cache,
                     const std::vector<std::unique_ptr<KvCache>>& caches,
                     std::vector<std::unique_ptr<KvCache>>* single, BenchResult* r) {
  ClusterExpertBackend* cluster = b.cluster;
  if (cluster != nullptr) cluster->ResetStats();
  std::vector<BatchRow> rows;
  for (int64_t i = 0; i < b.o.n_prompt; ++i) {
    rows.push_back({(*b.tokens)[static_cast<size_t>(i)], i, cache, i + 1 == b.o.n_prompt});
  }
  std::vector<float> logits;
  auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(b.tf->Forward(rows, &logits));
  auto t1 = std::chrono::steady_clock::now();
  r->best_pp = std::max(r->best_pp, b.o.n_prompt / Seconds(t0, t1));
  if (cluster != nullptr) {
    for (const WorkerStats& w : cluster->Stats().workers) {
      r->prompt_wire_bytes += w.request_bytes + w.response_bytes;
    }
    cluster->ResetStats();
  }
  ExpertBackend* experts = b.tf->experts();
  const uint64_t blocked0 = experts->blocked_micros();
  t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(DecodeSteps(b, caches, r->split));
  t1 = std::chrono::steady_clock::now();
  r->best_tg =
      std::max(r->best_tg, static_cast<double>(b.o.n_decode * b.o.n_seq) / Seconds(t0, t1));
  r->idle_s += static_cast<double>(experts->blocked_micros() - blocked0) / 1e6;
  r->decode_s += Seconds(t0, t1);
  if (cluster != nullptr) r->wire.Add(cluster->Stats());
  // With several sequences, the single-sequence decode of the same process is the baseline,
  // measured right after each batched run so that both see the same machine (best of --repeat).
  if (b.o.n_seq > 1) {
    (*single)[0]->set_n_past(0);
    const auto t2 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(DecodeSteps(b, *single, 0));
    r->best_single =
        std::max(r->best_single, b.o.n_decode / Seconds(t2, std::chrono::steady_clock::now()));
  }
  return absl::OkStatus();
}

void PrintJson(const BenchOptions& o, const BenchResult& r, Engine& engine,
               const std::string& model_path, uint64_t rss, const nlohmann::json* cluster) {
  nlohmann::json j;
  j["model"] = model_path;
  j["threads"] = engine.pool().size();
  j["cpu_kernels"] = KernelIsaName();
  j["prompt_tokens"] = o.n_prompt;
  j["decode_tokens"] = o.n_decode;
  j["prompt_tokens_per_s"] = r.best_pp;
  j["decode_tokens_per_s"] = r.best_tg;
  j["decode_sequences"] = o.n_seq;
  if (o.n_seq > 1) {
    j["decode_single_sequence_tokens_per_s"] = r.best_single;
    j["decode_vs_single_sequence"] = r.best_tg / r.best_single;
  }
  j["decode_micro_batches"] = r.split > 0 ? 2 : 1;
  j["decode_coordinator_idle_ratio"] = r.decode_s > 0 ? r.idle_s / r.decode_s : 0.0;
  j["decode_coordinator_idle_note"] =
      "time the forward thread was blocked waiting for remote experts / decode wall time";
  j["peak_rss_bytes"] = rss;
  j["file_bytes"] = engine.model().file().file_size();
  if (cluster != nullptr) j["cluster"] = *cluster;
  std::cout << j.dump() << std::endl;
}

void PrintText(const BenchOptions& o, const BenchResult& r, Engine& engine,
               const std::string& model_path, uint64_t rss, const nlohmann::json* cluster) {
  std::cout << absl::StrFormat(
      "model %s, %d threads, %s kernels\n  prompt %d tokens: %.1f tokens/s\n  decode %d tokens x "
      "%d sequences (%d micro-batches): %.1f tokens/s, coordinator idle %.0f%%\n  peak RSS %.1f "
      "MiB (file %.1f MiB)\n",
      model_path, engine.pool().size(), KernelIsaName(), o.n_prompt, r.best_pp, o.n_decode, o.n_seq,
      r.split > 0 ? 2 : 1, r.best_tg, r.decode_s > 0 ? 100 * r.idle_s / r.decode_s : 0.0,
      rss / 1048576.0, engine.model().file().file_size() / 1048576.0);
  if (o.n_seq > 1) {
    std::cout << absl::StrFormat("  one sequence alone: %.1f tokens/s (%d at once: %.2fx)\n",
                                 r.best_single, o.n_seq, r.best_tg / r.best_single);
  }
  if (cluster != nullptr) {
    const nlohmann::json& c = *cluster;
    std::cout << absl::StrFormat(
        "  cluster: %d workers, wire %s; per layer of a decode step: round trip p50 %.0f us, "
        "dispatch overhead p50 %.0f us p99 %.0f us; raw TCP ping-pong of %d bytes p50 %.0f "
        "us (%s); %.0f bytes on the wire per decode token\n",
        static_cast<int>(c["workers"].size()), c["wire_dtype"].get<std::string>(),
        c["decode_round_trip_us"]["p50"].get<double>(),
        c["decode_dispatch_overhead_us"]["p50"].get<double>(),
        c["decode_dispatch_overhead_us"]["p99"].get<double>(),
        c["tcp_ping_pong_us"]["bytes_each_way"].get<int>(),
        c["tcp_ping_pong_us"]["p50"].get<double>(),
        c["tcp_ping_pong_us"]["target"].get<std::string>(),
        c["decode_wire_bytes_per_token"].get<double>());
  }
}

absl::Status Bench(const Args& args) {
  EngineOptions opts;
  opts.model_path = args.Get("model");
  if (opts.model_path.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  ASSIGN_OR_RETURN(const BenchOptions o, ParseBenchOptions(args));
  opts.threads = static_cast<int>(threads);
  opts.n_ctx = std::max<int64_t>(o.n_prompt, o.n_decode);
  ASSIGN_OR_RETURN(LoadedEngine loaded, LoadEngineForArgs(args, opts));
  Engine* engine = loaded.engine.get();
  const ModelConfig& c = engine->config();
  if (opts.n_ctx > c.n_ctx_train) {
    return absl::InvalidArgumentError("benchmark length exceeds the model's context");
  }
  const std::vector<int32_t> tokens = BenchTokens(opts.n_ctx, c.n_vocab);
  const BenchRun run{&engine->transformer(), loaded.cluster.get(), &tokens, o};
  KvCache cache(c, opts.n_ctx);
  {  // Warm-up: touch every weight page once.
    std::vector<BatchRow> rows;
    const int64_t n_warm = std::min<int64_t>(8, opts.n_ctx);
    for (int64_t i = 0; i < n_warm; ++i) rows.push_back({tokens[i], i, &cache, i + 1 == n_warm});
    std::vector<float> logits;
    RETURN_IF_ERROR(run.tf->Forward(rows, &logits));
  }
  // Decode: `n_seq` sequences, one row each per step; with two micro-batches the first half of
  // the sequences and the second run ping-pong (Transformer::ForwardMicroBatches).
  std::vector<std::unique_ptr<KvCache>> caches, single;
  for (int64_t q = 0; q < o.n_seq; ++q) caches.push_back(std::make_unique<KvCache>(c, opts.n_ctx));
  single.push_back(std::make_unique<KvCache>(c, opts.n_ctx));
  BenchResult r;
  r.split = o.micro_batches == 2 && o.n_seq >= 2 ? static_cast<size_t>(o.n_seq / 2) : 0;
  for (int64_t rep = 0; rep < o.reps; ++rep) {
    RETURN_IF_ERROR(RunOnce(run, &cache, caches, &single, &r));
  }
  const uint64_t rss = PeakRssBytes();
  nlohmann::json cluster_report;
  if (run.cluster != nullptr) {
    ASSIGN_OR_RETURN(cluster_report,
                     ClusterReport(args, *run.cluster, r.wire, o.n_decode * o.reps * o.n_seq,
                                   r.prompt_wire_bytes, o.n_prompt * o.reps));
  }
  const nlohmann::json* cluster = run.cluster != nullptr ? &cluster_report : nullptr;
  if (args.Has("json")) {
    PrintJson(o, r, *engine, opts.model_path, rss, cluster);
  } else {
    PrintText(o, r, *engine, opts.model_path, rss, cluster);
  }
  return absl::OkStatus();
}

}  // namespace

int RunBench(int argc, char** argv) {
  FlagSpec spec = {{"prompt-tokens", "decode-tokens", "repeat", "echo-port", "pings", "sequences",
                    "micro-batches"},
                   {"json"}};
  AddEngineFlags(&spec);
  AddClusterFlags(&spec);
  spec.usage = "moepool bench --model M.gguf [flags]";
  spec.summary =
      "measure prompt and decode speed and peak memory; with --workers also the cluster's costs";
  std::map<std::string, std::string>& help = spec.help;
  help["prompt-tokens"] = "N  tokens in the prompt pass (default 512)";
  help["decode-tokens"] = "N  decode steps of each run (default 128)";
  help["repeat"] = "N  runs; the best speed of them is reported (default 1)";
  help["echo-port"] =
      "N  with --workers: port of a TCP echo server on the first worker's host for the raw "
      "ping-pong comparison (default: an echo server started on this machine's loopback)";
  help["pings"] = "N  with --workers: round trips of the raw TCP ping-pong (default 2000)";
  help["sequences"] =
      "N  sequences decoded at once, one row each per step, 1..1024; above 1 one sequence alone "
      "is measured as well (default 1)";
  help["micro-batches"] =
      "N  1 or 2; with 2 the --sequences are decoded as two pipelined halves (default 1)";
  help["json"] = "print one JSON object instead of text";
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Bench(*args);
  return s.ok() ? 0 : PrintError(s);
}

}  // namespace moepool::cli
