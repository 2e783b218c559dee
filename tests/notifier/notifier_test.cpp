// Interval notifiers: docs/contracts.md §1.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "test_mirror.h"

namespace svm {
namespace {

using test::recording_ops;
constexpr std::uint64_t K4 = page_size;

va_t map_anon(mm& m, std::uint64_t len, prot p = prot::read | prot::write) {
  return m.mmap(0, len, p, map::private_ | map::anonymous).value();
}

TEST(IntervalNotifier, InsertBadInputIsRejected) {
  mm m;
  recording_ops ops;
  interval_notifier a;
  EXPECT_EQ(a.insert(m, 0x1000, 0, ops), errc::overflow);
  EXPECT_EQ(a.insert(m, ~va_t{0} - 10, 100, ops), errc::overflow);
  EXPECT_EQ(m.notifiers().size(), 0u);
  ASSERT_EQ(a.insert(m, 0x1000, K4, ops), errc::ok);
  EXPECT_EQ(a.insert(m, 0x1000, K4, ops), errc::inval);  // already inserted
  EXPECT_EQ(m.notifiers().size(), 1u);
}

TEST(IntervalNotifier, ReadBeginOnANotifierNeverInsertedOrRemovedReturnsAtOnce) {
  mm m;
  recording_ops ops;
  interval_notifier never;
  const std::uint64_t s0 = never.read_begin();  // no crash, no wait, in every build
  EXPECT_FALSE(never.read_retry(s0));
  interval_notifier a;
  ASSERT_EQ(a.insert(m, 0x1000, K4, ops), errc::ok);
  const std::uint64_t s1 = a.read_begin();
  a.remove();
  EXPECT_EQ(a.read_begin(), s1);  // removed: its seq as it was
  {
    interval_notifier b;
    ASSERT_EQ(b.insert(m, 0x1000, K4, ops), errc::ok);
    m.teardown();  // detaches nothing yet; the destructor of mm does
    (void)b.read_begin();
  }
  auto m2 = std::make_unique<mm>();
  interval_notifier c;
  ASSERT_EQ(c.insert(*m2, 0x1000, K4, ops), errc::ok);
  m2.reset();  // the mm's teardown detaches c
  const std::uint64_t s3 = c.read_begin();
  EXPECT_FALSE(c.read_retry(s3));
}

TEST(IntervalNotifier, FreshInsertSeqIsMmSeqMinusOne) {
  mm m;
  recording_ops ops;
  interval_notifier a;
  EXPECT_EQ(m.notifiers().seq(), 2u);
  ASSERT_EQ(a.insert(m, 0x1000, K4, ops), errc::ok);
  EXPECT_EQ(a.seq(), 1u);
  const auto s = a.read_begin();  // must not wait
  EXPECT_EQ(s, 1u);
  EXPECT_FALSE(a.read_retry(s));
  EXPECT_FALSE(a.check_retry(s));
}

TEST(IntervalNotifier, OnlyOverlappingNotifiersAreCalledWithOddSeq) {
  mm m;
  const va_t va = map_anon(m, 8 * K4);
  recording_ops in, out;
  interval_notifier a, b;
  ASSERT_EQ(a.insert(m, va, 4 * K4, in), errc::ok);
  ASSERT_EQ(b.insert(m, va + 6 * K4, 2 * K4, out), errc::ok);
  const auto sa = a.read_begin(), sb = b.read_begin();
  ASSERT_EQ(m.munmap(va + K4, K4), errc::ok);
  ASSERT_EQ(in.calls.size(), 1u);
  EXPECT_TRUE(out.calls.empty());
  EXPECT_EQ(in.calls[0].event, mmu_notifier_event::unmap);
  EXPECT_EQ(in.calls[0].start, va + K4);
  EXPECT_EQ(in.calls[0].end, va + 2 * K4);
  EXPECT_EQ(in.calls[0].cur_seq % 2, 1u);
  EXPECT_EQ(m.notifiers().seq(), in.calls[0].cur_seq + 1);
  EXPECT_TRUE(a.read_retry(sa));
  EXPECT_FALSE(b.read_retry(sb));
  EXPECT_EQ(in.end_calls.load(), 1);
  EXPECT_EQ(out.end_calls.load(), 0);
}

TEST(IntervalNotifier, InvalidationWithoutOverlapKeepsSeqEven) {
  mm m;
  const va_t va = map_anon(m, 8 * K4);
  recording_ops ops;
  interval_notifier a;
  ASSERT_EQ(a.insert(m, va + 4 * K4, K4, ops), errc::ok);
  ASSERT_EQ(m.munmap(va, K4), errc::ok);
  EXPECT_EQ(m.notifiers().seq(), 2u);
  EXPECT_TRUE(ops.calls.empty());
}

TEST(IntervalNotifier, InsertDuringOverlappingInvalidationIsDeferred) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops ops, late_ops;
  interval_notifier a, late;
  ASSERT_EQ(a.insert(m, va, 4 * K4, ops), errc::ok);
  std::uint64_t odd = 0;
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    odd = m.notifiers().seq();
    EXPECT_EQ(late.insert(m, va, K4, late_ops), errc::ok);
    EXPECT_EQ(m.notifiers().size(), 1u);  // deferred, not in the tree yet
    EXPECT_EQ(late.seq(), odd);           // its first read_begin would wait
  }});
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok);
  m.set_test_hooks({});
  EXPECT_EQ(odd % 2, 1u);
  EXPECT_EQ(m.notifiers().size(), 2u);  // applied by the last end
  EXPECT_TRUE(late_ops.calls.empty());
  EXPECT_EQ(late.read_begin(), odd);    // seq moved on: no wait, and retry-safe
  EXPECT_EQ(m.notifiers().seq(), odd + 1);
}

TEST(IntervalNotifier, InsertDuringNonOverlappingInvalidationMakesSeqOdd) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops ops;
  interval_notifier late;
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    EXPECT_EQ(m.notifiers().seq(), 2u);
    EXPECT_EQ(late.insert(m, va, K4, ops), errc::ok);
    EXPECT_EQ(m.notifiers().seq(), 3u);
    EXPECT_EQ(m.notifiers().size(), 1u);  // inserted at once
    EXPECT_EQ(late.seq(), 3u);
  }});
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok);
  m.set_test_hooks({});
  EXPECT_EQ(m.notifiers().seq(), 4u);
  EXPECT_TRUE(ops.calls.empty());  // it joined after the callbacks ran
  EXPECT_EQ(late.read_begin(), 3u);
}

TEST(IntervalNotifier, RemoveOfDeferredInsertDropsIt) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops ops, late_ops;
  interval_notifier a, late;
  ASSERT_EQ(a.insert(m, va, 4 * K4, ops), errc::ok);
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    ASSERT_EQ(late.insert(m, va, K4, late_ops), errc::ok);
    late.remove();  // deferred insert never applied: returns at once
  }});
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok);
  m.set_test_hooks({});
  EXPECT_EQ(m.notifiers().size(), 1u);
  EXPECT_EQ(late.mm(), nullptr);
}

TEST(IntervalNotifier, RemoveDuringInvalidationWaitsForItsEnd) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops ops;
  interval_notifier a;
  ASSERT_EQ(a.insert(m, va, 4 * K4, ops), errc::ok);
  std::atomic<int> phase{0};
  std::atomic<bool> removed{false};
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    phase = 1;
    phase.notify_all();
    // Hold the invalidation open until the remover is known to be waiting.
    while (phase.load() != 2) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_FALSE(removed.load());
  }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok); });
  phase.wait(0);
  std::jthread rem([&] {
    phase = 2;
    a.remove();
    removed = true;
  });
  rem.join();
  inv.join();
  EXPECT_TRUE(removed.load());
  EXPECT_EQ(m.notifiers().size(), 0u);
  m.set_test_hooks({});
  ops.calls.clear();
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok);
  EXPECT_TRUE(ops.calls.empty());  // no callback after remove returned
}

TEST(IntervalNotifier, ReadBeginWaitsWhileItsInvalidationIsActive) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops ops;
  interval_notifier a;
  ASSERT_EQ(a.insert(m, va, 4 * K4, ops), errc::ok);
  std::atomic<int> phase{0};
  std::atomic<bool> begun{false};
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    phase = 1;
    phase.notify_all();
    while (phase.load() != 2) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_FALSE(begun.load());  // read_begin is still waiting
  }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok); });
  phase.wait(0);
  std::uint64_t seq = 0;
  std::jthread rd([&] {
    phase = 2;
    seq = a.read_begin();
    begun = true;
  });
  rd.join();
  inv.join();
  m.set_test_hooks({});
  EXPECT_EQ(seq % 2, 1u);  // the odd value it waited on, now stale-proof
  EXPECT_EQ(m.notifiers().seq() % 2, 0u);
  EXPECT_FALSE(a.read_retry(seq));
}

TEST(IntervalNotifier, NonBlockableRefusalReturnsEagainAndChangesNothing) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  ASSERT_EQ(m.store<int>(va, 7), errc::ok);
  recording_ops first, refuser;
  refuser.refuse_nonblock = true;
  interval_notifier a, b;
  ASSERT_EQ(a.insert(m, va, K4, first), errc::ok);  // earlier in the tree
  ASSERT_EQ(b.insert(m, va + K4, K4, refuser), errc::ok);
  const auto before = m.cpu_translate(va);
  auto r = m.reclaim(va, 4 * K4, /*blockable=*/false);
  EXPECT_EQ(r.error(), errc::again);
  EXPECT_EQ(m.swap_used(), 0u);
  EXPECT_EQ(m.cpu_translate(va).pfn, before.pfn);
  EXPECT_EQ(m.notifiers().active(), 0u);
  EXPECT_EQ(m.notifiers().seq() % 2, 0u);
  EXPECT_EQ(first.calls.size(), 1u);
  EXPECT_EQ(first.end_calls.load(), 1);  // undone for the one that ran
  EXPECT_EQ(refuser.end_calls.load(), 0);
  EXPECT_EQ(m.load<int>(va).value(), 7);
  // Blockable, the same pages go.
  EXPECT_EQ(m.reclaim(va, 4 * K4).value(), 1u);
}

TEST(IntervalNotifier, BlockableRefusalIsReportedAndIgnored) {
  mm m;
  const va_t va = map_anon(m, 4 * K4);
  recording_ops bad;
  bad.refuse_always = true;
  interval_notifier a;
  ASSERT_EQ(a.insert(m, va, 4 * K4, bad), errc::ok);
  EXPECT_EQ(m.munmap(va, 4 * K4), errc::ok);
  EXPECT_EQ(m.notifiers().bug_count(), 1u);
  EXPECT_EQ(m.notifiers().seq() % 2, 0u);
}

TEST(IntervalNotifier, EachOperationRaisesItsEvent) {
  mm m;
  auto pool1 = std::make_shared<frame_pool>(1024);
  const unsigned p1 = m.attach_pool(pool1, pool_kind::numa).value();
  const va_t va = map_anon(m, 16 * K4);
  for (int i = 0; i < 16; ++i) ASSERT_EQ(m.store<int>(va + i * K4, i), errc::ok);
  recording_ops ops;
  interval_notifier a;
  ASSERT_EQ(a.insert(m, 0, va_t{1} << 47, ops), errc::ok);
  int owner_tag = 0;
  using ev = mmu_notifier_event;
  auto last = [&] { return ops.calls.back().event; };
  ASSERT_EQ(m.mprotect(va, K4, prot::read), errc::ok);
  EXPECT_EQ(last(), ev::protection_vma);
  ASSERT_EQ(m.madvise(va + K4, K4, madvice::dontneed), errc::ok);
  EXPECT_EQ(last(), ev::clear);
  ASSERT_EQ(m.reclaim(va + 2 * K4, K4).value(), 1u);
  EXPECT_EQ(last(), ev::clear);
  ASSERT_EQ(m.migrate(va + 3 * K4, K4, p1, &owner_tag).value(), 1u);
  EXPECT_EQ(last(), ev::migrate);
  EXPECT_EQ(ops.calls.back().owner, &owner_tag);
  auto child = m.fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(last(), ev::protection_page);
  auto moved = m.mremap(va + 8 * K4, 4 * K4, 4 * K4, mremap_flags::maymove | mremap_flags::fixed, va + 64 * K4);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(last(), ev::unmap);
  EXPECT_EQ(ops.calls.back().start, va + 8 * K4);
  ASSERT_EQ(m.munmap(va + 4 * K4, K4), errc::ok);
  EXPECT_EQ(last(), ev::unmap);
  const std::size_t before = ops.calls.size();
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::hugepage), errc::ok);  // no event
  EXPECT_EQ(ops.calls.size(), before);
  m.teardown();
  EXPECT_EQ(last(), ev::release);
  EXPECT_TRUE(ops.calls.back().blockable);
  EXPECT_EQ(ops.calls.back().start, 0u);
  interval_notifier b;
  EXPECT_EQ(b.insert(m, va, K4, ops), errc::inval);  // torn down
  a.remove();
}

TEST(IntervalNotifier, ReadBeginRangeWaitsOnlyForOverlaps) {
  mm m;
  const va_t va = map_anon(m, 8 * K4);
  std::atomic<int> phase{0};
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    phase = 1;
    phase.notify_all();
    while (phase.load() != 2) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    phase = 3;
  }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, 2 * K4, madvice::dontneed), errc::ok); });
  phase.wait(0);
  // No notifier at all: the range set still records the invalidation.
  EXPECT_TRUE(m.notifiers().range_is_invalidating(va + K4, va + 2 * K4));
  EXPECT_FALSE(m.notifiers().range_is_invalidating(va + 2 * K4, va + 8 * K4));
  read_begin_range(m, va + 4 * K4, va + 8 * K4);  // disjoint: returns at once
  EXPECT_NE(phase.load(), 3);
  phase = 2;
  read_begin_range(m, va, va + K4);  // overlapping: waits for the end
  EXPECT_EQ(phase.load(), 3);
  inv.join();
  m.set_test_hooks({});
  EXPECT_FALSE(m.notifiers().range_is_invalidating(va, va + 8 * K4));
}

TEST(IntervalNotifier, MmDestructionDetachesNotifiers) {
  recording_ops ops;
  interval_notifier a;
  {
    mm m;
    ASSERT_EQ(a.insert(m, 0x10000, K4, ops), errc::ok);
  }
  EXPECT_EQ(a.mm(), nullptr);
  a.remove();  // a no-op
  ASSERT_EQ(ops.calls.size(), 1u);
  EXPECT_EQ(ops.calls[0].event, mmu_notifier_event::release);
}

}  // namespace
}  // namespace svm
