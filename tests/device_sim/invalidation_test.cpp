// Ranged TLB invalidation: deterministic interleavings with an access in
// flight, idle and stalled engines, the log overflow, and a stress run in
// which the oracle catches any access to a retired frame.
#include <gtest/gtest.h>

#include <mutex>
#include <random>

#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;
using test::map_range;
using test::run_kernel;

constexpr va_t base_va = 0x20'0000'0000;
constexpr vm_id vm = 1;

struct Inval : ::testing::Test {
  void make(device_config c) {
    auto made = device::create(std::move(c));
    ASSERT_TRUE(made.ok()) << errc_name(made.error());
    dev = std::move(*made);
    ASSERT_EQ(dev->attach_vm(vm, pt, mem), errc::ok);
    q = dev->create_queue(vm).value();
  }
  void remap(va_t va, pfn_t pfn) {  // clear, then write a new PTE (no TLB invalidation)
    std::vector<va_range> flush;
    ASSERT_EQ(pt.zap(va, va + page_size, flush), errc::ok);
    map_range(pt, va, page_size, 0, aperture::system, pfn);
  }
  static void wait_for(const std::atomic<bool>& flag) {
    while (!flag.load()) std::this_thread::sleep_for(100us);
  }

  test::watchdog wd;
  test::test_mem mem{64};
  dev_page_table pt;
  std::unique_ptr<device> dev;
  queue_id q = 0;
};

// The property the issue names: an access that began before the
// invalidation cannot use the old translation once it has completed, i.e.
// invalidate_tlb() does not return while an access that translated through
// the old PTE is still in flight, and every access after it retranslates.
TEST_F(Inval, AccessInFlightCompletesBeforeInvalidationReturns) {
  make({.engines = 2});
  const va_t p = base_va;
  mem.set_word(1, 0, 111);  // old frame
  mem.set_word(2, 0, 222);  // new frame
  map_range(pt, p, page_size, 0, aperture::system, 1);
  std::atomic<bool> in_access{false}, release{false}, go_on{false};
  // The injected pause: the oracle runs inside the access, after the
  // translation and before the memory operation.
  dev->set_oracle([&](const access_check& c) {
    if (c.acc == access::write && !in_access.exchange(true)) {
      EXPECT_EQ(c.pfn, 1u);
      wait_for(release);
    }
  });
  std::uint64_t after = 0;
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    (void)wi.load<std::uint64_t>(p);       // caches p -> frame 1
    wi.store<std::uint64_t>(p + 8, 5);    // paused in flight, old translation
    while (!go_on.load()) wi.boundary();  // waits on host state: explicit boundaries
    after = wi.load<std::uint64_t>(p);    // must retranslate: frame 2
  });
  ASSERT_TRUE(k.ok());
  wait_for(in_access);
  remap(p, 2);
  std::atomic<bool> returned{false};
  std::jthread inv([&] {
    EXPECT_EQ(dev->invalidate_tlb(vm, {p, p + page_size}), errc::ok);
    returned = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(returned.load()) << "invalidation returned while an access through the old PTE was in flight";
  release = true;
  inv.join();
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(mem.word(1, 8), 5u) << "the access that began before completes on the old frame";
  go_on = true;
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_EQ(after, 222u) << "an access after the invalidation used a stale translation";
  EXPECT_GE(dev->stats().tlb_acks, 1u);
}

// The walker variant: the engine is paused inside the page-table walk (radix
// test hook) when the PTE is cleared and the invalidation starts.
TEST_F(Inval, WalkInFlightCompletesBeforeInvalidationReturns) {
  make({.engines = 1});
  const va_t p = base_va + page_size;
  map_range(pt, p, page_size, 0, aperture::system, 3);
  std::atomic<bool> paused{false}, release{false}, armed{false};
  pt.set_test_hooks({.on_walk_node = [&](const pt::node* n) {
    if (n->level == 0 && armed.load() && !paused.exchange(true)) wait_for(release);
  }});
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, [](const fault_record&) { return dev_pte::make(aperture::system, 4, true); });
  armed = true;
  std::uint64_t first = 0, second = 0;
  mem.set_word(3, 0, 33);
  mem.set_word(4, 0, 44);
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    first = wi.load<std::uint64_t>(p);   // walk paused at the leaf node
    second = wi.load<std::uint64_t>(p);
  });
  ASSERT_TRUE(k.ok());
  wait_for(paused);
  std::vector<va_range> flush;
  ASSERT_EQ(pt.zap(p, p + page_size, flush), errc::ok);
  std::atomic<bool> returned{false};
  std::jthread inv([&] {
    EXPECT_EQ(dev->invalidate_tlb(vm, {p, p + page_size}), errc::ok);
    returned = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(returned.load());
  release = true;
  inv.join();
  ASSERT_TRUE(k->wait(10s).ok());
  // The paused walk read the PTE after the zap, so it faulted and was mapped
  // to frame 4; either way the second access must not see frame 3.
  EXPECT_EQ(second, 44u);
  EXPECT_TRUE(first == 33u || first == 44u);
}

TEST_F(Inval, IdleEnginesCountAsAcknowledgedAndRecheckOnWake) {
  make({.engines = 4});
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 1);
  mem.set_word(2, 0, 2);
  // Warm the TLBs of whichever engines run items.
  ASSERT_TRUE(run_kernel(*dev, q, 4096, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); }).ok());
  remap(base_va, 2);
  ASSERT_EQ(dev->invalidate_tlb(vm, {base_va, base_va + page_size}), errc::ok);  // engines idle: returns at once
  std::atomic<int> stale{0};
  ASSERT_TRUE(run_kernel(*dev, q, 4096, [&](work_item& wi) {
    if (wi.load<std::uint64_t>(base_va) != 2) ++stale;
  }).ok());
  EXPECT_EQ(stale.load(), 0);
  EXPECT_EQ(dev->invalidate_tlb(vm, {}), errc::ok);  // empty: no-op
}

// Negative control: without the invalidation, the TLB keeps serving the old
// translation (so the tests above can fail), and the oracle sees it.
TEST_F(Inval, WithoutInvalidationAStaleTranslationIsUsed) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 1);
  mem.set_word(2, 0, 2);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); }).ok());
  remap(base_va, 2);
  std::atomic<int> oracle_stale{0};
  dev->set_oracle([&](const access_check& c) {
    if (dev_pte::pfn(pt.translate(c.gva).entry) != c.pfn) ++oracle_stale;
  });
  std::uint64_t v = 0;
  ASSERT_TRUE(run_kernel(*dev, q, 1, [&](work_item& wi) { v = wi.load<std::uint64_t>(base_va); }).ok());
  EXPECT_EQ(v, 1u);
  EXPECT_EQ(oracle_stale.load(), 1);
  ASSERT_EQ(dev->invalidate_tlb(vm, {base_va, base_va + page_size}), errc::ok);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [&](work_item& wi) { v = wi.load<std::uint64_t>(base_va); }).ok());
  EXPECT_EQ(v, 2u);
  EXPECT_EQ(oracle_stale.load(), 1);
}

// A stalled engine counts as acknowledged (the invalidation does not wait
// for the fault handler), and rechecks before it reuses its TLB.
TEST_F(Inval, StalledEngineRechecksBeforeReusingItsTlb) {
  make({.engines = 1});
  const va_t p = base_va, f = base_va + 16 * page_size;
  map_range(pt, p, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 1);
  mem.set_word(2, 0, 2);
  std::uint64_t before = 0, after = 0;
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    before = wi.load<std::uint64_t>(p);  // TLB: p -> frame 1
    (void)wi.load<std::uint64_t>(f);     // faults: the engine stalls
    after = wi.load<std::uint64_t>(p);
  });
  ASSERT_TRUE(k.ok());
  std::array<fault_record, 1> rec;
  ASSERT_EQ(dev->faults().fetch_wait(rec, 10s), 1u);
  remap(p, 2);
  ASSERT_EQ(dev->invalidate_tlb(vm, {p, p + page_size}), errc::ok);  // must not wait for the stalled wave
  map_range(pt, f, page_size, 0, aperture::system, 3);
  ASSERT_EQ(dev->replay(rec), 1u);
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_EQ(before, 1u);
  EXPECT_EQ(after, 2u);
}

// An idle engine more than the log's depth behind flushes everything.
TEST_F(Inval, FarBehindEngineFlushesItsWholeTlb) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 1);
  mem.set_word(2, 0, 2);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); }).ok());
  remap(base_va, 2);
  ASSERT_EQ(dev->invalidate_tlb(vm, {base_va, base_va + page_size}), errc::ok);
  for (int i = 0; i < 200; ++i) ASSERT_EQ(dev->invalidate_tlb(vm, {base_va + 0x100000, base_va + 0x101000}), errc::ok);
  std::uint64_t v = 0;
  ASSERT_TRUE(run_kernel(*dev, q, 1, [&](work_item& wi) { v = wi.load<std::uint64_t>(base_va); }).ok());
  EXPECT_EQ(v, 2u);
  EXPECT_EQ(dev->stats().tlb_invalidations, 201u);
}

TEST_F(Inval, InvalidationOfAnotherVmLeavesTranslationsAlone) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); }).ok());
  const auto misses = dev->stats().tlb_misses;
  ASSERT_EQ(dev->invalidate_tlb(vm + 1, {base_va, base_va + page_size}), errc::ok);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); }).ok());
  EXPECT_EQ(dev->stats().tlb_misses, misses);
}

// Stress: engines fault pages in through a map-on-fault driver while an
// "unmapper" repeatedly clears a page's PTE, invalidates, retires its frame
// (marks it dead) and later revives it. The oracle flags any access to a
// dead frame: a stale translation used after invalidate_tlb() returned.
TEST_F(Inval, StressFaultsAndInvalidationsNeverTouchARetiredFrame) {
  make({.engines = 4, .fault_buffer_entries = 8});
  constexpr std::size_t pages = 32;
  std::array<std::mutex, pages> page_lock;          // the driver's per-page lock
  std::array<std::atomic<bool>, pages> live{};
  for (auto& l : live) l = true;
  std::atomic<std::uint64_t> stale{0}, checked{0};
  dev->set_oracle([&](const access_check& c) {
    ++checked;
    if (!live[c.pfn % pages].load()) ++stale;
  });
  std::atomic<bool> stop{false};
  std::jthread driver([&] {
    std::array<fault_record, 16> buf;
    while (!stop) {
      const std::size_t n = dev->faults().fetch_wait(buf, 5ms);
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t pg = (buf[i].page() - base_va) >> page_shift;
        std::lock_guard g(page_lock[pg]);
        map_range(pt, buf[i].page(), page_size, 0, aperture::system, pg);
      }
      dev->replay(std::span(buf.data(), n));
    }
  });
  std::atomic<std::uint64_t> unmaps{0};
  std::jthread unmapper([&] {
    std::mt19937 rng(1);
    while (!stop) {
      const std::size_t pg = rng() % pages;
      const va_t va = base_va + pg * page_size;
      std::lock_guard g(page_lock[pg]);
      std::vector<va_range> flush;
      ASSERT_EQ(pt.zap(va, va + page_size, flush), errc::ok);
      ASSERT_EQ(dev->invalidate_tlb(vm, {va, va + page_size}), errc::ok);
      live[pg] = false;  // "freed": from here no device access may reach it
      mem.retire(pg);
      // Keep the frame dead a little: a stale TLB entry still in use would
      // reach it in this window.
      for (int spin = 0; spin < 2000; ++spin) SVM_CPU_RELAX();
      live[pg] = true;   // "reallocated" before the lock lets the driver map it
      ++unmaps;
    }
  });
  // At least 6 rounds, and until the unmapper has really run beside them
  // (how fast the kernels go depends on the machine and the scheduler).
  std::uint64_t rounds = 0;
  for (; rounds < 6 || (unmaps.load() < 20 && rounds < 500); ++rounds) {
    auto st = run_kernel(*dev, q, 4096, [&](work_item& wi) {
      const va_t va = base_va + (wi.id() * 7 % pages) * page_size + (wi.id() % 64) * 8;
      wi.atomic_add<std::uint64_t>(va, 1);
      (void)wi.load<std::uint32_t>(va);
    }, 30s);
    ASSERT_TRUE(st.ok()) << errc_name(st.error);
  }
  stop = true;
  dev->faults().wake_fetchers();
  unmapper.join();
  driver.join();
  EXPECT_EQ(stale.load(), 0u) << "stale device accesses";
  EXPECT_GT(unmaps.load(), 0u);
  EXPECT_EQ(checked.load(), rounds * 4096 * 2);
  RecordProperty("unmaps", static_cast<int>(unmaps.load()));
}

}  // namespace
}  // namespace svm::dev
