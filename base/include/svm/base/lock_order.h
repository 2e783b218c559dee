// The lock order of svm, written down once, and its debug-build validator.
//
// Locking order, outermost first (docs/architecture.md, "Lock order"):
//
//   rank::driver      svm::device registry   VM table of the fault handler, r/w
//   rank::vm          gpu_vm::lock_          BO VA tree, reader-writer
//   rank::mmap        mm::mmap_lock_         VMAs, reader-writer
//   rank::rmap        mm::rmap_lock_         taken exclusive by every mmap_lock
//                                            writer, shared by device-memory
//                                            eviction instead of mmap_lock
//   rank::resv        reservation locks      wound-wait style, several at once
//   rank::notifier    mm notifier state      short, never held across a callback
//   rank::mirror      svm mirror locks       the notifier-wide mode's per-notifier
//                                            lock (callbacks take it exclusive,
//                                            fault commits shared)
//   rank::pt_node     page-table node locks  parent before child, then
//                                            ascending address within a level
//   rank::leaf        everything else        innermost: frame pools, fault
//                                            buffer, retire lists, statistics
//
// A thread may acquire a lock of rank R with key K only if every lock it
// already holds has a smaller rank, or the same rank and a smaller key.
// Locks of one rank with no meaningful order use key 0, so nesting two of
// them is reported. A lock constructed as `nestable` (the wound-wait
// reservation locks, which resolve their own deadlocks by backing off) may be
// nested with others of its rank in any order.
//
// Notifier callbacks run with mmap_lock (and possibly resv) held; they may
// take page-table node locks and wait for TLB invalidation, and nothing else.
//
// The validator is compiled in when SVM_LOCK_CHECKS is 1 (the default when
// NDEBUG is not defined). A violation is reported with both acquisition
// sites, the one already held and the new one, then the process aborts
// unless a test installed its own handler with set_violation_handler().
#pragma once

#include <cstdint>
#include <string>

#ifndef SVM_LOCK_CHECKS
#ifdef NDEBUG
#define SVM_LOCK_CHECKS 0
#else
#define SVM_LOCK_CHECKS 1
#endif
#endif

namespace svm::lockdep {

enum class rank : std::uint16_t {
  driver = 50,
  vm = 100,
  mmap = 200,
  rmap = 250,
  resv = 300,
  notifier = 400,
  mirror = 450,
  pt_node = 500,
  leaf = 900,
};

const char* to_string(rank r) noexcept;

/// Where a lock was taken. Filled by default arguments at the call site.
struct site {
  const char* file = "?";  ///< source file (static storage)
  int line = 0;            ///< source line
};

/// What the validator reports: the lock being taken and the one held that it
/// conflicts with, each with its rank, key, name and acquisition site.
struct violation {
  const void* held_lock;    ///< the lock already held (null for "not-held")
  const char* held_name;    ///< its class name
  rank held_rank;           ///< its rank
  std::uint64_t held_key;   ///< its ordering key within the rank (e.g. an address)
  site held_site;           ///< where it was taken
  const void* new_lock;     ///< the lock being taken or released
  const char* new_name;     ///< its class name
  rank new_rank;            ///< its rank
  std::uint64_t new_key;    ///< its ordering key within the rank
  site new_site;            ///< where it is being taken
  const char* what;  ///< "order" (inversion), "recursive", "not-held" (release/assert)

  /// Both locks, their ranks and sites, in one line.
  std::string describe() const;
};

/// Called with each violation instead of the default print-and-abort.
using violation_handler = void (*)(const violation&);

/// Install a handler (tests use it to observe a seeded inversion); nullptr
/// restores the default, which prints describe() and aborts. Returns the
/// previous handler. Not thread-safe against concurrent lock traffic.
violation_handler set_violation_handler(violation_handler h) noexcept;

/// Hooks the lock wrappers call when SVM_LOCK_CHECKS is on. `try_lock`
/// acquisitions are recorded but never checked against the order, since a
/// trylock cannot deadlock. All operate on the calling thread's held set.
void on_acquire(const void* lock, const char* name, rank r, std::uint64_t key, bool nestable,
                bool try_lock, site s);
void on_release(const void* lock, site s);
/// True if the calling thread holds `lock`.
bool is_held(const void* lock) noexcept;
/// Reports "not-held" if the calling thread does not hold `lock`.
void check_held(const void* lock, const char* name, site s);
/// Reports if the calling thread holds any lock of rank `r` or outer than it
/// would forbid taking `r` now (used by "may block" / "must not hold" checks).
void check_none_held(const char* what, site s);
/// Number of locks the calling thread holds.
int held_count() noexcept;

}  // namespace svm::lockdep
