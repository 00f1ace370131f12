// moepool_expert_bench [--model MINI.gguf | --model -] [--device N] [--tokens N] [--layers N]
//                      [--mixtral-cpu on|off] [--mixtral-decode-layers N (0: skip)]
// Prints the JSON of RunExpertBench (bench/expert_bench.h); progress and errors on stderr.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "bench/expert_bench.h"

int main(int argc, char** argv) {
  moepool::ExpertBenchOptions options;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const char* value = argv[i + 1];
    if (flag == "--model") {
      options.mini_model_path = value;
    } else if (flag == "--device") {
      options.device = std::atoi(value);
    } else if (flag == "--tokens") {
      options.decode_tokens = std::atoi(value);
    } else if (flag == "--layers") {
      options.mixtral_layers = std::atoi(value);
    } else if (flag == "--mixtral-decode-layers") {
      options.mixtral_decode_layers = std::atoi(value);
    } else if (flag == "--mixtral-cpu") {
      options.mixtral_cpu = std::strcmp(value, "off") != 0;
    } else {
      std::cerr << "unknown flag " << flag << "\n";
      return 2;
    }
  }
  auto json = moepool::RunExpertBench(options);
  if (!json.ok()) {
    std::cerr << "moepool_expert_bench: " << json.status() << "\n";
    return 1;
  }
  std::fputs(json->c_str(), stdout);
  return 0;
}
