// The engines' micro-TLB (detail::micro_tlb): the last 4K translation,
// checked inline by work_item. These tests run without an oracle, since an
// installed oracle turns the micro-TLB off; each would fail if the
// micro-TLB kept an entry past an invalidation, another VM's kernel, a
// permission upgrade it does not have, or an oracle installation.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;
using test::map_range;
using test::run_kernel;

constexpr va_t base_va = 0x30'0000'0000;

struct MicroTlb : ::testing::Test {
  void make(device_config c = {.engines = 1}) {
    auto made = device::create(std::move(c));
    ASSERT_TRUE(made.ok()) << errc_name(made.error());
    dev = std::move(*made);
    ASSERT_EQ(dev->attach_vm(1, pt, mem), errc::ok);
    q = dev->create_queue(1).value();
  }
  void remap(dev_page_table& t, va_t va, pfn_t pfn, bool writable = true) {
    std::vector<va_range> flush;
    ASSERT_EQ(t.zap(va, va + page_size, flush), errc::ok);
    map_range(t, va, page_size, 0, aperture::system, pfn, writable);
  }

  test::watchdog wd;
  test::test_mem mem{16};
  dev_page_table pt;
  std::unique_ptr<device> dev;
  queue_id q = 0;
};

// A running kernel hits the same page over and over (the micro-TLB path);
// once invalidate_tlb() returned, its next load must see the new frame.
TEST_F(MicroTlb, EntryIsDroppedByAnInvalidationWhileTheKernelRuns) {
  make();
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 11);
  mem.set_word(2, 0, 22);
  std::atomic<bool> started{false}, go{false};
  std::atomic<std::uint64_t> before{0}, after{0};
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    before = wi.load<std::uint64_t>(base_va);
    started = true;
    // Keep hitting the cached page until told to look once more.
    while (!go.load()) (void)wi.load<std::uint64_t>(base_va);
    after = wi.load<std::uint64_t>(base_va);
  });
  ASSERT_TRUE(k.ok());
  while (!started.load()) std::this_thread::sleep_for(100us);
  remap(pt, base_va, 2);
  ASSERT_EQ(dev->invalidate_tlb(1, {base_va, base_va + page_size}), errc::ok);
  go = true;
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_EQ(before.load(), 11u);
  EXPECT_EQ(after.load(), 22u) << "a load after the invalidation used the old translation";
}

// The same with the invalidation acknowledged at an explicit boundary, not
// by an access: the engine processes it without a lookup that would refill
// the micro-TLB, so only emptying the entry there keeps the next load right.
TEST_F(MicroTlb, EntryIsDroppedWhenTheInvalidationIsAcknowledgedAtABoundary) {
  make();
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 11);
  mem.set_word(2, 0, 22);
  std::atomic<bool> started{false}, go{false};
  std::atomic<std::uint64_t> after{0};
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    (void)wi.load<std::uint64_t>(base_va);
    started = true;
    while (!go.load()) wi.boundary();
    after = wi.load<std::uint64_t>(base_va);
  });
  ASSERT_TRUE(k.ok());
  while (!started.load()) std::this_thread::sleep_for(100us);
  remap(pt, base_va, 2);
  ASSERT_EQ(dev->invalidate_tlb(1, {base_va, base_va + page_size}), errc::ok);
  go = true;
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_EQ(after.load(), 22u) << "a load after the invalidation used the old translation";
}

// Without an invalidation the stale entry is used (so the test above is not
// passing by accident of a full lookup every time), and every micro-TLB hit
// is counted as a TLB hit.
TEST_F(MicroTlb, HitsAreCountedAndAStaleEntryLivesUntilInvalidated) {
  make();
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  mem.set_word(1, 0, 11);
  mem.set_word(2, 0, 22);
  std::atomic<std::uint64_t> first{0}, later{0};
  std::atomic<bool> started{false}, go{false};
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    first = wi.load<std::uint64_t>(base_va);
    started = true;
    while (!go.load()) wi.boundary();
    later = wi.load<std::uint64_t>(base_va);
    for (int i = 0; i < 100; ++i) (void)wi.load<std::uint64_t>(base_va + 8 * static_cast<unsigned>(i));
  });
  ASSERT_TRUE(k.ok());
  while (!started.load()) std::this_thread::sleep_for(100us);
  remap(pt, base_va, 2);  // no TLB invalidation
  go = true;
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_EQ(first.load(), 11u);
  EXPECT_EQ(later.load(), 11u) << "without an invalidation the cached translation is still used";
  const device_stats s = dev->stats();
  EXPECT_EQ(s.accesses, 102u);
  EXPECT_EQ(s.tlb_hits, 101u);
  EXPECT_EQ(s.tlb_misses, 1u);
}

// A read caches a read-only translation; a store to the same page must not
// go through it: it faults (here: cancelled, so the kernel fails with the
// store's address).
TEST_F(MicroTlb, ReadOnlyEntryDoesNotServeAStore) {
  make();
  map_range(pt, base_va, page_size, 0, aperture::system, 1, /*writable=*/false);
  mem.set_word(1, 0, 5);
  std::jthread driver([&](std::stop_token st) {
    std::array<fault_record, 8> recs;
    while (!st.stop_requested()) {
      const std::size_t n = dev->faults().fetch_wait(recs, 10ms);
      if (n) (void)dev->cancel(std::span(recs).first(n), errc::perm);
    }
  });
  const kernel_status s = run_kernel(*dev, q, 1, [](work_item& wi) {
    (void)wi.load<std::uint64_t>(base_va);
    (void)wi.load<std::uint64_t>(base_va + 8);  // a micro-TLB hit
    wi.store<std::uint64_t>(base_va + 16, 7);
  });
  EXPECT_EQ(s.error, errc::canceled);
  EXPECT_EQ(s.reason, errc::perm);
  EXPECT_EQ(s.address, base_va + 16);
  EXPECT_EQ(mem.word(1, 16), 0u) << "the store went through a read-only translation";
}

// One engine runs a kernel of VM 1, then one of VM 2 whose page table maps
// the same GPU VA elsewhere: the second must not reuse the first's entry.
TEST_F(MicroTlb, EntryDoesNotCrossIntoAnotherVmsKernel) {
  make();
  dev_page_table pt2;
  ASSERT_EQ(dev->attach_vm(2, pt2, mem), errc::ok);
  const queue_id q2 = dev->create_queue(2).value();
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  map_range(pt2, base_va, page_size, 0, aperture::system, 2);
  mem.set_word(1, 0, 11);
  mem.set_word(2, 0, 22);
  std::uint64_t a = 0, b = 0;
  ASSERT_TRUE(run_kernel(*dev, q, 1, [&](work_item& wi) { a = wi.load<std::uint64_t>(base_va); }).ok());
  ASSERT_TRUE(run_kernel(*dev, q2, 1, [&](work_item& wi) { b = wi.load<std::uint64_t>(base_va); }).ok());
  EXPECT_EQ(a, 11u);
  EXPECT_EQ(b, 22u);
  EXPECT_EQ(dev->destroy_queue(q2), errc::ok);
  EXPECT_EQ(dev->detach_vm(2), errc::ok);
}

// An oracle installed while a kernel keeps hitting one page sees the
// kernel's later accesses (the micro-TLB steps aside for it).
TEST_F(MicroTlb, AnOracleInstalledMidKernelSeesLaterAccesses) {
  make();
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  std::atomic<bool> started{false}, go{false};
  std::atomic<int> seen{0};
  auto k = dev->submit(q, 1, [&](work_item& wi) {
    (void)wi.load<std::uint64_t>(base_va);
    started = true;
    while (!go.load()) (void)wi.load<std::uint64_t>(base_va);
    for (int i = 0; i < 10; ++i) (void)wi.load<std::uint64_t>(base_va);
  });
  ASSERT_TRUE(k.ok());
  while (!started.load()) std::this_thread::sleep_for(100us);
  dev->set_oracle([&](const access_check&) { ++seen; });
  go = true;
  ASSERT_TRUE(k->wait(10s).ok());
  EXPECT_GE(seen.load(), 10);
  dev->set_oracle(nullptr);
}

}  // namespace
}  // namespace svm::dev
