// cli/args.cc: flag parsing and the --help text, and every command's --help through the binary.
#include "cli/args.h"

#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool::cli {
namespace {

absl::StatusOr<Args> ParseWords(std::vector<std::string> words, const FlagSpec& spec) {
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  return Args::Parse(static_cast<int>(argv.size()), argv.data(), spec);
}

FlagSpec Spec() {
  FlagSpec spec = {{"parallel", "prompt"}, {"json"}};
  spec.usage = "moepool thing [flags]";
  spec.summary = "does a thing";
  spec.help = {{"parallel", "N  sequences at once (default 4)"}, {"json", "print JSON"}};
  return spec;
}

TEST(ArgsTest, ValuesBooleansAndErrors) {
  absl::StatusOr<Args> a = ParseWords({"--parallel", "8", "--json", "--prompt=hi", "x"}, Spec());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->GetInt("parallel", 4).value(), 8);
  EXPECT_TRUE(a->Has("json"));
  EXPECT_EQ(a->Get("prompt"), "hi");
  EXPECT_EQ(a->positional(), std::vector<std::string>{"x"});
  EXPECT_EQ(ParseWords({"--bogus"}, Spec()).status().message(), "unknown flag --bogus");
  EXPECT_EQ(ParseWords({"--parallel"}, Spec()).status().message(), "--parallel needs a value");
  EXPECT_EQ(ParseWords({"--json=1"}, Spec()).status().message(), "--json takes no value");
}

// --help and -h print the help and return HelpRequest (exit 0 through PrintError); as another
// flag's value they are just that value.
TEST(ArgsTest, HelpIsAFlagNotAValue) {
  ::testing::internal::CaptureStdout();
  const absl::Status help = ParseWords({"--parallel", "2", "--help"}, Spec()).status();
  const std::string printed = ::testing::internal::GetCapturedStdout();
  EXPECT_TRUE(IsHelpRequest(help)) << help;
  EXPECT_EQ(PrintError(help), 0);
  EXPECT_EQ(printed, HelpText(Spec()));
  ::testing::internal::CaptureStdout();
  EXPECT_TRUE(IsHelpRequest(ParseWords({"-h"}, Spec()).status()));
  ::testing::internal::GetCapturedStdout();
  absl::StatusOr<Args> value = ParseWords({"--prompt", "--help"}, Spec());
  ASSERT_TRUE(value.ok()) << value.status();
  EXPECT_EQ(value->Get("prompt"), "--help");
  EXPECT_EQ(PrintError(absl::InvalidArgumentError("x")), 1);
}

TEST(ArgsTest, HelpTextPutsThePlaceholderBesideTheFlagAndWraps) {
  FlagSpec spec = Spec();
  spec.help["prompt"] =
      "TEXT  " + std::string(30, 'a') + " " + std::string(30, 'b') + " " + std::string(30, 'c');
  const std::string text = HelpText(spec);
  EXPECT_EQ(text.rfind("usage: moepool thing [flags]\ndoes a thing\n\nflags:\n", 0), 0u) << text;
  EXPECT_NE(text.find("  --json                      print JSON\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  --parallel N                sequences at once (default 4)\n"),
            std::string::npos)
      << text;
  // The long line wraps under the description column, within 100 columns.
  EXPECT_NE(text.find("  --prompt TEXT               " + std::string(30, 'a') + " " +
                      std::string(30, 'b') + "\n" + std::string(30, ' ') + std::string(30, 'c')),
            std::string::npos)
      << text;
  spec.help.erase("json");
  EXPECT_NE(HelpText(spec).find("--json                      (no description)"), std::string::npos);
}

// Every command of the binary: --help exits 0 with its usage first, every flag described and no
// line over 100 columns.
TEST(ArgsTest, EveryCommandDescribesEveryFlag) {
  for (const char* command : {"demo", "run", "eval", "tokenize", "inspect", "synth", "bench",
                              "worker", "plan", "serve"}) {
    SCOPED_TRACE(command);
    const ::moepool::testing::CommandResult r =
        ::moepool::testing::RunMoepool(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out.rfind(std::string("usage: moepool ") + command, 0), 0u) << r.out;
    EXPECT_EQ(r.out.find("(no description)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\nflags:\n  --"), std::string::npos) << r.out;
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);) EXPECT_LE(line.size(), 100u) << line;
  }
}

}  // namespace
}  // namespace moepool::cli
