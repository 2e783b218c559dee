// Reservation objects (after the kernel's dma_resv) and the wound-wait mutex
// (after ww_mutex) that locks them, several at once (docs/contracts.md §4, §5).
//
// A reservation object belongs to one buffer object. It holds the fences of
// every job that uses the BO, each with a usage (resv_usage), and it is
// locked with a wound-wait mutex so that a VM_BIND or an eviction can lock
// several BOs at once without deadlocking against another thread that locks
// an overlapping set in another order.
//
// Lock order (svm/base/lock_order.h): reservation locks are rank `resv`,
// inside vm.lock and mmap_lock, outside page-table node locks. They are
// `nestable`: two reservation locks may be held together in any order,
// because the wound-wait protocol below resolves the cycles the order
// validator would otherwise have to forbid.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/fence.h"
#include "svm/base/lock_order.h"
#include "svm/base/mutex.h"
#include "svm/base/thread_annotations.h"

namespace svm {

class ww_mutex;
class ww_acquire_ctx;

/// -EDEADLK of ww_mutex_lock(): "you were wounded by an older context; drop
/// every lock of this context, then take the contended one with lock_slow()".
/// svm::errc (base/errc.h) has no EDEADLK, and base/ is not ours to edit, so
/// it is spelled errc::again: "try again after backing off" is exactly what
/// the caller must do. It never escapes a correct acquire loop, so it cannot
/// be confused with the non-blockable -EAGAIN of the notifier paths.
inline constexpr errc ww_edeadlk = errc::again;
/// -EALREADY of ww_mutex_lock(): this context already holds the lock. The
/// lock is still held exactly once; spelled errc::exist for the same reason.
inline constexpr errc ww_ealready = errc::exist;

/// What a ww_class's test hook observes.
enum class ww_event : std::uint8_t {
  wait,   ///< the locker is about to sleep on a held mutex (no internal lock held)
  wound,  ///< the locker (an older context) has just wounded the holder
};

/// A wound-wait class (the kernel's DEFINE_WW_CLASS): the ticket dispenser
/// that orders acquire contexts by age. Contexts and mutexes of one class
/// work together; mixing classes is a bug.
///
/// `hook`, when set, is called on the locking thread at each ww_event with
/// no internal lock held, so a test may block in it to force an
/// interleaving. It is immutable after construction.
class ww_class {
 public:
  /// The test hook's type: called with the event, the mutex involved and
  /// the locking context (null for a context-less lock).
  using hook_fn = std::function<void(ww_event, const ww_mutex&, const ww_acquire_ctx*)>;

  /// A class named `name` (a string that must outlive the class), with an
  /// optional test hook.
  explicit ww_class(const char* name, hook_fn hook = {}) : name_(name), hook_(std::move(hook)) {}
  ww_class(const ww_class&) = delete;
  ww_class& operator=(const ww_class&) = delete;

  /// The name given at construction (for diagnostics).
  [[nodiscard]] const char* name() const noexcept { return name_; }

 private:
  friend class ww_acquire_ctx;
  friend class ww_mutex;

  const char* name_;    // immutable
  const hook_fn hook_;  // immutable after construction
  /// Ticket dispenser: ww_acquire_ctx takes the next stamp with a relaxed
  /// fetch_add. Only uniqueness and the order of the values matter; the
  /// stamps are published to other threads through the mutexes' wait_lock_.
  std::atomic<std::uint64_t> next_stamp_{1};
};

/// The class of every reservation object (the kernel's reservation_ww_class).
extern ww_class reservation_ww_class;

// ---------------------------------------------------------------------------
// The wound-wait protocol
//
// State:
//   ww_mutex:        locked_, owner_ (the holding context, or null for a
//                    context-less holder), waiters_: all under wait_lock_.
//                    wake_seq_: a futex word the sleepers of this mutex
//                    wait on; bumped by unlock() (under wait_lock_) and by a
//                    wound of a sleeper (under the sleeper's ctx lock_).
//   ww_acquire_ctx:  stamp_ (immutable; smaller = older), acquired_ and the
//                    held list (owner thread only); wounded_ and blocked_on_
//                    under its lock_.
//
// Rules (wound-wait, the kernel's default for reservation objects):
//   1. A context that finds a mutex held by a YOUNGER context wounds it (sets
//      its wounded_ and, if it sleeps on some mutex, wakes it), then waits.
//   2. A context that finds a mutex held by an OLDER context (or a
//      context-less holder) waits.
//   3. A wounded context that holds at least one lock gets ww_edeadlk from
//      its next lock() (even an uncontended one: stricter than the kernel,
//      which only checks while it would sleep), and a wounded context asleep
//      in lock() is woken and gets ww_edeadlk. It must then unlock everything
//      (ww_acquire_ctx::unlock_all), take the contended mutex with
//      lock_slow(), which sleeps and cannot fail since the context holds
//      nothing, and lock the rest again with lock().
//   4. A context that holds nothing is never wounded effectively: its wound
//      is cleared at its next lock().
//
// Why it cannot deadlock: in any cycle of contexts each waiting for a mutex
// held by the next, the oldest context O waits for a younger holder Y and so
// wounded Y (rule 1). Y holds a lock and waits in the cycle, so it is woken
// and backs off (rule 3), which breaks the cycle. Why it makes progress: the
// oldest context is never wounded, so it gets all its locks once the younger
// holders finish or back off; a context that backed off keeps its stamp and
// eventually becomes the oldest.
//
// The interleaving, A older than B, each locking {X, Y} in opposite order:
//
//     context A (stamp 1)                 context B (stamp 2)
//     -------------------                 -------------------
//     lock(X) -> ok                       lock(Y) -> ok
//     lock(Y): held by B, younger:
//        B.wounded_ = true; if B sleeps,
//        bump its mutex's wake_seq_
//        sleep on Y.wake_seq_             lock(X): wounded and acquired>0
//                                            -> ww_edeadlk (also when B was
//                                               already asleep on X: woken)
//                                         unlock_all(): unlock(Y) bumps
//        woken, Y free -> ok  <---------  Y.wake_seq_
//     ... work ...                        lock_slow(X): held by A (older),
//                                            sleep on X.wake_seq_
//     unlock_all(): unlock(X), unlock(Y)
//                          ------------>  woken, X free -> ok
//                                         lock(Y) -> ok ... work ...
//
// A lost wake-up is impossible: a sleeper reads wake_seq_ under wait_lock_,
// then registers blocked_on_ and re-reads wounded_ under its ctx lock_,
// then sleeps only while wake_seq_ still holds the value it read. A waker
// either sets wounded_ before that registration (the sleeper sees it and
// does not sleep) or finds blocked_on_ set and bumps wake_seq_ after the
// sleeper read it (the sleep returns at once).
//
// Internal lock nesting: wait_lock_ (leaf, key 1) before ww_acquire_ctx
// lock_ (leaf, key 2); nothing is taken inside the latter.
// ---------------------------------------------------------------------------

/// An acquire context (ww_acquire_ctx): one locking transaction over several
/// wound-wait mutexes of one class. Construction is ww_acquire_init (takes a
/// stamp), done() is ww_acquire_done, destruction is ww_acquire_fini and
/// requires every lock released.
///
/// Thread safety: used by one thread at a time (its owner); other threads
/// only wound it, through its lock_.
class ww_acquire_ctx {
 public:
  /// ww_acquire_init: start a transaction on mutexes of `cls`, taking the
  /// class's next stamp (younger than every context made before it).
  explicit ww_acquire_ctx(ww_class& cls = reservation_ww_class);
  /// Requires acquired() == 0 (checked; a leak aborts).
  ~ww_acquire_ctx();
  ww_acquire_ctx(const ww_acquire_ctx&) = delete;
  ww_acquire_ctx& operator=(const ww_acquire_ctx&) = delete;

  /// ww_acquire_done: the acquire phase is over; a later lock() with this
  /// context is a bug (checked in debug builds). Wounds are moot after it.
  void done() noexcept { done_ = true; }

  /// The ticket: smaller is older; older contexts win.
  [[nodiscard]] std::uint64_t stamp() const noexcept { return stamp_; }
  /// Mutexes this context holds. Owner thread only.
  [[nodiscard]] int acquired() const noexcept { return acquired_; }
  /// Whether an older context wounded this one (racy hint for tests).
  /// Locking: takes lock_ (leaf) briefly.
  [[nodiscard]] bool is_wounded() const;
  /// How many times a lock() of this context returned ww_edeadlk (stats).
  [[nodiscard]] unsigned backoffs() const noexcept { return backoffs_; }

  /// The backoff step: unlock every mutex this context holds, newest first.
  /// Owner thread only. Locking: releases reservation locks; may be called
  /// inside a signalling section (unlocking never blocks).
  void unlock_all(lockdep::site s = {__builtin_FILE(), __builtin_LINE()});

 private:
  friend class ww_mutex;
  void wound();  // called by an older context holding a mutex this one owns

  ww_class& class_;            // immutable
  const std::uint64_t stamp_;  // immutable
  int acquired_ = 0;           // owner thread only
  unsigned backoffs_ = 0;      // owner thread only
  bool done_ = false;          // owner thread only
  /// The mutex whose lock() returned ww_edeadlk; lock_slow() expects it
  /// (checked in debug builds). Owner thread only.
  const ww_mutex* contending_ = nullptr;
  /// Mutexes held, newest first, for unlock_all(): an intrusive singly
  /// linked list through ww_mutex::held_next_ (no allocation). Owner thread
  /// only: a mutex is linked here only while this context holds it.
  ww_mutex* held_head_ = nullptr;

  static constexpr lock_class lock_class_{"ww_acquire_ctx.lock", lockdep::rank::leaf};
  mutable mutex lock_{lock_class_, 2};
  bool wounded_ SVM_GUARDED_BY(lock_) = false;
  /// The mutex this context sleeps on inside lock(), or null. A wounder
  /// bumps its wake_seq_ under lock_; the mutex stays alive while it is
  /// registered here because its lock() call has not returned.
  ww_mutex* blocked_on_ SVM_GUARDED_BY(lock_) = nullptr;
};

/// A wound-wait mutex (ww_mutex). It carries no thread-safety annotations
/// itself: resv, which embeds one, is the annotated capability.
///
/// Locking (all functions): rank resv, nestable (svm/base/lock_order.h);
/// the blocking ones may block, must not be called inside a fence
/// signalling section (reported via fence_sig::check_forbidden) and must not
/// run inside a notifier callback.
class ww_mutex {
 public:
  /// An unlocked mutex of class `cls` (which must outlive it).
  explicit ww_mutex(ww_class& cls = reservation_ww_class) : class_(cls) {}
  /// Must be unlocked.
  ~ww_mutex();
  ww_mutex(const ww_mutex&) = delete;
  ww_mutex& operator=(const ww_mutex&) = delete;

  /// ww_mutex_lock(lock, ctx): ok, ww_edeadlk (back off, see above) or
  /// ww_ealready (ctx holds it already). May sleep.
  [[nodiscard]] errc lock(ww_acquire_ctx& ctx, lockdep::site s = {__builtin_FILE(), __builtin_LINE()});
  /// ww_mutex_lock_slow(lock, ctx): after a backoff (ctx holds nothing), take
  /// the contended mutex. Sleeps; cannot fail.
  void lock_slow(ww_acquire_ctx& ctx, lockdep::site s = {__builtin_FILE(), __builtin_LINE()});
  /// ww_mutex_lock(lock, NULL): a context-less lock, for code that locks
  /// exactly one mutex of the class (it is never wounded, so holding it
  /// while taking another could deadlock).
  void lock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()});
  /// Never sleeps; allowed inside a signalling section (cannot deadlock).
  [[nodiscard]] bool try_lock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()});
  /// Unlock (with or without context). Never blocks.
  void unlock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()});

  /// Whether some thread holds the mutex now (a racy hint, for tests and
  /// assertions).
  [[nodiscard]] bool is_locked() const;
  /// The context holding the mutex, or null if unlocked or locked without a
  /// context (a racy hint, for tests and assertions).
  [[nodiscard]] const ww_acquire_ctx* owner() const;

 private:
  friend class ww_acquire_ctx;
  enum class mode : std::uint8_t { normal, slow };
  errc lock_common(ww_acquire_ctx* ctx, mode m, lockdep::site s);
  void call_hook(ww_event e, const ww_acquire_ctx* ctx) const {
    if (class_.hook_) class_.hook_(e, *this, ctx);
  }

  ww_class& class_;  // immutable

  static constexpr lock_class wait_lock_class_{"ww_mutex.wait_lock", lockdep::rank::leaf};
  mutable mutex wait_lock_{wait_lock_class_, 1};
  bool locked_ SVM_GUARDED_BY(wait_lock_) = false;
  ww_acquire_ctx* owner_ SVM_GUARDED_BY(wait_lock_) = nullptr;
  unsigned waiters_ SVM_GUARDED_BY(wait_lock_) = 0;
  /// Futex word of the sleepers. Bumped with a release fetch_add by unlock()
  /// and by ww_acquire_ctx::wound(); pairs with the acquire wait/load of the
  /// sleepers in lock_common().
  std::atomic<std::uint32_t> wake_seq_{0};
  /// Link in the holding context's held list (ww_acquire_ctx::held_head_).
  /// Touched only by the thread of the context holding this mutex.
  ww_mutex* held_next_ = nullptr;
};

/// Fence usage in a reservation object (enum dma_resv_usage), from the
/// strongest to the weakest. Asking for a usage returns every fence up to and
/// including it: kernel ⊂ write ⊂ read ⊂ bookkeep.
enum class resv_usage : std::uint8_t {
  kernel = 0,    ///< memory management: copies and clears (eviction, moves)
  write = 1,     ///< implicit sync: writers
  read = 2,      ///< implicit sync: readers
  bookkeep = 3,  ///< page-table updates, TLB flushes, preempt fences
};
/// The usage's name (for diagnostics).
[[nodiscard]] const char* to_string(resv_usage u) noexcept;

/// A reservation object (struct dma_resv): a wound-wait lock plus fences by
/// usage.
///
/// Protection:
///  - the lock (itself the capability of this class): held to add or prune
///    fences (SVM_REQUIRES(this)). Acquire it with lock(ctx) / lock_slow(ctx)
///    for several objects, or lock() / try_lock() for exactly one.
///  - fences_: modified only with the resv lock AND list_lock_ held; read
///    under list_lock_ alone by the lock-free readers (fences(),
///    test_signaled(), wait()), the analogue of the kernel's RCU readers.
///
/// Clang thread-safety: lock(ctx) returns an errc, which the analysis cannot
/// follow, and ww_acquire_ctx::unlock_all() releases a dynamic set, so the
/// context-based functions carry no annotation. After lock(ctx) returns ok
/// (or lock_slow returns), the caller states what it knows with
/// assert_held(), which also checks it in debug builds:
///
///     if (errc e = r.lock(ctx); e != errc::ok) return backoff(e);
///     r.assert_held();
///     r.add_fence(f, resv_usage::write);
class SVM_CAPABILITY("resv") resv {
 public:
  /// An unlocked reservation object with no fences, whose lock is of class
  /// `cls` (which must outlive it).
  explicit resv(ww_class& cls = reservation_ww_class) : lock_(cls) {}
  resv(const resv&) = delete;
  resv& operator=(const resv&) = delete;

  // --- locking (dma_resv_lock & co.; see ww_mutex for the Locking lines) --
  /// dma_resv_lock(obj, ctx): ok, ww_edeadlk or ww_ealready.
  [[nodiscard]] errc lock(ww_acquire_ctx& ctx, lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) {
    return lock_.lock(ctx, s);
  }
  /// dma_resv_lock_slow(obj, ctx). Like lock(ctx), not annotated: locks
  /// taken through a context are released by ww_acquire_ctx::unlock_all().
  void lock_slow(ww_acquire_ctx& ctx, lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) {
    lock_.lock_slow(ctx, s);
  }
  /// dma_resv_lock(obj, NULL): only when locking this one object.
  void lock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) SVM_ACQUIRE() { lock_.lock(s); }
  /// dma_resv_trylock().
  [[nodiscard]] bool try_lock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) SVM_TRY_ACQUIRE(true) {
    return lock_.try_lock(s);
  }
  /// dma_resv_unlock().
  void unlock(lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) SVM_RELEASE() { lock_.unlock(s); }
  /// dma_resv_assert_held(): debug builds check the calling thread holds it.
  void assert_held(lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) const SVM_ASSERT_CAPABILITY(this) {
#if SVM_LOCK_CHECKS
    lockdep::check_held(&lock_, "resv", s);
#else
    (void)s;
#endif
  }
  /// dma_resv_is_locked(): whether anyone holds the lock (a racy hint).
  [[nodiscard]] bool is_locked() const { return lock_.is_locked(); }
  /// The underlying wound-wait mutex (dma_resv's `lock` member).
  [[nodiscard]] ww_mutex& ww() noexcept { return lock_; }

  // --- fences ---------------------------------------------------------------
  /// dma_resv_reserve_fences(): make room for `n` more add_fence() calls so
  /// that they do not allocate (add_fence typically runs inside a signalling
  /// section, where allocation is forbidden). Returns ok (or nomem).
  /// Locking: SVM_REQUIRES the resv lock; may allocate; never blocks otherwise.
  errc reserve_fences(unsigned n) SVM_REQUIRES(this);

  /// dma_resv_add_fence(): record `f` with usage `u`.
  ///  - `f` already present: its usage is promoted if `u` is stronger (lower),
  ///    never demoted.
  ///  - otherwise it takes the slot of a signalled fence if there is one (the
  ///    signalled fence is pruned), or a reserved slot. Without a reserved
  ///    slot it allocates, which debug builds report inside a signalling
  ///    section.
  /// Locking: SVM_REQUIRES the resv lock; takes list_lock_ (leaf); never blocks.
  void add_fence(fence_ptr f, resv_usage u,
                 lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) SVM_REQUIRES(this);

  /// Drop every signalled fence; returns how many. Keeps the capacity.
  /// Locking: SVM_REQUIRES the resv lock; takes list_lock_; never blocks.
  std::size_t prune() SVM_REQUIRES(this);

  /// Every unsignalled fence with usage up to and including `u` (a snapshot).
  /// Locking: none required (takes list_lock_); allocates; never blocks.
  [[nodiscard]] std::vector<fence_ptr> fences(resv_usage u) const;

  /// dma_resv_test_signaled(): every fence with usage up to `u` signalled.
  /// Locking: none required; never blocks; allowed anywhere.
  [[nodiscard]] bool test_signaled(resv_usage u) const;

  /// dma_resv_wait_timeout(): wait until every fence with usage up to `u`
  /// (present now or added during the wait) is signalled, at most `timeout`
  /// in total. Returns ok or timedout; a fence's own error is not reported
  /// (read it from fences() before waiting if it matters).
  /// Locking: none required; must not hold the resv lock if the fences'
  /// signallers may need it; must not be inside a signalling section
  /// (fence::wait checks); may block.
  [[nodiscard]] errc wait(resv_usage u, std::chrono::nanoseconds timeout) const;

  /// Number of slots in use, signalled or not (tests).
  [[nodiscard]] std::size_t num_slots() const;

 private:
  struct slot {
    fence_ptr f;
    resv_usage usage;
  };

  ww_mutex lock_;
  static constexpr lock_class list_lock_class_{"resv.list_lock", lockdep::rank::leaf};
  mutable mutex list_lock_{list_lock_class_};
  std::vector<slot> fences_ SVM_GUARDED_BY(list_lock_);
};

}  // namespace svm
