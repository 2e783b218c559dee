#include "svm/base/epoch.h"

#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "svm/base/mutex.h"

namespace svm::epoch {
namespace {

struct retired {
  void* obj;
  deleter del;
  void* ctx;
  std::uint64_t epoch;
};

constexpr lock_class retire_class{"epoch.retire", lockdep::rank::leaf};

struct domain {
  /// Global epoch; starts at 2 so that "e - 2" never wraps. Advanced by CAS
  /// in try_advance(); loads by readers are relaxed (the fence after the
  /// record store orders them), loads by reclaimers are seq_cst.
  std::atomic<std::uint64_t> global{2};
  /// Head of the push-only record list; release on push pairs with the
  /// acquire loads of the walkers of the list.
  std::atomic<record*> head{nullptr};
  mutex retire_lock{retire_class};
  std::vector<retired> items SVM_GUARDED_BY(retire_lock);
  /// Mirrors items.size(); relaxed, for pending() and the retire heuristic.
  std::atomic<std::size_t> n_pending{0};
  /// free_safe() passes that took items off the list and are still running
  /// their deleters. Incremented under retire_lock by the pass that takes
  /// the items; decremented (release) once their deleters ran. synchronize()
  /// waits (acquire) for it to drop to 0 after its own pass: an item retired
  /// before it may have been taken by another thread's pass, and "freed"
  /// must mean its deleter has finished (a table destroys its accounting
  /// right after synchronize() returns).
  std::atomic<unsigned> freeing{0};
};

domain& dom() {
  static domain* d = new domain;  // leaked on purpose: threads may exit after main
  return *d;
}

record* acquire_record() {
  domain& d = dom();
  for (record* r = d.head.load(std::memory_order_acquire); r; r = r->next) {
    bool expected = false;
    if (!r->in_use.load(std::memory_order_relaxed) &&
        r->in_use.compare_exchange_strong(expected, true, std::memory_order_acquire))
      return r;
  }
  auto* r = new record;
  r->in_use.store(true, std::memory_order_relaxed);
  record* h = d.head.load(std::memory_order_relaxed);
  do {
    r->next = h;
  } while (!d.head.compare_exchange_weak(h, r, std::memory_order_release, std::memory_order_relaxed));
  return r;
}

struct thread_slot {
  record* rec = nullptr;
  ~thread_slot() {
    if (rec) {
      rec->state.store(0, std::memory_order_release);
      rec->nest = 0;
      rec->in_use.store(false, std::memory_order_release);
    }
  }
};
thread_local thread_slot tl_slot;
// Constant-initialised copy of tl_slot.rec: the fast path avoids the
// dynamic-TLS wrapper of a thread_local with a destructor.
thread_local record* tl_rec = nullptr;

record* my_record() {
  record* r = tl_rec;
  if (r) [[likely]]
    return r;
  r = acquire_record();
  tl_slot.rec = r;
  tl_rec = r;
  return r;
}

// Advance the epoch if every active reader has seen the current one.
bool try_advance(domain& d) {
  std::uint64_t g = d.global.load(std::memory_order_seq_cst);
  for (record* r = d.head.load(std::memory_order_acquire); r; r = r->next) {
    std::uint64_t s = r->state.load(std::memory_order_seq_cst);
    if ((s & 1) && (s >> 1) != g) return false;
  }
  return d.global.compare_exchange_strong(g, g + 1, std::memory_order_seq_cst);
}

std::size_t free_safe(domain& d) {
  std::vector<retired> ready;
  {
    lock_guard g(d.retire_lock);
    std::uint64_t now = d.global.load(std::memory_order_seq_cst);
    auto it = d.items.begin();
    for (auto& item : d.items) {
      if (item.epoch + 2 <= now) ready.push_back(item);
      else *it++ = item;
    }
    d.items.erase(it, d.items.end());
    d.n_pending.store(d.items.size(), std::memory_order_relaxed);
    if (ready.empty()) return 0;
    d.freeing.fetch_add(1, std::memory_order_relaxed);  // ordered by retire_lock
  }
  for (auto& item : ready) item.del(item.obj, item.ctx);
  d.freeing.fetch_sub(1, std::memory_order_release);
  return ready.size();
}

}  // namespace

void enter() noexcept {
  record* r = my_record();
  if (r->nest++ == 0) {
    std::uint64_t g = dom().global.load(std::memory_order_relaxed);
    // seq_cst: see the protocol in epoch.h; pairs with the seq_cst loads
    // of records in try_advance().
    r->state.store((g << 1) | 1, std::memory_order_seq_cst);
  }
}

void leave() noexcept {
  record* r = tl_rec;
  if (--r->nest == 0) r->state.store(0, std::memory_order_release);
}

void quiescent() noexcept {
  record* r = my_record();
  if (r->nest != 1) return;
  std::uint64_t g = dom().global.load(std::memory_order_relaxed);
  if (((r->state.load(std::memory_order_relaxed)) >> 1) == g) return;
  // seq_cst (a release too): the reads this thread made under the old
  // epoch happen before a reclaimer that sees the new one.
  r->state.store((g << 1) | 1, std::memory_order_seq_cst);
}

bool in_section() noexcept {
  record* r = tl_rec;
  return r && r->nest > 0;
}

void retire(void* obj, deleter del, void* ctx) noexcept {
  domain& d = dom();
  std::size_t n;
  {
    lock_guard g(d.retire_lock);
    d.items.push_back({obj, del, ctx, d.global.load(std::memory_order_seq_cst)});
    n = d.items.size();
    d.n_pending.store(n, std::memory_order_relaxed);
  }
  if (n % 32 == 0 && !in_section()) try_reclaim();
}

std::size_t try_reclaim() noexcept {
  domain& d = dom();
  try_advance(d);
  try_advance(d);
  return free_safe(d);
}

void synchronize() noexcept {
  if (in_section()) {
    std::fprintf(stderr, "svm epoch: synchronize() inside a read-side section would deadlock\n");
    std::abort();
  }
  domain& d = dom();
  const std::uint64_t target = d.global.load(std::memory_order_seq_cst) + 2;
  while (d.global.load(std::memory_order_seq_cst) < target) {
    if (!try_advance(d)) std::this_thread::yield();
  }
  free_safe(d);
  // Items another thread's pass took are freed only when its deleters ran.
  while (d.freeing.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

std::size_t pending() noexcept { return dom().n_pending.load(std::memory_order_relaxed); }

std::uint64_t current() noexcept { return dom().global.load(std::memory_order_relaxed); }

}  // namespace svm::epoch
