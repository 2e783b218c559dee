// Deterministic interleavings (injected pauses) of mirror faults against
// invalidations, and a modest stress run.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "test_mirror.h"

namespace svm {
namespace {

using test::test_mirror;
constexpr std::uint64_t K4 = page_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

// A two-phase rendezvous: wait_for(n) until phase >= n, advance(n).
struct gate {
  std::atomic<int> phase{0};
  void advance(int n) {
    phase.store(n);
    phase.notify_all();
  }
  void wait_for(int n) {
    for (int p = phase.load(); p < n; p = phase.load()) phase.wait(p);
  }
};

// The hazard of docs/protocols.md: the fault takes its sequence after the
// callback ran but before the CPU PTEs are cleared. read_begin must make it
// wait, so that its walk cannot find the frame that is about to be freed.
TEST(Interleave, SeqTakenAfterCallbackWaitsUntilPtesAreCleared) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 5), errc::ok);
  const auto old = m.cpu_translate(va);
  test_mirror mir(m, va, K4);
  gate g;
  std::atomic<bool> walked{false};
  m.set_test_hooks({.after_invalidate_start =
                        [&](const mmu_notifier_range&) {
                          g.advance(1);  // callbacks done, PTEs not yet cleared
                          g.wait_for(2);
                          std::this_thread::sleep_for(std::chrono::milliseconds(30));
                          EXPECT_FALSE(walked.load()) << "the fault walked before the PTEs were cleared";
                        },
                    .hmm_after_walk = [&](va_t, va_t) { walked = true; }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok); });
  g.wait_for(1);
  std::jthread fault([&] {
    g.advance(2);
    EXPECT_EQ(mir.fault(va, va + K4, false), errc::ok);
  });
  fault.join();
  inv.join();
  m.set_test_hooks({});
  const hmm_pfn e = mir.entry(va);
  ASSERT_TRUE(e & hmm_pfn_valid);
  EXPECT_EQ(hmm_pfn_to_pfn(e), mm::zero_pfn());  // the fresh zero page, not the freed frame
  EXPECT_NE(m.pool().frame_generation(old.pfn), old.generation);
  EXPECT_TRUE(mir.coherent());
}

// The callback runs after the fault walked (it saw the old frame) but before
// it took the driver lock: read_retry must send it round again.
TEST(Interleave, CallbackAfterWalkForcesRetry) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 5), errc::ok);
  const auto old = m.cpu_translate(va);
  test_mirror mir(m, va, K4);
  gate g;
  std::atomic<int> walks{0};
  m.set_test_hooks({.hmm_after_walk = [&](va_t, va_t) {
    if (walks.fetch_add(1) == 0) {
      g.advance(1);  // walked: saw the old frame
      g.wait_for(2);
    }
  }});
  std::jthread fault([&] { EXPECT_EQ(mir.fault(va, va + K4, false), errc::ok); });
  g.wait_for(1);
  ASSERT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok);  // old frame freed now
  EXPECT_NE(m.pool().frame_generation(old.pfn), old.generation);
  g.advance(2);
  fault.join();
  m.set_test_hooks({});
  EXPECT_GE(mir.retries.load(), 1);
  const hmm_pfn e = mir.entry(va);
  EXPECT_EQ(hmm_pfn_to_pfn(e), mm::zero_pfn());
  EXPECT_TRUE(mir.coherent());
}

// The callback runs between the snapshot and the walk: the walk itself
// refuses (EBUSY) before looking at any PTE.
TEST(Interleave, CallbackBetweenSnapshotAndWalkIsBusy) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 5), errc::ok);
  test_mirror mir(m, va, K4);
  const auto seq = mir.sub.read_begin();
  ASSERT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok);
  std::vector<hmm_pfn> pfns(1);
  hmm_range r{.notifier = &mir.sub, .notifier_seq = seq, .start = va, .end = va + K4, .hmm_pfns = pfns,
              .default_flags = hmm_req::fault};
  auto g = m.read_lock();
  EXPECT_EQ(hmm_range_fault(r), errc::busy);
  EXPECT_EQ(pfns[0], 0u);
}

// Per-page-table mode with no device leaf (and no notifier callback that
// could leave a trace): the fault's range-granular read_begin waits for the
// active invalidation, and its validity check is the driver's own counter.
TEST(Interleave, RangeReadBeginCoversInvalidationWithNoLeaf) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 5), errc::ok);
  const auto old = m.cpu_translate(va);
  gate g;
  std::atomic<bool> walked{false};
  m.set_test_hooks({.after_invalidate_start =
                        [&](const mmu_notifier_range&) {
                          g.advance(1);
                          g.wait_for(2);
                          std::this_thread::sleep_for(std::chrono::milliseconds(30));
                          EXPECT_FALSE(walked.load());
                        },
                    .hmm_after_walk = [&](va_t, va_t) { walked = true; }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok); });
  g.wait_for(1);
  std::vector<hmm_pfn> pfns(1);
  std::atomic<std::uint64_t> leaf_seq{0};  // stands for the device leaf's counter
  std::jthread fault([&] {
    g.advance(2);
    read_begin_range(m, va, va + K4);
    const auto snap = leaf_seq.load();
    hmm_range r{.start = va, .end = va + K4, .hmm_pfns = pfns, .default_flags = hmm_req::fault, .mm = &m,
                .is_valid = [&] { return leaf_seq.load() == snap; }};
    auto rl = m.read_lock();
    EXPECT_EQ(hmm_range_fault(r), errc::ok);
  });
  fault.join();
  inv.join();
  m.set_test_hooks({});
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[0]), mm::zero_pfn());
  EXPECT_NE(hmm_pfn_to_pfn(pfns[0]), old.pfn);
}

TEST(Interleave, InsertAndRemoveWhileAnInvalidationIsActive) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  test::recording_ops ops_a, ops_new;
  interval_notifier a, fresh;
  ASSERT_EQ(a.insert(m, va, 4 * K4, ops_a), errc::ok);
  gate g;
  m.set_test_hooks({.after_invalidate_start = [&](const mmu_notifier_range&) {
    g.advance(1);
    g.wait_for(3);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }});
  std::jthread inv([&] { EXPECT_EQ(m.madvise(va, 4 * K4, madvice::dontneed), errc::ok); });
  g.wait_for(1);
  const auto odd = m.notifiers().seq();
  EXPECT_EQ(odd % 2, 1u);
  ASSERT_EQ(fresh.insert(m, va, K4, ops_new), errc::ok);  // deferred
  EXPECT_EQ(fresh.seq(), odd);
  EXPECT_EQ(m.notifiers().size(), 1u);
  std::atomic<bool> removed{false}, begun{false};
  std::jthread rem([&] {
    g.advance(2);
    a.remove();  // deferred: waits for the end
    removed = true;
  });
  std::jthread rb([&] {
    g.wait_for(2);
    g.advance(3);
    (void)fresh.read_begin();  // its seq is the odd one: waits too
    begun = true;
  });
  g.wait_for(3);
  EXPECT_FALSE(removed.load());
  EXPECT_FALSE(begun.load());
  rem.join();
  rb.join();
  inv.join();
  m.set_test_hooks({});
  EXPECT_TRUE(removed.load());
  EXPECT_EQ(m.notifiers().size(), 1u);  // fresh in, a out
  EXPECT_EQ(m.notifiers().seq(), odd + 1);
  EXPECT_TRUE(ops_new.calls.empty());
  ASSERT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok);
  EXPECT_EQ(ops_new.calls.size(), 1u);
  EXPECT_EQ(ops_a.calls.size(), 1u);  // only the first invalidation
}

TEST(Interleave, NonBlockableInvalidationMeetsHeldDriverLock) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 1), errc::ok);
  test_mirror mir(m, va, 2 * K4);
  ASSERT_EQ(mir.fault(va, va + K4, false), errc::ok);
  const auto seq_before = m.notifiers().seq();
  gate g;
  std::jthread driver([&] {  // the driver is busy: it holds its lock
    lock_guard held(mir.lock);
    g.advance(1);
    g.wait_for(2);
  });
  g.wait_for(1);
  auto r = m.reclaim(va, 2 * K4, /*blockable=*/false);
  EXPECT_EQ(r.error(), errc::again);
  g.advance(2);
  driver.join();
  EXPECT_EQ(mir.refusals.load(), 1);
  EXPECT_NE(mir.entry(va), 0u);  // nothing changed
  EXPECT_TRUE(m.cpu_translate(va).present);
  EXPECT_EQ(m.swap_used(), 0u);
  EXPECT_EQ(m.notifiers().active(), 0u);
  EXPECT_EQ(m.notifiers().seq(), seq_before + 2);  // started and ended at once
  EXPECT_EQ(m.reclaim(va, 2 * K4, /*blockable=*/true).value(), 1u);
  EXPECT_EQ(mir.entry(va), 0u);
}

// Several mirror threads fault over a region while another thread unmaps,
// remaps, DONTNEEDs and reclaims it. Device entries must never outlive frames.
TEST(NotifierStress, MirrorFaultsAgainstCpuInvalidations) {
  mm m;
  constexpr int pages = 128;
  const va_t va = m.mmap(0, pages * K4, rw, anon_priv).value();
  test_mirror mir(m, va, pages * K4);
  std::atomic<bool> stop{false};
  std::atomic<bool> incoherent{false};
  std::atomic<int> faults_done{0};
  std::vector<std::jthread> faulters;
  for (int t = 0; t < 2; ++t) {
    faulters.emplace_back([&, t] {
      std::mt19937 rng(t);
      while (!stop.load()) {
        const va_t a = va + (rng() % pages) * K4;
        const bool w = rng() % 2;
        errc e = mir.fault(a, a + K4, w);
        EXPECT_TRUE(e == errc::ok || e == errc::fault || e == errc::busy) << errc_name(e);
        std::uint64_t v = 0;
        (void)mir.read(a, std::as_writable_bytes(std::span{&v, 1}));
        faults_done.fetch_add(1);
      }
    });
  }
  std::mt19937 rng(99);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int i = 0; i < 3000 || (faults_done.load() < 20000 && std::chrono::steady_clock::now() < deadline); ++i) {
    const va_t a = va + (rng() % (pages - 8)) * K4;
    switch (rng() % 4) {
      case 0:
        ASSERT_EQ(m.munmap(a, 8 * K4), errc::ok);
        ASSERT_TRUE(m.mmap(a, 8 * K4, rw, anon_priv | map::fixed).ok());
        break;
      case 1: ASSERT_EQ(m.madvise(a, 8 * K4, madvice::dontneed), errc::ok); break;
      case 2: ASSERT_TRUE(m.reclaim(a, 8 * K4).ok()); break;
      case 3: ASSERT_EQ(m.store<std::uint64_t>(a, static_cast<std::uint64_t>(i)), errc::ok); break;
    }
    if (!mir.coherent()) incoherent = true;
  }
  stop = true;
  faulters.clear();
  EXPECT_FALSE(incoherent.load());
  EXPECT_GE(faults_done.load(), 20000);
  EXPECT_GT(mir.invalidations.load(), 1000);
  ASSERT_EQ(m.munmap(va, pages * K4), errc::ok);
  EXPECT_EQ(mir.size(), 0u);
  EXPECT_EQ(m.pool().free_frames(), m.pool().frame_count() - 1);
}

}  // namespace
}  // namespace svm
