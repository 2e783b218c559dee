// The fault buffer in isolation: order, bounded capacity, stalls, close.
#include <gtest/gtest.h>

#include <set>

#include "svm/device_sim/fault_buffer.h"
#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;

TEST(FaultBuffer, FetchReturnsRecordsInOrderInBatches) {
  fault_buffer fb(8);
  for (std::uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(fb.push({.vm = 1, .gva = i * page_size, .token = i}));
  EXPECT_EQ(fb.size(), 5u);
  std::array<fault_record, 3> out;
  ASSERT_EQ(fb.fetch(out), 3u);
  EXPECT_EQ(out[0].token, 0u);
  EXPECT_EQ(out[2].token, 2u);
  ASSERT_EQ(fb.fetch(out), 2u);
  EXPECT_EQ(out[1].token, 4u);
  EXPECT_EQ(fb.fetch(out), 0u);
  EXPECT_EQ(fb.fetch_wait(out, 1ms), 0u);  // times out
  auto s = fb.stats();
  EXPECT_EQ(s.pushed, 5u);
  EXPECT_EQ(s.fetched, 5u);
  EXPECT_EQ(s.high_water, 5u);
}

TEST(FaultBuffer, FullBufferStallsProducersAndLosesNothing) {
  test::watchdog wd;
  fault_buffer fb(2);
  constexpr int producers = 4, per = 500;
  std::vector<std::jthread> ts;
  for (int p = 0; p < producers; ++p)
    ts.emplace_back([&, p] {
      for (int i = 0; i < per; ++i) ASSERT_TRUE(fb.push({.engine = static_cast<std::uint32_t>(p), .token = std::uint64_t(i)}));
    });
  std::set<std::pair<std::uint32_t, std::uint64_t>> seen;
  std::array<fault_record, 3> out;
  while (seen.size() < std::size_t{producers * per}) {
    const std::size_t n = fb.fetch_wait(out, 5s);
    ASSERT_GT(n, 0u);
    for (std::size_t i = 0; i < n; ++i) EXPECT_TRUE(seen.insert({out[i].engine, out[i].token}).second);
    if (seen.size() % 97 == 0) std::this_thread::sleep_for(100us);  // let the ring fill up
  }
  ts.clear();
  auto s = fb.stats();
  EXPECT_EQ(s.pushed, std::uint64_t{producers * per});
  EXPECT_LE(s.high_water, 2u);
  EXPECT_GT(s.full_stalls, 0u);
}

TEST(FaultBuffer, OneEntryBufferMakesProgress) {
  test::watchdog wd;
  fault_buffer fb(1);
  EXPECT_EQ(fb.capacity(), 1u);
  std::jthread prod([&] {
    for (std::uint64_t i = 0; i < 200; ++i) ASSERT_TRUE(fb.push({.token = i}));
  });
  std::array<fault_record, 4> out;
  for (std::uint64_t want = 0; want < 200;) {
    const std::size_t n = fb.fetch_wait(out, 5s);
    ASSERT_EQ(n, 1u);  // never more than the capacity
    EXPECT_EQ(out[0].token, want++);
  }
}

TEST(FaultBuffer, CloseReleasesStalledProducers) {
  test::watchdog wd;
  fault_buffer fb(1);
  ASSERT_TRUE(fb.push({}));
  std::atomic<int> result{-1};
  std::jthread prod([&] { result = fb.push({}) ? 1 : 0; });  // stalls: full
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(result.load(), -1) << "a push into a full buffer must stall";
  fb.close();
  prod.join();
  EXPECT_EQ(result.load(), 0);
  EXPECT_FALSE(fb.push({}));
}

TEST(FaultBuffer, WakeFetchersEndsAnUnboundedFetchWait) {
  test::watchdog wd;
  fault_buffer fb(4);
  std::atomic<bool> returned{false};
  std::jthread fetcher([&] {
    std::array<fault_record, 4> out;
    EXPECT_EQ(fb.fetch_wait(out, 24h), 0u);
    returned = true;
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(returned.load());
  while (!returned.load()) {  // a wake before the fetcher started waiting is not lost either
    fb.wake_fetchers();
    std::this_thread::sleep_for(1ms);
  }
  fetcher.join();
  EXPECT_TRUE(returned.load());
}

// With a timed spin before the futex (device_config::wait_spin_ns): a push
// during the spin, one after it (the fetcher asleep), wake_fetchers and the
// timeout all still end the wait correctly.
TEST(FaultBuffer, TimedSpinBeforeSleepingLosesNoPushAndKeepsTheTimeout) {
  test::watchdog wd;
  fault_buffer fb(4, 2'000'000);  // 2 ms of spinning
  EXPECT_EQ(fb.spin_ns(), 2'000'000u);
  std::array<fault_record, 4> out;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(fb.fetch_wait(out, 5ms), 0u);  // spins, then sleeps, then times out
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 5ms);
  for (auto delay : {0ms, 1ms, 30ms}) {  // during the spin, still spinning, asleep
    std::jthread producer([&] {
      std::this_thread::sleep_for(delay);
      EXPECT_TRUE(fb.push({.vm = 1, .gva = page_size, .token = 7}));
    });
    ASSERT_EQ(fb.fetch_wait(out, 10s), 1u) << "push after " << delay.count() << " ms was lost";
    EXPECT_EQ(out[0].token, 7u);
  }
  std::jthread waker([&] {
    std::this_thread::sleep_for(1ms);
    fb.wake_fetchers();
  });
  EXPECT_EQ(fb.fetch_wait(out, 10s), 0u);  // woken during the spin
}

}  // namespace
}  // namespace svm::dev
