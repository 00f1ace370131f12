// moepool: pooled Mixtral inference. See README.md for the commands.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cli/commands.h"
#include "engine/quant/types.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

constexpr Command kCommands[] = {
    {"demo", moepool::cli::RunDemo, "synthesize a demo model, start two workers and serve it"},
    {"run", moepool::cli::RunRun, "generate text from a prompt"},
    {"eval", moepool::cli::RunEval, "evaluate a prompt and write every position's logits"},
    {"tokenize", moepool::cli::RunTokenize, "print the token ids of a text"},
    {"inspect", moepool::cli::RunInspect, "print a model's hyperparameters, types and memory"},
    {"synth", moepool::cli::RunSynth, "write a Mixtral-architecture GGUF with random weights"},
    {"bench", moepool::cli::RunBench, "measure prompt and decode speed"},
    {"worker", moepool::cli::RunWorker, "serve some experts of a model to a coordinator"},
    {"plan", moepool::cli::RunPlan, "place the coordinator and the experts on machines"},
    {"serve", moepool::cli::RunServe, "serve the OpenAI-compatible HTTP API"},
};

void Usage(FILE* out) {
  std::fprintf(out, "usage: moepool <command> [flags]\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.help);
  std::fprintf(out,
               "\nenvironment:\n  MOEPOOL_CPU_KERNELS  auto|avx512|avx2|scalar: the CPU kernels "
               "to run (default auto, the fastest this CPU has)\n"
               "  MOEPOOL_PREFETCH_BYTES  0..65536: how far ahead the CPU kernels ask for the "
               "weights they stream (default %zu; 0 none)\n",
               moepool::kDefaultPrefetchBytes);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    Usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (const char* kernels = std::getenv("MOEPOOL_CPU_KERNELS"); kernels != nullptr) {
    if (const absl::Status s = moepool::SetCpuKernels(kernels); !s.ok()) {
      std::fprintf(stderr, "moepool: MOEPOOL_CPU_KERNELS: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  if (const char* bytes = std::getenv("MOEPOOL_PREFETCH_BYTES"); bytes != nullptr) {
    if (const auto parsed = moepool::ParsePrefetchBytes(bytes); !parsed.ok()) {
      std::fprintf(stderr, "moepool: MOEPOOL_PREFETCH_BYTES: %s\n",
                   std::string(parsed.status().message()).c_str());
      return 2;
    }
  }
  for (const auto& c : kCommands) {
    if (std::strcmp(argv[1], c.name) == 0) return c.run(argc - 2, argv + 2);
  }
  std::fprintf(stderr, "moepool: unknown command '%s'\n", argv[1]);
  Usage(stderr);
  return 2;
}
