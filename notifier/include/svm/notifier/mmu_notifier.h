// Interval notifiers with sequence numbers (docs/contracts.md §1; kernel:
// mm/mmu_notifier.c, include/linux/mmu_notifier.h).
//
// A driver that mirrors part of an mm's address space registers an
// interval_notifier over that part. Every CPU operation that changes or
// removes a translation brackets the change with invalidate_range_start /
// invalidate_range_end; each overlapping notifier's `invalidate` callback runs
// at start, before any CPU PTE is cleared, and frames are freed only after end.
#pragma once

#include <atomic>
#include <cstdint>

#include <boost/intrusive/list.hpp>
#include <boost/intrusive/set.hpp>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"

namespace svm {

class mm;
class interval_notifier;

/// Why a range is being invalidated (kernel: enum mmu_notifier_event).
enum class mmu_notifier_event : std::uint8_t {
  unmap = 0,        ///< munmap, mremap's old range, MAP_FIXED over a mapping
  clear,            ///< madvise DONTNEED, reclaim, copy-on-write break
  protection_vma,   ///< mprotect
  protection_page,  ///< fork write-protecting private pages
  soft_dirty,       ///< (not raised by this model)
  release,          ///< mm teardown
  migrate,          ///< page migration; carries the initiator in `owner`
  exclusive,        ///< (not raised by this model)
};
[[nodiscard]] const char* to_string(mmu_notifier_event e) noexcept;

namespace detail {
using range_hook = boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>>;
}

/// One invalidation (kernel: struct mmu_notifier_range). The caller owns it
/// and keeps it alive from invalidate_range_start until invalidate_range_end.
struct mmu_notifier_range {
  svm::mm* mm = nullptr;  ///< the mm being invalidated; set by mm::invalidate_range_start
  va_t start = 0;  ///< inclusive, page aligned
  va_t end = 0;    ///< exclusive, page aligned
  mmu_notifier_event event = mmu_notifier_event::unmap;  ///< why the range is invalidated
  /// Who started it (MIGRATE/EXCLUSIVE): a driver ignores its own events.
  const void* owner = nullptr;
  /// False for a non-blockable invalidation: callbacks must not sleep and
  /// may refuse (return false), which fails the start with EAGAIN.
  bool blockable = true;

  // Private to the mm. Written under the mm's notifier lock.
  detail::range_hook active_hook_;   ///< member of the mm's active-range list
  bool overlapped_ = false;          ///< start found an overlapping notifier
  bool started_ = false;             ///< between start and end
};

/// Callbacks of an interval notifier (kernel: mmu_interval_notifier_ops).
/// Callbacks run with the mm's mmap_lock held (shared or exclusive) and no
/// notifier lock held. They may take page-table node locks and the driver's
/// own lock and wait for TLB invalidation; they must not take mmap_lock,
/// call interval_notifier::remove() or insert() of this mm, or wait on
/// anything that needs a fault to make progress.
class interval_notifier_ops {
 public:
  virtual ~interval_notifier_ops() = default;
  /// Called at range start for every overlapping notifier. The driver takes
  /// its lock, calls `sub.set_seq(cur_seq)`, clears its mappings of the
  /// range (or schedules it), and returns true. With `!range.blockable` it
  /// may instead return false if it would have to sleep.
  virtual bool invalidate(interval_notifier& sub, const mmu_notifier_range& range,
                          std::uint64_t cur_seq) = 0;
  /// Extension: called at range end for every notifier whose invalidate ran
  /// for this range (and returned true).
  virtual void invalidate_end(interval_notifier& /*sub*/, const mmu_notifier_range& /*range*/) {}
};

/*
 * The sequence protocol (kernel: mmu_interval_notifier).
 *
 * State, per mm (mmu_notifier_subscriptions, all under `lock_`):
 *   invalidate_seq   starts at 2. Odd while an invalidation that overlaps
 *                    some notifier is active. Made odd by a start that found
 *                    an overlapping notifier (or by an insert during an
 *                    active invalidation); made even by the last end.
 *   active           count of invalidations between start and end.
 *   tree             notifiers by interval. While active > 0 and the seq is
 *                    odd, the tree is frozen: inserts and removes go to the
 *                    deferred list and are applied by the last end.
 * State, per notifier:
 *   invalidate_seq   written by the driver's callback through set_seq(cur_seq)
 *                    under the driver's lock; initialised by insert.
 *
 *   fault (driver)                           invalidation (CPU op)
 *   --------------                           ---------------------
 *   seq = read_begin(sub)                    lock; active++; seq |= 1; unlock
 *     (waits while sub.seq == mm odd seq)    invalidate(sub, range, cur_seq):
 *   hmm_range_fault(range)                     lock(driver); set_seq(cur_seq);
 *     (walks the CPU page table)                 clear device PTEs; unlock(driver)
 *   lock(driver)                             clear CPU PTEs
 *   if read_retry(sub, seq): unlock, retry   lock; if --active == 0: seq++ (even),
 *   program device PTEs                            apply deferred; unlock; wake
 *   unlock(driver)                           free frames
 *
 * Why it is safe: if the callback ran before the driver lock was taken in
 * the fault, read_retry sees the new seq and the fault retries. If the fault
 * took its seq after the callback, read_begin saw sub.seq == the mm's odd
 * seq and waited for the end, so its walk happens after the CPU PTEs were
 * cleared and never finds a frame that is about to be freed (the hazard of
 * docs/protocols.md). If the callback runs after the fault unlocked, it clears
 * what the fault programmed before any frame is freed.
 */

/// A driver's subscription to an interval of an mm (kernel:
/// struct mmu_interval_notifier). Not copyable or movable; must stay alive
/// and inserted until remove() returns (the destructor removes it).
class interval_notifier {
 public:
  interval_notifier() = default;
  ~interval_notifier();
  interval_notifier(const interval_notifier&) = delete;
  interval_notifier& operator=(const interval_notifier&) = delete;

  /// Subscribe to [start, start + length) of `m` with `ops` (kernel:
  /// mmu_interval_notifier_insert). EOVERFLOW if length is 0 or the end
  /// overflows; EINVAL if the mm is being torn down or this notifier is
  /// already inserted. During an active invalidation the insert is deferred
  /// (or the seq made odd); either way the first read_begin() waits for it.
  /// Locking: takes the notifier lock; must not be called from a callback of
  /// the same mm. Does not block.
  [[nodiscard]] errc insert(svm::mm& m, va_t start, std::uint64_t length, interval_notifier_ops& ops);
  /// Unsubscribe (kernel: mmu_interval_notifier_remove). During an
  /// invalidation the removal is deferred and this waits until that
  /// invalidation ends; on return no callback runs or will run. A notifier
  /// that is not inserted (or whose mm is gone) is a no-op.
  /// Locking: takes the notifier lock; blocks; must not be called from a
  /// callback or with mmap_lock held.
  void remove();

  /// Kernel: mmu_interval_read_begin. Waits while this notifier's seq equals
  /// the mm's odd seq (an invalidation of it is in progress), then returns the
  /// notifier's seq. On a notifier that is not inserted (never inserted,
  /// removed, or detached by its mm's teardown) it returns the notifier's
  /// seq at once, in every build: no invalidation can reach such a notifier.
  /// Locking: takes the notifier lock; blocks; call without mmap_lock and
  /// driver locks.
  [[nodiscard]] std::uint64_t read_begin();
  /// Kernel: mmu_interval_read_retry. True if an invalidation ran since
  /// read_begin returned `seq`. Exact only under the driver lock that the
  /// callback takes around set_seq.
  [[nodiscard]] bool read_retry(std::uint64_t seq) const noexcept {
    // relaxed: the driver lock orders it with set_seq's store.
    return invalidate_seq_.load(std::memory_order_relaxed) != seq;
  }
  /// Kernel: mmu_interval_check_retry. A lock-free hint (acquire; pairs with
  /// the release store in set_seq).
  [[nodiscard]] bool check_retry(std::uint64_t seq) const noexcept {
    return invalidate_seq_.load(std::memory_order_acquire) != seq;
  }
  /// Kernel: mmu_interval_set_seq. Called by the invalidate callback under the
  /// driver lock with the `cur_seq` it was given.
  void set_seq(std::uint64_t cur_seq) noexcept {
    // release: pairs with the acquire load in check_retry().
    invalidate_seq_.store(cur_seq, std::memory_order_release);
  }

  /// First byte of the subscribed interval (as given to insert()).
  [[nodiscard]] va_t start() const noexcept { return start_; }
  /// Inclusive last byte.
  [[nodiscard]] va_t last() const noexcept { return last_; }
  /// The mm this notifier is inserted into; null when it is not inserted
  /// (never inserted, removed, or detached by the mm's teardown).
  [[nodiscard]] svm::mm* mm() const noexcept { return mm_; }
  /// The notifier's seq (racy snapshot, for tests).
  [[nodiscard]] std::uint64_t seq() const noexcept { return invalidate_seq_.load(std::memory_order_acquire); }

 private:
  friend class mmu_notifier_subscriptions;
  // Interval, ops and mm: written by insert() under the notifier lock before
  // the notifier becomes reachable; immutable while inserted.
  va_t start_ = 0;
  va_t last_ = 0;
  interval_notifier_ops* ops_ = nullptr;
  svm::mm* mm_ = nullptr;
  /// See the protocol comment above; atomic with the orders documented at
  /// each access.
  std::atomic<std::uint64_t> invalidate_seq_{0};
  /// Member of the mm's interval tree; membership guarded by the notifier
  /// lock, frozen while an overlapping invalidation is active.
  using tree_hook_t = boost::intrusive::set_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>>;
  using list_hook_t = boost::intrusive::list_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>>;
  tree_hook_t tree_hook_;
  /// Member of the mm's deferred list; guarded by the notifier lock.
  list_hook_t deferred_hook_;
  bool in_tree_ = false;   ///< guarded by the notifier lock
  bool deferred_ = false;  ///< guarded by the notifier lock
  bool inserted_ = false;  ///< guarded by the notifier lock: insert done, remove not yet
};

/// Per-mm notifier state (kernel: struct mmu_notifier_subscriptions). Owned by
/// svm::mm; drivers use it through interval_notifier and the mm.
class mmu_notifier_subscriptions {
 public:
  mmu_notifier_subscriptions();
  ~mmu_notifier_subscriptions();
  mmu_notifier_subscriptions(const mmu_notifier_subscriptions&) = delete;
  mmu_notifier_subscriptions& operator=(const mmu_notifier_subscriptions&) = delete;

  /// Begin an invalidation: count it, register `r` in the active-range set,
  /// make the seq odd if a notifier overlaps, and call every overlapping
  /// notifier's invalidate(). Non-blockable and refused by a callback: the
  /// invalidation is ended at once (invalidate_end runs for the notifiers
  /// already invalidated) and EAGAIN is returned; the caller must not call
  /// invalidate_range_end. A blockable callback returning false is a bug: it
  /// is reported on stderr and counted (bug_count()), and the start goes on.
  /// Locking: takes and releases the notifier lock (rank notifier); holds no
  /// lock across the callbacks. The caller may hold mmap_lock; must not hold
  /// page-table node locks. Blocks only in callbacks.
  [[nodiscard]] errc invalidate_range_start(mmu_notifier_range& r);
  /// End an invalidation started with invalidate_range_start: run the
  /// invalidate_end extension callbacks, unregister the range, and if it was
  /// the last active one make the seq even, apply deferred inserts/removes and
  /// wake waiters. Locking: as invalidate_range_start.
  void invalidate_range_end(mmu_notifier_range& r);

  /// Extension: wait until no active invalidation overlaps [start, end).
  /// Locking: takes the notifier lock; blocks (std::atomic wait); must not be
  /// called with mmap_lock held exclusively by a thread that will invalidate,
  /// nor from a callback.
  void read_begin_range(va_t start, va_t end);
  /// Extension: true if some active invalidation overlaps [start, end) now.
  [[nodiscard]] bool range_is_invalidating(va_t start, va_t end) const;

  /// The mm sequence (racy snapshot, for tests and statistics).
  [[nodiscard]] std::uint64_t seq() const noexcept { return invalidate_seq_.load(std::memory_order_acquire); }
  /// Active invalidation count (racy snapshot).
  [[nodiscard]] unsigned active() const;
  /// Number of notifiers in the tree (racy snapshot; excludes deferred).
  [[nodiscard]] std::size_t size() const;
  /// Blockable callbacks that returned false (each one a driver bug).
  [[nodiscard]] std::uint64_t bug_count() const noexcept { return bugs_.load(std::memory_order_relaxed); }

  /// Refuse further inserts (EINVAL): the mm is being torn down.
  void mark_dying();
  /// Unlink every notifier left at mm destruction (they become detached).
  void detach_all();

 private:
  friend class interval_notifier;
  template <class F>
  void for_each_overlap(va_t start, va_t end, F&& f);
  void inv_end_locked(bool overlapped) SVM_REQUIRES(lock_);

  static constexpr lock_class lock_class_{"mmu_notifier_subscriptions", lockdep::rank::notifier};
  mutable mutex lock_{lock_class_};
  /// Written under lock_ with release stores; read under lock_, or lock-free
  /// (acquire) by waiters in read_begin()/remove() and by seq(). Pairs with the
  /// release store in the last invalidate_range_end.
  std::atomic<std::uint64_t> invalidate_seq_{2};
  unsigned active_ SVM_GUARDED_BY(lock_) = 0;
  bool dying_ SVM_GUARDED_BY(lock_) = false;
  /// Longest notifier interval ever in the tree (pages-independent, bytes - 1);
  /// bounds the overlap search. Written under lock_ when the tree may change.
  std::uint64_t max_len_ = 0;
  struct by_start {
    bool operator()(const interval_notifier& a, const interval_notifier& b) const noexcept {
      return a.start_ < b.start_;
    }
  };
  using tree_t = boost::intrusive::multiset<
      interval_notifier,
      boost::intrusive::member_hook<interval_notifier, interval_notifier::tree_hook_t, &interval_notifier::tree_hook_>,
      boost::intrusive::compare<by_start>>;
  using deferred_t = boost::intrusive::list<
      interval_notifier,
      boost::intrusive::member_hook<interval_notifier, interval_notifier::list_hook_t, &interval_notifier::deferred_hook_>>;
  using ranges_t = boost::intrusive::list<
      mmu_notifier_range,
      boost::intrusive::member_hook<mmu_notifier_range, detail::range_hook, &mmu_notifier_range::active_hook_>>;
  /// Notifiers by start address. Modified under lock_ only while no
  /// overlapping invalidation is active (seq even); read under lock_, or
  /// without it by an invalidation that made the seq odd (the tree is frozen
  /// until the last end, which is what makes the lock-free read safe).
  tree_t tree_;
  /// Inserts and removes deferred while the seq is odd (guarded by lock_).
  deferred_t deferred_ SVM_GUARDED_BY(lock_);
  /// Extension: invalidations between start and end (guarded by lock_).
  ranges_t ranges_ SVM_GUARDED_BY(lock_);
  /// Bumped (release) under lock_ whenever an active range is removed;
  /// read_begin_range waiters wait on it (acquire).
  std::atomic<std::uint32_t> ranges_gen_{0};
  std::atomic<std::uint64_t> bugs_{0};  // relaxed: statistics
};

}  // namespace svm
