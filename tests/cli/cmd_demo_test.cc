// `moepool demo` end to end: synthesizes its model, starts two workers and the coordinator,
// serves a chat completion, and Ctrl-C (SIGINT) stops every process.
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testdata.h"

namespace moepool {
namespace {

TEST(DemoCommandTest, ServesChatThroughTwoWorkersAndStopsOnSigint) {
  const std::string cache = moepool::testing::TempDir() + "/demo-cache";
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    setpgid(0, 0);
    dup2(fds[1], 1);
    close(fds[0]);
    close(fds[1]);
    setenv("XDG_CACHE_HOME", cache.c_str(), 1);
    execl(MOEPOOL_BINARY, MOEPOOL_BINARY, "demo", "--listen", "127.0.0.1:0", nullptr);
    _exit(127);
  }
  close(fds[1]);
  FILE* out = fdopen(fds[0], "r");
  std::string ready;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), out) != nullptr) {
    ready = buf;
    if (ready.rfind("moepool: serving on http://", 0) == 0) break;
  }
  ASSERT_EQ(ready.rfind("moepool: serving on http://127.0.0.1:", 0), 0u) << ready;
  const int port =
      std::stoi(ready.substr(std::string("moepool: serving on http://127.0.0.1:").size()));
  ASSERT_NE(std::fgets(buf, sizeof(buf), out), nullptr);
  EXPECT_EQ(std::string(buf), "web console (workers, experts, chat): http://127.0.0.1:" +
                                  std::to_string(port) + "/\n");

  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(60, 0);
  const std::string body =
      R"({"model": "moepool", "messages": [{"role": "user", "content": "Hello!"}],)"
      R"( "max_tokens": 8, "temperature": 0})";
  auto res = client.Post("/v1/chat/completions", body, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  const auto j = nlohmann::json::parse(res->body);
  EXPECT_EQ(j["usage"]["completion_tokens"], 8);
  auto page = client.Get("/");  // the web console, embedded in the binary
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_EQ(page->get_header_value("Content-Type").rfind("text/html", 0), 0u);
  EXPECT_NE(page->body.find("/console/app.js"), std::string::npos);
  auto health = client.Get("/health");
  ASSERT_TRUE(health);
  const auto h = nlohmann::json::parse(health->body);
  ASSERT_EQ(h["workers"].size(), 2u);
  EXPECT_TRUE(h["workers"][0]["up"].get<bool>());
  EXPECT_TRUE(h["workers"][1]["up"].get<bool>());

  // Ctrl-C goes to the whole process group, as in a terminal.
  kill(-pid, SIGINT);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  std::fclose(out);
  // No process of the group is left.
  EXPECT_EQ(kill(-pid, 0), -1);
}

}  // namespace
}  // namespace moepool
