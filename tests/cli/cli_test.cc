// The moepool binary end to end: eval on the shared reference models, run / tokenize / inspect /
// bench on tiny-F16, and bad inputs (exit code, a message on stderr, nothing on stdout).
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/conformance_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::ReadReferenceCase;
using ::moepool::testing::ReferenceCase;
using ::moepool::testing::SharedTestdataPath;
using ::moepool::testing::TempDir;

using Result = ::moepool::testing::CommandResult;

// Runs `moepool ARGS` through the shell (arguments are quoted by the caller where needed).
Result Moepool(const std::string& args) { return ::moepool::testing::RunMoepool(args); }

std::string Quote(const std::string& s) { return "'" + s + "'"; }

std::string TinyF16() { return SharedTestdataPath("conformance/tiny-F16.gguf"); }
std::string PromptFile() { return SharedTestdataPath("conformance/p1.txt"); }

std::vector<float> ReadFloats(const std::string& path) {
  const std::string bytes = ReadFileOrDie(path);
  std::vector<float> v(bytes.size() / sizeof(float));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
  return v;
}

// Expects a failed command: non-zero exit, a "moepool: " message holding `needle` on stderr,
// nothing on stdout.
void ExpectFailure(const Result& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(r.out.empty()) << "stdout: " << r.out;
  EXPECT_NE(r.err.find("moepool: "), std::string::npos) << "stderr: " << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
}

// `moepool eval` with default flags meets the bars of ../shared/testdata/README.md on each
// shared model, both prompts pooled: median NMSE <= 1e-4 / 5e-3, top-1 >= 95% / 80% (F16 /
// quantized).
TEST(CliTest, EvalWritesReferenceTokensAndLogits) {
  struct Bar {
    const char* model;
    double max_median_nmse, min_top1;
  };
  for (const Bar& bar : {Bar{"tiny-F16", 1e-4, 0.95}, Bar{"tiny-Q8_0", 5e-3, 0.80},
                         Bar{"tiny-Q4_K_M", 5e-3, 0.80}}) {
    SCOPED_TRACE(bar.model);
    const std::string model = SharedTestdataPath(std::string("conformance/") + bar.model + ".gguf");
    REQUIRE_TESTDATA(model);
    std::vector<double> nmse;
    int agree = 0, rows = 0;
    for (const char* prompt : {"p1", "p2"}) {
      const ReferenceCase rc = ReadReferenceCase(bar.model, prompt);
      const std::string logits_path = TempDir() + "/eval.f32";
      const Result r =
          Moepool("eval --model " + Quote(model) + " --prompt-file " +
                  Quote(SharedTestdataPath(std::string("conformance/") + prompt + ".txt")) +
                  " --logits-out " + Quote(logits_path));
      ASSERT_EQ(r.exit_code, 0) << r.err;
      const auto j = nlohmann::json::parse(r.out);
      EXPECT_EQ(j.at("prompt_tokens").get<std::vector<int32_t>>(), rc.prompt_tokens);
      const std::vector<float> logits = ReadFloats(logits_path);
      ASSERT_EQ(logits.size(), rc.prompt_tokens.size() * rc.n_vocab);
      const std::vector<double> row_nmse = testing::RowNmse(logits, rc.logits, rc.n_vocab);
      nmse.insert(nmse.end(), row_nmse.begin(), row_nmse.end());
      agree += testing::Top1Agreement(logits, rc.logits, rc.n_vocab);
      rows += static_cast<int>(rc.prompt_tokens.size());
      std::remove(logits_path.c_str());
    }
    EXPECT_LE(testing::Median(nmse), bar.max_median_nmse);
    EXPECT_GE(agree, bar.min_top1 * rows);
  }
}

TEST(CliTest, RunGreedyJsonGivesReferenceTokens) {
  REQUIRE_TESTDATA(TinyF16());
  const ReferenceCase rc = ReadReferenceCase("tiny-F16", "p1");
  const Result r = Moepool("run --model " + Quote(TinyF16()) + " --prompt-file " +
                           Quote(PromptFile()) + " -n 8 --temperature 0 --ignore-eos --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const std::vector<int32_t> want(rc.greedy_tokens.begin(), rc.greedy_tokens.begin() + 8);
  EXPECT_EQ(j.at("tokens").get<std::vector<int32_t>>(), want);
  EXPECT_TRUE(j.at("text").is_string());
  EXPECT_FALSE(j.at("text").get<std::string>().empty());
  // Greedy needs no seed, so none is announced.
  EXPECT_EQ(r.err.find("seed"), std::string::npos) << r.err;
}

TEST(CliTest, RunWithSeedIsReproducible) {
  REQUIRE_TESTDATA(TinyF16());
  const std::string args = "run --model " + Quote(TinyF16()) +
                           " --prompt 'Once upon a time' -n 6 --ignore-eos --json --seed 5";
  const Result a = Moepool(args), b = Moepool(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(nlohmann::json::parse(a.out).at("tokens").size(), 6u);
}

// The vocabulary of synth and demo: $MOEPOOL_VOCAB first (an installed binary has no source
// tree; the images put it in BIN/../share/moepool/, which is also searched).
TEST(CliTest, SynthTakesTheVocabularyFromTheEnvironment) {
  const std::string out = ::moepool::testing::TempDir() + "/env-vocab.gguf";
  const Result bad = ::moepool::testing::RunMoepool("synth --shape tiny --type Q8_0 --out " + out,
                                                    "MOEPOOL_VOCAB=/nonexistent/vocab.gguf ");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("/nonexistent/vocab.gguf"), std::string::npos) << bad.err;
  const Result good = ::moepool::testing::RunMoepool(
      "synth --shape tiny --type Q8_0 --out " + out,
      "MOEPOOL_VOCAB=" + std::string(MOEPOOL_SOURCE_DIR) + "/deploy/vocab/mistral-vocab.gguf ");
  EXPECT_EQ(good.exit_code, 0) << good.err;
}

TEST(CliTest, TokenizePrintsIds) {
  REQUIRE_TESTDATA(TinyF16());
  const ReferenceCase rc = ReadReferenceCase("tiny-F16", "p1");
  Result r = Moepool("tokenize --model " + Quote(TinyF16()) + " --file " + Quote(PromptFile()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::istringstream in(r.out);
  std::vector<int32_t> ids;
  for (int32_t id; in >> id;) ids.push_back(id);
  EXPECT_EQ(ids, rc.prompt_tokens);
  r = Moepool("tokenize --model " + Quote(TinyF16()) + " --text 'Hello world' --no-bos");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "22557 1526\n");  // "▁Hello", "▁world" in the Mistral vocabulary
}

TEST(CliTest, InspectJsonHasTheHyperparameters) {
  REQUIRE_TESTDATA(TinyF16());
  const Result r = Moepool("inspect " + Quote(TinyF16()) + " --json --ctx 512");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("architecture"), "llama");
  EXPECT_EQ(j.at("n_vocab"), 32000);
  EXPECT_EQ(j.at("n_embd"), 256);
  EXPECT_EQ(j.at("n_layer"), 4);
  EXPECT_EQ(j.at("n_head"), 8);
  EXPECT_EQ(j.at("n_head_kv"), 2);
  EXPECT_EQ(j.at("head_dim"), 32);
  EXPECT_EQ(j.at("n_ff"), 768);
  EXPECT_EQ(j.at("n_expert"), 8);
  EXPECT_EQ(j.at("n_expert_used"), 2);
  EXPECT_EQ(j.at("n_ctx_train"), 4096);
  EXPECT_EQ(j.at("rope_base").get<double>(), 1e6);
  EXPECT_EQ(j.at("expert_layout"), "merged");
  EXPECT_EQ(j.at("ctx"), 512);
  // Weights: 8 experts x 3 matrices x 4 layers of 256 x 768 F16 values.
  EXPECT_EQ(j.at("expert_bytes").get<uint64_t>(), 8ull * 3 * 4 * 256 * 768 * 2);
  EXPECT_EQ(j.at("file_bytes").get<uint64_t>(), std::filesystem::file_size(TinyF16()));
  // The KV cache as the engine allocates it (half precision).
  auto model = Model::Load(TinyF16());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(j.at("kv_cache_bytes").get<uint64_t>(),
            KvCache((*model)->config(), 512).ReservedBytes());
}

TEST(CliTest, BenchJsonReportsSpeedsAndMemory) {
  REQUIRE_TESTDATA(TinyF16());
  for (const char* sizes :
       {"--prompt-tokens 16 --decode-tokens 4", "--prompt-tokens 3 --decode-tokens 2"}) {
    SCOPED_TRACE(sizes);
    const Result r =
        Moepool("bench --model " + Quote(TinyF16()) + " " + sizes + " --threads 2 --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_GT(j.at("prompt_tokens_per_s").get<double>(), 0.0);
    EXPECT_GT(j.at("decode_tokens_per_s").get<double>(), 0.0);
    // At least the bytes it had to read: the non-expert F16 weights touched on every pass.
    EXPECT_GT(j.at("peak_rss_bytes").get<uint64_t>(), 1ull << 20);
    EXPECT_EQ(j.at("threads"), 2);
    // The kernels the numbers came from: the fastest this CPU runs.
    EXPECT_EQ(j.at("cpu_kernels").get<std::string>(), KernelIsaName());
  }
}

// MOEPOOL_CPU_KERNELS picks the kernel path one machine runs (to compare them); the paths give
// the same logits on this k-quant-free F16 model only up to rounding, so only the choice and the
// refusals are checked here (the kernels' bits are tested in tests/engine/quant).
TEST(CliTest, CpuKernelsOverrideIsReportedAndBadValuesAreRefused) {
  REQUIRE_TESTDATA(TinyF16());
  const std::string bench =
      "bench --model " + Quote(TinyF16()) + " --prompt-tokens 4 --decode-tokens 2 --json";
  const Result scalar = ::moepool::testing::RunMoepool(bench, "MOEPOOL_CPU_KERNELS=scalar ");
  ASSERT_EQ(scalar.exit_code, 0) << scalar.err;
  EXPECT_EQ(nlohmann::json::parse(scalar.out).at("cpu_kernels"), "scalar");
  const Result bogus = ::moepool::testing::RunMoepool(bench, "MOEPOOL_CPU_KERNELS=avx9000 ");
  EXPECT_EQ(bogus.exit_code, 2);
  EXPECT_NE(bogus.err.find("unknown CPU kernels 'avx9000' (auto, avx512, avx2 or scalar)"),
            std::string::npos)
      << bogus.err;
  if (!CpuHasAvx512Vnni()) {
    const Result missing = ::moepool::testing::RunMoepool(bench, "MOEPOOL_CPU_KERNELS=avx512 ");
    EXPECT_EQ(missing.exit_code, 2);
    EXPECT_NE(missing.err.find("cannot run here"), std::string::npos) << missing.err;
  }
}

// MOEPOOL_PREFETCH_BYTES tunes how far ahead the kernels ask for the weights: every distance
// gives the same logits bit for bit (a prefetch never changes a value); a bad one is refused
// before anything runs.
TEST(CliTest, PrefetchDistanceKeepsTheBitsAndBadValuesAreRefused) {
  const std::string model = SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(model);
  const std::string logits_path = TempDir() + "/prefetch.f32";
  auto eval = [&](const std::string& bytes) {
    return ::moepool::testing::RunMoepool(
        "eval --model " + Quote(model) + " --prompt-file " +
            Quote(SharedTestdataPath("conformance/p1.txt")) + " --logits-out " + Quote(logits_path),
        bytes.empty() ? "" : "MOEPOOL_PREFETCH_BYTES=" + bytes + " ");
  };
  const Result plain = eval("");
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  const std::string want = ReadFileOrDie(logits_path);
  ASSERT_FALSE(want.empty());
  for (const char* bytes : {"0", "64", "65536"}) {
    std::remove(logits_path.c_str());
    const Result r = eval(bytes);
    ASSERT_EQ(r.exit_code, 0) << bytes << r.err;
    EXPECT_TRUE(ReadFileOrDie(logits_path) == want) << bytes;
  }
  for (const char* bad : {"-1", "65537", "4k", "''"}) {
    const Result r = eval(bad);
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_NE(r.err.find("MOEPOOL_PREFETCH_BYTES: "), std::string::npos) << bad << r.err;
    EXPECT_NE(r.err.find("is not a number of bytes from 0 to 65536"), std::string::npos) << r.err;
  }
  std::remove(logits_path.c_str());
}

TEST(CliTest, BenchBatchDecodesSeveralSequencesAtOnce) {
  REQUIRE_TESTDATA(TinyF16());
  const Result r =
      Moepool("bench --model " + Quote(TinyF16()) +
              " --prompt-tokens 8 --decode-tokens 20 --sequences 4 --threads 1 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("decode_sequences"), 4);
  EXPECT_GT(j.at("decode_single_sequence_tokens_per_s").get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(j.at("decode_vs_single_sequence").get<double>(),
                   j.at("decode_tokens_per_s").get<double>() /
                       j.at("decode_single_sequence_tokens_per_s").get<double>());
  ExpectFailure(Moepool("bench --model " + Quote(TinyF16()) + " --sequences 0"), "--sequences");
}

TEST(CliTest, MissingModelFileFails) {
  const std::string missing = TempDir() + "/no-such-model.gguf";
  ExpectFailure(Moepool("eval --model " + Quote(missing) + " --prompt hi --logits-out " +
                        Quote(TempDir() + "/x.f32")),
                missing);
  ExpectFailure(Moepool("run --model " + Quote(missing) + " --prompt hi"), missing);
  ExpectFailure(Moepool("inspect " + Quote(missing)), missing);
  ExpectFailure(Moepool("tokenize --model " + Quote(missing) + " --text hi"), missing);
  ExpectFailure(Moepool("bench --model " + Quote(missing) + " --json"), missing);
}

TEST(CliTest, CorruptModelFileFails) {
  REQUIRE_TESTDATA(TinyF16());
  const std::string bytes = ReadFileOrDie(TinyF16());
  const std::string corrupt = TempDir() + "/truncated.gguf";
  for (size_t keep : {bytes.size() / 2, size_t{1000}, size_t{3}}) {
    SCOPED_TRACE(keep);
    std::ofstream(corrupt, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(keep));
    ExpectFailure(Moepool("inspect " + Quote(corrupt)), corrupt);
    ExpectFailure(Moepool("run --model " + Quote(corrupt) + " --prompt hi -n 2"), corrupt);
  }
  std::remove(corrupt.c_str());
}

TEST(CliTest, UnknownFlagOrCommandFails) {
  ExpectFailure(Moepool("run --bogus 3"), "unknown flag --bogus");
  ExpectFailure(Moepool("inspect --temperature 0 x.gguf"), "unknown flag --temperature");
  ExpectFailure(Moepool("run --model"), "--model needs a value");
  ExpectFailure(Moepool("frobnicate"), "unknown command 'frobnicate'");
  // The MoE residual is Mixtral's and only that: the old switch is gone from every command.
  for (const char* command : {"eval", "run", "serve", "bench"}) {
    ExpectFailure(Moepool(std::string(command) + " --model m.gguf --moe-residual standard"),
                  "unknown flag --moe-residual");
  }
  const Result none = Moepool("");
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.err.find("usage"), std::string::npos);
}

TEST(CliTest, ServeRejectsBadOptionValuesBeforeLoading) {
  REQUIRE_TESTDATA(TinyF16());
  const std::string serve = "serve --listen 127.0.0.1:0 --model " + Quote(TinyF16());
  ExpectFailure(Moepool(serve + " --prefix-cache maybe"), "--prefix-cache must be on or off");
  ExpectFailure(Moepool(serve + " --micro-batches 3"), "--micro-batches must be 1 or 2");
  ExpectFailure(Moepool(serve + " --kv-block-size 0"), "--kv-block-size: 1..4096");
  ExpectFailure(Moepool(serve + " --preload maybe"), "--preload must be on or off");
}

TEST(CliTest, PromptLongerThanContextFails) {
  REQUIRE_TESTDATA(TinyF16());
  const std::string logits_path = TempDir() + "/too-long.f32";
  ExpectFailure(Moepool("eval --model " + Quote(TinyF16()) + " --prompt-file " +
                        Quote(PromptFile()) + " --ctx 8 --logits-out " + Quote(logits_path)),
                "context of 8 tokens");
  EXPECT_FALSE(std::filesystem::exists(logits_path));
  ExpectFailure(Moepool("run --model " + Quote(TinyF16()) + " --prompt-file " +
                        Quote(PromptFile()) + " --ctx 8 -n 4 --temperature 0"),
                "context of 8 tokens");
}

TEST(CliTest, MissingRequiredFlagsFail) {
  REQUIRE_TESTDATA(TinyF16());
  ExpectFailure(Moepool("eval --prompt hi --logits-out x.f32"), "--model is required");
  ExpectFailure(Moepool("eval --model " + Quote(TinyF16()) + " --prompt hi"),
                "--logits-out is required");
  ExpectFailure(Moepool("run --model " + Quote(TinyF16())), "--prompt-file (or --prompt)");
  ExpectFailure(Moepool("run --model " + Quote(TinyF16()) + " --prompt hi --temperature -1"),
                "temperature");
  ExpectFailure(Moepool("run --model " + Quote(TinyF16()) + " --prompt hi -n x"), "not an integer");
}

}  // namespace
}  // namespace moepool
