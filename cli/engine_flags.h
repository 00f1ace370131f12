// The flags every command that loads and runs the whole model shares (`serve`, `run`, `eval`,
// `bench`): --model and --threads, with their --help lines.
#ifndef MOEPOOL_CLI_ENGINE_FLAGS_H_
#define MOEPOOL_CLI_ENGINE_FLAGS_H_

#include "cli/args.h"

namespace moepool::cli {

// Adds the two to the valued flags of `spec`, with their help lines.
void AddEngineFlags(FlagSpec* spec);

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_ENGINE_FLAGS_H_
