#include "cli/args.h"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moepool::cli {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, const FlagSpec& spec) {
  Args args;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    const bool long_flag = a.size() > 2 && a.rfind("--", 0) == 0;
    const bool short_flag =
        a.size() == 2 && a[0] == '-' && std::isalpha(static_cast<unsigned char>(a[1]));
    if (long_flag || short_flag) {
      std::string name = a.substr(long_flag ? 2 : 1);
      std::string value;
      bool has_value = false;
      const size_t eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      if ((name == "help" || name == "h") && !has_value && spec.boolean.count(name) == 0 &&
          spec.valued.count(name) == 0) {
        std::fputs(HelpText(spec).c_str(), stdout);
        return HelpRequest();
      }
      if (spec.boolean.count(name)) {
        if (has_value)
          return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
        args.values_[name].push_back("true");
      } else if (spec.valued.count(name)) {
        if (!has_value) {
          if (i + 1 >= argc)
            return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
          value = argv[++i];
        }
        args.values_[name].push_back(value);
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
      }
    } else {
      args.positional_.push_back(a);
    }
  }
  return args;
}

std::string Args::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::GetInt(const std::string& name, int64_t def) const {
  if (!Has(name)) return def;
  const std::string v = Get(name);
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": not an integer: '", v, "'"));
  }
  return static_cast<int64_t>(x);
}

absl::StatusOr<double> Args::GetDouble(const std::string& name, double def) const {
  if (!Has(name)) return def;
  const std::string v = Get(name);
  errno = 0;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": not a number: '", v, "'"));
  }
  return x;
}

std::string HelpText(const FlagSpec& spec) {
  std::string out = absl::StrCat("usage: ", spec.usage, "\n", spec.summary, "\n\nflags:\n");
  std::set<std::string> names = spec.valued;
  names.insert(spec.boolean.begin(), spec.boolean.end());
  constexpr size_t kColumn = 30, kWidth = 100;
  for (const std::string& name : names) {
    auto it = spec.help.find(name);
    std::string text = it == spec.help.end() ? "(no description)" : it->second;
    std::string head = absl::StrCat("  --", name);
    if (spec.valued.count(name) != 0) {
      // The placeholder goes beside the flag: "--parallel N".
      const size_t gap = text.find("  ");
      const std::string value = gap == std::string::npos ? "VALUE" : text.substr(0, gap);
      if (gap != std::string::npos) text = text.substr(gap + 2);
      absl::StrAppend(&head, " ", value);
    }
    std::string line = head.size() + 2 <= kColumn ? head + std::string(kColumn - head.size(), ' ')
                                                  : head + "\n" + std::string(kColumn, ' ');
    // Words of the description, wrapped under the description column.
    size_t col = line.size() - line.rfind('\n') - 1;
    if (line.find('\n') == std::string::npos) col = line.size();
    for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
      if (col > kColumn && col + 1 + word.size() > kWidth) {
        absl::StrAppend(&line, "\n", std::string(kColumn, ' '));
        col = kColumn;
      } else if (col > kColumn) {
        line += ' ';
        ++col;
      }
      absl::StrAppend(&line, word);
      col += word.size();
    }
    absl::StrAppend(&out, line, "\n");
  }
  return out;
}

absl::Status HelpRequest() { return absl::CancelledError("--help"); }

bool IsHelpRequest(const absl::Status& status) {
  return status.code() == absl::StatusCode::kCancelled && status.message() == "--help";
}

int PrintError(const absl::Status& status, const char* prefix) {
  if (IsHelpRequest(status)) return 0;
  std::fprintf(stderr, "%s: %s\n", prefix, std::string(status.message()).c_str());
  return 1;
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace moepool::cli
