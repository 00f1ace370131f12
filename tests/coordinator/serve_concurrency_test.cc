// 16 clients at once against `moepool serve` with two real `moepool worker` processes: mixed
// lengths, streaming and not, some hanging up early, more clients than sequence slots plus queue
// places (so some get 429 and retry). Every completed response equals the same request served
// alone (greedy; the engine's batch invariance), nothing but 429 goes wrong, and afterwards every
// KV cache block is back in the pool and the server still answers.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/coordinator/cluster_process_util.h"
#include "tests/coordinator/fake_worker_util.h"

namespace moepool {
namespace {

using json = nlohmann::json;
using ::moepool::testing::MetricValue;
using ::moepool::testing::ServeProcess;
using ::moepool::testing::SmallModel;
using ::moepool::testing::WorkerProcess;

const char* const kPrompts[] = {"Once upon a time", "The capital of France is",
                                "List three colours:", "def fibonacci(n):"};
const int kLengths[] = {3, 8, 17, 29};

json ChatRequest(int prompt, int max_tokens, bool stream) {
  json req = {{"messages", {{{"role", "user"}, {"content", kPrompts[prompt]}}}},
              {"max_tokens", max_tokens},
              {"temperature", 0},
              {"stream", stream}};
  if (stream) req["stream_options"] = {{"include_usage", true}};
  return req;
}

// What a chat completion produced, streamed or not.
struct Reply {
  int status = 0;
  std::string retry_after;
  std::string content;
  std::string finish_reason;
  int completion_tokens = -1;
  bool done_marker = false;  // streaming: ended with data: [DONE]
  std::string error;         // anything unexpected
};

Reply ParseSse(const std::string& body) {
  Reply r;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(pos, end - pos);
    pos = end + 2;
    if (event.rfind("data: ", 0) != 0) {
      r.error = "not an SSE data line: " + event;
      return r;
    }
    const std::string data = event.substr(6);
    if (data == "[DONE]") {
      r.done_marker = true;
      continue;
    }
    const json c = json::parse(data, nullptr, false);
    if (c.is_discarded()) {
      r.error = "bad JSON chunk: " + data;
      return r;
    }
    if (c.contains("usage") && c["usage"].is_object()) {
      r.completion_tokens = c["usage"]["completion_tokens"];
    }
    if (!c["choices"].empty()) {
      const json& ch = c["choices"][0];
      r.content += ch["delta"].value("content", "");
      if (ch["finish_reason"].is_string()) r.finish_reason = ch["finish_reason"];
    }
  }
  return r;
}

Reply Chat(const ServeProcess& srv, int prompt, int max_tokens, bool stream) {
  httplib::Client client = srv.Client();
  auto res = client.Post("/v1/chat/completions", ChatRequest(prompt, max_tokens, stream).dump(),
                         "application/json");
  Reply r;
  if (!res) {
    r.error = "no response: " + httplib::to_string(res.error());
    return r;
  }
  r.status = res->status;
  r.retry_after = res->get_header_value("Retry-After");
  if (res->status != 200) return r;
  if (stream) {
    Reply s = ParseSse(res->body);
    s.status = r.status;
    return s;
  }
  const json c = json::parse(res->body, nullptr, false);
  if (c.is_discarded()) {
    r.error = "bad JSON: " + res->body;
    return r;
  }
  r.content = c["choices"][0]["message"]["content"];
  r.finish_reason = c["choices"][0]["finish_reason"];
  r.completion_tokens = c["usage"]["completion_tokens"];
  return r;
}

// Starts a streamed chat that would run to the end of the context and hangs up after `chunks`
// chunks. Returns the HTTP status seen (0 if refused before any byte).
int ChatAndHangUp(const ServeProcess& srv, int prompt, int chunks) {
  httplib::Client client = srv.Client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.set_header("Content-Type", "application/json");
  json body = ChatRequest(prompt, 100000, true);
  body.erase("max_tokens");
  body["logit_bias"] = {{"2", -100}};  // no EOS: only the hang-up ends it
  req.body = body.dump();
  int seen = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++seen < chunks; };
  int status = 0;
  req.response_handler = [&](const httplib::Response& r) {
    status = r.status;
    return true;
  };
  client.send(req);
  return status;
}

TEST(ServeConcurrencyTest, SixteenClientsWithHangUpsThroughTwoWorkers) {
  const std::string& model = SmallModel("Q8_0");
  WorkerProcess a, b;
  ASSERT_TRUE(a.Start(model, "0-3"));
  ASSERT_TRUE(b.Start(model, "4-7"));
  ServeProcess srv;
  ASSERT_TRUE(srv.Start({"--model", model, "--workers", a.address() + "," + b.address(),
                         "--parallel", "8", "--max-queue", "4", "--ctx", "256"}));

  // Each (prompt, length) served alone first: the expected replies.
  std::map<std::pair<int, int>, Reply> want;
  for (int p = 0; p < 4; ++p) {
    for (int len : kLengths) {
      Reply r = Chat(srv, p, len, false);
      ASSERT_EQ(r.status, 200) << r.error;
      ASSERT_FALSE(r.content.empty());
      want[{p, len}] = r;
    }
  }

  constexpr int kClients = 16;
  std::atomic<int> ready{0};
  std::atomic<int> refused{0};  // 429s (each retried)
  std::atomic<int> hung_up{0};
  std::mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      const int prompt = i % 4;
      const int len = kLengths[(i / 4) % 4];
      ready.fetch_add(1);
      while (ready.load() < kClients) std::this_thread::yield();
      for (int attempt = 0; attempt < 600; ++attempt) {
        if (i % 4 == 3) {  // hangs up after a few chunks
          const int status = ChatAndHangUp(srv, prompt, 3);
          if (status == 429) {
            refused.fetch_add(1);
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            continue;
          }
          if (status == 200)
            hung_up.fetch_add(1);
          else {
            std::lock_guard<std::mutex> lock(mu);
            failures.push_back("client " + std::to_string(i) + ": status " +
                               std::to_string(status));
          }
          return;
        }
        const bool stream = i % 2 == 0;
        Reply got = Chat(srv, prompt, len, stream);
        if (got.status == 429) {
          refused.fetch_add(1);
          if (got.retry_after.empty()) {
            std::lock_guard<std::mutex> lock(mu);
            failures.push_back("429 without Retry-After");
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          continue;
        }
        const Reply& w = want[{prompt, len}];
        std::string why;
        if (got.status != 200 || !got.error.empty()) {
          why = "status " + std::to_string(got.status) + " " + got.error;
        } else if (got.content != w.content) {
          why = "content '" + got.content + "' != alone '" + w.content + "'";
        } else if (got.finish_reason != w.finish_reason) {
          why = "finish_reason " + got.finish_reason + " != " + w.finish_reason;
        } else if (got.completion_tokens != w.completion_tokens) {
          why = "completion_tokens differ";
        } else if (stream && !got.done_marker) {
          why = "stream without [DONE]";
        }
        if (!why.empty()) {
          std::lock_guard<std::mutex> lock(mu);
          failures.push_back("client " + std::to_string(i) + (stream ? " (stream): " : ": ") + why);
        }
        return;
      }
      std::lock_guard<std::mutex> lock(mu);
      failures.push_back("client " + std::to_string(i) + ": still refused after 600 tries");
    });
  }
  for (std::thread& t : clients) t.join();
  for (const std::string& f : failures) ADD_FAILURE() << f;
  EXPECT_EQ(hung_up.load(), kClients / 4);

  // The hung-up sequences are cancelled and every block comes back.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while ((MetricValue(srv, "moepool_kv_blocks_used") != 0 ||
          MetricValue(srv, "moepool_active_sequences") != 0) &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(MetricValue(srv, "moepool_kv_blocks_used"), 0);
  EXPECT_EQ(MetricValue(srv, "moepool_active_sequences"), 0);
  EXPECT_EQ(MetricValue(srv, "moepool_queue_depth"), 0);
  EXPECT_GT(MetricValue(srv, "moepool_kv_blocks_free"), 0);
  ASSERT_TRUE(srv.alive());
  const Reply after = Chat(srv, 1, 8, false);
  EXPECT_EQ(after.status, 200);
  EXPECT_EQ(after.content, (want[{1, 8}].content));
  std::printf("429s retried: %d\n", refused.load());
}

}  // namespace
}  // namespace moepool
