// Lock wrappers with thread-safety annotations and lock-order checks.
//
// svm::mutex        a 4-byte spin-then-futex mutex (std::atomic wait/notify);
//                   used for page-table nodes and every short critical section.
// svm::shared_mutex a reader-writer lock (std::shared_mutex underneath), for
//                   vm.lock and mmap_lock.
// lock_guard, shared_lock_guard, unique_lock: scoped holders the clang-tsa
//                   build understands.
//
// Each lock carries a rank and a key from svm/base/lock_order.h; debug builds
// (SVM_LOCK_CHECKS) check every acquisition against the declared order and
// record the call site, so a violation names both acquisition sites.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <shared_mutex>

#include "svm/base/lock_order.h"
#include "svm/base/thread_annotations.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SVM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define SVM_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define SVM_CPU_RELAX() ((void)0)
#endif

namespace svm {

#define SVM_HERE_DEFAULT ::svm::lockdep::site s = {__builtin_FILE(), __builtin_LINE()}

/// Describes a class of locks and where it sits in the lock order. Lock
/// objects refer to their class, so a class must have static storage
/// duration (declare it `static constexpr` or at namespace scope).
struct lock_class {
  const char* name = "lock";                 ///< shown in violation reports
  lockdep::rank rank = lockdep::rank::leaf;  ///< its place in the lock order (lock_order.h)
  bool nestable = false;  ///< may nest with other nestable locks of its rank
};

inline constexpr lock_class default_lock_class{};

/// Spin-then-futex mutex. State: 0 free, 1 held, 2 held with sleepers.
/// A contended locker spins briefly (a critical section here is a few
/// hundred nanoseconds), then sleeps in std::atomic::wait; unlock wakes one
/// sleeper only when the state says there is one.
class SVM_CAPABILITY("mutex") mutex {
 public:
  constexpr mutex() noexcept = default;
  /// `key` orders locks of one rank (ascending); see lock_order.h.
  explicit mutex(const lock_class& c, [[maybe_unused]] std::uint64_t key = 0) noexcept
#if SVM_LOCK_CHECKS
      : cls_(&c), key_(key)
#endif
  {
    (void)c;
  }
  mutex(const mutex&) = delete;
  mutex& operator=(const mutex&) = delete;

  /// Take the lock, spinning briefly and then sleeping on a futex. Debug
  /// builds check the lock order first (a violation is reported at `s`).
  void lock(SVM_HERE_DEFAULT) SVM_ACQUIRE() {
#if SVM_LOCK_CHECKS
    lockdep::on_acquire(this, cls_->name, cls_->rank, key_, cls_->nestable, false, s);
#else
    (void)s;
#endif
    std::uint32_t c = 0;
    // acquire: pairs with the release exchange in unlock().
    if (state_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed))
      return;
    lock_slow();
  }

  /// Take the lock if it is free; true when taken. Never blocks, so the lock
  /// order does not apply to it (the validator records the hold).
  bool try_lock(SVM_HERE_DEFAULT) SVM_TRY_ACQUIRE(true) {
    std::uint32_t c = 0;
    if (!state_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed))
      return false;
#if SVM_LOCK_CHECKS
    lockdep::on_acquire(this, cls_->name, cls_->rank, key_, cls_->nestable, true, s);
#else
    (void)s;
#endif
    return true;
  }

  /// Release the lock and wake one sleeper, if any.
  void unlock(SVM_HERE_DEFAULT) SVM_RELEASE() {
#if SVM_LOCK_CHECKS
    lockdep::on_release(this, s);
#else
    (void)s;
#endif
    // release: pairs with the acquire CAS/exchange in lock()/lock_slow().
    if (state_.exchange(0, std::memory_order_release) == 2) state_.notify_one();
  }

  /// Debug builds check that the calling thread holds this lock.
  void assert_held(SVM_HERE_DEFAULT) const SVM_ASSERT_CAPABILITY(this) {
#if SVM_LOCK_CHECKS
    lockdep::check_held(this, cls_->name, s);
#else
    (void)s;
#endif
  }

  /// A racy hint for tests and assertions: somebody holds it.
  [[nodiscard]] bool is_locked() const noexcept {
    return state_.load(std::memory_order_relaxed) != 0;
  }

 private:
  void lock_slow() {
    for (int i = 0; i < 128; ++i) {
      SVM_CPU_RELAX();
      std::uint32_t c = 0;
      if (state_.load(std::memory_order_relaxed) == 0 &&
          state_.compare_exchange_weak(c, 1, std::memory_order_acquire, std::memory_order_relaxed))
        return;
    }
    // Mark "held with sleepers" and sleep until it is free; whoever takes it
    // from here leaves it at 2 so that its unlock wakes the next sleeper.
    while (state_.exchange(2, std::memory_order_acquire) != 0) state_.wait(2, std::memory_order_relaxed);
  }

#if SVM_LOCK_CHECKS
  const lock_class* cls_ = &default_lock_class;  // immutable after construction
  std::uint64_t key_ = 0;                         // immutable after construction
#endif
  // Last, so that the validator's build leaves its padding at the tail,
  // where a [[no_unique_address]] owner (pt::node) packs its next fields.
  std::atomic<std::uint32_t> state_{0};
};

/// Reader-writer lock over std::shared_mutex, ranked like svm::mutex.
class SVM_CAPABILITY("shared_mutex") shared_mutex {
 public:
  shared_mutex() = default;
  /// A lock of class `c`; `key` orders locks of one rank (e.g. by address).
  explicit shared_mutex(const lock_class& c, std::uint64_t key = 0) : cls_(&c), key_(key) {}
  shared_mutex(const shared_mutex&) = delete;
  shared_mutex& operator=(const shared_mutex&) = delete;

  /// Take the lock exclusively (lock order checked in debug builds).
  void lock(SVM_HERE_DEFAULT) SVM_ACQUIRE() {
    check_acquire(false, s);
    m_.lock();
  }
  /// Take it exclusively if free; true when taken.
  bool try_lock(SVM_HERE_DEFAULT) SVM_TRY_ACQUIRE(true) {
    if (!m_.try_lock()) return false;
    check_acquire(true, s);
    return true;
  }
  /// Release an exclusive hold.
  void unlock(SVM_HERE_DEFAULT) SVM_RELEASE() {
    check_release(s);
    m_.unlock();
  }
  /// Take the lock shared (lock order checked in debug builds).
  void lock_shared(SVM_HERE_DEFAULT) SVM_ACQUIRE_SHARED() {
    check_acquire(false, s);
    m_.lock_shared();
  }
  /// Take it shared if no writer holds it; true when taken.
  bool try_lock_shared(SVM_HERE_DEFAULT) SVM_TRY_ACQUIRE_SHARED(true) {
    if (!m_.try_lock_shared()) return false;
    check_acquire(true, s);
    return true;
  }
  /// Release a shared hold.
  void unlock_shared(SVM_HERE_DEFAULT) SVM_RELEASE_SHARED() {
    check_release(s);
    m_.unlock_shared();
  }
  /// Debug builds check that the calling thread holds it (shared or exclusive).
  void assert_held(SVM_HERE_DEFAULT) const SVM_ASSERT_CAPABILITY(this) { check_held(s); }
  /// Debug builds check that the calling thread holds it (shared or exclusive).
  void assert_held_shared(SVM_HERE_DEFAULT) const SVM_ASSERT_SHARED_CAPABILITY(this) { check_held(s); }

 private:
  void check_acquire([[maybe_unused]] bool try_lock, [[maybe_unused]] lockdep::site s) {
#if SVM_LOCK_CHECKS
    lockdep::on_acquire(this, cls_->name, cls_->rank, key_, cls_->nestable, try_lock, s);
#endif
  }
  void check_release([[maybe_unused]] lockdep::site s) {
#if SVM_LOCK_CHECKS
    lockdep::on_release(this, s);
#endif
  }
  void check_held([[maybe_unused]] lockdep::site s) const {
#if SVM_LOCK_CHECKS
    lockdep::check_held(this, cls_->name, s);
#endif
  }

  std::shared_mutex m_;
  const lock_class* cls_ = &default_lock_class;  // immutable after construction
  std::uint64_t key_ = 0;                         // immutable after construction
};

/// Scoped exclusive holder.
template <class M>
class SVM_SCOPED_CAPABILITY lock_guard {
 public:
  /// Lock `m` exclusively until the guard goes (the site defaults to the caller's).
  explicit lock_guard(M& m, SVM_HERE_DEFAULT) SVM_ACQUIRE(m) : m_(m), s_(s) { m_.lock(s); }
  ~lock_guard() SVM_RELEASE() { m_.unlock(s_); }
  lock_guard(const lock_guard&) = delete;
  lock_guard& operator=(const lock_guard&) = delete;

 private:
  M& m_;
  lockdep::site s_;
};

/// Scoped shared holder.
template <class M>
class SVM_SCOPED_CAPABILITY shared_lock_guard {
 public:
  /// Lock `m` shared until the guard goes (the site defaults to the caller's).
  explicit shared_lock_guard(M& m, SVM_HERE_DEFAULT) SVM_ACQUIRE_SHARED(m) : m_(m), s_(s) {
    m_.lock_shared(s);
  }
  ~shared_lock_guard() SVM_RELEASE() { m_.unlock_shared(s_); }
  shared_lock_guard(const shared_lock_guard&) = delete;
  shared_lock_guard& operator=(const shared_lock_guard&) = delete;

 private:
  M& m_;
  lockdep::site s_;
};

/// Scoped exclusive holder that can be released early.
template <class M>
class SVM_SCOPED_CAPABILITY unique_lock {
 public:
  /// Lock `m` exclusively (the site defaults to the caller's).
  explicit unique_lock(M& m, SVM_HERE_DEFAULT) SVM_ACQUIRE(m) : m_(&m), s_(s) { m_->lock(s); owns_ = true; }
  ~unique_lock() SVM_RELEASE() {
    if (owns_) m_->unlock(s_);
  }
  /// Release early (the lock must be owned).
  void unlock() SVM_RELEASE() {
    m_->unlock(s_);
    owns_ = false;
  }
  /// Take the lock again after unlock().
  void lock() SVM_ACQUIRE() {
    m_->lock(s_);
    owns_ = true;
  }
  /// True while the lock is held through this holder.
  [[nodiscard]] bool owns_lock() const noexcept { return owns_; }
  unique_lock(const unique_lock&) = delete;
  unique_lock& operator=(const unique_lock&) = delete;

 private:
  M* m_;
  lockdep::site s_;
  bool owns_ = false;
};

}  // namespace svm
