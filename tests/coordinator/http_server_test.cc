#include "coordinator/http_server.h"

#include <httplib.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/openai_api.h"
#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using json = nlohmann::json;
using ::moepool::testing::LoadTinyEngine;

// True if `s` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1, cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2, cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    for (int k = 1; k <= n; ++k) {
      if (i + k >= s.size()) return false;
      const unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

// A server over the tiny model on 127.0.0.1 with an ephemeral port.
struct TestServer {
  explicit TestServer(SchedulerOptions so = {}, HttpServerOptions ho = {},
                      bool start_scheduler = true, int64_t n_ctx = 256) {
    engine = LoadTinyEngine(n_ctx);
    tmpl = std::make_unique<ChatTemplate>(ChatFormat::kMistral, &engine->tokenizer());
    metrics = std::make_unique<ServerMetrics>(static_cast<int>(engine->config().n_layer),
                                              static_cast<int>(engine->config().n_expert));
    engine->transformer().set_routing_observer(metrics.get());
    scheduler = std::make_unique<Scheduler>(engine.get(), so, metrics.get());
    ho.host = "127.0.0.1";
    ho.port = 0;
    ho.model_id = "tiny";
    http = std::make_unique<HttpServer>(scheduler.get(), tmpl.get(), metrics.get(), ho);
    if (start_scheduler) scheduler->Start();
    const absl::Status s = http->Start();
    EXPECT_TRUE(s.ok()) << s;
    client = std::make_unique<httplib::Client>("127.0.0.1", http->port());
    client->set_read_timeout(120, 0);
  }
  ~TestServer() {
    http->Stop();
    scheduler->Stop();
  }
  httplib::Result Post(const std::string& path, const std::string& body,
                       const httplib::Headers& headers = {}) {
    return client->Post(path, headers, body, "application/json");
  }

  std::unique_ptr<Engine> engine;
  std::unique_ptr<ChatTemplate> tmpl;
  std::unique_ptr<ServerMetrics> metrics;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<HttpServer> http;
  std::unique_ptr<httplib::Client> client;
};

// The JSON payloads of an SSE body ("[DONE]" as a string).
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(pos, end - pos);
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    out.push_back(event.substr(6));
    pos = end + 2;
  }
  return out;
}

const char kChat[] =
    R"({"messages": [{"role": "user", "content": "Write a poem"}], "max_tokens": 12,
        "temperature": 0)";

TEST(HttpServerTest, NonStreamingChatMatchesTheEngine) {
  TestServer srv;
  // The greedy reference straight from the engine (the scheduler is idle now).
  const auto prompt = *srv.tmpl->Apply({{"user", "Write a poem"}});
  Engine::GenerateOptions g;
  g.max_tokens = 12;
  g.sampling.temperature = 0;
  const auto ref = *srv.engine->Generate(prompt, g, nullptr);
  StreamingDetokenizer detok(srv.engine->tokenizer());
  std::string want;
  for (int32_t id : ref) want += detok.Push(id);
  want += detok.Flush();
  if (!want.empty() && want[0] == ' ') want.erase(0, 1);

  auto res = srv.Post("/v1/chat/completions", std::string(kChat) + "}");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(res->get_header_value("Content-Type"), "application/json");
  const json j = json::parse(res->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_EQ(j["choices"][0]["message"]["content"], want);
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt.size());
  EXPECT_EQ(j["usage"]["completion_tokens"], ref.size());
  EXPECT_EQ(j["choices"][0]["finish_reason"], ref.size() == 12 ? "length" : "stop");
}

TEST(HttpServerTest, StreamingChatSendsChunksUsageAndDone) {
  TestServer srv;
  auto whole = srv.Post("/v1/chat/completions", std::string(kChat) + "}");
  ASSERT_TRUE(whole);
  const std::string want = json::parse(whole->body)["choices"][0]["message"]["content"];
  auto res = srv.Post(
      "/v1/chat/completions",
      std::string(kChat) + R"(, "stream": true, "stream_options": {"include_usage": true}})");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  const auto events = SseData(res->body);
  ASSERT_GE(events.size(), 4u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json first = json::parse(events[0]);
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  std::string id = first["id"];
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const json c = json::parse(events[i]);
    EXPECT_EQ(c["object"], "chat.completion.chunk");
    EXPECT_EQ(c["id"], id);
    if (c["choices"][0]["delta"].contains("content")) text += c["choices"][0]["delta"]["content"];
  }
  EXPECT_EQ(text, want);
  const json finish = json::parse(events[events.size() - 3]);
  EXPECT_FALSE(finish["choices"][0]["finish_reason"].is_null());
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"], json::parse(whole->body)["usage"]);
}

// A conversation sent again (as every chat client does on the next turn) reuses the cached KV of
// its prompt: usage reports the cached tokens the way OpenAI does, the reply is unchanged, and
// /metrics counts the hits.
TEST(HttpServerTest, RepeatedPromptReportsCachedTokens) {
  TestServer srv;
  const std::string body =
      R"({"messages": [{"role": "system", "content": "You are a patient teacher of geography. )"
      R"(Keep answers short."}, {"role": "user", "content": "Name the longest river."}],)"
      R"( "max_tokens": 6, "temperature": 0, "stream": true,)"
      R"( "stream_options": {"include_usage": true}})";
  auto usage_of = [&](std::string* text) {
    auto res = srv.Post("/v1/chat/completions", body);
    EXPECT_TRUE(res);
    if (!res) return json();
    const auto events = SseData(res->body);
    for (size_t i = 0; i + 2 < events.size(); ++i) {
      const json c = json::parse(events[i]);
      if (c["choices"][0]["delta"].contains("content"))
        *text += c["choices"][0]["delta"]["content"];
    }
    return json::parse(events[events.size() - 2])["usage"];
  };
  std::string first_text, second_text;
  const json first = usage_of(&first_text);
  const json second = usage_of(&second_text);
  const int64_t prompt = first["prompt_tokens"];
  const int64_t block = srv.scheduler->stats().block_size;
  ASSERT_GT(prompt, block);
  EXPECT_EQ(first["prompt_tokens_details"]["cached_tokens"], 0);
  EXPECT_EQ(second["prompt_tokens_details"]["cached_tokens"], (prompt - 1) / block * block);
  EXPECT_EQ(second_text, first_text);
  auto metrics = srv.client->Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("moepool_prefix_cache_hit_tokens_total " +
                               std::to_string((prompt - 1) / block * block) + "\n"),
            std::string::npos);
}

// The next turn of a chat renders the earlier turns exactly as they were rendered before, so at
// least the blocks of the first turn's prompt come from the cache (more if the reply's text
// tokenizes back to the sampled tokens).
TEST(HttpServerTest, ANextChatTurnReusesThePreviousPrompt) {
  TestServer srv;
  json messages = json::array(
      {{{"role", "system"}, {"content", "You are a patient teacher of geography. Be short."}},
       {{"role", "user"}, {"content", "Name the longest river in Africa, and its length."}}});
  auto chat = [&](const json& m) {
    auto res = srv.Post("/v1/chat/completions",
                        json{{"messages", m}, {"max_tokens", 8}, {"temperature", 0}}.dump());
    EXPECT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    return json::parse(res->body);
  };
  const json first = chat(messages);
  const int64_t prompt1 = first["usage"]["prompt_tokens"];
  const int64_t block = srv.scheduler->stats().block_size;
  ASSERT_GE(prompt1, 2 * block);
  messages.push_back(
      {{"role", "assistant"}, {"content", first["choices"][0]["message"]["content"]}});
  messages.push_back({{"role", "user"}, {"content", "And in Europe?"}});
  const json second = chat(messages);
  EXPECT_GE(second["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>(),
            prompt1 / block * block);
}

TEST(HttpServerTest, CompletionsModelsHealthAndMetrics) {
  TestServer srv;
  auto res = srv.Post("/v1/completions", R"({"prompt": "The quick brown", "max_tokens": 5,
                                            "logprobs": 2, "seed": 7})");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json j = json::parse(res->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["usage"]["completion_tokens"], 5);
  EXPECT_EQ(j["choices"][0]["logprobs"]["tokens"].size(), 5u);
  EXPECT_EQ(j["choices"][0]["logprobs"]["top_logprobs"][0].size(), 2u);
  // The same seed gives the same text.
  auto again = srv.Post("/v1/completions", R"({"prompt": "The quick brown", "max_tokens": 5,
                                              "logprobs": 2, "seed": 7})");
  EXPECT_EQ(json::parse(again->body)["choices"][0]["text"], j["choices"][0]["text"]);

  auto models = srv.client->Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "tiny");
  EXPECT_EQ(srv.client->Get("/v1/models/tiny")->status, 200);
  EXPECT_EQ(srv.client->Get("/v1/models/gpt-4")->status, 404);
  auto health = srv.client->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(json::parse(health->body)["status"], "ok");
  auto metrics = srv.client->Get("/metrics");
  ASSERT_TRUE(metrics);
  const std::string& m = metrics->body;
  EXPECT_NE(m.find("moepool_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("moepool_generated_tokens_total 10"), std::string::npos);
  EXPECT_NE(m.find("moepool_time_to_first_token_seconds_count 2"), std::string::npos);
  EXPECT_NE(m.find("moepool_inter_token_latency_seconds_count 8"), std::string::npos);
  EXPECT_NE(m.find("moepool_kv_blocks_used 0"), std::string::npos);
  // Bucket bounds in their shortest form; a histogram of step times for alerts.
  EXPECT_NE(m.find("moepool_time_to_first_token_seconds_bucket{le=\"0.0025\"}"), std::string::npos);
  EXPECT_EQ(m.find("000000000"), std::string::npos) << m;
  EXPECT_NE(m.find("moepool_step_duration_seconds_bucket{le=\"0.05\"}"), std::string::npos);
  EXPECT_NE(m.find("moepool_step_duration_seconds_count"), std::string::npos);
  EXPECT_NE(m.find("moepool_expert_routed_tokens_total{layer=\"3\",expert=\"7\"}"),
            std::string::npos);
  uint64_t routed = 0;
  for (int e = 0; e < 8; ++e) routed += srv.metrics->routed(0, e);
  EXPECT_GT(routed, 0u);
}

struct ErrorCase {
  const char* path;
  std::string body;
  int status;
  const char* param;  // nullptr: null
};

TEST(HttpServerTest, BadRequestsGetOpenAiErrors) {
  HttpServerOptions ho;
  ho.max_body_bytes = 64 << 10;
  TestServer srv({}, ho);
  std::string long_prompt;
  for (int i = 0; i < 400; ++i) long_prompt += "word ";
  const std::vector<ErrorCase> cases = {
      {"/v1/chat/completions", "{not json", 400, nullptr},
      {"/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "x"}]})", 400,
       "messages[0].role"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "n": 2})", 400,
       "n"},
      {"/v1/chat/completions",
       R"({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]})", 400,
       "messages"},
      {"/v1/chat/completions",
       R"({"messages": [{"role": "user", "content": ")" + long_prompt + R"("}]})", 400, "messages"},
      {"/v1/completions", R"({"prompt": ")" + long_prompt + R"("})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [1, 99999]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": "x", "temperature": -1})", 400, "temperature"},
  };
  for (const ErrorCase& c : cases) {
    auto res = srv.Post(c.path, c.body);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, c.status) << c.body.substr(0, 80);
    const json j = json::parse(res->body, nullptr, false);
    ASSERT_TRUE(j.contains("error")) << res->body;
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_TRUE(j["error"]["message"].is_string());
    if (c.param == nullptr) {
      EXPECT_TRUE(j["error"]["param"].is_null()) << res->body;
    } else {
      EXPECT_EQ(j["error"]["param"], c.param) << res->body;
    }
  }
  auto ctx = srv.Post("/v1/completions", R"({"prompt": ")" + long_prompt + R"("})");
  EXPECT_EQ(json::parse(ctx->body)["error"]["code"], "context_length_exceeded");
  auto missing = srv.client->Get("/v1/nothing");
  EXPECT_EQ(missing->status, 404);
  EXPECT_TRUE(json::parse(missing->body).contains("error"));
  auto big = srv.Post("/v1/completions", std::string(100 << 10, ' '));
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
}

// curl -d sends application/x-www-form-urlencoded; a large JSON body must still be read as JSON.
TEST(HttpServerTest, ReadsJsonWhateverTheContentType) {
  TestServer srv;
  const json body = {{"prompt", "x"}, {"max_tokens", 1}, {"user", std::string(20000, 'u')}};
  auto res = srv.client->Post("/v1/completions", body.dump(), "application/x-www-form-urlencoded");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

// The first half of a graceful stop: /health says draining, new completions get 503, and
// open_responses counts a response until it is fully written.
TEST(HttpServerTest, DrainRefusesNewWorkAndCountsOpenResponses) {
  TestServer srv;
  const std::string body = R"({"prompt": "x", "max_tokens": 2})";
  ASSERT_EQ(srv.Post("/v1/completions", body)->status, 200);
  EXPECT_EQ(srv.http->open_responses(), 0);
  srv.http->BeginDrain();
  auto health = srv.client->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 503);
  EXPECT_EQ(json::parse(health->body)["status"], "draining");
  auto refused = srv.Post("/v1/completions", body);
  EXPECT_EQ(refused->status, 503);
  EXPECT_EQ(json::parse(refused->body)["error"]["type"], "server_error");
  auto metrics = srv.client->Get("/metrics");  // still observable
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("moepool_draining 1"), std::string::npos);
}

TEST(HttpServerTest, ApiKeysGuardTheApiButNotHealth) {
  HttpServerOptions ho;
  ho.api_keys = {"key-one", "key-two"};
  TestServer srv({}, ho);
  const std::string body = R"({"prompt": "x", "max_tokens": 1})";
  auto none = srv.Post("/v1/completions", body);
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(json::parse(none->body)["error"]["code"], "invalid_api_key");
  EXPECT_EQ(srv.Post("/v1/completions", body, {{"Authorization", "Bearer key-on"}})->status, 401);
  EXPECT_EQ(srv.Post("/v1/completions", body, {{"Authorization", "Bearer key-one!"}})->status, 401);
  EXPECT_EQ(srv.Post("/v1/completions", body, {{"Authorization", "Bearer key-two"}})->status, 200);
  EXPECT_EQ(srv.client->Get("/v1/models")->status, 401);
  EXPECT_EQ(srv.client->Get("/health")->status, 200);
  EXPECT_EQ(srv.client->Get("/metrics")->status, 200);
}

TEST(HttpServerTest, FullQueueIs429WithRetryAfter) {
  SchedulerOptions so;
  so.max_active = 1;
  so.max_queue = 0;
  TestServer srv(so, {}, /*start_scheduler=*/false);
  GenerationRequest hold;
  hold.prompt = {1, 415};
  auto held = srv.scheduler->Submit(hold);  // fills the only place; nothing runs it
  ASSERT_TRUE(held.ok());
  auto res = srv.Post("/v1/chat/completions", std::string(kChat) + "}");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 429);
  EXPECT_EQ(res->get_header_value("Retry-After"), "1");
  EXPECT_EQ(json::parse(res->body)["error"]["type"], "rate_limit_error");
}

// Byte-fallback tokens pushed up by logit_bias: every chunk is still valid UTF-8 and the text is
// the tokens' bytes with invalid sequences replaced.
TEST(HttpServerTest, EveryStreamedChunkIsValidUtf8) {
  TestServer srv;
  const Tokenizer& tok = srv.engine->tokenizer();
  json bias = json::object();
  for (const char* b : {"<0xE2>", "<0x82>", "<0xAC>", "<0xF0>", "<0x9F>", "<0x98>", "<0xC3>",
                        "<0xA9>", "<0xFF>", "<0x41>"}) {
    bias[std::to_string(tok.PieceToId(b))] = 100;
  }
  const json req = {{"messages", {{{"role", "user"}, {"content", "bytes"}}}},
                    {"max_tokens", 61},
                    {"seed", 11},
                    {"logit_bias", bias},
                    {"logprobs", true},
                    {"stream", true}};
  auto res = srv.Post("/v1/chat/completions", req.dump());
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_TRUE(ValidUtf8(res->body));
  std::string text, bytes;
  for (const std::string& e : SseData(res->body)) {
    if (e == "[DONE]") break;
    const json c = json::parse(e);
    const json& choice = c["choices"][0];
    const std::string delta = choice["delta"].value("content", "");
    EXPECT_TRUE(ValidUtf8(delta));
    text += delta;
    if (choice["logprobs"].is_object()) {
      for (const json& t : choice["logprobs"]["content"]) {
        for (int b : t["bytes"]) bytes.push_back(static_cast<char>(b));
      }
    }
  }
  const bool replaced = text.find("\xEF\xBF\xBD") != std::string::npos;
  EXPECT_EQ(bytes.size(), 61u);
  EXPECT_TRUE(replaced) << "no invalid byte sequence was generated";
  EXPECT_TRUE(ValidUtf8(text));
  // Non-streamed, the same request is a 200 with valid UTF-8 too.
  json plain = req;
  plain["stream"] = false;
  auto whole = srv.Post("/v1/chat/completions", plain.dump());
  ASSERT_EQ(whole->status, 200);
  EXPECT_EQ(json::parse(whole->body)["choices"][0]["message"]["content"], text);
}

TEST(HttpServerTest, ClientDisconnectCancelsTheSequence) {
  TestServer srv({}, {}, true, /*n_ctx=*/2048);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.set_header("Content-Type", "application/json");
  // EOS suppressed: it would run to the end of the context unless cancelled.
  req.body = R"({"messages": [{"role": "user", "content": "Go on"}], "stream": true,
                 "logit_bias": {"2": -100}})";
  int chunks = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 3; };
  auto res = srv.client->send(req);
  EXPECT_FALSE(res);  // we hung up
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (srv.scheduler->stats().finished == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const SchedulerStats st = srv.scheduler->stats();
  EXPECT_EQ(st.cancelled, 1u);
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.active, 0);
}

}  // namespace
}  // namespace moepool

namespace moepool {
namespace {

// POST /tokenize and /detokenize (llama-server's): the engine's own tokenizer, round trip,
// pieces, errors, and the API key as on /v1.
TEST(HttpServerTest, TokenizeAndDetokenizeLikeLlamaServer) {
  HttpServerOptions ho;
  ho.api_keys = {"k"};
  TestServer srv({}, ho);
  const httplib::Headers key = {{"Authorization", "Bearer k"}};
  const Tokenizer& tok = srv.engine->tokenizer();
  const std::string text = "Hello world, naïve café 😀";
  auto r = srv.Post("/tokenize", json{{"content", text}}.dump(), key);
  ASSERT_EQ(r->status, 200) << r->body;
  const std::vector<int32_t> want = tok.Encode(text, /*add_bos=*/false);
  EXPECT_EQ(json::parse(r->body)["tokens"].get<std::vector<int32_t>>(), want);
  r = srv.Post("/tokenize", json{{"content", text}, {"add_special", true}}.dump(), key);
  EXPECT_EQ(json::parse(r->body)["tokens"][0], tok.bos_id()) << r->body;
  r = srv.Post("/tokenize", json{{"content", text}, {"with_pieces", true}}.dump(), key);
  ASSERT_EQ(r->status, 200) << r->body;
  std::string joined;
  const json with_pieces = json::parse(r->body);
  for (const json& t : with_pieces["tokens"]) {
    const json& piece = t["piece"];
    if (piece.is_string()) {
      joined += piece.get<std::string>();
    } else {  // bytes of a character split over tokens
      for (const json& b : piece) joined += static_cast<char>(b.get<int>());
    }
  }
  std::string pieces;
  for (const int32_t id : want) pieces += tok.TokenToPiece(id);
  EXPECT_EQ(joined, pieces);
  r = srv.Post("/detokenize", json{{"tokens", want}}.dump(), key);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(json::parse(r->body)["content"], text);
  EXPECT_TRUE(
      ValidUtf8(srv.Post("/detokenize", json{{"tokens", {want.back()}}}.dump(), key)->body));

  EXPECT_EQ(srv.Post("/tokenize", json{{"content", "x"}}.dump())->status, 401);
  EXPECT_EQ(srv.Post("/detokenize", json{{"tokens", {1}}}.dump())->status, 401);
  const std::pair<const char*, std::string> bad[] = {
      {"/tokenize", "not json"},
      {"/tokenize", "[1]"},
      {"/tokenize", R"({"content": 5})"},
      {"/tokenize", R"({})"},
      {"/tokenize", R"({"content": "x", "add_special": "yes"})"},
      {"/detokenize", R"({"tokens": "1 2"})"},
      {"/detokenize", R"({"tokens": [1, -1]})"},
      {"/detokenize", R"({"tokens": [1, 1e9]})"},
      {"/detokenize", R"({"tokens": [1.5]})"},
      {"/detokenize", json{{"tokens", {tok.n_vocab()}}}.dump()},
  };
  for (const auto& [path, body] : bad) {
    auto e = srv.Post(path, body, key);
    ASSERT_TRUE(e);
    EXPECT_EQ(e->status, 400) << path << " " << body << ": " << e->body;
    EXPECT_TRUE(json::parse(e->body)["error"]["message"].is_string()) << e->body;
  }
}

}  // namespace
}  // namespace moepool
