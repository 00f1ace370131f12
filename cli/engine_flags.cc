#include "cli/engine_flags.h"

namespace moepool::cli {

void AddEngineFlags(FlagSpec* spec) {
  for (const char* f : {"model", "threads"}) spec->valued.insert(f);
  spec->help["model"] = "PATH  the GGUF model file (required)";
  spec->help["threads"] = "N  compute threads (default all cores)";
}

}  // namespace moepool::cli
