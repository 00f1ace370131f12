// The planner (coordinator/) writes placement files that the worker (worker/) reads: the two
// sides of one file format, tested together.
#include <string>
#include <utility>
#include <vector>

#include "coordinator/planner.h"
#include "gtest/gtest.h"
#include "worker/expert_set.h"

namespace moepool {
namespace {

TEST(PlacementFileTest, TheWorkerReadsWhatThePlannerWrites) {
  std::vector<std::pair<int, int>> pairs;
  for (int layer = 0; layer < 32; ++layer) {
    for (int expert = 0; expert < (layer < 22 ? 4 : 3); ++expert) pairs.emplace_back(layer, expert);
  }
  pairs.emplace_back(31, 7);
  const std::string text = FormatPlacementFile(pairs, "machine-1");
  auto set = worker::ParsePlacement(text, 32, 8, "machine-1.placement");
  ASSERT_TRUE(set.ok()) << set.status() << "\n" << text;
  EXPECT_EQ(set->pairs(), pairs) << text;
}

}  // namespace
}  // namespace moepool
