// moepool eval | run | tokenize.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cli/args.h"
#include "cli/cluster_flags.h"
#include "cli/commands.h"
#include "cli/engine_flags.h"
#include "engine/engine.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace moepool::cli {
namespace {

absl::StatusOr<LoadedEngine> LoadEngine(const Args& args) {
  EngineOptions opts;
  opts.model_path = args.Get("model");
  if (opts.model_path.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  ASSIGN_OR_RETURN(opts.n_ctx, args.GetInt("ctx", 0));
  opts.threads = static_cast<int>(threads);
  return LoadEngineForArgs(args, opts);
}

absl::StatusOr<std::string> PromptText(const Args& args) {
  if (args.Has("prompt-file")) return ReadFileToString(args.Get("prompt-file"));
  if (args.Has("prompt")) return args.Get("prompt");
  return absl::InvalidArgumentError("--prompt-file (or --prompt) is required");
}

absl::Status Eval(const Args& args) {
  ASSIGN_OR_RETURN(LoadedEngine loaded, LoadEngine(args));
  Engine* engine = loaded.engine.get();
  ASSIGN_OR_RETURN(std::string text, PromptText(args));
  const std::string out_path = args.Get("logits-out");
  if (out_path.empty()) return absl::InvalidArgumentError("--logits-out is required");
  const std::vector<int32_t> tokens = engine->Tokenize(text);
  KvCache cache(engine->config(), engine->n_ctx());
  ASSIGN_OR_RETURN(std::vector<float> logits, engine->EvalPrompt(tokens, &cache, true));
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(logits.data()),
            static_cast<std::streamsize>(logits.size() * sizeof(float)));
  if (!out) return absl::InternalError(out_path + ": write failed");
  nlohmann::json j;
  j["prompt_tokens"] = tokens;
  std::cout << j.dump() << std::endl;
  return absl::OkStatus();
}

absl::Status Run(const Args& args) {
  ASSIGN_OR_RETURN(LoadedEngine loaded, LoadEngine(args));
  Engine* engine = loaded.engine.get();
  ASSIGN_OR_RETURN(std::string text, PromptText(args));
  Engine::GenerateOptions g;
  ASSIGN_OR_RETURN(int64_t n, args.GetInt("n", 128));
  g.max_tokens = static_cast<int>(n);
  g.ignore_eos = args.Has("ignore-eos");
  ASSIGN_OR_RETURN(double temp, args.GetDouble("temperature", 0.8));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 40));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 0.95));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.05));
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", -1));
  g.sampling.temperature = static_cast<float>(temp);
  g.sampling.top_k = static_cast<int>(top_k);
  g.sampling.top_p = static_cast<float>(top_p);
  g.sampling.min_p = static_cast<float>(min_p);
  if (seed < 0) {
    seed = static_cast<int64_t>(std::random_device{}() & 0x7fffffff);
    if (temp > 0) std::fprintf(stderr, "moepool: seed %lld\n", static_cast<long long>(seed));
  }
  g.sampling.seed = static_cast<uint64_t>(seed);
  const bool json = args.Has("json");
  const std::vector<int32_t> prompt = engine->Tokenize(text);
  StreamingDetokenizer detok(engine->tokenizer());
  std::string all_text;
  auto on_token = [&](int32_t id) {
    const std::string piece = detok.Push(id);
    all_text += piece;
    if (!json) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  ASSIGN_OR_RETURN(std::vector<int32_t> tokens, engine->Generate(prompt, g, on_token));
  const std::string tail = detok.Flush();
  all_text += tail;
  if (json) {
    nlohmann::json j;
    j["tokens"] = tokens;
    j["text"] = all_text;
    std::cout << j.dump() << std::endl;
  } else {
    std::fwrite(tail.data(), 1, tail.size(), stdout);
    std::fputc('\n', stdout);
  }
  return absl::OkStatus();
}

absl::Status Tokenize(const Args& args) {
  const std::string path = args.Get("model");
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(auto file, GgufFile::Open(path));
  ASSIGN_OR_RETURN(auto tok, Tokenizer::FromGguf(*file));
  std::string text;
  if (args.Has("file")) {
    ASSIGN_OR_RETURN(text, ReadFileToString(args.Get("file")));
  } else if (args.Has("text")) {
    text = args.Get("text");
  } else {
    return absl::InvalidArgumentError("--file (or --text) is required");
  }
  const auto ids = tok->Encode(text, !args.Has("no-bos") && tok->add_bos_default());
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(ids[i]);
  }
  std::cout << line << std::endl;
  return absl::OkStatus();
}

// The flags of run and eval (they accept the same ones), described for `command`: the flags
// only the other command reads say so.
FlagSpec EngineFlags(const std::string& command, std::string usage, std::string summary) {
  FlagSpec spec = {{"prompt-file", "prompt", "ctx", "logits-out", "n", "temperature", "top-k",
                    "top-p", "min-p", "seed"},
                   {"ignore-eos", "json"}};
  AddEngineFlags(&spec);
  AddClusterFlags(&spec);
  spec.usage = std::move(usage);
  spec.summary = std::move(summary);
  std::map<std::string, std::string>& help = spec.help;
  help["prompt-file"] = "PATH  file whose text is the prompt (required unless --prompt)";
  help["prompt"] = "TEXT  the prompt text itself (--prompt-file wins when both are given)";
  help["ctx"] =
      "N  context positions, prompt and generated tokens (default min(model context, 4096))";
  // "eval only: ..." on run's --help and the other way round.
  const std::string eval_only = command == "eval" ? "" : "eval only: ";
  const std::string run_only = command == "run" ? "" : "run only: ";
  help["logits-out"] =
      "PATH  " + eval_only +
      "file to write every position's logits to, n_tokens x n_vocab f32 (required)";
  help["n"] = "N  " + run_only + "most tokens to generate (default 128)";
  help["temperature"] = "X  " + run_only + "sampling temperature; 0 is greedy (default 0.8)";
  help["top-k"] =
      "N  " + run_only + "sample among the N most likely tokens; 0 turns it off (default 40)";
  help["top-p"] = "X  " + run_only +
                  "sample among the most likely tokens whose probabilities add up to X; 1 turns "
                  "it off (default 0.95)";
  help["min-p"] = "X  " + run_only +
                  "drop tokens less likely than X times the most likely one; 0 turns it off "
                  "(default 0.05)";
  help["seed"] = "N  " + run_only +
                 "sampling seed; a negative one picks a random seed, printed on stderr when "
                 "sampling (default -1)";
  help["ignore-eos"] = run_only + "keep generating after the end-of-sequence token, up to --n";
  help["json"] =
      run_only + "print {\"tokens\": [...], \"text\": \"...\"} instead of streaming the text";
  return spec;
}

}  // namespace

int RunEval(int argc, char** argv) {
  auto args = Args::Parse(
      argc, argv,
      EngineFlags(
          "eval", "moepool eval --model M.gguf --prompt-file P.txt --logits-out L.f32 [flags]",
          "evaluate a prompt in one batch and write every position's logits to --logits-out"));
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Eval(*args);
  return s.ok() ? 0 : PrintError(s);
}

int RunRun(int argc, char** argv) {
  auto args =
      Args::Parse(argc, argv,
                  EngineFlags("run", "moepool run --model M.gguf --prompt-file P.txt [flags]",
                              "generate text after a prompt and stream it to stdout"));
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Run(*args);
  return s.ok() ? 0 : PrintError(s);
}

int RunTokenize(int argc, char** argv) {
  FlagSpec spec = {{"model", "file", "text"}, {"no-bos"}};
  spec.usage = "moepool tokenize --model M.gguf --file P.txt [flags]";
  spec.summary = "print the token ids of a text, separated by spaces, with the model's tokenizer";
  spec.help = {
      {"model", "PATH  the GGUF file whose tokenizer is used (required)"},
      {"file", "PATH  file holding the text (required unless --text)"},
      {"text", "TEXT  the text itself (--file wins when both are given)"},
      {"no-bos", "do not add the beginning-of-sequence token the model asks for"},
  };
  auto args = Args::Parse(argc, argv, spec);
  if (!args.ok()) return PrintError(args.status());
  const absl::Status s = Tokenize(*args);
  return s.ok() ? 0 : PrintError(s);
}

}  // namespace moepool::cli
