#include "coordinator/console.h"

namespace moepool {

const EmbeddedFile* FindConsoleFile(std::string_view url) {
  for (int i = 0; i < kEmbeddedFileCount; ++i) {
    if (url == kEmbeddedFiles[i].url) return &kEmbeddedFiles[i];
  }
  return nullptr;
}

}  // namespace moepool
