#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "svm/base/fence.h"

namespace svm {
namespace {

TEST(Fence, SignalsOnceWithErrorAndRunsCallbacksOnce) {
  auto f = fence::create("t");
  int calls = 0;
  ASSERT_TRUE(f->add_callback([&](const fence& x) {
    ++calls;
    EXPECT_EQ(x.error(), errc::io);
  }));
  EXPECT_FALSE(f->is_signaled());
  EXPECT_TRUE(f->signal(errc::io));
  EXPECT_FALSE(f->signal(errc::ok));
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(f->error(), errc::io);
  EXPECT_FALSE(f->add_callback([&](const fence&) { ++calls; }));
  EXPECT_EQ(calls, 1);
}

TEST(Fence, WaitTimesOutThenSucceeds) {
  auto f = fence::create("t");
  EXPECT_EQ(f->wait(std::chrono::milliseconds(2)), errc::timedout);
  std::jthread t([&] { f->signal(); });
  EXPECT_EQ(f->wait(std::chrono::seconds(10)), errc::ok);
  EXPECT_EQ(f->wait(), errc::ok);
}

TEST(Fence, ConcurrentSignallersOnlyOneWins) {
  auto f = fence::create("t");
  std::atomic<int> wins{0}, cbs{0};
  f->add_callback([&](const fence&) { ++cbs; });
  {
    std::vector<std::jthread> ts;
    for (int i = 0; i < 4; ++i) ts.emplace_back([&] { wins += f->signal(); });
  }
  EXPECT_EQ(wins.load(), 1);
  EXPECT_EQ(cbs.load(), 1);
}

std::vector<fence_sig::violation> g_seen;
void capture(const fence_sig::violation& v) { g_seen.push_back(v); }

TEST(FenceSignalling, WaitInsideSectionIsReportedWithBothSites) {
  if (!SVM_LOCK_CHECKS) GTEST_SKIP() << "signalling checks are compiled out in this build";
  g_seen.clear();
  auto prev = fence_sig::set_violation_handler(&capture);
  auto other = fence::signaled_fence();
  {
    const int section_line = __LINE__ + 1;
    fence_sig::section sec("copy job");
    EXPECT_TRUE(fence_sig::in_section());
    const int wait_line = __LINE__ + 1;
    (void)other->wait(std::chrono::milliseconds(1));
    ASSERT_EQ(g_seen.size(), 1u);
    EXPECT_EQ(g_seen[0].section_site.line, section_line);
    EXPECT_EQ(g_seen[0].op_site.line, wait_line);
    EXPECT_NE(g_seen[0].describe().find("copy job"), std::string::npos);
  }
  EXPECT_FALSE(fence_sig::in_section());
  (void)other->wait(std::chrono::milliseconds(1));
  EXPECT_EQ(g_seen.size(), 1u);
  fence_sig::set_violation_handler(prev);
}

}  // namespace
}  // namespace svm
