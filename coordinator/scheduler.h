// Continuous batching over one Engine. A loop thread repeatedly builds one batch from every
// active sequence -- the next decode token of each generating sequence plus chunks of pending
// prompts up to a token budget -- runs ONE Transformer::Forward for all of it, samples each
// sequence with its own Sampler and streams the text to the sequence's GenerationStream.
// Because every row's result is independent of its batch, a sequence generates exactly the
// tokens it would generate alone (Engine::Generate), whatever else shares the batch.
//
// KV memory is a shared KvBlockPool: a sequence takes blocks as it grows and returns them when it
// ends or is cancelled. If the pool runs dry the youngest sequence is preempted (its blocks freed,
// its tokens kept) and recomputed later, which gives the same tokens again.
//
// Prefix caching (SchedulerOptions::prefix_cache): every full block a sequence computes is
// published, and a sequence that starts (or restarts after preemption) attaches the cached blocks
// of its longest cached prefix, keeping at least its last token to compute. A prompt whose next
// block an earlier chunk of the same step computes from the same tokens waits one step and
// attaches it (a burst with a new shared prefix computes it once). Multi-turn chats and shared
// system prompts then prefill only what is new; the tokens are the same either way.
//
// Text: tokens are detokenized with StreamingDetokenizer, so every text delta is valid UTF-8
// (an incomplete character is held back, and replaced by U+FFFD if the sequence ends). Text that
// may be the start of a stop string is held back until it cannot be; a stop string is never
// emitted.
//
// Ownership: the Scheduler borrows the Engine and the ServerMetrics (both must outlive it). A
// GenerationStream is shared between the scheduler and the consumer and outlives either.
// Threading: Submit, stats and Stop are thread-safe; Forward runs only on the loop thread, so
// nothing else may use the engine's transformer while the scheduler runs.
#ifndef MOEPOOL_COORDINATOR_SCHEDULER_H_
#define MOEPOOL_COORDINATOR_SCHEDULER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/json_grammar.h"
#include "coordinator/metrics.h"
#include "coordinator/token_constraint.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/sampler.h"

namespace moepool {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, BOS included if wanted
  SamplingParams sampling;
  int64_t max_tokens = -1;           // < 0: until the context is full
  std::vector<std::string> stop;     // stop strings (non-empty, valid UTF-8)
  std::vector<int32_t> stop_tokens;  // end the sequence like EOS (e.g. chatml's <|im_end|>)
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits before sampling
  bool ignore_eos = false;
  bool trim_leading_space = false;  // drop one ' ' at the start of the reply
  int top_logprobs = -1;            // < 0: no logprobs; else the chosen token's and this many
  // When set, every token is sampled among those the grammar allows (token_constraint.h), and
  // the sequence stops (kStop) as soon as the grammar's text is complete.
  std::shared_ptr<const JsonGrammar> grammar;
};

// kToolCalls: never from the scheduler; the API layer's name for a reply that is a tool call.
enum class FinishReason { kNone, kStop, kLength, kCancelled, kError, kToolCalls };
// "stop", "length", "cancelled", "error", "tool_calls"
const char* FinishReasonName(FinishReason r);

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;           // only with top_logprobs >= 0
  std::vector<TokenLogprob> top;  // top_logprobs entries, most likely first
};

struct GenerationEvent {
  std::string text;                           // valid UTF-8 delta, possibly empty
  std::vector<SampledToken> tokens;           // tokens sampled for this event (EOS excluded)
  FinishReason finish = FinishReason::kNone;  // set on the last event of a stream only
  absl::Status error;                         // with kError / kCancelled by shutdown
  int64_t prompt_tokens = 0;                  // on the last event
  int64_t cached_prompt_tokens = 0;           // on the last event: prompt tokens not recomputed
  int64_t completion_tokens = 0;              // on the last event
};

// One request's stream of events. Thread-safe.
class GenerationStream {
 public:
  // Waits up to `timeout` for the next event. False on timeout; after the final event (finish
  // != kNone) there are no more and Next always times out.
  bool Next(GenerationEvent* event, std::chrono::milliseconds timeout);
  // Asks the scheduler to stop this sequence; it frees its KV blocks and sends a final event
  // with kCancelled at its next step.
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

 private:
  friend class Scheduler;
  void Push(GenerationEvent event);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<GenerationEvent> events_;  // guarded by mu_
  std::atomic<bool> cancelled_{false};
};

struct SchedulerOptions {
  int max_active = 4;         // sequences generated at once (--parallel)
  int max_queue = 64;         // requests waiting beyond those (--max-queue)
  int64_t n_ctx = 0;          // positions per sequence; 0: the engine's n_ctx
  int64_t step_tokens = 512;  // rows per forward pass (decode rows + prompt chunks)
  int64_t block_size = 16;    // positions per KV block
  // KV blocks in the pool; 0: enough for max_active full contexts. At least one full context.
  int64_t kv_blocks = 0;
  // Micro-batches per step (--micro-batches, 1 or 2). With 2, a step whose experts are remote
  // (ExpertBackend::overlaps) and that has at least `micro_batch_min_rows` rows from two or more
  // sequences is split by sequence into two halves of about equal rows, run ping-pong
  // (Transformer::ForwardMicroBatches): the coordinator computes one half's attention while the
  // workers compute the other's experts. Same tokens either way.
  int micro_batches = 2;
  int64_t micro_batch_min_rows = 2;
  // Publish full KV blocks and reuse them for later sequences with the same prefix
  // (--prefix-cache).
  bool prefix_cache = true;
};

struct SchedulerStats {
  int64_t queued = 0;
  int64_t active = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_cached = 0;  // published blocks (held by sequences or evictable)
  int64_t block_size = 0;
  uint64_t prefix_hit_tokens = 0;  // prompt positions attached from the prefix cache
  uint64_t finished = 0;           // sequences finished for any reason
  uint64_t cancelled = 0;          // of which cancelled
  uint64_t preempted = 0;
  uint64_t steps = 0;                // forward steps run
  uint64_t micro_batched_steps = 0;  // of which split into two micro-batches
};

class Scheduler {
 public:
  // `metrics` may be null.
  Scheduler(Engine* engine, const SchedulerOptions& options, ServerMetrics* metrics);
  ~Scheduler();  // Stop()
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Reserves what the engine's attention backend needs for this scheduler's KV pool (device
  // memory for a GPU backend): its error, e.g. RESOURCE_EXHAUSTED, belongs at startup.
  absl::Status PrepareBackend();
  void Start();
  // Stops the loop; every queued or active sequence gets a final kCancelled event with an
  // UNAVAILABLE error. Later Submits fail with UNAVAILABLE. Idempotent.
  void Stop();

  // Queues a request. INVALID_ARGUMENT: empty prompt, a token id out of range, bad sampling
  // parameters or logit_bias, or a prompt that leaves no room to generate (>= n_ctx tokens; the
  // message says so); RESOURCE_EXHAUSTED: the queue is full; UNAVAILABLE: stopped. A request
  // with a grammar has its first token mask computed here, on the caller's thread.
  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest request);

  int64_t n_ctx() const { return n_ctx_; }
  const SchedulerOptions& options() const { return options_; }
  const Engine& engine() const { return *engine_; }
  SchedulerStats stats() const;

 private:
  struct Sequence;
  // Rows [start, start + n) of one sequence in a step.
  struct Chunk {
    Sequence* seq;
    int64_t start;
    int64_t n;
  };
  void Loop();
  // One batch: plan the chunks, build their rows, choose the micro-batch split, run, commit and
  // sample. False if there was nothing to run.
  bool Step();
  // Each unfinished sequence's next chunk within the step's token budget (decode rows first),
  // attaching cached prefixes and reserving KV blocks (preempting the youngest when out).
  std::vector<Chunk> PlanChunks();
  // The chunks' rows in order, and rows->size() after each chunk.
  void BuildRows(const std::vector<Chunk>& chunks, std::vector<BatchRow>* rows,
                 std::vector<size_t>* chunk_end) const;
  // Where to split the rows into two micro-batches (at the chunk boundary nearest the middle),
  // or 0 for one pass.
  size_t ChooseSplit(size_t n_rows, const std::vector<size_t>& chunk_end) const;
  // The forward pass over the rows (two micro-batches when split > 0) into logits_.
  absl::Status Run(const std::vector<BatchRow>& rows, size_t split);
  // Advances each chunk's cache (or fails its sequence), samples and emits the next tokens.
  void CommitAndSample(const std::vector<Chunk>& chunks, const absl::Status& status);
  void RemoveFinished();
  void Admit();
  // Ends `seq`: returns its KV blocks and sends `event` as its final event.
  void Finish(Sequence* seq, FinishReason reason, absl::Status error = absl::OkStatus(),
              GenerationEvent event = {});
  void Preempt(Sequence* seq);
  // True if a chunk in `chunks` computes, from the same tokens, the whole block of `seq` that
  // starts at `start` (prefix caching on): `seq` can attach it next step.
  bool SharesAPlannedBlock(const std::vector<Chunk>& chunks, const Sequence& seq,
                           int64_t start) const;
  // Samples the sequence's next token from `logits` (modified by penalties) and streams it.
  // Samples the sequence's next token from its logits row into seq->next (bias, sampler,
  // logprobs). Touches only `seq` and `logits`: safe for several sequences in parallel.
  void SampleNext(Sequence* seq, float* logits) const;
  // Emits seq->next: metrics, text, stop strings, the event; finishes the sequence if it ends.
  void OnToken(Sequence* seq);

  Engine* engine_;
  SchedulerOptions options_;
  ServerMetrics* metrics_;
  int64_t n_ctx_;
  std::unique_ptr<KvBlockPool> pool_;
  std::unique_ptr<VocabTrie> vocab_trie_;  // for grammar-constrained requests
  std::vector<int32_t> end_tokens_;        // the tokenizer's end-of-generation ids

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Sequence>> pending_;  // guarded by mu_
  bool stopping_ = false;                          // guarded by mu_
  std::thread loop_;

  // Loop thread only.
  std::vector<std::unique_ptr<Sequence>> active_;  // oldest first
  uint64_t next_id_ = 0;
  std::vector<float> logits_;

  std::atomic<int64_t> n_active_{0};
  std::atomic<uint64_t> n_finished_{0};
  std::atomic<uint64_t> n_cancelled_{0};
  std::atomic<uint64_t> n_preempted_{0};
  std::atomic<uint64_t> n_steps_{0};
  std::atomic<uint64_t> n_micro_batched_{0};
  std::atomic<uint64_t> n_prefix_hit_tokens_{0};
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_SCHEDULER_H_
