// gpu_vm: the fault path's sequence protocol under deterministic
// interleavings (both sequence modes and the baseline), false retries,
// statistics and bad input.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "svm/pagetable/node.h"
#include "svm/svm/gpu_vm.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

struct mode {
  seq_mode seq;
  mirror_impl impl;
};
std::string mode_name(const ::testing::TestParamInfo<mode>& p) {
  return std::string(to_string(p.param.seq)) + "_" + to_string(p.param.impl);
}

class GpuVm : public ::testing::TestWithParam<mode> {
 protected:
  void SetUp() override {
    m = std::make_unique<mm>(mm_options{.frames = 4096});
    dev = driver::create(driver_config{.hw = {.engines = 2}}).value();
    vm_config c;
    c.seq = GetParam().seq;
    c.impl = GetParam().impl;
    tune(c);
    vm = gpu_vm::create(*dev, *m, c).value();
    auto va = m->mmap(0, 8 * huge_size, prot::read | prot::write, map::private_ | map::anonymous);
    ASSERT_TRUE(va.ok());
    base = align_up(*va, huge_size);
    ASSERT_EQ(m->madvise(*va, 8 * huge_size, madvice::nohugepage), errc::ok);
  }
  virtual void tune(vm_config&) {}
  void TearDown() override {
    vm.reset();
    dev.reset();
    m.reset();
  }
  std::uint64_t device_read(va_t va) {
    std::atomic<std::uint64_t> v{~0ull};
    auto c = dev->submit(*vm, 1, [&, va](dev::work_item& wi) { v = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(c.ok());
    auto st = c->wait(30s);
    EXPECT_TRUE(st.ok()) << errc_name(st.error);
    return v.load();
  }
  void dontneed(va_t va) { ASSERT_EQ(m->madvise(va, page_size, madvice::dontneed), errc::ok); }

  std::unique_ptr<mm> m;
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm;
  va_t base = 0;
};

// The hazard of docs/protocols.md: an invalidation's callbacks have run but the
// CPU PTEs are not cleared yet. A fault that starts now must not map the
// frame that is about to be freed: it waits (read_begin / read_begin_range)
// until the invalidation ends, then maps what the CPU maps afterwards.
TEST_P(GpuVm, CallbackBeforeSnapshotFaultWaitsForTheInvalidation) {
  const va_t va = base + 3 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 77), errc::ok);
  EXPECT_EQ(device_read(va), 77u);            // mirrored: there is a leaf
  ASSERT_EQ(m->store<std::uint64_t>(va + page_size, 1), errc::ok);
  std::atomic<int> phase{0};
  m->set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    if (phase.load() != 0) return;
    phase = 1;
    phase.notify_all();
    while (phase.load() != 2) phase.wait(1);
  }});
  std::jthread cpu([&] { dontneed(va); });
  while (phase.load() != 1) phase.wait(0);
  // The device PTE was zapped by the callback; the next access faults.
  std::atomic<std::uint64_t> seen{~0ull};
  auto c = dev->submit(*vm, 1, [&, va](dev::work_item& wi) { seen = wi.load<std::uint64_t>(va); });
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->wait(100ms).error, errc::timedout) << "the fault did not wait for the invalidation";
  phase = 2;
  phase.notify_all();
  cpu.join();
  ASSERT_TRUE(c->wait(30s).ok());
  EXPECT_EQ(seen.load(), 0u) << "mapped the frame of a page that was being dropped";
  m->set_test_hooks({});
}

// The invalidation runs between the fault's snapshot and its CPU walk.
TEST_P(GpuVm, CallbackBetweenSnapshotAndWalkMakesTheFaultRetry) {
  const va_t va = base + 5 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 55), errc::ok);
  std::atomic<int> fired{0};
  vm->set_test_hooks({.after_snapshot = [&](va_range w) {
    if (w.contains(va) && fired.exchange(1) == 0) dontneed(va);
  }});
  EXPECT_EQ(device_read(va), 0u);
  EXPECT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  EXPECT_GE(s.retries_busy + s.retries_seq, 1u);
  EXPECT_EQ(s.false_retries, 0u);
  vm->set_test_hooks({});
}

// The invalidation runs after the walk, before the commit's locks.
TEST_P(GpuVm, CallbackAfterWalkIsCaughtAtCommit) {
  const va_t va = base + 6 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 66), errc::ok);
  std::atomic<int> fired{0};
  vm->set_test_hooks({.before_commit = [&](va_range w) {
    if (w.contains(va) && fired.exchange(1) == 0) dontneed(va);
  }});
  EXPECT_EQ(device_read(va), 0u);
  EXPECT_EQ(fired.load(), 1);
  EXPECT_GE(vm->stats().retries_seq, 1u) << vm->stats();
  vm->set_test_hooks({});
}

// An invalidation runs while the device has no page-table node for the
// range at all (a callback finds nothing to clear and leaves no trace in a
// node). The fault that creates the node afterwards must still wait for it.
TEST_P(GpuVm, InvalidationWithNoLeafIsNotMissed) {
  const va_t va = base + 4 * huge_size + 9 * page_size;  // never mirrored
  ASSERT_EQ(m->store<std::uint64_t>(va, 99), errc::ok);
  EXPECT_FALSE(vm->page_table().any_leaf(align_down(va, huge_size), align_down(va, huge_size) + huge_size));
  std::atomic<int> phase{0};
  m->set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    if (phase.load() != 0) return;
    phase = 1;
    phase.notify_all();
    while (phase.load() != 2) phase.wait(1);
  }});
  std::jthread cpu([&] { dontneed(va); });
  while (phase.load() != 1) phase.wait(0);
  std::atomic<std::uint64_t> seen{~0ull};
  auto c = dev->submit(*vm, 1, [&, va](dev::work_item& wi) { seen = wi.load<std::uint64_t>(va); });
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->wait(100ms).error, errc::timedout);
  phase = 2;
  phase.notify_all();
  cpu.join();
  ASSERT_TRUE(c->wait(30s).ok());
  EXPECT_EQ(seen.load(), 0u);
  m->set_test_hooks({});
}

// P4 as behaviour: an invalidation of another 2M block of the same notifier
// lands between the fault's snapshot and its walk. Per-page-table mode:
// no retry at all. Notifier-wide: the fault retries, and the retry is
// counted as false.
TEST_P(GpuVm, DisjointInvalidationRetriesOnlyInNotifierWideMode) {
  const va_t va = base + 2 * page_size, other = base + 3 * huge_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 12), errc::ok);
  ASSERT_EQ(m->store<std::uint64_t>(other, 34), errc::ok);
  std::atomic<int> fired{0};
  vm->set_test_hooks({.after_snapshot = [&](va_range w) {
    if (w.contains(va) && fired.exchange(1) == 0) dontneed(other);
  }});
  EXPECT_EQ(device_read(va), 12u);
  ASSERT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  if (GetParam().seq == seq_mode::pgtable && GetParam().impl == mirror_impl::page) {
    EXPECT_EQ(s.retries_busy + s.retries_seq, 0u);
    EXPECT_EQ(s.false_retries, 0u);
  } else {
    EXPECT_GE(s.retries_busy + s.retries_seq, 1u);
    EXPECT_GE(s.false_retries, 1u);
  }
  vm->set_test_hooks({});
}

// The automatic spin: on only when engines and handler threads fit in the
// hardware threads; an explicit value always wins.
// A write fault on a page the CPU never touched maps its window's other
// untouched pages writable (real pages, not the zero page), so the device's
// writes to them are valid faults that invalidate nothing. Asked for read,
// each would get the zero page and each later write would break it: one
// invalidation and one retry per page of a first-touch storm.
TEST_P(GpuVm, FirstTouchWriteMapsTheWindowsUntouchedNeighboursWritable) {
  const va_t va = base + 3 * page_size, other = base + 5 * page_size;
  auto c = dev->submit(*vm, 1, [va](dev::work_item& wi) { wi.store<std::uint64_t>(va, 9); });
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(30s).ok());
  const cpu_translation t = m->cpu_translate(other);
  EXPECT_TRUE(t.present && t.writable && !t.zero_page) << "the neighbour got the zero page";
  const auto before = vm->stats();
  auto w = dev->submit(*vm, 16, [this](dev::work_item& wi) {
    wi.store<std::uint64_t>(base + wi.id() * page_size + 8, wi.id());
  });
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(w->wait(30s).ok());
  const auto after = vm->stats();
  EXPECT_EQ(after.invalidations, before.invalidations) << "a neighbour's write broke a zero page";
  EXPECT_EQ(after.hmm_calls, before.hmm_calls) << "the window did not map the neighbours";
  for (std::uint64_t i = 0; i < 16; ++i) EXPECT_EQ(m->load<std::uint64_t>(base + i * page_size + 8).value(), i);
  EXPECT_EQ(m->load<std::uint64_t>(va).value(), 9u);
}

// Neighbours the CPU maps read-only (COW after a fork) stay read-only: a
// write fault breaks the COW of its own page only, so a CPU that forks
// again and again does not make every fault break the whole window.
TEST_P(GpuVm, WriteFaultLeavesPresentReadOnlyNeighboursShared) {
  for (std::uint64_t i = 0; i < 8; ++i) ASSERT_EQ(m->store<std::uint64_t>(base + i * page_size, 100 + i), errc::ok);
  auto child = m->fork();
  ASSERT_TRUE(child.ok());
  const va_t va = base + 3 * page_size, other = base + 5 * page_size;
  const pfn_t shared = m->cpu_translate(other).pfn;
  ASSERT_FALSE(m->cpu_translate(other).writable);
  auto c = dev->submit(*vm, 1, [va](dev::work_item& wi) { wi.store<std::uint64_t>(va, 9); });
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(30s).ok());
  EXPECT_TRUE(m->cpu_translate(va).writable);
  EXPECT_NE(m->cpu_translate(va).pfn, (*child)->cpu_translate(va).pfn) << "the faulting page's COW is broken";
  EXPECT_FALSE(m->cpu_translate(other).writable) << "a neighbour's COW was broken on the fault's behalf";
  EXPECT_EQ(m->cpu_translate(other).pfn, shared);
  EXPECT_EQ((*child)->load<std::uint64_t>(va).value(), 103u);
  EXPECT_EQ(m->load<std::uint64_t>(va).value(), 9u);
}

// The snapshot pass of a first-touch write fault sees the sequence move
// (an invalidation of the window between the snapshot and the pass): the
// fault retries with a fresh snapshot instead of calling hmm_range_fault
// again on the stale one (which the stale-sequence checker would report).
TEST_P(GpuVm, FirstTouchPassThatSeesTheSequenceMoveRetriesWithAFreshSnapshot) {
  const va_t va = base + 3 * page_size;
  std::atomic<int> calls{0};
  vm->set_test_hooks({.after_snapshot = [&](va_range) {
    if (calls.fetch_add(1) == 0) {
      EXPECT_EQ(m->madvise(base + 9 * page_size, page_size, madvice::dontneed), errc::ok);
    }
  }});
  const std::uint64_t reuses = hmm_stale_sequence_reuses();
  const auto before = vm->stats();
  auto c = dev->submit(*vm, 1, [va](dev::work_item& wi) { wi.store<std::uint64_t>(va, 9); });
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(30s).ok());
  vm->set_test_hooks({});
  EXPECT_GE(calls.load(), 2) << "the fault did not retry";
  EXPECT_GT(vm->stats().retries_busy, before.retries_busy);
  EXPECT_EQ(hmm_stale_sequence_reuses(), reuses);
  EXPECT_EQ(m->load<std::uint64_t>(va).value(), 9u);
}

TEST(DeviceConfig, WaitSpinIsAutomaticUnlessGiven) {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  driver_config c;
  c.hw.engines = hw + 1;
  EXPECT_EQ(c.effective_wait_spin_ns(), 0u);
  c.hw.engines = 1;
  c.handler_threads = 1;
  EXPECT_EQ(c.effective_wait_spin_ns(), hw >= 2 ? 20'000u : 0u);
  c.wait_spin_ns = 123;
  EXPECT_EQ(c.effective_wait_spin_ns(), 123u);
  c.hw.engines = hw + 1;
  EXPECT_EQ(c.effective_wait_spin_ns(), 123u);
}

TEST_P(GpuVm, ValidFaultIsCountedApart) {
  const va_t va = base + 7 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 1), errc::ok);
  EXPECT_EQ(device_read(va), 1u);
  const auto before = vm->stats();
  // Many work items fault on one page at once: one is serviced, the rest
  // are coalesced or find the PTE already there.
  const va_t fresh = base + 5 * huge_size;  // another 2M block: not mapped yet
  auto c = dev->submit(*vm, 64, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(fresh + 8 * (wi.id() % 8)); });
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(30s).ok());
  const auto after = vm->stats();
  EXPECT_GT(after.faults_raised, before.faults_raised);
  EXPECT_EQ(after.faults_cancelled, 0u);
  EXPECT_EQ(after.faults_serviced, after.faults_raised);
  EXPECT_LE(after.hmm_calls - before.hmm_calls, after.faults_raised - before.faults_raised);
  vm->reset_stats();
  EXPECT_EQ(vm->stats().faults_raised, 0u);
  EXPECT_EQ(vm->stats().latency.total(), 0u);
}

TEST_P(GpuVm, StatisticsCountPtesAndInvalidations) {
  const va_t va = base;
  ASSERT_EQ(m->store<std::uint64_t>(va, 5), errc::ok);
  EXPECT_EQ(device_read(va), 5u);
  auto s = vm->stats();
  EXPECT_GE(s.ptes_written, 1u);
  EXPECT_GE(s.hmm_calls, 1u);
  EXPECT_GE(s.latency.total(), 1u);
  EXPECT_GT(s.latency.quantile(0.5), 0u);
  ASSERT_EQ(m->munmap(va, huge_size), errc::ok);
  s = vm->stats();
  EXPECT_GE(s.invalidations, 1u);
  EXPECT_GE(s.ptes_zapped, 1u);
  EXPECT_GE(s.tlb_invalidations, 1u);
  EXPECT_FALSE(vm->page_table().any_leaf(va, va + huge_size));
  EXPECT_NE(s.to_string().find("faults raised"), std::string::npos);
}

TEST_P(GpuVm, AddWindowRejectsBadInput) {
  EXPECT_EQ(vm->add_window(base, 0x1000'0000'0000, page_size), errc::inval);  // full_mm VM
  vm_config c;
  c.mirror = mirror_kind::windows;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  auto w_owner = gpu_vm::create(*dev, *m, c).value();
  gpu_vm& w = *w_owner;
  EXPECT_EQ(w.add_window(base + 1, 0x1000'0000'0000, page_size), errc::inval);
  EXPECT_EQ(w.add_window(base, 0x1000'0000'0000, 0), errc::inval);
  EXPECT_EQ(w.add_window(base, ~va_t{0} & ~(page_size - 1), 2 * page_size), errc::overflow);
  EXPECT_EQ(w.add_window(base, 0x1000'0000'0000, huge_size), errc::ok);
  EXPECT_EQ(w.add_window(base + huge_size, 0x1000'0000'0000 + page_size, page_size), errc::exist);
  EXPECT_EQ(w.add_window(base + page_size, 0x2000'0000'0000, page_size), errc::exist);
}

TEST_P(GpuVm, WindowMirrorTranslatesAtAnOffset) {
  vm.reset();
  vm_config c;
  c.mirror = mirror_kind::windows;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  vm = gpu_vm::create(*dev, *m, c).value();
  const va_t gpu = 0x1000'0000'0000;
  ASSERT_EQ(vm->add_window(base, gpu, 4 * page_size), errc::ok);
  ASSERT_EQ(m->store<std::uint64_t>(base + page_size, 4242), errc::ok);
  EXPECT_EQ(device_read(gpu + page_size), 4242u);
  const va_t cpu_va = base;
  auto c2 = dev->submit(*vm, 1, [cpu_va](dev::work_item& wi) { (void)wi.load<int>(cpu_va); });  // CPU VA: not mirrored
  ASSERT_TRUE(c2.ok());
  auto st = c2->wait(30s);
  EXPECT_EQ(st.error, errc::canceled);
  // Invalidation through the window: DONTNEED on the CPU side clears it.
  ASSERT_EQ(m->madvise(base + page_size, page_size, madvice::dontneed), errc::ok);
  EXPECT_EQ(device_read(gpu + page_size), 0u);
}

TEST_P(GpuVm, NotifiersAreInsertedLazilyPerChunk) {
  EXPECT_EQ(m->notifiers().size(), 0u);
  ASSERT_EQ(m->store<std::uint64_t>(base, 1), errc::ok);
  EXPECT_EQ(device_read(base), 1u);
  EXPECT_EQ(m->notifiers().size(), 1u);
  EXPECT_EQ(device_read(base + page_size), 0u);
  EXPECT_EQ(m->notifiers().size(), 1u);  // same chunk
}

TEST_P(GpuVm, NotifierOfAnEmptiedChunkIsRemoved) {
  ASSERT_EQ(m->store<std::uint64_t>(base, 1), errc::ok);
  EXPECT_EQ(device_read(base), 1u);
  EXPECT_EQ(vm->gc_notifiers(), 0u);  // something is mapped: kept
  EXPECT_EQ(m->notifiers().size(), 1u);
  ASSERT_EQ(m->munmap(base, 8 * huge_size), errc::ok);
  // The handler thread may beat us to it when idle; either way it goes.
  vm->gc_notifiers();
  EXPECT_EQ(m->notifiers().size(), 0u);
  // A later fault in the chunk inserts a fresh one.
  auto va = m->mmap(0, page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  EXPECT_EQ(device_read(*va), 0u);
  EXPECT_EQ(m->notifiers().size(), 1u);
}

TEST_P(GpuVm, BaselineKeepsRangeObjectsThePageMirrorDoesNot) {
  ASSERT_EQ(m->store<std::uint64_t>(base, 1), errc::ok);
  EXPECT_EQ(device_read(base), 1u);
  if (GetParam().impl == mirror_impl::range) {
    EXPECT_EQ(vm->baseline_ranges(), 1u);
    // A partial invalidation splits the range object in two.
    ASSERT_EQ(m->madvise(base + 16 * page_size, page_size, madvice::dontneed), errc::ok);
    EXPECT_EQ(vm->baseline_ranges(), 2u);
  } else {
    EXPECT_EQ(vm->baseline_ranges(), 0u);
  }
}

// With 4K windows, several faults share one leaf node. The node logs which
// entries its recent sequence advances covered (two generations of
// extents), so an invalidation of other pages of the same 2M block does not
// make a fault retry in per-page-table mode; one of its own page does, and
// so do more advances than the log remembers.
class GpuVm4K : public GpuVm {
 protected:
  void tune(vm_config& c) override { c.window = std::make_shared<fixed_window_policy>(page_size); }
  bool node_log() const { return GetParam().seq == seq_mode::pgtable && GetParam().impl == mirror_impl::page; }
  // Arms a one-shot before_commit hook on the window of `va` that runs `f`.
  template <class F>
  void at_commit_of(va_t va, std::atomic<int>& fired, F f) {
    vm->set_test_hooks({.before_commit = [&fired, va, f](va_range w) {
      if (w.contains(va) && fired.exchange(1) == 0) f();
    }});
  }
};

TEST_P(GpuVm4K, OtherPagesOfTheBlockInvalidatedTwiceDoNotRetry) {
  const va_t va = base + 2 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 12), errc::ok);
  ASSERT_EQ(m->store<std::uint64_t>(va + 7 * page_size, 1), errc::ok);
  EXPECT_EQ(device_read(va + 7 * page_size), 1u);  // the leaf node exists and maps a neighbour
  std::atomic<int> fired{0};
  at_commit_of(va, fired, [&] {
    dontneed(va + 7 * page_size);  // mapped: its PTE is cleared
    dontneed(va + 9 * page_size);  // not mapped: the node's sequence still advances
  });
  EXPECT_EQ(device_read(va), 12u);
  ASSERT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  if (node_log()) {
    EXPECT_EQ(s.retries_busy + s.retries_seq, 0u) << s;
  } else {
    EXPECT_GE(s.retries_seq, 1u) << s;
    EXPECT_GE(s.false_retries, 1u) << s;
  }
  EXPECT_EQ(device_read(va + 7 * page_size), 0u);  // the neighbour really was dropped
  vm->set_test_hooks({});
}

// The oldest of three advances covers the fault's page: the walk
// found a frame that is now dropped, so the commit must refuse it. A log
// that looked only at the newer advances would map the freed frame and the
// device would read 34 instead of 0.
TEST_P(GpuVm4K, OwnPageInTheOldestLoggedAdvanceRetries) {
  const va_t va = base + 20 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 34), errc::ok);
  std::atomic<int> fired{0};
  at_commit_of(va, fired, [&] {
    dontneed(va);
    dontneed(va + 100 * page_size);
    dontneed(va + 101 * page_size);
  });
  EXPECT_EQ(device_read(va), 0u) << "mapped the frame of a page dropped between the walk and the commit";
  ASSERT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  EXPECT_GE(s.retries_seq, 1u) << s;
  EXPECT_EQ(s.false_retries, 0u) << s;
}

// The fault's page was dropped first, then a dozen other pages: the young
// generation of the log no longer covers the first advance, only the old
// one (or neither) does. A check of the young generation alone would accept
// the commit and map the freed frame.
TEST_P(GpuVm4K, OwnPageBeforeTheYoungGenerationRetries) {
  const va_t va = base + 60 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 38), errc::ok);
  std::atomic<int> fired{0};
  at_commit_of(va, fired, [&] {
    dontneed(va);
    for (unsigned i = 1; i <= pt::node::log_generation + 4; ++i) dontneed(va + i * page_size);
  });
  EXPECT_EQ(device_read(va), 0u) << "mapped the frame of a page dropped between the walk and the commit";
  ASSERT_EQ(fired.load(), 1);
  EXPECT_GE(vm->stats().retries_seq, 1u) << vm->stats();
}

TEST_P(GpuVm4K, OwnPageInTheLatestLoggedAdvanceRetries) {
  const va_t va = base + 21 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 35), errc::ok);
  std::atomic<int> fired{0};
  at_commit_of(va, fired, [&] {
    dontneed(va + 100 * page_size);
    dontneed(va);
  });
  EXPECT_EQ(device_read(va), 0u);
  ASSERT_EQ(fired.load(), 1);
  EXPECT_GE(vm->stats().retries_seq, 1u) << vm->stats();
}

// More advances than both generations span (at most 2 x 8 + 1): the fault
// cannot tell, so it retries (and the retry is counted as false, since none
// overlapped it).
TEST_P(GpuVm4K, MoreAdvancesThanTheLogHoldsRetry) {
  const va_t va = base + 30 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 36), errc::ok);
  std::atomic<int> fired{0};
  at_commit_of(va, fired, [&] {
    for (unsigned i = 1; i <= 2 * pt::node::log_generation + 2; ++i) dontneed(va + i * page_size);
  });
  EXPECT_EQ(device_read(va), 36u);
  ASSERT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  EXPECT_GE(s.retries_seq, 1u) << s;
  EXPECT_GE(s.false_retries, 1u) << s;
}

// The same between the snapshot and the CPU walk: hmm_range_fault's
// validity check consults the log too, so no -EBUSY for a disjoint page.
TEST_P(GpuVm4K, DisjointPageDuringTheWalkIsNotBusy) {
  const va_t va = base + 40 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 37), errc::ok);
  std::atomic<int> fired{0};
  vm->set_test_hooks({.after_snapshot = [&](va_range w) {
    if (w.contains(va) && fired.exchange(1) == 0) dontneed(va + page_size);
  }});
  EXPECT_EQ(device_read(va), 37u);
  ASSERT_EQ(fired.load(), 1);
  const auto s = vm->stats();
  if (node_log()) {
    EXPECT_EQ(s.retries_busy + s.retries_seq, 0u) << s;
  } else {
    EXPECT_GE(s.retries_busy + s.retries_seq, 1u) << s;
  }
  vm->set_test_hooks({});
}

// A window policy that breaks its contract (here: 4M, larger than a leaf
// node and the fault's page array) gets the fault's page alone.
class oversized_policy final : public window_policy {
 public:
  va_range choose(va_t fault, va_range) const noexcept override {
    return {align_down(fault, 2 * huge_size), align_down(fault, 2 * huge_size) + 2 * huge_size};
  }
};

TEST_P(GpuVm, WindowPolicyBreakingItsContractGetsOnePage) {
  vm.reset();
  vm_config c;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  c.window = std::make_shared<oversized_policy>();
  vm = gpu_vm::create(*dev, *m, c).value();
  const va_t va = base + huge_size + 3 * page_size;
  ASSERT_EQ(m->store<std::uint64_t>(va, 41), errc::ok);
  EXPECT_EQ(device_read(va), 41u);
  EXPECT_EQ(vm->stats().ptes_written, 1u);
  EXPECT_FALSE(vm->page_table().any_leaf(base, va));
}

#define SVM_GPU_VM_MODES                                                                   \
  ::testing::Values(mode{seq_mode::pgtable, mirror_impl::page}, mode{seq_mode::notifier, mirror_impl::page}, \
                    mode{seq_mode::notifier, mirror_impl::range})
INSTANTIATE_TEST_SUITE_P(Modes, GpuVm, SVM_GPU_VM_MODES, mode_name);
INSTANTIATE_TEST_SUITE_P(Modes, GpuVm4K, SVM_GPU_VM_MODES, mode_name);

}  // namespace
}  // namespace svm::test
