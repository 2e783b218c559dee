// Fault injection: each test injects one failure and shows that
// nothing is corrupted (the access oracle, on for every E2E test, reports no
// stale access; data read back is right), that the error is clear, and that
// the system makes progress once the injection stops (and, where it is
// partial, while it runs).
//
// | injected                              | where                                   | what the user sees                                   |
// |---------------------------------------|-----------------------------------------|------------------------------------------------------|
// | page-table node allocation failure    | gpu_vm::page_table().set_alloc_failure  | the faulting kernel fails: ECANCELED, reason ENOMEM  |
// | frame pool exhaustion                 | frame_pool::set_alloc_failure           | CPU store: ENOMEM; device fault: ECANCELED / ENOMEM  |
// | VRAM exhaustion                       | a tiny VRAM                             | create_bo: ENOMEM (VM unchanged), or an eviction     |
// | a 1-entry fault buffer                | dev::device_config::fault_buffer_entries| nothing: every fault is serviced, in turn            |
// | an -EBUSY storm from hmm_range_fault  | an invalidation of the fault's window   | retries (retries_busy/seq), then the kernel completes|
// |                                       | after every snapshot (test hook)        |   (or, never ending, EBUSY at the timeout: see       |
// |                                       |                                         |   ProgressStress in storm_stress_test.cpp)           |
// | failing non-blockable invalidations   | reclaim(..., blockable = false)         | reclaim: EAGAIN, nothing reclaimed, data intact      |
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "common/e2e_fixture.h"
#include "svm/notifier/frame_pool.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

class Inject : public E2E {
 protected:
  /// Load one word per page of [buf, buf + pages * 4K) on the device.
  dev::kernel_status read_pages(va_t buf, std::uint64_t pages, std::vector<std::uint64_t>& out) {
    out.assign(pages, ~0ull);
    std::uint64_t* o = out.data();
    return run(pages, [=](dev::work_item& wi) { o[wi.id()] = wi.load<std::uint64_t>(buf + wi.id() * page_size); });
  }
};

// Node allocation fails while the device populates its page table: the
// faulting kernel fails cleanly with ENOMEM, no PTE appears, and once the
// allocator works again the same access succeeds.
TEST_P(Inject, PageTableNodeAllocationFailureDuringPopulate) {
  std::atomic<bool> fail{true};
  std::atomic<std::uint64_t> refused{0};
  vm->page_table().set_alloc_failure([&](unsigned) {
    if (!fail.load()) return false;
    refused.fetch_add(1);
    return true;
  });
  const va_t buf = map_anon(huge_size);  // a fresh 2M block: its leaf node must be allocated
  ASSERT_EQ(m->store<std::uint64_t>(buf, 41), errc::ok);
  std::vector<std::uint64_t> got;
  const dev::kernel_status st = read_pages(buf, 1, got);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::nomem);
  EXPECT_EQ(st.address, buf);
  EXPECT_GE(refused.load(), 1u);
  EXPECT_FALSE(vm->page_table().any_leaf(buf, buf + huge_size)) << "a half-populated table after ENOMEM";
  fail = false;
  ASSERT_TRUE(read_pages(buf, 1, got).ok());
  EXPECT_EQ(got[0], 41u);
  vm->page_table().set_alloc_failure({});
}

// Every third node allocation fails: kernels fail or complete, but what
// completes is right and nothing stale is ever touched.
TEST_P(Inject, IntermittentNodeAllocationFailuresNeverCorrupt) {
  std::atomic<std::uint64_t> n{0};
  vm->page_table().set_alloc_failure([&](unsigned) { return n.fetch_add(1) % 3 == 0; });
  const va_t buf = map_anon(8 * huge_size);
  for (std::uint64_t b = 0; b < 8; ++b) ASSERT_EQ(m->store<std::uint64_t>(buf + b * huge_size, 100 + b), errc::ok);
  std::uint64_t nomem = 0;
  for (int round = 0; round < 6; ++round) {
    std::vector<std::atomic<std::uint64_t>> got(8);
    const dev::kernel_status st = run(8, [&, buf](dev::work_item& wi) {
      got[wi.id()] = wi.load<std::uint64_t>(buf + wi.id() * huge_size);
    });
    if (st.ok()) {
      for (std::uint64_t b = 0; b < 8; ++b) EXPECT_EQ(got[b].load(), 100 + b);
    } else {
      EXPECT_EQ(st.reason, errc::nomem);
      ++nomem;
    }
    ASSERT_EQ(m->madvise(buf, 8 * huge_size, madvice::dontneed), errc::ok);  // zaps: nodes are freed again
    for (std::uint64_t b = 0; b < 8; ++b) ASSERT_EQ(m->store<std::uint64_t>(buf + b * huge_size, 100 + b), errc::ok);
  }
  EXPECT_GT(nomem, 0u) << "the injection never hit";
  vm->page_table().set_alloc_failure({});
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 100u);
}

// The frame pool is exhausted: a CPU store to untouched memory fails with
// ENOMEM, a device fault on untouched memory is cancelled with ENOMEM;
// resident pages stay readable; when frames come back both work.
TEST_P(Inject, FramePoolExhaustion) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 5), errc::ok);
  std::atomic<bool> fail{true};
  m->pool_ptr()->set_alloc_failure([&](bool) { return fail.load(); });
  EXPECT_EQ(m->store<std::uint64_t>(buf + page_size, 6), errc::nomem);
  std::vector<std::uint64_t> got;
  // A write fault needs a frame; a read of the resident page does not.
  dev::kernel_status st = run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + 2 * page_size, 7); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::nomem);
  ASSERT_TRUE(read_pages(buf, 1, got).ok());
  EXPECT_EQ(got[0], 5u);
  fail = false;
  ASSERT_EQ(m->store<std::uint64_t>(buf + page_size, 6), errc::ok);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + 2 * page_size, 7); }).ok());
  EXPECT_EQ(*m->load<std::uint64_t>(buf + 2 * page_size), 7u);
  ASSERT_TRUE(read_pages(buf, 3, got).ok());
  EXPECT_EQ(got[1], 6u);
  m->pool_ptr()->set_alloc_failure({});
}

// VRAM exhaustion: a BO larger than VRAM is refused with ENOMEM and the VM
// is unchanged; filling VRAM and asking for more evicts a BO (its bytes
// survive in system memory and the device still reads them).
TEST_P(Inject, VramExhaustion) {
  make({}, dev::device_config{.vram_bytes = 8 * page_size});
  auto too_big = vm->create_bo(16 * page_size, placement::vram);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.error(), errc::nomem);
  auto a = vm->create_bo(8 * page_size, placement::vram);
  ASSERT_TRUE(a.ok());
  const std::uint64_t pat = 0xabcdef;
  ASSERT_EQ(vm->bo_write(*a, 0, std::as_bytes(std::span(&pat, 1))), errc::ok);
  const va_t bo_va = 0x7d00'0000'0000;
  ASSERT_EQ(vm->bind(*a, bo_va, 0, 8 * page_size), errc::ok);
  auto b = vm->create_bo(4 * page_size, placement::vram);  // needs room: a is evicted
  ASSERT_TRUE(b.ok()) << errc_name(b.error());
  EXPECT_EQ(*vm->bo_placement(*a), placement::system);
  EXPECT_GE(vm->stats().evictions, 1u);
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&](dev::work_item& wi) { seen = wi.load<std::uint64_t>(bo_va); }).ok());
  EXPECT_EQ(seen.load(), pat);
}

// A 1-entry fault buffer with many engines faulting on many pages: nothing
// is lost, every fault is serviced in turn, and the data is right.
TEST_P(Inject, OneEntryFaultBuffer) {
  vm_config c;
  c.window = std::make_shared<fixed_window_policy>(page_size);  // one fault per page
  make(c, dev::device_config{.engines = 3, .fault_buffer_entries = 1});
  constexpr std::uint64_t pages = 64;
  const va_t buf = map_anon(pages * page_size);
  for (std::uint64_t i = 0; i < pages; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, i * 3), errc::ok);
  std::vector<std::atomic<std::uint64_t>> got(pages);
  ASSERT_TRUE(run(pages * 4, [&, buf](dev::work_item& wi) {
    const std::uint64_t p = wi.id() % pages;
    got[p] = wi.load<std::uint64_t>(buf + p * page_size);
    wi.store<std::uint64_t>(buf + p * page_size + 8 * (1 + wi.id() / pages), wi.id());
  }).ok());
  for (std::uint64_t i = 0; i < pages; ++i) {
    EXPECT_EQ(got[i].load(), i * 3);
    for (std::uint64_t k = 0; k < 4; ++k) EXPECT_EQ(*m->load<std::uint64_t>(buf + i * page_size + 8 * (1 + k)), i + k * pages);
  }
  // Nothing lost, and never more than one record held (whether a push found
  // it full depends on timing; the stress of it is in the 3 engines).
  const dev::fault_buffer_stats fb = dev->hw().faults().stats();
  EXPECT_EQ(fb.high_water, 1u);
  EXPECT_EQ(fb.pushed, fb.fetched);
  EXPECT_GE(fb.pushed, pages);
}

// An -EBUSY storm: the first attempts of a fault each see their window
// invalidated after the sequence snapshot (hmm_range_fault reports EBUSY,
// or the commit sees the sequence moved); the fault retries and, when the
// storm ends, completes with the right value.
TEST_P(Inject, EbusyStormFromHmmRangeFault) {
  const va_t buf = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 77), errc::ok);
  std::atomic<int> storms{25};
  vm->set_test_hooks({.after_snapshot = [&](va_range w) {
    if (w.contains(buf) && storms.fetch_sub(1) > 0) {
      // Read-only and back: two real protection changes (an mprotect to the
      // protection a range already has changes nothing, as in Linux), and
      // the page stays.
      ASSERT_EQ(m->mprotect(buf, page_size, prot::read), errc::ok);
      ASSERT_EQ(m->mprotect(buf, page_size, prot::read | prot::write), errc::ok);
    }
  }});
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 77u);
  const vm_stats s = vm->stats();
  EXPECT_GE(s.retries_busy + s.retries_seq, 25u) << s;
  EXPECT_EQ(s.faults_cancelled, 0u);
  vm->set_test_hooks({});
}

// Failing non-blockable invalidations: a non-blockable reclaim meets pages
// the device maps; the driver refuses (it may not wait for a shootdown), the
// mm reports EAGAIN and reclaims nothing; the device keeps reading the right
// bytes; a blockable retry succeeds and the data survives the swap.
TEST_P(Inject, NonBlockableInvalidationsFail) {
  const va_t buf = map_anon(8 * page_size);
  for (std::uint64_t i = 0; i < 8; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 900 + i), errc::ok);
  std::vector<std::uint64_t> got;
  ASSERT_TRUE(read_pages(buf, 8, got).ok());
  const std::size_t resident = m->resident_pages();
  for (int k = 0; k < 5; ++k) {
    auto r = m->reclaim(buf, 8 * page_size, /*blockable=*/false);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error(), errc::again);
  }
  EXPECT_EQ(m->resident_pages(), resident) << "a refused invalidation still freed pages";
  ASSERT_TRUE(read_pages(buf, 8, got).ok());
  for (std::uint64_t i = 0; i < 8; ++i) EXPECT_EQ(got[i], 900 + i);
  auto r = m->reclaim(buf, 8 * page_size, /*blockable=*/true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 8u);
  ASSERT_TRUE(read_pages(buf, 8, got).ok());
  for (std::uint64_t i = 0; i < 8; ++i) EXPECT_EQ(got[i], 900 + i);
}

INSTANTIATE_TEST_SUITE_P(Modes, Inject, SVM_E2E_MODES, param_name);

}  // namespace
}  // namespace svm::test
