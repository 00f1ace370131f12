// The moepool subcommands. Each takes the arguments after its name and returns the process
// exit code; errors are printed to stderr.
#ifndef MOEPOOL_CLI_COMMANDS_H_
#define MOEPOOL_CLI_COMMANDS_H_

#include <string>

namespace moepool::cli {

int RunEval(int argc, char** argv);
int RunRun(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunInspect(int argc, char** argv);
int RunSynth(int argc, char** argv);
int RunBench(int argc, char** argv);
int RunWorker(int argc, char** argv);
int RunPlan(int argc, char** argv);
int RunServe(int argc, char** argv);
int RunDemo(int argc, char** argv);

// Path of the bundled Mistral vocabulary (next to the working directory, the binary or the
// source tree).
std::string FindDefaultVocab();

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_COMMANDS_H_
