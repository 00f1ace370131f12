#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/generated_text.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
    case FinishReason::kToolCalls:
      return "tool_calls";
    case FinishReason::kNone:
      break;
  }
  return "none";
}

bool GenerationStream::Next(GenerationEvent* event, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

void GenerationStream::Push(GenerationEvent event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

struct Scheduler::Sequence {
  Sequence(GenerationRequest r, KvBlockPool* pool, int64_t n_ctx, const Tokenizer& tokenizer)
      : req(std::move(r)),
        stream(std::make_shared<GenerationStream>()),
        cache(pool, n_ctx),
        sampler(req.sampling),
        text(tokenizer, req.stop, req.trim_leading_space),
        tokens(req.prompt),
        submitted(Clock::now()) {}

  GenerationRequest req;
  std::shared_ptr<GenerationStream> stream;
  KvCache cache;
  Sampler sampler;
  std::unique_ptr<TokenConstraint> constraint;  // with req.grammar
  bool constraint_failed = false;  // no allowed token had a finite logit (set by SampleNext)
  SampledToken next;               // set by SampleNext, consumed by OnToken in the same step
  GeneratedText text;
  std::vector<int32_t> tokens;  // prompt + generated; positions < cache.n_past() are computed
  int64_t n_generated = 0;
  int64_t cached_prompt_tokens = 0;  // positions attached before it computed any of its own
  bool computed = false;             // some chunk of it has run
  bool admitted = false;             // moved from the queue to the active set
  bool done = false;
  Clock::time_point submitted, last_token;
};

Scheduler::Scheduler(Engine* engine, const SchedulerOptions& options, ServerMetrics* metrics)
    : engine_(engine), options_(options), metrics_(metrics) {
  n_ctx_ = options_.n_ctx > 0 ? options_.n_ctx : engine_->n_ctx();
  options_.max_active = std::max(options_.max_active, 1);
  options_.max_queue = std::max(options_.max_queue, 0);
  options_.step_tokens = std::max<int64_t>(options_.step_tokens, 1);
  options_.block_size = std::max<int64_t>(options_.block_size, 1);
  const int64_t per_ctx = (n_ctx_ + options_.block_size - 1) / options_.block_size;
  const int64_t blocks = options_.kv_blocks > 0 ? std::max(options_.kv_blocks, per_ctx)
                                                : per_ctx * options_.max_active;
  pool_ = std::make_unique<KvBlockPool>(engine_->config(), options_.block_size, blocks,
                                        options_.prefix_cache);
  const Tokenizer& tok = engine_->tokenizer();
  vocab_trie_ = std::make_unique<VocabTrie>(tok);
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    if (tok.IsEndOfGeneration(id)) end_tokens_.push_back(id);
  }
}

Scheduler::~Scheduler() { Stop(); }

absl::Status Scheduler::PrepareBackend() { return engine_->transformer().PreparePool(pool_.get()); }

void Scheduler::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (loop_.joinable() || stopping_) return;
  loop_ = std::thread([this] { Loop(); });
}

void Scheduler::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (loop_.joinable()) loop_.join();
  // The loop has ended (or never ran): end every sequence still here.
  const absl::Status shutdown = absl::UnavailableError("the server is shutting down");
  for (auto& seq : active_) {
    if (!seq->done) Finish(seq.get(), FinishReason::kCancelled, shutdown);
  }
  active_.clear();
  std::deque<std::unique_ptr<Sequence>> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending.swap(pending_);
  }
  for (auto& seq : pending) Finish(seq.get(), FinishReason::kCancelled, shutdown);
}

absl::StatusOr<std::shared_ptr<GenerationStream>> Scheduler::Submit(GenerationRequest request) {
  const int64_t n_vocab = engine_->config().n_vocab;
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= n_vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " out of range [0, ", n_vocab, ")"));
    }
  }
  const int64_t n_prompt = static_cast<int64_t>(request.prompt.size());
  if (n_prompt >= n_ctx_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "This model's maximum context length is ", n_ctx_, " tokens. However, your prompt has ",
        n_prompt, " tokens, which leaves no room to generate."));
  }
  if (request.max_tokens == 0) return absl::InvalidArgumentError("max_tokens must be at least 1");
  for (const std::string& s : request.stop) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  }
  for (const auto& [id, bias] : request.logit_bias) {
    if (id < 0 || id >= n_vocab || !(std::fabs(bias) <= 100.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("logit_bias: token ", id, " must be in [0, ",
                                                     n_vocab, ") with a bias in [-100, 100]"));
    }
  }
  RETURN_IF_ERROR(ValidateSamplingParams(request.sampling));
  auto seq =
      std::make_unique<Sequence>(std::move(request), pool_.get(), n_ctx_, engine_->tokenizer());
  if (seq->req.grammar != nullptr) {
    std::vector<int32_t> ends = end_tokens_;
    ends.insert(ends.end(), seq->req.stop_tokens.begin(), seq->req.stop_tokens.end());
    seq->constraint =
        std::make_unique<TokenConstraint>(seq->req.grammar, vocab_trie_.get(), std::move(ends));
    seq->constraint->Prepare();
  }
  std::shared_ptr<GenerationStream> stream = seq->stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
    const int64_t waiting = static_cast<int64_t>(pending_.size()) + n_active_.load();
    if (waiting >= options_.max_active + options_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the server is busy: ", options_.max_active, " requests are running and ",
                       options_.max_queue, " waiting; retry later"));
    }
    pending_.push_back(std::move(seq));
  }
  cv_.notify_all();
  if (metrics_ != nullptr) metrics_->AddPromptTokens(n_prompt);
  return stream;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queued = static_cast<int64_t>(pending_.size());
  }
  s.active = n_active_.load();
  s.kv_blocks_free = pool_->free_blocks();
  s.kv_blocks_total = pool_->n_blocks();
  s.kv_blocks_used = s.kv_blocks_total - s.kv_blocks_free;
  s.kv_blocks_cached = pool_->cached_blocks();
  s.block_size = pool_->block_size();
  s.prefix_hit_tokens = n_prefix_hit_tokens_.load();
  s.finished = n_finished_.load();
  s.cancelled = n_cancelled_.load();
  s.preempted = n_preempted_.load();
  s.steps = n_steps_.load();
  s.micro_batched_steps = n_micro_batched_.load();
  return s;
}

void Scheduler::Loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !pending_.empty() || !active_.empty(); });
      if (stopping_) return;
    }
    if (!Step()) {
      // Active sequences but nothing runnable (all waiting for KV blocks): do not spin.
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(1), [&] { return stopping_; });
    }
  }
}

void Scheduler::Admit() {
  std::vector<std::unique_ptr<Sequence>> cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = pending_.begin(); it != pending_.end();) {
      if ((*it)->stream->cancelled()) {
        cancelled.push_back(std::move(*it));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    while (!pending_.empty() && static_cast<int>(active_.size()) < options_.max_active) {
      pending_.front()->admitted = true;
      active_.push_back(std::move(pending_.front()));
      pending_.pop_front();
      n_active_.fetch_add(1);
    }
  }
  for (auto& seq : cancelled) Finish(seq.get(), FinishReason::kCancelled);
}

void Scheduler::Preempt(Sequence* seq) {
  seq->cache.Release();
  n_preempted_.fetch_add(1);
  if (metrics_ != nullptr) metrics_->CountPreemption();
}

bool Scheduler::Step() {
  Admit();
  for (auto& seq : active_) {
    if (seq->stream->cancelled()) Finish(seq.get(), FinishReason::kCancelled);
  }
  const std::vector<Chunk> chunks = PlanChunks();
  if (chunks.empty()) {
    RemoveFinished();
    return false;
  }
  const Clock::time_point step_start = Clock::now();
  ExpertBackend* experts = engine_->transformer().experts();
  const uint64_t blocked_before = experts->blocked_micros();
  std::vector<BatchRow> rows;
  std::vector<size_t> chunk_end;  // rows.size() after each chunk
  BuildRows(chunks, &rows, &chunk_end);
  const size_t split = ChooseSplit(rows.size(), chunk_end);
  const absl::Status status = Run(rows, split);
  CommitAndSample(chunks, status);
  if (metrics_ != nullptr) {
    const double blocked_s = static_cast<double>(experts->blocked_micros() - blocked_before) / 1e6;
    metrics_->ObserveStep(split > 0 ? 2 : 1, Seconds(step_start, Clock::now()), blocked_s);
  }
  RemoveFinished();
  return true;
}

std::vector<Scheduler::Chunk> Scheduler::PlanChunks() {
  std::vector<Chunk> chunks;
  int64_t n_decode = 0;
  for (auto& seq : active_) {
    if (!seq->done && static_cast<int64_t>(seq->tokens.size()) - seq->cache.n_past() == 1) {
      ++n_decode;
    }
  }
  int64_t prefill_budget = std::max<int64_t>(options_.step_tokens - n_decode, 0);
  for (size_t i = 0; i < active_.size(); ++i) {
    Sequence* seq = active_[i].get();
    if (seq->done) continue;
    // Starting, restarting after preemption, or waiting for a prefix another sequence computed:
    // take the longest cached prefix (a no-op once the sequence has blocks of its own), leaving
    // at least the last token to compute, whose logits give the next token.
    const int64_t attached =
        seq->cache.AttachCachedPrefix(seq->tokens, static_cast<int64_t>(seq->tokens.size()) - 1);
    n_prefix_hit_tokens_.fetch_add(static_cast<uint64_t>(attached));
    if (!seq->computed) seq->cached_prompt_tokens += attached;
    const int64_t start = seq->cache.n_past();
    const int64_t remaining = static_cast<int64_t>(seq->tokens.size()) - start;
    // A prompt whose next block a chunk planned earlier in this step computes as well waits one
    // step and attaches it instead of computing it twice.
    if (remaining > 1 && SharesAPlannedBlock(chunks, *seq, start)) continue;
    int64_t n = remaining == 1 ? 1 : std::min(remaining, prefill_budget);
    if (n <= 0) continue;
    absl::Status reserved = seq->cache.Reserve(start + n);
    // Out of blocks: reclaim the youngest sequences' blocks (they are planned after this one).
    for (size_t v = active_.size(); !reserved.ok() && v-- > i + 1;) {
      Sequence* victim = active_[v].get();
      if (victim->done || victim->cache.n_blocks() == 0) continue;
      Preempt(victim);
      reserved = seq->cache.Reserve(start + n);
    }
    if (!reserved.ok()) n = std::min(n, seq->cache.capacity() - start);
    if (n <= 0) continue;
    if (remaining > 1) prefill_budget -= n;
    chunks.push_back({seq, start, n});
  }
  return chunks;
}

void Scheduler::BuildRows(const std::vector<Chunk>& chunks, std::vector<BatchRow>* rows,
                          std::vector<size_t>* chunk_end) const {
  for (const Chunk& c : chunks) {
    const int64_t end = c.start + c.n;
    for (int64_t p = c.start; p < end; ++p) {
      const bool last = p + 1 == static_cast<int64_t>(c.seq->tokens.size());
      rows->push_back({c.seq->tokens[static_cast<size_t>(p)], p, &c.seq->cache, last});
    }
    chunk_end->push_back(rows->size());
  }
}

size_t Scheduler::ChooseSplit(size_t n_rows, const std::vector<size_t>& chunk_end) const {
  if (options_.micro_batches < 2 || chunk_end.size() < 2 ||
      !engine_->transformer().experts()->overlaps() ||
      static_cast<int64_t>(n_rows) < options_.micro_batch_min_rows) {
    return 0;
  }
  const auto gap = [&](size_t at) {
    return std::abs(2 * static_cast<int64_t>(at) - static_cast<int64_t>(n_rows));
  };
  size_t split = 0;
  for (size_t i = 0; i + 1 < chunk_end.size(); ++i) {
    if (split == 0 || gap(chunk_end[i]) < gap(split)) split = chunk_end[i];
  }
  return split;
}

absl::Status Scheduler::Run(const std::vector<BatchRow>& rows, size_t split) {
  logits_.clear();
  absl::Status status;
  if (split > 0) {
    const absl::Span<const BatchRow> all(rows);
    const absl::Span<const BatchRow> halves[] = {all.subspan(0, split), all.subspan(split)};
    status = engine_->transformer().ForwardMicroBatches(halves, &logits_);
    n_micro_batched_.fetch_add(1);
  } else {
    status = engine_->transformer().Forward(rows, &logits_);
  }
  n_steps_.fetch_add(1);
  return status;
}

void Scheduler::CommitAndSample(const std::vector<Chunk>& chunks, const absl::Status& status) {
  const int64_t n_vocab = engine_->config().n_vocab;
  size_t logits_row = 0;
  std::vector<std::pair<Sequence*, float*>> sampled;  // sequences that get a token this step
  for (const Chunk& c : chunks) {
    if (!status.ok()) {
      Finish(c.seq, FinishReason::kError, status);
      continue;
    }
    c.seq->cache.set_n_past(c.start + c.n);
    c.seq->computed = true;
    c.seq->cache.PublishFullBlocks(c.seq->tokens);
    if (c.start + c.n == static_cast<int64_t>(c.seq->tokens.size())) {
      sampled.emplace_back(c.seq, logits_.data() + logits_row * n_vocab);
      ++logits_row;
    }
  }
  // Sampling touches only each sequence's own sampler and logits row, so the sequences are
  // sampled in parallel on the engine's pool (the same tokens as one by one); the text, stop
  // strings and events then follow in batch order on this thread.
  engine_->pool().ParallelFor(static_cast<int64_t>(sampled.size()), [&](int64_t i) {
    SampleNext(sampled[static_cast<size_t>(i)].first, sampled[static_cast<size_t>(i)].second);
  });
  for (const auto& [seq, logits] : sampled) OnToken(seq);
}

void Scheduler::RemoveFinished() {
  active_.erase(
      std::remove_if(active_.begin(), active_.end(), [](const auto& s) { return s->done; }),
      active_.end());
}

bool Scheduler::SharesAPlannedBlock(const std::vector<Chunk>& chunks, const Sequence& seq,
                                    int64_t start) const {
  const int64_t bs = options_.block_size;
  const int64_t end = start + bs;
  // Only a block the sequence could attach: whole, and short of its last token.
  if (!options_.prefix_cache || start % bs != 0 ||
      end > static_cast<int64_t>(seq.tokens.size()) - 1) {
    return false;
  }
  for (const Chunk& c : chunks) {
    if (c.start > start || c.start + c.n < end) continue;
    if (std::equal(seq.tokens.begin(), seq.tokens.begin() + end, c.seq->tokens.begin())) {
      return true;
    }
  }
  return false;
}

void Scheduler::SampleNext(Sequence* seq, float* logits) const {
  const GenerationRequest& req = seq->req;
  const int64_t n_vocab = engine_->config().n_vocab;
  for (const auto& [bias_id, bias] : req.logit_bias) logits[bias_id] += bias;
  std::vector<float> raw;
  if (req.top_logprobs >= 0) raw.assign(logits, logits + n_vocab);
  SampledToken& st = seq->next;
  st = SampledToken();
  if (seq->constraint != nullptr && !seq->constraint->Mask(logits, n_vocab)) {
    seq->constraint_failed = true;
    return;
  }
  st.id = seq->sampler.Sample(logits, n_vocab);
  if (seq->constraint != nullptr && !seq->constraint->Accept(st.id)) {
    seq->constraint_failed = true;
    return;
  }
  if (req.top_logprobs >= 0) {
    st.logprob = Sampler::Logprob(raw.data(), n_vocab, st.id).logprob;
    if (req.top_logprobs > 0) st.top = Sampler::TopLogprobs(raw.data(), n_vocab, req.top_logprobs);
  }
}

void Scheduler::OnToken(Sequence* seq) {
  const GenerationRequest& req = seq->req;
  const Tokenizer& tok = engine_->tokenizer();
  const int32_t id = seq->next.id;
  if (seq->constraint_failed) {
    return Finish(seq, FinishReason::kError,
                  absl::InternalError("no token of the vocabulary can continue the reply under "
                                      "its response_format or tool schema"));
  }

  const Clock::time_point now = Clock::now();
  if (metrics_ != nullptr) {
    metrics_->AddGeneratedTokens(1);
    if (seq->n_generated == 0) {
      metrics_->time_to_first_token().Observe(Seconds(seq->submitted, now));
    } else {
      metrics_->inter_token_latency().Observe(Seconds(seq->last_token, now));
    }
  }
  seq->last_token = now;

  const bool end_of_turn =
      !req.ignore_eos &&
      (tok.IsEndOfGeneration(id) ||
       std::find(req.stop_tokens.begin(), req.stop_tokens.end(), id) != req.stop_tokens.end());
  GenerationEvent ev;
  bool final = end_of_turn;
  FinishReason reason = FinishReason::kStop;
  if (!end_of_turn) {
    ev.tokens.push_back(std::move(seq->next));
    ++seq->n_generated;
    seq->tokens.push_back(id);
    // The next token would sit at position tokens.size()-1, which must be inside the context.
    if (seq->constraint != nullptr && seq->constraint->Finished()) {
      final = true;  // the grammar's text is complete: nothing may follow
    } else if ((req.max_tokens > 0 && seq->n_generated >= req.max_tokens) ||
               static_cast<int64_t>(seq->tokens.size()) > n_ctx_) {
      final = true;
      reason = FinishReason::kLength;
    }
  }
  GeneratedText::Delta delta = seq->text.Push(end_of_turn ? -1 : id, final);
  ev.text = std::move(delta.text);
  if (delta.stopped) {
    final = true;
    reason = FinishReason::kStop;
  }
  if (final) {
    ev.finish = reason;
    Finish(seq, reason, absl::OkStatus(), std::move(ev));
  } else {
    seq->stream->Push(std::move(ev));
  }
}

void Scheduler::Finish(Sequence* seq, FinishReason reason, absl::Status error,
                       GenerationEvent event) {
  if (seq->done) return;
  seq->done = true;
  seq->cache.Release();
  if (seq->admitted) n_active_.fetch_sub(1);
  event.finish = reason;
  event.error = std::move(error);
  event.prompt_tokens = static_cast<int64_t>(seq->req.prompt.size());
  event.cached_prompt_tokens = seq->cached_prompt_tokens;
  event.completion_tokens = seq->n_generated;
  n_finished_.fetch_add(1);
  if (reason == FinishReason::kCancelled) n_cancelled_.fetch_add(1);
  if (metrics_ != nullptr) metrics_->CountFinish(FinishReasonName(reason));
  seq->stream->Push(std::move(event));
}

}  // namespace moepool
