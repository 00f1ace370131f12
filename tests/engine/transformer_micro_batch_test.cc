// Transformer::ForwardMicroBatches: micro-batches pipelined per layer give, bit for bit, the
// logits of a plain Forward of each micro-batch's rows, with experts computed synchronously
// (LocalExpertBackend's default Start) or deferred to Finish (as remote experts are: the
// buffers handed to Start must stay untouched until Finish); errors finish every started
// computation.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"

namespace moepool {
namespace {

using ::moepool::testing::PseudoRandomPrompt;
using ::moepool::testing::TinyModelPath;

constexpr int64_t kCtx = 64;

// An ExpertBackend whose Start does nothing but remember the call: the work runs in Finish, as
// it would arrive from a remote worker later. It checks the seam's contract (finished in start
// order, no Compute while computations are outstanding) and can fail one computation.
class DeferredExperts : public ExpertBackend {
 public:
  DeferredExperts(ExpertBackend* inner, int fail_start = -1)
      : inner_(inner), fail_start_(fail_start) {}

  absl::Status Compute(const ExpertRoutes& routes, float* out) override {
    EXPECT_EQ(started_, finished_) << "Compute while computations are outstanding";
    return inner_->Compute(routes, out);
  }

  std::unique_ptr<PendingExperts> Start(const ExpertRoutes& routes, float* out) override {
    const int id = started_++;
    max_outstanding_ = std::max(max_outstanding_, started_ - finished_);
    return std::make_unique<Pending>(this, routes, out, id);
  }
  bool overlaps() const override { return true; }

  int started() const { return started_; }
  int finished() const { return finished_; }
  int max_outstanding() const { return max_outstanding_; }

 private:
  class Pending : public PendingExperts {
   public:
    Pending(DeferredExperts* b, const ExpertRoutes& routes, float* out, int id)
        : b_(b), routes_(routes), out_(out), id_(id) {}
    ~Pending() override {
      if (!done_) Finish().IgnoreError();
    }
    absl::Status Finish() override {
      EXPECT_FALSE(done_);
      done_ = true;
      EXPECT_EQ(id_, b_->finished_) << "finished out of start order";
      ++b_->finished_;
      if (id_ == b_->fail_start_) return absl::UnavailableError("worker 10.0.0.9:7070 is gone");
      return b_->inner_->Compute(routes_, out_);
    }

   private:
    DeferredExperts* b_;
    ExpertRoutes routes_;
    float* out_;
    int id_;
    bool done_ = false;
  };

  ExpertBackend* inner_;
  int fail_start_;
  int started_ = 0;
  int finished_ = 0;
  int max_outstanding_ = 0;
};

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class MicroBatchTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::string& path = TinyModelPath(GetParam());
    ASSERT_FALSE(path.empty());
    auto model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    pool_ = std::make_unique<ThreadPool>(2);
    local_ = std::make_unique<LocalExpertBackend>(model_.get(), pool_.get());
    n_vocab_ = model_->config().n_vocab;
  }

  // Rows for positions [from, to) of `tokens` in `cache`, all wanting logits.
  static std::vector<BatchRow> Rows(const std::vector<int32_t>& tokens, int64_t from, int64_t to,
                                    KvCache* cache) {
    std::vector<BatchRow> rows;
    for (int64_t i = from; i < to; ++i) rows.push_back({tokens[i], i, cache, true});
    return rows;
  }

  // Plain Forward of each sequence alone: its prompt in one batch, then its decode tokens one
  // at a time; the logits of every position.
  std::vector<float> Alone(const std::vector<int32_t>& tokens, int64_t n_prompt) {
    Transformer tf(model_.get(), local_.get(), pool_.get());
    KvCache cache(model_->config(), kCtx);
    std::vector<float> logits;
    EXPECT_TRUE(tf.Forward(Rows(tokens, 0, n_prompt, &cache), &logits).ok());
    for (int64_t i = n_prompt; i < static_cast<int64_t>(tokens.size()); ++i) {
      EXPECT_TRUE(tf.Forward(Rows(tokens, i, i + 1, &cache), &logits).ok());
    }
    return logits;
  }

  // Three sequences, one per micro-batch: prompts pipelined, then decode steps pipelined; the
  // logits must be those of each sequence alone.
  void ExpectPipelinedEqualsAlone(ExpertBackend* experts, int n_micro) {
    const std::vector<int32_t> seq[3] = {PseudoRandomPrompt(12, n_vocab_, 11),
                                         PseudoRandomPrompt(8, n_vocab_, 12),
                                         PseudoRandomPrompt(10, n_vocab_, 13)};
    const int64_t prompt[3] = {9, 5, 1};  // the rest are decode tokens
    Transformer tf(model_.get(), experts, pool_.get());
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<std::vector<float>> got(3);
    for (int s = 0; s < n_micro; ++s) {
      caches.push_back(std::make_unique<KvCache>(model_->config(), kCtx));
    }
    std::vector<std::vector<BatchRow>> rows(static_cast<size_t>(n_micro));
    for (int s = 0; s < n_micro; ++s) rows[s] = Rows(seq[s], 0, prompt[s], caches[s].get());
    for (int64_t step = 0;; ++step) {
      std::vector<absl::Span<const BatchRow>> spans(rows.begin(), rows.end());
      std::vector<float> logits;
      const absl::Status st = tf.ForwardMicroBatches(spans, &logits);
      ASSERT_TRUE(st.ok()) << st;
      // Split the logits back per micro-batch (in micro-batch order).
      size_t at = 0;
      for (int s = 0; s < n_micro; ++s) {
        const size_t len = rows[s].size() * static_cast<size_t>(n_vocab_);
        got[s].insert(got[s].end(), logits.begin() + at, logits.begin() + at + len);
        at += len;
      }
      ASSERT_EQ(at, logits.size());
      bool more = false;
      for (int s = 0; s < n_micro; ++s) {
        const int64_t next = prompt[s] + step;
        rows[s].clear();
        if (next < static_cast<int64_t>(seq[s].size())) {
          rows[s] = Rows(seq[s], next, next + 1, caches[s].get());
          more = true;
        }
      }
      if (!more) break;
    }
    for (int s = 0; s < n_micro; ++s) {
      EXPECT_TRUE(SameBits(got[s], Alone(seq[s], prompt[s])))
          << "sequence " << s << " of " << n_micro << " micro-batches";
    }
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<LocalExpertBackend> local_;
  int64_t n_vocab_ = 0;
};

TEST_P(MicroBatchTest, PipelinedEqualsPlainWithSynchronousExperts) {
  ExpectPipelinedEqualsAlone(local_.get(), 2);
  ExpectPipelinedEqualsAlone(local_.get(), 3);
}

TEST_P(MicroBatchTest, PipelinedEqualsPlainWithDeferredExperts) {
  for (int n_micro : {2, 3}) {
    DeferredExperts deferred(local_.get());
    ExpectPipelinedEqualsAlone(&deferred, n_micro);
    EXPECT_EQ(deferred.started(), deferred.finished());
    // Every micro-batch had its experts in flight at once.
    EXPECT_EQ(deferred.max_outstanding(), n_micro);
  }
}

// Two sequences interleaved in one micro-batch and one sequence split over both (earlier
// positions first): the same bits as one plain Forward of all rows.
TEST_P(MicroBatchTest, MixedMicroBatchesEqualOneForward) {
  const std::vector<int32_t> a = PseudoRandomPrompt(10, n_vocab_, 21);
  const std::vector<int32_t> b = PseudoRandomPrompt(6, n_vocab_, 22);
  auto run = [&](bool pipelined, ExpertBackend* experts) {
    Transformer tf(model_.get(), experts, pool_.get());
    KvCache ca(model_->config(), kCtx), cb(model_->config(), kCtx);
    std::vector<BatchRow> first, second;
    for (int64_t i = 0; i < 6; ++i) {
      first.push_back({a[i], i, &ca, true});
      first.push_back({b[i], i, &cb, i % 2 == 0});
    }
    for (int64_t i = 6; i < 10; ++i) second.push_back({a[i], i, &ca, true});
    std::vector<float> logits;
    if (pipelined) {
      const absl::Span<const BatchRow> spans[] = {first, second};
      EXPECT_TRUE(tf.ForwardMicroBatches(spans, &logits).ok());
    } else {
      std::vector<BatchRow> all = first;
      all.insert(all.end(), second.begin(), second.end());
      EXPECT_TRUE(tf.Forward(all, &logits).ok());
    }
    return logits;
  };
  const std::vector<float> plain = run(false, local_.get());
  ASSERT_EQ(plain.size(), static_cast<size_t>((6 + 3 + 4) * n_vocab_));
  DeferredExperts deferred(local_.get());
  EXPECT_TRUE(SameBits(run(true, &deferred), plain));
  EXPECT_TRUE(SameBits(run(true, local_.get()), plain));
}

// One non-empty micro-batch is a plain Forward (through Compute), empty ones are skipped.
TEST_P(MicroBatchTest, SingleMicroBatchIsForward) {
  const std::vector<int32_t> a = PseudoRandomPrompt(7, n_vocab_, 31);
  DeferredExperts deferred(local_.get());
  Transformer tf(model_.get(), &deferred, pool_.get());
  KvCache cache(model_->config(), kCtx);
  const std::vector<BatchRow> rows = Rows(a, 0, 7, &cache);
  const absl::Span<const BatchRow> spans[] = {{}, rows, {}};
  std::vector<float> logits;
  ASSERT_TRUE(tf.ForwardMicroBatches(spans, &logits).ok());
  EXPECT_EQ(deferred.started(), 0);
  EXPECT_TRUE(SameBits(logits, Alone(a, 7)));
}

// A failing expert computation fails the call with its error, after every started
// computation was finished (their buffers are the call's).
TEST_P(MicroBatchTest, ErrorFinishesEveryStartedComputation) {
  const int n_layer = static_cast<int>(model_->config().n_layer);
  for (int fail_start : {0, 1, 3, 2 * n_layer - 1}) {
    DeferredExperts deferred(local_.get(), fail_start);
    Transformer tf(model_.get(), &deferred, pool_.get());
    KvCache ca(model_->config(), kCtx), cb(model_->config(), kCtx);
    const std::vector<int32_t> a = PseudoRandomPrompt(4, n_vocab_, 41);
    const std::vector<BatchRow> ra = Rows(a, 0, 4, &ca), rb = Rows(a, 0, 4, &cb);
    const absl::Span<const BatchRow> spans[] = {ra, rb};
    std::vector<float> logits;
    const absl::Status s = tf.ForwardMicroBatches(spans, &logits);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << fail_start;
    EXPECT_NE(s.message().find("10.0.0.9:7070"), absl::string_view::npos) << s;
    EXPECT_EQ(deferred.started(), deferred.finished()) << fail_start;
    EXPECT_TRUE(logits.empty());
  }
}

TEST_P(MicroBatchTest, BadRowFailsBeforeAnyWork) {
  DeferredExperts deferred(local_.get());
  Transformer tf(model_.get(), &deferred, pool_.get());
  KvCache ca(model_->config(), kCtx), cb(model_->config(), kCtx);
  const std::vector<BatchRow> ra = {{5, 0, &ca, true}};
  const std::vector<BatchRow> rb = {{-3, 0, &cb, true}};
  const absl::Span<const BatchRow> spans[] = {ra, rb};
  std::vector<float> logits;
  EXPECT_EQ(tf.ForwardMicroBatches(spans, &logits).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(deferred.started(), 0);
}

INSTANTIATE_TEST_SUITE_P(Tiny, MicroBatchTest, ::testing::Values("Q4_K_M", "F16"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace moepool
