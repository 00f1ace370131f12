// moepool inspect | synth.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>

#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/status_macros.h"
#include "engine/synth.h"
#include "nlohmann/json.hpp"

namespace moepool::cli {
namespace {

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return absl::StrFormat("%.2f %s", b, units[u]);
}

absl::Status Inspect(const Args& args) {
  if (args.positional().size() != 1) {
    return absl::InvalidArgumentError("usage: moepool inspect MODEL.gguf [--json] [--ctx N]");
  }
  ASSIGN_OR_RETURN(auto model, Model::Load(args.positional()[0]));
  ASSIGN_OR_RETURN(int64_t ctx, args.GetInt("ctx", 0));
  const ModelConfig& c = model->config();
  if (ctx <= 0) ctx = std::min<int64_t>(c.n_ctx_train, 4096);
  std::map<std::string, int> type_counts;
  for (const auto& t : model->file().tensors()) ++type_counts[GetTypeTraits(t.type).name];
  // K and V, half precision, as KvCache reserves them.
  const uint64_t kv_bytes = 2ull * c.n_layer * ctx * c.kv_dim() * sizeof(uint16_t);
  const uint64_t expert = model->ExpertBytes();
  const uint64_t non_expert = model->NonExpertBytes();
  nlohmann::json j;
  j["path"] = model->file().path();
  j["name"] = c.name;
  j["gguf_version"] = model->file().version();
  j["architecture"] = c.architecture;
  j["n_vocab"] = c.n_vocab;
  j["n_embd"] = c.n_embd;
  j["n_layer"] = c.n_layer;
  j["n_head"] = c.n_head;
  j["n_head_kv"] = c.n_head_kv;
  j["head_dim"] = c.head_dim;
  j["n_rot"] = c.n_rot;
  j["n_ff"] = c.n_ff;
  j["n_expert"] = c.n_expert;
  j["n_expert_used"] = c.n_expert_used;
  j["n_ctx_train"] = c.n_ctx_train;
  j["rope_base"] = c.rope_base;
  j["rms_eps"] = c.rms_eps;
  j["expert_layout"] = model->per_expert_layout() ? "per-expert" : "merged";
  j["tensor_types"] = type_counts;
  j["file_bytes"] = model->file().file_size();
  j["expert_bytes"] = expert;
  j["non_expert_bytes"] = non_expert;
  j["ctx"] = ctx;
  j["kv_cache_bytes"] = kv_bytes;
  j["memory_bytes"] = expert + non_expert + kv_bytes;
  if (args.Has("json")) {
    std::cout << j.dump() << std::endl;
    return absl::OkStatus();
  }
  std::cout << absl::StrFormat(
      "%s (%s, GGUF v%u, %s experts)\n"
      "  vocab %d, embd %d, layers %d, heads %d (kv %d, dim %d, rope %d, base %g), ff %d\n"
      "  experts %d (top-%d), trained context %d, rms eps %g\n",
      model->file().path(), c.name, model->file().version(),
      model->per_expert_layout() ? "per-expert" : "merged", c.n_vocab, c.n_embd, c.n_layer,
      c.n_head, c.n_head_kv, c.head_dim, c.n_rot, c.rope_base, c.n_ff, c.n_expert, c.n_expert_used,
      c.n_ctx_train, c.rms_eps);
  std::cout << "  tensor types:";
  for (const auto& [t, n] : type_counts) std::cout << " " << t << " x" << n;
  std::cout << "\n"
            << absl::StrFormat(
                   "  weights: experts %s, non-expert %s (file %s)\n"
                   "  KV cache at %d tokens: %s (f16)\n  memory needed: %s\n",
                   HumanBytes(expert), HumanBytes(non_expert),
                   HumanBytes(model->file().file_size()), ctx, HumanBytes(kv_bytes),
                   HumanBytes(expert + non_expert + kv_bytes));
  return absl::OkStatus();
}

absl::Status Synth(const Args& args) {
  SynthOptions o;
  o.out_path = args.Get("out");
  if (o.out_path.empty()) return absl::InvalidArgumentError("--out is required");
  ASSIGN_OR_RETURN(o.shape, SynthShapeByName(args.Get("shape", "tiny")));
  o.type = args.Get("type", "Q4_K_M");
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 1));
  o.seed = static_cast<uint64_t>(seed);
  o.vocab_path = args.Has("vocab") ? args.Get("vocab") : FindDefaultVocab();
  const std::string layout = args.Get("expert-layout", "merged");
  if (layout != "merged" && layout != "per-expert") {
    return absl::InvalidArgumentError("--expert-layout must be merged or per-expert");
  }
  o.per_expert_layout = layout == "per-expert";
  ASSIGN_OR_RETURN(const double skew, args.GetDouble("router-skew", 0));
  if (!(skew >= 0 && skew <= 1)) {
    return absl::InvalidArgumentError("--router-skew must be in [0, 1]");
  }
  o.router_skew = static_cast<float>(skew);
  const bool tty = isatty(2);
  RETURN_IF_ERROR(SynthesizeModel(o, [&](int done, int total) {
    if (tty) std::fprintf(stderr, "\rmoepool synth: %d/%d tensors", done, total);
  }));
  if (tty) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "moepool: wrote %s (%s %s, seed %llu, random weights)\n", o.out_path.c_str(),
               o.shape.name.c_str(), o.type.c_str(), static_cast<unsigned long long>(o.seed));
  return absl::OkStatus();
}

}  // namespace

// The vocabulary shipped with moepool: next to the working directory, the binary, or the source.
std::string FindDefaultVocab() {
  // $MOEPOOL_VOCAB, the source tree's path from the working directory or any directory above
  // the binary, an installed layout (BIN/../share/moepool/, as the container images have it),
  // then the source directory this binary was built from.
  // An explicit $MOEPOOL_VOCAB is used as it is (a wrong path is an error naming it).
  if (const char* env = std::getenv("MOEPOOL_VOCAB"); env != nullptr && *env != '\0') return env;
  std::vector<std::filesystem::path> candidates = {kDefaultSynthVocabPath};
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(exe.parent_path().parent_path() / "share/moepool" /
                         std::filesystem::path(kDefaultSynthVocabPath).filename());
    for (auto dir = exe.parent_path(); !dir.empty() && dir != dir.root_path();
         dir = dir.parent_path()) {
      candidates.push_back(dir / kDefaultSynthVocabPath);
    }
  }
  candidates.push_back(std::filesystem::path(MOEPOOL_SOURCE_DIR) / kDefaultSynthVocabPath);
  for (const auto& p : candidates) {
    if (std::filesystem::exists(p)) return p.string();
  }
  return kDefaultSynthVocabPath;
}

int RunInspect(int argc, char** argv) {
  FlagSpec spec = {{"ctx"}, {"json"}};
  spec.usage = "moepool inspect MODEL.gguf [flags]";
  spec.summary = "print a model's hyperparameters, tensor types and the memory it needs";
  spec.help = {
      {"ctx",
       "N  context positions the KV cache estimate is for (default min(model context, 4096))"},
      {"json", "print one JSON object instead of text"},
  };
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Inspect(*args);
  return s.ok() ? 0 : PrintError(s);
}

int RunSynth(int argc, char** argv) {
  FlagSpec spec = {{"out", "shape", "type", "seed", "vocab", "expert-layout", "router-skew"}, {}};
  spec.usage = "moepool synth --out F.gguf [flags]";
  spec.summary = "write a Mixtral-architecture GGUF with random weights and a real vocabulary";
  spec.help = {
      {"out", "PATH  the GGUF file to write (required)"},
      {"shape", "NAME  tiny, mini or mixtral-8x7b (the real model's shape) (default tiny)"},
      {"type",
       "NAME  a tensor type for every matrix (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, "
       "Q3_K, Q4_K, Q5_K, Q6_K) or a llama.cpp-style mix (Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_S, "
       "Q5_K_M) (default Q4_K_M)"},
      {"seed", "N  seed of the random weights (default 1)"},
      {"vocab",
       "PATH  GGUF file whose tokenizer is copied (default the bundled Mistral vocabulary, "
       "deploy/vocab/mistral-vocab.gguf)"},
      {"expert-layout",
       "merged|per-expert  experts in one tensor per layer and matrix, or one tensor each "
       "(default merged)"},
      {"router-skew",
       "S  in [0, 1]: routers that choose experts 0-2 more often and, per layer, pairs of experts "
       "from the two halves together (to test placement that follows routing; default 0)"},
  };
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Synth(*args);
  return s.ok() ? 0 : PrintError(s);
}

}  // namespace moepool::cli
