// Interval notifiers: the kernel's mm/mmu_notifier.c interval-tree half,
// plus the active-range set and invalidate_end extensions.
#include "svm/notifier/mmu_notifier.h"

#include <cassert>
#include <cstdio>

#include "svm/notifier/mm.h"

namespace svm {

const char* to_string(mmu_notifier_event e) noexcept {
  switch (e) {
    case mmu_notifier_event::unmap: return "UNMAP";
    case mmu_notifier_event::clear: return "CLEAR";
    case mmu_notifier_event::protection_vma: return "PROTECTION_VMA";
    case mmu_notifier_event::protection_page: return "PROTECTION_PAGE";
    case mmu_notifier_event::soft_dirty: return "SOFT_DIRTY";
    case mmu_notifier_event::release: return "RELEASE";
    case mmu_notifier_event::migrate: return "MIGRATE";
    case mmu_notifier_event::exclusive: return "EXCLUSIVE";
  }
  return "?";
}

mmu_notifier_subscriptions::mmu_notifier_subscriptions() = default;

mmu_notifier_subscriptions::~mmu_notifier_subscriptions() {
  detach_all();
}

// Visit every notifier overlapping [start, end). The caller either holds
// lock_ or is an invalidation that found an overlap (seq odd: tree frozen).
template <class F>
void mmu_notifier_subscriptions::for_each_overlap(va_t start, va_t end, F&& f) SVM_NO_THREAD_SAFETY_ANALYSIS {
  if (tree_.empty() || end <= start) return;
  const va_t last = end - 1;
  // A notifier overlaps if n.start <= last && n.last >= start. Its length is
  // at most max_len_ + 1, so n.last >= start implies n.start >= start - max_len_.
  const va_t from = start > max_len_ ? start - max_len_ : 0;
  interval_notifier key;
  key.start_ = from;
  for (auto it = tree_.lower_bound(key); it != tree_.end() && it->start_ <= last; ++it) {
    if (it->last_ >= start) f(*it);
  }
}

errc mmu_notifier_subscriptions::invalidate_range_start(mmu_notifier_range& r) {
  assert(!r.started_ && "range started twice");
  std::uint64_t cur_seq = 0;
  bool overlap = false;
  {
    lock_guard g(lock_);
    ++active_;
    ranges_.push_back(r);
    for_each_overlap(r.start, r.end, [&](interval_notifier&) { overlap = true; });
    if (overlap) {
      // release: pairs with the acquire loads of waiters and seq().
      invalidate_seq_.store(invalidate_seq_.load(std::memory_order_relaxed) | 1, std::memory_order_release);
      cur_seq = invalidate_seq_.load(std::memory_order_relaxed);
    }
    r.overlapped_ = overlap;
    r.started_ = true;
  }
  if (!overlap) return errc::ok;
  // The tree is frozen now (seq odd and our invalidation active), so walking
  // it without the lock is safe, as in the kernel's mn_itree_invalidate.
  interval_notifier* refused = nullptr;
  for_each_overlap(r.start, r.end, [&](interval_notifier& sub) {
    if (refused) return;
    if (sub.ops_->invalidate(sub, r, cur_seq)) return;
    if (r.blockable) {
      bugs_.fetch_add(1, std::memory_order_relaxed);
      std::fprintf(stderr,
                   "svm: BUG: blockable invalidate callback returned false (notifier [%#llx, %#llx], event %s)\n",
                   static_cast<unsigned long long>(sub.start_), static_cast<unsigned long long>(sub.last_),
                   to_string(r.event));
      return;
    }
    refused = &sub;
  });
  if (!refused) return errc::ok;
  // Non-blockable and refused: end it at once (kernel: out_would_block).
  // The notifiers invalidated before the refusing one get invalidate_end.
  bool stop = false;
  for_each_overlap(r.start, r.end, [&](interval_notifier& sub) {
    if (stop || &sub == refused) {
      stop = true;
      return;
    }
    sub.ops_->invalidate_end(sub, r);
  });
  {
    lock_guard g(lock_);
    ranges_.erase(ranges_.iterator_to(r));
    r.started_ = false;
    inv_end_locked(overlap);
  }
  return errc::again;
}

void mmu_notifier_subscriptions::invalidate_range_end(mmu_notifier_range& r) {
  assert(r.started_ && "range end without start");
  if (r.overlapped_) {
    // Still frozen: our invalidation is active and found an overlap.
    for_each_overlap(r.start, r.end, [&](interval_notifier& sub) { sub.ops_->invalidate_end(sub, r); });
  }
  lock_guard g(lock_);
  ranges_.erase(ranges_.iterator_to(r));
  r.started_ = false;
  inv_end_locked(r.overlapped_);
}

// Kernel: mn_itree_inv_end. Drops the active count; the last one out makes
// the seq even, applies deferred inserts/removes and wakes every waiter.
void mmu_notifier_subscriptions::inv_end_locked(bool) {
  lock_.assert_held();
  // release: pairs with the acquire load in read_begin_range's waiters.
  ranges_gen_.fetch_add(1, std::memory_order_release);
  ranges_gen_.notify_all();
  assert(active_ > 0);
  const std::uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
  if (--active_ != 0 || (seq & 1) == 0) return;
  while (!deferred_.empty()) {
    interval_notifier& sub = deferred_.front();
    deferred_.pop_front();
    sub.deferred_ = false;
    if (sub.in_tree_) {
      tree_.erase(tree_.iterator_to(sub));
      sub.in_tree_ = false;
    } else {
      tree_.insert(sub);
      sub.in_tree_ = true;
      max_len_ = std::max(max_len_, sub.last_ - sub.start_);
    }
  }
  if (tree_.empty()) max_len_ = 0;
  // release: pairs with the acquire loads of read_begin()/remove() waiters;
  // everything the invalidation did (CPU PTEs cleared) happens before.
  invalidate_seq_.store(seq + 1, std::memory_order_release);
  invalidate_seq_.notify_all();
}

void mmu_notifier_subscriptions::read_begin_range(va_t start, va_t end) {
  for (;;) {
    std::uint32_t gen;
    {
      lock_guard g(lock_);
      bool busy = false;
      for (const auto& r : ranges_) {
        if (r.start < end && start < r.end) {
          busy = true;
          break;
        }
      }
      if (!busy) return;
      gen = ranges_gen_.load(std::memory_order_relaxed);
    }
    // acquire: pairs with the release RMW in inv_end_locked.
    ranges_gen_.wait(gen, std::memory_order_acquire);
  }
}

bool mmu_notifier_subscriptions::range_is_invalidating(va_t start, va_t end) const {
  lock_guard g(lock_);
  for (const auto& r : ranges_)
    if (r.start < end && start < r.end) return true;
  return false;
}

unsigned mmu_notifier_subscriptions::active() const {
  lock_guard g(lock_);
  return active_;
}

std::size_t mmu_notifier_subscriptions::size() const {
  lock_guard g(lock_);
  return tree_.size();
}

void mmu_notifier_subscriptions::mark_dying() {
  lock_guard g(lock_);
  dying_ = true;
}

void mmu_notifier_subscriptions::detach_all() {
  lock_guard g(lock_);
  while (!deferred_.empty()) {
    interval_notifier& sub = deferred_.front();
    deferred_.pop_front();
    sub.deferred_ = false;
  }
  while (!tree_.empty()) {
    interval_notifier& sub = *tree_.begin();
    tree_.erase(tree_.begin());
    sub.in_tree_ = false;
    sub.inserted_ = false;
    sub.mm_ = nullptr;
  }
  dying_ = true;
}

// ---- interval_notifier --------------------------------------------------

interval_notifier::~interval_notifier() { remove(); }

errc interval_notifier::insert(svm::mm& m, va_t start, std::uint64_t length, interval_notifier_ops& ops) {
  if (length == 0 || start + length - 1 < start) return errc::overflow;
  mmu_notifier_subscriptions& s = m.notifiers();
  lock_guard g(s.lock_);
  if (s.dying_ || inserted_) return errc::inval;
  start_ = start;
  last_ = start + length - 1;
  ops_ = &ops;
  mm_ = &m;
  inserted_ = true;
  const std::uint64_t seq = s.invalidate_seq_.load(std::memory_order_relaxed);
  if (s.active_ != 0) {
    if (seq & 1) {
      // An overlapping invalidation froze the tree: defer (kernel: the
      // deferred_list). The first read_begin waits for its end.
      deferred_ = true;
      s.deferred_.push_back(*this);
    } else {
      // Active invalidations that overlap nothing: nobody walks the tree
      // unlocked, so insert now but make the seq odd, so that read_begin
      // waits for them to end (one of them may cover this interval).
      s.invalidate_seq_.store(seq | 1, std::memory_order_release);
      s.tree_.insert(*this);
      in_tree_ = true;
      s.max_len_ = std::max(s.max_len_, last_ - start_);
    }
    invalidate_seq_.store(s.invalidate_seq_.load(std::memory_order_relaxed), std::memory_order_release);
  } else {
    invalidate_seq_.store(seq - 1, std::memory_order_release);
    s.tree_.insert(*this);
    in_tree_ = true;
    s.max_len_ = std::max(s.max_len_, last_ - start_);
  }
  return errc::ok;
}

void interval_notifier::remove() {
  svm::mm* m = nullptr;
  std::uint64_t wait_seq = 0;
  {
    // mm_ is written only under the owning mm's notifier lock; a notifier
    // that was never inserted has mm_ == nullptr and nothing to do. Reading
    // it here without that lock is safe because remove() and insert() of
    // one notifier are not called concurrently (the caller owns it).
    m = mm_;
    if (!m) return;
    mmu_notifier_subscriptions& s = m->notifiers();
    lock_guard g(s.lock_);
    if (!inserted_) return;
    inserted_ = false;
    const std::uint64_t seq = s.invalidate_seq_.load(std::memory_order_relaxed);
    if (seq & 1) {
      if (deferred_) {
        // Inserted during this invalidation and never applied: drop it.
        s.deferred_.erase(s.deferred_.iterator_to(*this));
        deferred_ = false;
      } else if (in_tree_) {
        deferred_ = true;
        s.deferred_.push_back(*this);
        wait_seq = seq;
      }
    } else {
      if (in_tree_) {
        s.tree_.erase(s.tree_.iterator_to(*this));
        in_tree_ = false;
        if (s.tree_.empty()) s.max_len_ = 0;
      }
    }
  }
  if (wait_seq) {
    mmu_notifier_subscriptions& s = m->notifiers();
    // acquire: pairs with the release store of the even seq in
    // inv_end_locked; after it the deferred removal was applied.
    while (s.invalidate_seq_.load(std::memory_order_acquire) == wait_seq)
      s.invalidate_seq_.wait(wait_seq, std::memory_order_acquire);
  }
  mm_ = nullptr;
}

std::uint64_t interval_notifier::read_begin() {
  svm::mm* m = mm_;
  // Not inserted (never, or removed, or its mm went away): nothing can
  // invalidate it, so there is nothing to wait for. Its seq is returned as
  // it is; read_retry() against it stays false until it is inserted again.
  if (!m) return invalidate_seq_.load(std::memory_order_acquire);
  mmu_notifier_subscriptions& s = m->notifiers();
  std::uint64_t seq;
  bool invalidating;
  {
    lock_guard g(s.lock_);
    seq = invalidate_seq_.load(std::memory_order_relaxed);
    invalidating = seq == s.invalidate_seq_.load(std::memory_order_relaxed);
  }
  if (invalidating) {
    // acquire: pairs with the release store in inv_end_locked, so the
    // caller's walk sees the CPU PTEs as the invalidation left them.
    while (s.invalidate_seq_.load(std::memory_order_acquire) == seq)
      s.invalidate_seq_.wait(seq, std::memory_order_acquire);
  }
  return seq;
}

}  // namespace svm
