#include "tests/fuzz/fuzz_model_util.h"

#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>

#include "google/protobuf/stubs/logging.h"

namespace moepool::testing {
namespace {

FILE* real_stderr = stderr;
const std::string* temp_dir = nullptr;  // once created

void RemoveTempDir() {
  if (temp_dir == nullptr) return;
  std::error_code ec;
  std::filesystem::remove_all(*temp_dir, ec);
}

}  // namespace

const std::string& FuzzTempDir() {
  if (temp_dir == nullptr) {
    const char* t = std::getenv("TMPDIR");
    std::string pattern =
        std::string(t != nullptr && *t != '\0' ? t : "/tmp") + "/moepool-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) FuzzFail("fuzz", "cannot create " + pattern);
    temp_dir = new std::string(pattern);
    std::atexit(RemoveTempDir);
  }
  return *temp_dir;
}

std::string SynthFuzzModel(const SynthShape& shape, const std::string& type, bool per_expert,
                           const std::string& file) {
  static auto* done = new std::map<std::string, std::string>;
  const auto it = done->find(file);
  if (it != done->end()) return it->second;
  SynthOptions o;
  o.shape = shape;
  o.type = type;
  o.seed = 7;
  o.vocab_path = std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath;
  o.per_expert_layout = per_expert;
  o.out_path = FuzzTempDir() + "/" + file;
  const absl::Status s = SynthesizeModel(o);
  if (!s.ok()) FuzzFail("fuzz", "cannot synthesize the model: " + s.ToString());
  return done->emplace(file, o.out_path).first->second;
}

bool FuzzVerbose() {
  static const bool verbose = [] {
    const char* v = std::getenv("MOEPOOL_FUZZ_VERBOSE");
    return v != nullptr && *v != '\0';
  }();
  return verbose;
}

void QuietStderr() {
  // Hostile strings are not UTF-8; protobuf would log each one.
  google::protobuf::SetLogHandler(nullptr);
  if (FuzzVerbose()) return;
  if (FILE* null = std::fopen("/dev/null", "w"); null != nullptr) stderr = null;
}

void FuzzTrace(const char* target, const std::string& what) {
  if (FuzzVerbose()) std::fprintf(real_stderr, "%s: %s\n", target, what.c_str());
}

void FuzzFail(const char* target, const std::string& what) {
  std::fprintf(real_stderr, "%s: %s\n", target, what.c_str());
  std::fflush(real_stderr);
  RemoveTempDir();  // abort skips atexit; libFuzzer keeps the input itself
  std::abort();
}

}  // namespace moepool::testing
