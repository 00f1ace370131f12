// What the cluster fuzz targets (cluster_control_fuzzer, shard_cache_fuzzer) share: a synthetic
// model written once per process, a quiet stderr for the code under test, and a failure report
// that survives it.
//
// Threading: call from one thread (the fuzz target's). Files: the model lies in a directory of
// its own under $TMPDIR (else /tmp), removed when the process exits normally.
#ifndef MOEPOOL_TESTS_FUZZ_FUZZ_MODEL_UTIL_H_
#define MOEPOOL_TESTS_FUZZ_FUZZ_MODEL_UTIL_H_

#include <string>

#include "engine/synth.h"

namespace moepool::testing {

// A directory of this process under $TMPDIR (else /tmp), created on first use and removed with
// everything in it at exit. Aborts if it cannot be created.
const std::string& FuzzTempDir();

// Synthesizes `shape` in `type` (engine/synth.h, the bundled vocabulary, per-expert layout when
// asked) into FuzzTempDir()/`file` unless done already in this process; returns the path.
// Aborts on failure: a fuzz target cannot run without its model.
std::string SynthFuzzModel(const SynthShape& shape, const std::string& type, bool per_expert,
                           const std::string& file);

// From here on, what the code under test prints on stderr (a line per cluster state change)
// goes to /dev/null, unless $MOEPOOL_FUZZ_VERBOSE is set. The fuzzer's own messages use
// FuzzFail; sanitizer and libFuzzer reports are written to the file descriptor, not the stream,
// and are not affected.
void QuietStderr();

// With $MOEPOOL_FUZZ_VERBOSE set: prints "`target`: `what`" on the real stderr (a trace of what
// an input does, for reading a finding). Otherwise nothing.
bool FuzzVerbose();
void FuzzTrace(const char* target, const std::string& what);

// Prints "`target`: `what`" on the real stderr and aborts.
[[noreturn]] void FuzzFail(const char* target, const std::string& what);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_FUZZ_FUZZ_MODEL_UTIL_H_
