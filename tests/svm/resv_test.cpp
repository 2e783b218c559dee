#include "svm/svm/resv.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

namespace svm {
namespace {

using namespace std::chrono_literals;

bool contains(const std::vector<fence_ptr>& v, const fence_ptr& f) {
  return std::find(v.begin(), v.end(), f) != v.end();
}

// Spin until `pred` holds (bounded, so a broken protocol fails instead of
// hanging the suite).
template <class P>
bool eventually(P pred, std::chrono::milliseconds limit = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

// --- fences by usage ------------------------------------------------------------

TEST(Resv, UsageQueriesIncludeEveryStrongerUsage) {
  resv r;
  auto k = fence::create("k"), w = fence::create("w"), rd = fence::create("r"), b = fence::create("b");
  r.lock();
  r.add_fence(b, resv_usage::bookkeep);
  r.add_fence(rd, resv_usage::read);
  r.add_fence(w, resv_usage::write);
  r.add_fence(k, resv_usage::kernel);
  r.unlock();
  EXPECT_EQ(r.fences(resv_usage::kernel).size(), 1u);
  EXPECT_TRUE(contains(r.fences(resv_usage::kernel), k));
  auto wr = r.fences(resv_usage::write);
  EXPECT_EQ(wr.size(), 2u);
  EXPECT_TRUE(contains(wr, k) && contains(wr, w));
  auto rr = r.fences(resv_usage::read);
  EXPECT_EQ(rr.size(), 3u);
  EXPECT_FALSE(contains(rr, b));
  EXPECT_EQ(r.fences(resv_usage::bookkeep).size(), 4u);
  for (auto& f : {k, w, rd, b}) f->signal();
}

TEST(Resv, FencePromotedToStrongerUsageInPlace) {
  resv r;
  auto f = fence::create();
  r.lock();
  r.add_fence(f, resv_usage::read);
  EXPECT_FALSE(contains(r.fences(resv_usage::write), f));
  r.add_fence(f, resv_usage::kernel);
  r.unlock();
  EXPECT_TRUE(contains(r.fences(resv_usage::kernel), f));
  EXPECT_EQ(r.num_slots(), 1u);
  f->signal();
}

TEST(Resv, FenceNeverDemoted) {
  resv r;
  auto f = fence::create();
  r.lock();
  r.add_fence(f, resv_usage::write);
  r.add_fence(f, resv_usage::bookkeep);
  r.add_fence(f, resv_usage::read);
  r.unlock();
  EXPECT_TRUE(contains(r.fences(resv_usage::write), f));
  EXPECT_FALSE(r.test_signaled(resv_usage::write));
  EXPECT_EQ(r.num_slots(), 1u);
  f->signal();
}

TEST(Resv, SignalledFencesAreLeftOutAndTheirSlotsReused) {
  resv r;
  auto a = fence::create("a"), b = fence::create("b");
  r.lock();
  r.add_fence(a, resv_usage::write);
  a->signal();
  EXPECT_TRUE(r.fences(resv_usage::bookkeep).empty());
  EXPECT_TRUE(r.test_signaled(resv_usage::bookkeep));
  r.add_fence(b, resv_usage::read);  // takes a's slot
  EXPECT_EQ(r.num_slots(), 1u);
  EXPECT_TRUE(r.test_signaled(resv_usage::write));
  EXPECT_FALSE(r.test_signaled(resv_usage::read));
  r.unlock();
  b->signal();
}

TEST(Resv, PruneDropsOnlySignalledFences) {
  resv r;
  auto a = fence::create(), b = fence::create(), c = fence::create();
  r.lock();
  r.add_fence(a, resv_usage::kernel);
  r.add_fence(b, resv_usage::read);
  r.add_fence(c, resv_usage::bookkeep);
  a->signal();
  c->signal();
  EXPECT_EQ(r.prune(), 2u);
  EXPECT_EQ(r.num_slots(), 1u);
  EXPECT_EQ(r.prune(), 0u);
  r.unlock();
  EXPECT_EQ(r.fences(resv_usage::bookkeep), std::vector<fence_ptr>{b});
  b->signal();
}

TEST(Resv, WaitTimesOutThenCompletesWhenSignalled) {
  resv r;
  auto w = fence::create("w");
  r.lock();
  r.add_fence(w, resv_usage::write);
  r.unlock();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(r.wait(resv_usage::read, 5ms), errc::timedout);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 5ms);
  // A kernel-usage wait does not see a write fence.
  EXPECT_EQ(r.wait(resv_usage::kernel, 0ms), errc::ok);
  std::jthread t([&] {
    std::this_thread::sleep_for(2ms);
    w->signal(errc::io);
  });
  EXPECT_EQ(r.wait(resv_usage::bookkeep, 10s), errc::ok);  // the fence's own error is not ours
  EXPECT_TRUE(r.test_signaled(resv_usage::bookkeep));
}

TEST(Resv, WaitCoversEveryFenceAndSharesOneDeadline) {
  resv r;
  auto a = fence::create(), b = fence::create();
  r.lock();
  r.add_fence(a, resv_usage::kernel);
  r.add_fence(b, resv_usage::read);
  r.unlock();
  a->signal();
  EXPECT_EQ(r.wait(resv_usage::read, 3ms), errc::timedout);  // b still pending
  EXPECT_EQ(r.wait(resv_usage::write, 3ms), errc::ok);       // a only
  std::jthread t([&] { b->signal(); });
  EXPECT_EQ(r.wait(resv_usage::read, std::chrono::hours(48)), errc::ok);  // "forever"
}

TEST(Resv, ReadersDoNotNeedTheLock) {
  resv r;
  auto f = fence::create();
  r.lock();
  r.add_fence(f, resv_usage::write);
  std::atomic<bool> done{false};
  {
    // The lock stays held by this thread while another reads.
    std::jthread reader([&] {
      EXPECT_FALSE(r.test_signaled(resv_usage::write));
      EXPECT_EQ(r.fences(resv_usage::write).size(), 1u);
      EXPECT_EQ(r.wait(resv_usage::write, 1ms), errc::timedout);
      done = true;
    });
  }
  EXPECT_TRUE(done.load());
  r.unlock();
  f->signal();
}

std::vector<fence_sig::violation> g_sig_seen;
void capture_sig(const fence_sig::violation& v) { g_sig_seen.push_back(v); }

TEST(Resv, ReservedSlotsKeepAddFenceFromAllocatingInSignallingSection) {
  if (!SVM_LOCK_CHECKS) GTEST_SKIP() << "signalling checks compiled out";
  g_sig_seen.clear();
  auto prev = fence_sig::set_violation_handler(&capture_sig);
  resv r;
  auto a = fence::create(), b = fence::create();
  r.lock();
  EXPECT_EQ(r.reserve_fences(1), errc::ok);
  {
    fence_sig::section sec("job run");
    r.add_fence(a, resv_usage::write);  // reserved: no report
    EXPECT_TRUE(g_sig_seen.empty());
    r.add_fence(b, resv_usage::read);  // no room left: allocation reported
    EXPECT_EQ(g_sig_seen.size(), 1u);
    if (!g_sig_seen.empty()) {
      EXPECT_STREQ(g_sig_seen[0].op, "allocation");
    }
  }
  r.unlock();
  fence_sig::set_violation_handler(prev);
  a->signal();
  b->signal();
}

TEST(Resv, ReservationLockInsideSignallingSectionIsReported) {
  if (!SVM_LOCK_CHECKS) GTEST_SKIP() << "signalling checks compiled out";
  g_sig_seen.clear();
  auto prev = fence_sig::set_violation_handler(&capture_sig);
  resv r;
  ww_acquire_ctx ctx;
  {
    const int section_line = __LINE__ + 1;
    fence_sig::section sec("preempt fence");
    const int lock_line = __LINE__ + 1;
    ASSERT_EQ(r.lock(ctx), errc::ok);
    ASSERT_EQ(g_sig_seen.size(), 1u);
    EXPECT_STREQ(g_sig_seen[0].op, "reservation lock");
    EXPECT_EQ(g_sig_seen[0].section_site.line, section_line);
    EXPECT_EQ(g_sig_seen[0].op_site.line, lock_line);
    ctx.unlock_all();
    // A trylock cannot deadlock, so it is allowed.
    if (r.try_lock()) {
      r.unlock();
    } else {
      ADD_FAILURE() << "try_lock of a free resv failed";
    }
    EXPECT_EQ(g_sig_seen.size(), 1u);
    r.lock();  // context-less: reported too
    r.unlock();
    EXPECT_EQ(g_sig_seen.size(), 2u);
  }
  fence_sig::set_violation_handler(prev);
}

// --- the wound-wait lock ----------------------------------------------------------

TEST(WwMutex, TryLockFailsWhileHeldAndContextLockReportsEalready) {
  resv r;
  ww_acquire_ctx ctx;
  ASSERT_EQ(r.lock(ctx), errc::ok);
  EXPECT_EQ(r.ww().owner(), &ctx);
  EXPECT_EQ(r.lock(ctx), ww_ealready);
  EXPECT_EQ(ctx.acquired(), 1);
  std::jthread([&] { EXPECT_FALSE(r.try_lock()); }).join();
  ctx.unlock_all();
  EXPECT_EQ(ctx.acquired(), 0);
  EXPECT_FALSE(r.is_locked());
  if (r.try_lock()) {
    r.unlock();
  } else {
    ADD_FAILURE() << "try_lock of a free resv failed";
  }
}

TEST(WwMutex, ContextsAreOrderedByAge) {
  ww_acquire_ctx a, b;
  EXPECT_LT(a.stamp(), b.stamp());
}

TEST(WwMutex, UnlockAllReleasesEveryLockOfTheContext) {
  resv r[4];
  ww_acquire_ctx ctx;
  for (auto& x : r) ASSERT_EQ(x.lock(ctx), errc::ok);
  EXPECT_EQ(ctx.acquired(), 4);
  r[1].assert_held();  // what lock(ctx) == ok told us, for clang's analysis
  r[1].unlock();        // one released out of order
  EXPECT_EQ(ctx.acquired(), 3);
  ctx.unlock_all();
  EXPECT_EQ(ctx.acquired(), 0);
  for (auto& x : r) EXPECT_FALSE(x.is_locked());
}

// Records what the hook sees, for forcing interleavings.
struct hook_state {
  std::atomic<const ww_acquire_ctx*> waiting_ctx{nullptr};
  std::atomic<int> waits{0};
  std::atomic<int> wounds{0};
};

TEST(WwMutex, YoungerWaitsForOlderHolderWithoutBackingOff) {
  hook_state hs;
  ww_class cls("t", [&](ww_event e, const ww_mutex&, const ww_acquire_ctx* c) {
    if (e == ww_event::wait) {
      ++hs.waits;
      hs.waiting_ctx = c;
    } else {
      ++hs.wounds;
    }
  });
  resv x(cls), y(cls);
  std::atomic<bool> a_holds{false}, release_a{false};
  std::atomic<int> b_result{-1};
  std::jthread ta([&] {
    ww_acquire_ctx a(cls);
    ASSERT_EQ(x.lock(a), errc::ok);
    a_holds = true;
    while (!release_a) std::this_thread::yield();
    a.unlock_all();
  });
  ASSERT_TRUE(eventually([&] { return a_holds.load(); }));
  std::jthread tb([&] {
    ww_acquire_ctx b(cls);  // younger
    ASSERT_EQ(y.lock(b), errc::ok);
    b_result = static_cast<int>(x.lock(b));  // held by the older: waits, no -EDEADLK
    b.unlock_all();
  });
  ASSERT_TRUE(eventually([&] { return hs.waits.load() > 0; }));
  EXPECT_EQ(b_result.load(), -1);
  release_a = true;
  tb.join();
  EXPECT_EQ(b_result.load(), static_cast<int>(errc::ok));
  EXPECT_EQ(hs.wounds.load(), 0);
}

// The two deterministic interleavings of "A locks X then Y, B locks Y then
// X", A older. Either way B backs off exactly once, A never does, and A's
// critical section (holding both) precedes B's.
struct opposing_order {
  hook_state hs;
  ww_class cls{"t", [this](ww_event e, const ww_mutex&, const ww_acquire_ctx* c) {
                 if (e == ww_event::wait) {
                   ++hs.waits;
                   hs.waiting_ctx = c;
                 } else {
                   ++hs.wounds;
                 }
               }};
  resv x{cls}, y{cls};
  ww_acquire_ctx* a = nullptr;
  ww_acquire_ctx* b = nullptr;
  std::atomic<bool> a_has_x{false}, b_has_y{false};
  std::atomic<int> order{0}, a_done{0}, b_done{0};
  unsigned a_backoffs = 99, b_backoffs = 99;

  // Lock `second` after `first`, backing off as the protocol says.
  static void lock_pair(ww_acquire_ctx& ctx, resv& first, resv& second) {
    errc e = second.lock(ctx);
    if (e == ww_edeadlk) {
      ctx.unlock_all();
      second.lock_slow(ctx);
      e = first.lock(ctx);
      ASSERT_EQ(e, errc::ok);
    } else {
      ASSERT_EQ(e, errc::ok);
    }
  }

  void run(bool older_blocks_first) {
    ww_acquire_ctx ca(cls);
    ww_acquire_ctx cb_ctx(cls);
    a = &ca;
    b = &cb_ctx;
    ASSERT_LT(a->stamp(), b->stamp());
    {
      std::jthread ta([&] {
        ASSERT_EQ(x.lock(*a), errc::ok);
        a_has_x = true;
        ASSERT_TRUE(eventually([&] { return b_has_y.load(); }));
        if (!older_blocks_first) {
          ASSERT_TRUE(eventually([&] { return hs.waiting_ctx.load() == b; }));
        }
        lock_pair(*a, x, y);
        a->done();
        a_done = ++order;
        a_backoffs = a->backoffs();
        a->unlock_all();
      });
      std::jthread tb([&] {
        ASSERT_EQ(y.lock(*b), errc::ok);
        b_has_y = true;
        ASSERT_TRUE(eventually([&] { return a_has_x.load(); }));
        if (older_blocks_first) {
          ASSERT_TRUE(eventually([&] { return hs.waiting_ctx.load() == a; }));
        }
        lock_pair(*b, y, x);
        b->done();
        b_done = ++order;
        b_backoffs = b->backoffs();
        b->unlock_all();
      });
    }
    EXPECT_EQ(a_backoffs, 0u);
    EXPECT_EQ(b_backoffs, 1u);
    EXPECT_LT(a_done.load(), b_done.load());
    EXPECT_GE(hs.wounds.load(), 1);
    EXPECT_FALSE(x.is_locked());
    EXPECT_FALSE(y.is_locked());
  }
};

TEST(WwMutex, OpposingOrderOlderBlocksFirstYoungerBacksOff) {
  opposing_order t;
  t.run(/*older_blocks_first=*/true);
}

TEST(WwMutex, OpposingOrderYoungerAsleepIsWokenByWound) {
  opposing_order t;
  t.run(/*older_blocks_first=*/false);
}

TEST(WwMutex, WoundIsForgottenOnceTheContextHoldsNothing) {
  ww_class cls("t");
  resv x(cls), y(cls);
  ww_acquire_ctx a(cls), b(cls);
  std::atomic<bool> b_holds{false}, a_waiting_done{false};
  std::jthread tb([&] {
    ASSERT_EQ(y.lock(b), errc::ok);
    b_holds = true;
    // A (older) will wound us while waiting for y.
    ASSERT_TRUE(eventually([&] { return b.is_wounded(); }));
    b.unlock_all();  // held nothing since; the wound must not count
    ASSERT_TRUE(eventually([&] { return a_waiting_done.load(); }));
    EXPECT_EQ(x.lock(b), errc::ok);  // acquired()==0: wound cleared
    EXPECT_FALSE(b.is_wounded());
    b.unlock_all();
  });
  ASSERT_TRUE(eventually([&] { return b_holds.load(); }));
  ASSERT_EQ(y.lock(a), errc::ok);  // wounds b, waits for it
  a.unlock_all();
  a_waiting_done = true;
  tb.join();
  EXPECT_EQ(b.backoffs(), 0u);
}

TEST(WwMutex, WoundedHolderBacksOffEvenOnUncontendedLock) {
  ww_class cls("t");
  resv x(cls), y(cls), z(cls);
  ww_acquire_ctx a(cls), b(cls);
  std::atomic<bool> b_holds{false};
  std::atomic<int> r{-1};
  std::jthread tb([&] {
    ASSERT_EQ(y.lock(b), errc::ok);
    b_holds = true;
    ASSERT_TRUE(eventually([&] { return b.is_wounded(); }));
    r = static_cast<int>(z.lock(b));  // z is free, but b must back off
    EXPECT_FALSE(z.is_locked());
    b.unlock_all();
  });
  ASSERT_TRUE(eventually([&] { return b_holds.load(); }));
  ASSERT_EQ(x.lock(a), errc::ok);
  ASSERT_EQ(y.lock(a), errc::ok);
  a.unlock_all();
  tb.join();
  EXPECT_EQ(r.load(), static_cast<int>(ww_edeadlk));
}

// Several threads lock random sets of reservation objects in random orders
// with the backoff loop; every set is eventually held exclusively, and the
// per-object counters (plain ints, guarded by the resv locks, so TSan checks
// the exclusion) add up.
TEST(WwMutex, StressRandomSetsMakeProgress) {
  constexpr int n_objs = 8;
  constexpr int n_threads = 4;
  constexpr int iters = 4000;
  resv objs[n_objs];
  int counters[n_objs] = {};
  std::atomic<int> holders[n_objs] = {};
  std::atomic<unsigned> total_backoffs{0};
  std::atomic<int> violations{0};
  {
    std::vector<std::jthread> ts;
    for (int t = 0; t < n_threads; ++t) {
      ts.emplace_back([&, t] {
        std::mt19937 rng(1234 + t);
        std::vector<int> idx(n_objs);
        for (int i = 0; i < n_objs; ++i) idx[i] = i;
        for (int it = 0; it < iters; ++it) {
          std::shuffle(idx.begin(), idx.end(), rng);
          const int k = 2 + static_cast<int>(rng() % 3);
          ww_acquire_ctx ctx;
          resv* contended = nullptr;
          for (;;) {
            if (contended != nullptr) contended->lock_slow(ctx);
            bool all = true;
            for (int j = 0; j < k; ++j) {
              resv* r = &objs[idx[j]];
              if (r == contended) continue;
              const errc e = r->lock(ctx);
              if (e == ww_edeadlk) {
                ctx.unlock_all();
                contended = r;
                all = false;
                break;
              }
              if (e != errc::ok) ++violations;
            }
            if (all) break;
          }
          ctx.done();
          for (int j = 0; j < k; ++j) {
            if (holders[idx[j]].fetch_add(1) != 0) ++violations;
            ++counters[idx[j]];
          }
          for (int j = 0; j < k; ++j) holders[idx[j]].fetch_sub(1);
          total_backoffs += ctx.backoffs();
          ctx.unlock_all();
        }
      });
    }
  }
  EXPECT_EQ(violations.load(), 0);
  long sum = 0;
  for (int c : counters) sum += c;
  EXPECT_GE(sum, long{n_threads} * iters * 2);
  EXPECT_LE(sum, long{n_threads} * iters * 4);
  for (auto& r : objs) EXPECT_FALSE(r.is_locked());
  RecordProperty("backoffs", static_cast<int>(total_backoffs.load()));
}

}  // namespace
}  // namespace svm
