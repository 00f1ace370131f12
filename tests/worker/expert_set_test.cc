// Expert sets of a worker: index lists, --experts/--layers, placement files, packing and the
// model filter.
#include "worker/expert_set.h"

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool::worker {
namespace {

using Pairs = std::vector<std::pair<int, int>>;
using Ints = std::vector<int>;

// The message of a failed StatusOr contains `needle`.
#define EXPECT_MESSAGE_HAS(status, needle) \
  EXPECT_PRED_FORMAT2(::testing::IsSubstring, needle, std::string((status).message()))

TEST(ParseIndexListTest, AcceptsNumbersRangesAndSpaces) {
  EXPECT_EQ(*ParseIndexList("0-3", 8, "--experts"), (Ints{0, 1, 2, 3}));
  EXPECT_EQ(*ParseIndexList("0,2,5-7", 8, "--experts"), (Ints{0, 2, 5, 6, 7}));
  EXPECT_EQ(*ParseIndexList(" 6 , 1 ", 8, "--experts"), (Ints{1, 6}));
  EXPECT_EQ(*ParseIndexList("7", 8, "--experts"), (Ints{7}));
  EXPECT_EQ(*ParseIndexList("4-4", 8, "--experts"), (Ints{4}));
}

TEST(ParseIndexListTest, RejectsMalformedOutOfRangeAndRepeatedItemsNamingTheFlag) {
  struct Case {
    const char* spec;
    const char* message;
  };
  const Case cases[] = {
      {"", "empty list"},
      {"  ", "empty list"},
      {"a", "'a' is not a number"},
      {"1,,2", "empty item"},
      {"1,", "empty item"},
      {"-1", "'-1' is not a number"},
      {"+1", "'+1' is not a number"},
      {"1-", "'1-' is not a number"},
      {"1-2-3", "'1-2-3' is not a number"},
      {"3-1", "runs backwards"},
      {"8", "8 is out of range (the model has 8, numbered 0-7)"},
      {"0-8", "8 is out of range"},
      {"99999999999999999999", "is not a number"},
      {"1,1", "1 is listed twice"},
      {"0-3,2", "2 is listed twice"},
  };
  for (const Case& c : cases) {
    auto r = ParseIndexList(c.spec, 8, "--experts");
    ASSERT_FALSE(r.ok()) << "'" << c.spec << "'";
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_MESSAGE_HAS(r.status(), "--experts");
    EXPECT_MESSAGE_HAS(r.status(), c.message) << "'" << c.spec << "'";
  }
}

TEST(ExpertSetFromFlagsTest, ExpertsOnListedLayersOrOnAll) {
  auto some = ExpertSetFromFlags("0-1", "2-3", 4, 8);
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_EQ(some->pairs(), (Pairs{{2, 0}, {2, 1}, {3, 0}, {3, 1}}));
  auto all_layers = ExpertSetFromFlags("5", "", 4, 8);
  ASSERT_TRUE(all_layers.ok()) << all_layers.status();
  EXPECT_EQ(all_layers->pairs(), (Pairs{{0, 5}, {1, 5}, {2, 5}, {3, 5}}));

  auto bad_layer = ExpertSetFromFlags("0", "4", 4, 8);
  ASSERT_FALSE(bad_layer.ok());
  EXPECT_MESSAGE_HAS(bad_layer.status(), "--layers: 4 is out of range");
  auto bad_expert = ExpertSetFromFlags("0-8", "", 4, 8);
  ASSERT_FALSE(bad_expert.ok());
  EXPECT_MESSAGE_HAS(bad_expert.status(), "--experts: 8");
}

TEST(ParsePlacementTest, ReadsLinesWithRangesCommentsAndBlankLines) {
  const std::string text =
      "# worker A\n"
      "\n"
      "layers 0-1: experts 0-3   # the first two layers\n"
      "  3 :6,7\n"
      "layer 2: expert 5\r\n";
  auto set = ParsePlacement(text, 4, 8, "a.placement");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(
      set->pairs(),
      (Pairs{
          {0, 0}, {0, 1}, {0, 2}, {0, 3}, {1, 0}, {1, 1}, {1, 2}, {1, 3}, {2, 5}, {3, 6}, {3, 7}}));
}

TEST(ParsePlacementTest, ErrorsNameTheFileAndLine) {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"0: 1\n1 2\n", "p.txt:2: expected 'layers LIST: experts LIST'"},
      {"layers 0: layers 1\n", "p.txt:1: experts: 'layers 1' is not a number"},
      {"layers: 1\n", "p.txt:1: layers: 'layers' is not a number"},
      {"0: 1\n\n4: 1\n", "p.txt:3: layers: 4 is out of range"},
      {"0: 8\n", "p.txt:1: experts: 8 is out of range"},
      {"0: \n", "p.txt:1: experts: empty list"},
      {": 1\n", "p.txt:1: layers: empty list"},
      {"0-1: 1\n1: 2\n", "p.txt:2: layer 1 is already placed"},
      {"# nothing\n\n", "p.txt: the placement names no (layer, expert) pairs"},
      {"", "names no"},
  };
  for (const Case& c : cases) {
    auto r = ParsePlacement(c.text, 4, 8, "p.txt");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_MESSAGE_HAS(r.status(), c.message) << c.text;
  }
}

TEST(ReadPlacementFileTest, ReadsAFileAndReportsAMissingOne) {
  const std::string path = moepool::testing::TempDir() + "/worker-a.placement";
  {
    std::ofstream out(path);
    out << "1: 2-3\n";
  }
  auto set = ReadPlacementFile(path, 4, 8);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->pairs(), (Pairs{{1, 2}, {1, 3}}));
  auto missing = ReadPlacementFile(path + ".absent", 4, 8);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_MESSAGE_HAS(missing.status(), path + ".absent");
}

TEST(ExpertSetTest, SortsMergesPacksAndFilters) {
  const ExpertSet set(Pairs{{3, 1}, {0, 7}, {3, 1}, {1, 0}});
  EXPECT_EQ(set.pairs(), (Pairs{{0, 7}, {1, 0}, {3, 1}}));
  EXPECT_EQ(set.size(), 3u);
  EXPECT_TRUE(set.Contains(3, 1));
  EXPECT_FALSE(set.Contains(1, 3));
  EXPECT_FALSE(set.Contains(2, 0));
  EXPECT_EQ(set.Packed(), (std::vector<uint32_t>{7u, 65536u, 3u * 65536u + 1u}));
  EXPECT_EQ(set.Summary(), "3 experts on 3 layers");
  const ExpertFilter filter = set.Filter();
  EXPECT_FALSE(filter.non_expert);
  ASSERT_TRUE(static_cast<bool>(filter.keep));
  EXPECT_TRUE(filter.keep(0, 7));
  EXPECT_FALSE(filter.keep(0, 6));
  EXPECT_TRUE(ExpertSet().empty());
}

}  // namespace
}  // namespace moepool::worker
