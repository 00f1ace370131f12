// Preloading and the residency watch (cli/weights_in_memory.h): weights evicted from the page
// cache are seen as gone, the watch says so once, and Preload brings them back.
#include "cli/weights_in_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool::cli {
namespace {

// Drops the model file's pages from this process and from the page cache (as the kernel does
// under memory pressure). False where the file system keeps them (tmpfs).
bool Evict(const Model& model) {
  const GgufFile& f = model.file();
  madvise(const_cast<uint8_t*>(f.base()), f.file_size(), MADV_DONTNEED);
  const int fd = open(f.path().c_str(), O_RDONLY);
  if (fd < 0) return false;
  fdatasync(fd);
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  close(fd);
  return model.ResidentWeightBytes() < (model.ExpertBytes() + model.NonExpertBytes()) / 2;
}

// Lines a watch said, and a wait for one holding `needle`.
class Said {
 public:
  ResidencyWatch::Sink sink() {
    return [this](const std::string& line) {
      absl::MutexLock lock(&mu_);
      lines_.push_back(line);
    };
  }
  bool WaitFor(const std::string& needle) {
    for (int i = 0; i < 500; ++i) {
      {
        absl::MutexLock lock(&mu_);
        for (const std::string& l : lines_) {
          if (l.find(needle) != std::string::npos) return true;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
  size_t size() {
    absl::MutexLock lock(&mu_);
    return lines_.size();
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> lines_;
};

TEST(WeightsInMemoryTest, EvictedWeightsAreSeenAndPreloadBringsThemBack) {
  const std::string& path = testing::TinyModelPath("Q4_K_M");
  ASSERT_FALSE(path.empty());
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  const uint64_t total = (*model)->ExpertBytes() + (*model)->NonExpertBytes();
  ASSERT_TRUE((*model)->Preload().ok());
  EXPECT_EQ((*model)->ResidentWeightBytes(), total);
  Said said;
  ResidencyWatch watch(model->get(), "test", 0.01, said.sink());
  if (!Evict(**model)) GTEST_SKIP() << "this file system keeps " << path << " in memory";
  EXPECT_TRUE(said.WaitFor("warning: only")) << "the watch did not see the eviction";
  uint64_t done = 0, seen_total = 0;
  ASSERT_TRUE((*model)
                  ->Preload([&](uint64_t d, uint64_t t) {
                    EXPECT_GE(d, done);
                    done = d;
                    seen_total = t;
                  })
                  .ok());
  EXPECT_EQ(done, total);
  EXPECT_EQ(seen_total, total);
  EXPECT_EQ((*model)->ResidentWeightBytes(), total);
  EXPECT_TRUE(said.WaitFor("in memory again"));
  EXPECT_EQ(said.size(), 2u) << "one line per change, not one per check";
}

TEST(WeightsInMemoryTest, AnImageInMemoryIsAlwaysResident) {
  const std::string& path = testing::TinyModelPath("Q4_K_M");
  ASSERT_FALSE(path.empty());
  absl::StatusOr<std::unique_ptr<GgufFile>> file =
      GgufFile::FromBuffer(testing::ReadFileOrDie(path), "image.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::unique_ptr<Model>> model = Model::FromFile(std::move(*file));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE((*model)->Preload().ok());
  EXPECT_EQ((*model)->ResidentWeightBytes(), (*model)->ExpertBytes() + (*model)->NonExpertBytes());
}

}  // namespace
}  // namespace moepool::cli
