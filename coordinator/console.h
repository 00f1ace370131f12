// The web console (console/, docs/console.md): its page, script and style sheet and uPlot's,
// embedded in the binary at build time (cmake/embed_files.cmake), so `moepool serve` answers
// GET / from the build tree and offline. The page itself is public; it asks for the API key and
// sends it on its /v1 calls.
//
// Threading: the table is constant data.
#ifndef MOEPOOL_COORDINATOR_CONSOLE_H_
#define MOEPOOL_COORDINATOR_CONSOLE_H_

#include <cstddef>
#include <string_view>

namespace moepool {

struct EmbeddedFile {
  const char* url;           // "/", "/console/app.js", ...
  const char* content_type;  // "text/html; charset=utf-8", ...
  const unsigned char* data;
  size_t size;
};

// Generated into the build tree (console_files.cc).
extern const EmbeddedFile kEmbeddedFiles[];
extern const int kEmbeddedFileCount;

// The console file served at `url`, or nullptr.
const EmbeddedFile* FindConsoleFile(std::string_view url);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_CONSOLE_H_
