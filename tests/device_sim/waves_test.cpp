// Waves: many work items in progress per engine, parked on faults or on a
// full fault buffer, with deterministic interleavings (test hooks, not
// sleeps) for the races the wave scheduler must get right.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;
using test::map_range;

constexpr va_t base_va = 0x10'0000'0000;

class Waves : public ::testing::Test {
 protected:
  void make(device_config c) {
    auto made = device::create(std::move(c));
    ASSERT_TRUE(made.ok()) << errc_name(made.error());
    dev = std::move(*made);
    ASSERT_EQ(dev->attach_vm(vm, pt, mem), errc::ok);
    auto qq = dev->create_queue(vm);
    ASSERT_TRUE(qq.ok());
    q = *qq;
  }
  /// Wait (bounded by the watchdog) until the buffer holds n records.
  void wait_records(std::size_t n) {
    while (dev->faults().size() < n) std::this_thread::sleep_for(1ms);
  }
  std::vector<fault_record> fetch_all(std::size_t n) {
    std::vector<fault_record> out(n);
    std::size_t got = 0;
    while (got < n) {
      const std::size_t k = dev->faults().fetch_wait(std::span(out).subspan(got), 10s);
      EXPECT_GT(k, 0u);
      if (k == 0) break;
      got += k;
    }
    out.resize(got);
    return out;
  }
  void map_and_replay(std::span<const fault_record> recs) {
    for (const auto& r : recs) map_range(pt, r.page(), page_size, 0, aperture::system, (r.page() >> page_shift) % 64);
    EXPECT_EQ(dev->replay(recs), recs.size());
  }
  static kernel_fn touch_own_page() {
    return [](work_item& wi) { wi.store<std::uint64_t>(base_va + wi.id() * page_size, wi.id()); };
  }

  test::watchdog wd;
  test::test_mem mem{64};
  dev_page_table pt;
  const vm_id vm = 2;
  std::unique_ptr<device> dev;
  queue_id q = 0;
};

TEST_F(Waves, ConfigValidationRefusesBadShapesWithEinval) {
  EXPECT_EQ(device_config{}.validate(), errc::ok);
  EXPECT_GE(std::uint64_t{device_config{}.engines} * device_config{}.waves_per_engine, 1024u);
  EXPECT_EQ((device_config{.engines = 0}.validate()), errc::inval);
  EXPECT_EQ((device_config{.engines = 257}.validate()), errc::inval);
  EXPECT_EQ((device_config{.waves_per_engine = 0}.validate()), errc::inval);
  EXPECT_EQ((device_config{.waves_per_engine = 1u << 20}.validate()), errc::inval);
  EXPECT_EQ((device_config{.engines = 256, .waves_per_engine = 4096}.validate()), errc::inval);
  EXPECT_EQ((device_config{.wave_stack_bytes = 100}.validate()), errc::inval);
  EXPECT_EQ((device_config{.wave_stack_bytes = std::size_t{1} << 40}.validate()), errc::inval);
  EXPECT_EQ((device_config{.fault_buffer_entries = 0}.validate()), errc::inval);
  EXPECT_EQ((device_config{.tlb = {.sets = 3, .ways = 2}}.validate()), errc::inval);
  EXPECT_EQ((device_config{.tlb = {.sets = 64, .ways = 0}}.validate()), errc::inval);
  EXPECT_EQ((device_config{.vram_bytes = std::uint64_t{1} << 50}.validate()), errc::inval);
  EXPECT_EQ((device::create({.engines = 0}).error()), errc::inval);
  EXPECT_EQ(device::create({.waves_per_engine = 0}).error(), errc::inval);
  EXPECT_EQ(device::create({.fault_buffer_entries = 0}).error(), errc::inval);
  auto ok = device::create({.engines = 1, .waves_per_engine = 1});
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ((*ok)->engine_count(), 1u);
}

TEST_F(Waves, OneEngineKeepsAFaultOutstandingPerWave) {
  make({.engines = 1, .waves_per_engine = 64});
  auto c = dev->submit(q, 64, touch_own_page());
  ASSERT_TRUE(c.ok());
  wait_records(64);  // one engine thread, 64 faults in flight at once
  auto recs = fetch_all(64);
  std::set<std::uint32_t> waves;
  for (const auto& r : recs) waves.insert(r.wave);
  EXPECT_EQ(waves.size(), 64u);
  EXPECT_EQ(dev->stats().waves_parked, 64u);
  EXPECT_EQ(dev->stats().outstanding_faults, 64u);
  map_and_replay(recs);
  ASSERT_TRUE(c->wait(10s).ok());
  for (std::uint64_t i = 0; i < 64; ++i) EXPECT_EQ(mem.word(i % 64, 0), i);
  EXPECT_EQ(dev->stats().outstanding_high_water, 64u);
}

TEST_F(Waves, OneWavePerEngineRunsOneItemAtATime) {
  make({.engines = 1, .waves_per_engine = 1});
  auto c = dev->submit(q, 4, touch_own_page());
  ASSERT_TRUE(c.ok());
  for (int i = 0; i < 4; ++i) {
    auto r = fetch_all(1);
    ASSERT_EQ(r.size(), 1u);
    // The only wave is parked on this record: nothing else can fault.
    EXPECT_EQ(dev->faults().size(), 0u);
    EXPECT_EQ(r[0].wave, 0u);
    map_and_replay(r);
  }
  EXPECT_TRUE(c->wait(10s).ok());
}

// A replay that lands after the wave saw its fault pending and before it
// parks: the wake bit must bring it back (no lost wake-up).
TEST_F(Waves, ReplayRacingAWavesParkIsNotLost) {
  std::atomic<int> at_park{0};
  std::atomic<bool> replayed{false};
  make({.engines = 1, .waves_per_engine = 4, .test_hook = [&](const char* point, unsigned, unsigned) {
          if (std::string_view(point) != "before_park") return;
          at_park.fetch_add(1);
          while (!replayed.load()) std::this_thread::yield();  // hold the wave right before its switch
        }});
  auto c = dev->submit(q, 1, touch_own_page());
  ASSERT_TRUE(c.ok());
  auto recs = fetch_all(1);
  while (at_park.load() < 1) std::this_thread::yield();
  map_and_replay(recs);  // the wave is between its check and its park
  replayed = true;
  EXPECT_TRUE(c->wait(10s).ok());
  EXPECT_EQ(at_park.load(), 1);
}

TEST_F(Waves, CancelOfAKernelParkedOnSeveralEnginesAbortsEveryWave) {
  make({.engines = 2, .waves_per_engine = 8});
  auto c = dev->submit(q, 16, touch_own_page());
  ASSERT_TRUE(c.ok());
  wait_records(16);  // 8 waves per engine: both engines hold 8 parked waves
  std::vector<fault_record> recs(16);
  ASSERT_EQ(dev->faults().fetch(recs), 16u);
  std::set<std::uint32_t> engines;
  for (const auto& r : recs) engines.insert(r.engine);
  EXPECT_EQ(engines.size(), 2u);
  ASSERT_EQ(dev->cancel_queue(q, errc::perm), errc::ok);
  const kernel_status s = c->wait(10s);
  EXPECT_EQ(s.error, errc::canceled);
  EXPECT_EQ(s.reason, errc::perm);
  EXPECT_EQ(dev->stats().waves_parked, 0u);
  EXPECT_EQ(dev->replay(recs), 0u);  // stale now
  // The engines run the next kernel with all their waves.
  map_range(pt, base_va, 16 * page_size, 0, aperture::system, 0);
  auto again = dev->submit(q, 16, touch_own_page());
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->wait(10s).ok());
}

// Waves of one engine parked on, and one running in, the range being
// invalidated: invalidate_tlb() returns (parked waves hold no translation),
// and the running wave's next access uses no stale entry (it faults).
TEST_F(Waves, InvalidationWhileWavesAreParkedOnAndRunningInTheRange) {
  make({.engines = 1, .waves_per_engine = 4});
  const va_t hot = base_va;  // mapped, read in a loop by item 3
  map_range(pt, hot, page_size, 0, aperture::system, 0);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> loops{0};
  // One engine takes items in order, one per wave: items 0..2 park on
  // their faults (pages 1..3, inside the range), then item 3 runs.
  auto c = dev->submit(q, 4, [&](work_item& wi) {
    if (wi.id() == 3) {
      while (!stop.load()) {
        (void)wi.load<std::uint64_t>(hot);
        loops.fetch_add(1);
      }
    } else {
      (void)wi.load<std::uint64_t>(base_va + (wi.id() + 1) * page_size);
    }
  });
  ASSERT_TRUE(c.ok());
  while (loops.load() < 100) std::this_thread::yield();
  EXPECT_EQ(dev->stats().waves_parked, 3u);
  std::vector<va_range> flush;
  ASSERT_EQ(pt.zap(hot, hot + page_size, flush), errc::ok);
  ASSERT_EQ(dev->invalidate_tlb(vm, {hot, hot + 4 * page_size}), errc::ok);
  // The running wave's next load of `hot` faults: no stale translation.
  auto recs = fetch_all(4);
  ASSERT_EQ(recs.size(), 4u);
  std::set<va_t> pages;
  for (const auto& r : recs) pages.insert(r.page());
  EXPECT_EQ(pages, (std::set<va_t>{hot, hot + page_size, hot + 2 * page_size, hot + 3 * page_size}));
  stop = true;
  map_and_replay(recs);
  EXPECT_TRUE(c->wait(10s).ok());
}

TEST_F(Waves, ShutdownWithParkedWavesOnEveryEngineReturns) {
  make({.engines = 2, .waves_per_engine = 64});
  auto c = dev->submit(q, 128, touch_own_page());
  auto queued = dev->submit(q, 1, [](work_item&) {});
  ASSERT_TRUE(c.ok() && queued.ok());
  wait_records(128);
  EXPECT_EQ(dev->stats().waves_parked, 128u);
  dev.reset();  // no driver: must cancel every parked wave and return
  EXPECT_EQ(c->wait(1s).error, errc::canceled);
  EXPECT_EQ(queued->wait(1s).error, errc::canceled);
}

TEST_F(Waves, OneEntryFaultBufferWith1024WavesMakesProgress) {
  make({.engines = 1, .waves_per_engine = 1024, .fault_buffer_entries = 1});
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, test::modulo_policy(64));
  auto c = dev->submit(q, 1024, touch_own_page());
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(60s).ok());
  drv.stop();
  EXPECT_EQ(dev->faults().capacity(), 1u);
  EXPECT_EQ(drv.largest_batch.load(), 1u);
  EXPECT_EQ(drv.records.load(), 1024u);  // every page faulted once: nothing lost or repeated
  EXPECT_EQ(dev->stats().faults, 1024u);
}

TEST_F(Waves, FullBufferParksTheWaveAndTheEngineRunsOthers) {
  // Two items fill the 1-entry buffer (one pushed, one parked on space);
  // a third item that touches mapped memory still completes meanwhile.
  make({.engines = 1, .waves_per_engine = 4, .fault_buffer_entries = 1});
  map_range(pt, base_va + 7 * page_size, page_size, 0, aperture::system, 7);
  std::atomic<int> mapped_done{0};
  auto c = dev->submit(q, 3, [&](work_item& wi) {
    if (wi.id() == 2) {
      wi.store<std::uint64_t>(base_va + 7 * page_size, 1);
      mapped_done = 1;
    } else {
      wi.store<std::uint64_t>(base_va + wi.id() * page_size, 1);
    }
  });
  ASSERT_TRUE(c.ok());
  while (mapped_done.load() == 0) std::this_thread::yield();  // ran while two waves were parked
  while (dev->stats().fault_buffer_full_parks == 0) std::this_thread::yield();
  EXPECT_EQ(dev->faults().size(), 1u);
  auto r1 = fetch_all(1);
  map_and_replay(r1);
  auto r2 = fetch_all(1);  // the parked push went in once space appeared
  EXPECT_NE(r2[0].page(), r1[0].page());
  map_and_replay(r2);
  EXPECT_TRUE(c->wait(10s).ok());
}

TEST_F(Waves, KernelsOfTwoVmsInterleaveOnOneEngineWithoutMixingTranslations) {
  test::test_mem mem2{64};
  dev_page_table pt2;
  make({.engines = 1, .waves_per_engine = 8});
  ASSERT_EQ(dev->attach_vm(9, pt2, mem2), errc::ok);
  auto q2 = dev->create_queue(9);
  ASSERT_TRUE(q2.ok());
  // Same VA, different frames per VM.
  map_range(pt, base_va, 8 * page_size, 0, aperture::system, 0);
  map_range(pt2, base_va, 8 * page_size, 0, aperture::system, 8);
  test::map_on_fault_driver drv(*dev, {{vm, &pt}, {9, &pt2}}, test::modulo_policy(64));
  auto k = [](std::uint64_t tag) {
    return [tag](work_item& wi) {
      const va_t p = base_va + (wi.id() % 8) * page_size + 8 * (wi.id() / 8 % 512);
      (void)wi.load<std::uint64_t>(base_va + (16 + wi.id()) * page_size);  // fault: waves interleave
      wi.store<std::uint64_t>(p, tag);
    };
  };
  auto a = dev->submit(q, 64, k(1));
  auto b = dev->submit(*q2, 64, k(2));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->wait(30s).ok());
  EXPECT_TRUE(b->wait(30s).ok());
  drv.stop();
  for (pfn_t f = 0; f < 8; ++f) {
    EXPECT_EQ(mem.word(f, 0), 1u);
    EXPECT_EQ(mem2.word(f + 8, 0), 2u);
  }
  EXPECT_EQ(mem.word(8, 0), 0u);  // VM 9's frames 8.. live in mem2: mem's frame 8 is untouched
}

TEST_F(Waves, AKernelAbortInOneWaveLeavesTheOtherWavesAndTheEngineSound) {
  make({.engines = 1, .waves_per_engine = 8});
  map_range(pt, base_va, 8 * page_size, 0, aperture::system, 0);
  auto c = dev->submit(q, 8, [](work_item& wi) {
    if (wi.id() == 3) (void)wi.load<std::uint64_t>(base_va + 1);  // unaligned: aborts the kernel
    wi.store<std::uint64_t>(base_va + wi.id() * page_size, 1);
  });
  ASSERT_TRUE(c.ok());
  const kernel_status s = c->wait(10s);
  EXPECT_EQ(s.error, errc::inval);
  EXPECT_EQ(s.address, base_va + 1);
  auto next = dev->submit(q, 8, [](work_item& wi) { wi.store<std::uint64_t>(base_va + wi.id() * page_size + 8, 2); });
  ASSERT_TRUE(next.ok());
  EXPECT_TRUE(next->wait(10s).ok());
  for (pfn_t f = 0; f < 8; ++f) EXPECT_EQ(mem.word(f, 8), 2u);
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && !SVM_TEST_UNDER_SANITIZER
int recurse(work_item& wi, int depth) {
  volatile char pad[512];
  pad[0] = static_cast<char>(depth);
  if (depth == 1 << 30) return pad[0];
  return recurse(wi, depth + 1) + pad[0];
}

TEST(WavesDeathTest, StackOverflowStopsWithAClearMessage) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        test::test_mem mem{4};
        dev_page_table pt;
        auto d = std::move(*device::create({.engines = 1, .waves_per_engine = 2, .wave_stack_bytes = 64 << 10}));
        (void)d->attach_vm(1, pt, mem);
        auto q = d->create_queue(1).value();
        auto c = d->submit(q, 1, [](work_item& wi) { (void)recurse(wi, 0); });
        (void)c->wait(30s);
      },
      "wave stack overflow on engine 0, wave [01] \\(stacks of 65536 bytes\\)");
}
#endif

#if defined(__SANITIZE_THREAD__)
// TSan stays meaningful with fibers: a plain (non-atomic) host variable
// written by waves on two engines, with nothing ordering them, is reported.
// 2 engines x 2 waves and 4 items: each engine holds two items, all four
// park on their faults and are replayed together, then each writes.
long planted_race = 0;

TEST(WavesTsanDeathTest, ARaceBetweenWavesOnTwoEnginesIsReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        test::test_mem mem{8};
        dev_page_table pt;
        auto d = std::move(*device::create({.engines = 2, .waves_per_engine = 2}));
        (void)d->attach_vm(1, pt, mem);
        auto q = d->create_queue(1).value();
        auto c = d->submit(q, 4, [](work_item& wi) {
          (void)wi.load<std::uint64_t>(base_va + wi.id() * page_size);
          planted_race = planted_race + 1;  // the race
        });
        std::vector<fault_record> recs(4);
        std::size_t got = 0;
        while (got < 4) got += d->faults().fetch_wait(std::span(recs).subspan(got), 10s);
        for (auto& r : recs)
          (void)pt.populate(r.page(), r.page() + page_size, 0,
                            [&](va_t) { return dev_pte::make(aperture::system, (r.page() >> page_shift) % 8, true); });
        (void)d->replay(recs);
        (void)c->wait(30s);
        std::abort();  // the report was printed before, if there was one
      },
      "ThreadSanitizer: data race");
}
#endif

}  // namespace
}  // namespace svm::dev
