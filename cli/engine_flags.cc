#include "cli/engine_flags.h"

namespace moepool::cli {

void AddEngineFlags(FlagSpec* spec) {
  for (const char* f : {"model", "threads", "moe-residual"}) spec->valued.insert(f);
  spec->help["model"] = "PATH  the GGUF model file (required)";
  spec->help["threads"] = "N  compute threads (default all cores)";
  spec->help["moe-residual"] =
      "reference|standard  what the MoE output is added to: reference matches the reference "
      "implementation's logits, standard is the textbook Mixtral residual (default reference)";
}

}  // namespace moepool::cli
