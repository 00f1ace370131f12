// Minimal command-line parsing for the moepool subcommands: `--name value`, `--name=value`,
// boolean `--flag`, and positional arguments. Each command declares its flags, so a typo is an
// error rather than silently ignored.
#ifndef MOEPOOL_CLI_ARGS_H_
#define MOEPOOL_CLI_ARGS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moepool::cli {

struct FlagSpec {
  std::set<std::string> valued;   // flags that take a value
  std::set<std::string> boolean;  // flags without a value
  // What --help prints: the synopsis ("moepool serve --model M.gguf [flags]"), one sentence on
  // what the command does, and one line per flag. A valued flag's line starts with its value's
  // placeholder and two spaces ("N  sequences generated at once (default 4)"); a boolean flag's
  // is just the meaning. Every flag in valued and boolean should have one.
  std::string usage;
  std::string summary;
  std::map<std::string, std::string> help;
};

class Args {
 public:
  // --help or -h as a flag (not as another flag's value): prints HelpText(spec) to stdout and
  // returns HelpRequest().
  static absl::StatusOr<Args> Parse(int argc, char** argv, const FlagSpec& spec);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
};

absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// The --help text of a command: usage, summary, then its flags in name order, each with its help
// line wrapped to 100 columns ("(no description)" where the spec has none).
std::string HelpText(const FlagSpec& spec);
// The status Parse returns after printing the help (the command then exits 0), and its test.
absl::Status HelpRequest();
bool IsHelpRequest(const absl::Status& status);

// Prints "PREFIX: message" to stderr and returns the exit code 1; for a HelpRequest() prints
// nothing and returns 0.
int PrintError(const absl::Status& status, const char* prefix = "moepool");

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_ARGS_H_
