#include "svm/svm/resv.h"

#include <algorithm>
#include <new>

#include "check.h"

namespace svm {

ww_class reservation_ww_class{"reservation_ww_class"};

const char* to_string(resv_usage u) noexcept {
  switch (u) {
    case resv_usage::kernel: return "kernel";
    case resv_usage::write: return "write";
    case resv_usage::read: return "read";
    case resv_usage::bookkeep: return "bookkeep";
  }
  return "?";
}

// --- ww_acquire_ctx -----------------------------------------------------------

ww_acquire_ctx::ww_acquire_ctx(ww_class& cls)
    // relaxed: only the uniqueness and order of stamps matter (see ww_class).
    : class_(cls), stamp_(cls.next_stamp_.fetch_add(1, std::memory_order_relaxed)) {}

ww_acquire_ctx::~ww_acquire_ctx() {
  SVM_CHECK(acquired_ == 0, "ww_acquire_fini with locks still held");
}

bool ww_acquire_ctx::is_wounded() const {
  lock_guard g(lock_);
  return wounded_;
}

void ww_acquire_ctx::unlock_all(lockdep::site s) {
  while (held_head_ != nullptr) held_head_->unlock(s);
}

void ww_acquire_ctx::wound() {
  lock_guard g(lock_);
  if (wounded_) return;
  wounded_ = true;
  if (blocked_on_ != nullptr) {
    // The victim sleeps in blocked_on_->lock_common(), so that mutex is alive
    // until the victim deregisters, which needs lock_, which we hold.
    // release: pairs with the acquire wait in lock_common().
    blocked_on_->wake_seq_.fetch_add(1, std::memory_order_release);
    blocked_on_->wake_seq_.notify_all();
  }
}

// --- ww_mutex -------------------------------------------------------------------

ww_mutex::~ww_mutex() {
  lock_guard g(wait_lock_);
  SVM_CHECK(!locked_, "ww_mutex destroyed while locked");
}

bool ww_mutex::is_locked() const {
  lock_guard g(wait_lock_);
  return locked_;
}

const ww_acquire_ctx* ww_mutex::owner() const {
  lock_guard g(wait_lock_);
  return owner_;
}

errc ww_mutex::lock(ww_acquire_ctx& ctx, lockdep::site s) { return lock_common(&ctx, mode::normal, s); }

void ww_mutex::lock_slow(ww_acquire_ctx& ctx, lockdep::site s) {
  SVM_CHECK(ctx.acquired_ == 0, "ww_mutex_lock_slow with locks held: back off first");
#if SVM_LOCK_CHECKS
  // The kernel's DEBUG_WW_MUTEX_SLOWPATH check: the slow path is for the
  // mutex that returned -EDEADLK.
  SVM_CHECK(ctx.contending_ == nullptr || ctx.contending_ == this,
            "ww_mutex_lock_slow on a mutex other than the contended one");
#endif
  const errc e = lock_common(&ctx, mode::slow, s);
  SVM_CHECK(e == errc::ok, "ww_mutex_lock_slow failed");
}

void ww_mutex::lock(lockdep::site s) { (void)lock_common(nullptr, mode::normal, s); }

bool ww_mutex::try_lock(lockdep::site s) {
  {
    lock_guard g(wait_lock_);
    if (locked_) return false;
    locked_ = true;
    owner_ = nullptr;
  }
#if SVM_LOCK_CHECKS
  lockdep::on_acquire(this, "resv", lockdep::rank::resv, 0, /*nestable=*/true, /*try_lock=*/true, s);
#else
  (void)s;
#endif
  return true;
}

errc ww_mutex::lock_common(ww_acquire_ctx* ctx, mode m, lockdep::site s) {
  fence_sig::check_forbidden("reservation lock", s);
  if (ctx != nullptr) {
    SVM_CHECK(&ctx->class_ == &class_, "ww_acquire_ctx and ww_mutex of different ww_class");
#if SVM_LOCK_CHECKS
    SVM_CHECK(!ctx->done_, "ww_mutex_lock after ww_acquire_done");
#endif
    {
      lock_guard g(wait_lock_);
      if (owner_ == ctx) return ww_ealready;
    }
    if (ctx->acquired_ == 0) {
      // Holding nothing, the context is in no cycle: forget an old wound.
      lock_guard g(ctx->lock_);
      ctx->wounded_ = false;
    }
  }
#if SVM_LOCK_CHECKS
  lockdep::on_acquire(this, "resv", lockdep::rank::resv, 0, /*nestable=*/true, /*try_lock=*/false, s);
#endif
  const bool may_backoff = ctx != nullptr && m == mode::normal;
  for (;;) {
    bool wounded_holder = false;
    bool backoff = false;
    std::uint32_t seq = 0;
    {
      lock_guard g(wait_lock_);
      if (may_backoff && ctx->acquired_ > 0) {
        lock_guard cg(ctx->lock_);
        backoff = ctx->wounded_;
      }
      if (!backoff) {
        if (!locked_) {
          locked_ = true;
          owner_ = ctx;
          if (ctx != nullptr) {
            held_next_ = ctx->held_head_;
            ctx->held_head_ = this;
            ++ctx->acquired_;
            ctx->contending_ = nullptr;
          }
          return errc::ok;
        }
        if (ctx != nullptr && owner_ != nullptr && owner_->stamp_ > ctx->stamp_) {
          owner_->wound();  // rule 1: we are older
          wounded_holder = true;
        }
        ++waiters_;
        // Read under wait_lock_, before registering: see the header's
        // lost-wake-up argument.
        seq = wake_seq_.load(std::memory_order_relaxed);
        if (ctx != nullptr) {
          lock_guard cg(ctx->lock_);
          ctx->blocked_on_ = this;
          backoff = may_backoff && ctx->wounded_ && ctx->acquired_ > 0;
          if (backoff) ctx->blocked_on_ = nullptr;
        }
        if (backoff) --waiters_;
      }
    }
    if (backoff) {
#if SVM_LOCK_CHECKS
      lockdep::on_release(this, s);
#endif
      ctx->contending_ = this;
      ++ctx->backoffs_;
      return ww_edeadlk;
    }
    if (wounded_holder) call_hook(ww_event::wound, ctx);
    call_hook(ww_event::wait, ctx);
    // acquire: pairs with the release fetch_add in unlock() / wound().
    wake_seq_.wait(seq, std::memory_order_acquire);
    lock_guard g(wait_lock_);
    --waiters_;
    if (ctx != nullptr) {
      lock_guard cg(ctx->lock_);
      ctx->blocked_on_ = nullptr;
    }
  }
}

void ww_mutex::unlock(lockdep::site s) {
#if SVM_LOCK_CHECKS
  lockdep::on_release(this, s);
#else
  (void)s;
#endif
  lock_guard g(wait_lock_);
  SVM_CHECK(locked_, "ww_mutex_unlock of an unlocked mutex");
  if (ww_acquire_ctx* ctx = owner_) {
    // Unlink from the holder's list while we still hold the mutex: the
    // next holder reuses held_next_.
    ww_mutex** pp = &ctx->held_head_;
    while (*pp != this) {
      SVM_CHECK(*pp != nullptr, "ww_mutex not in its context's held list");
      pp = &(*pp)->held_next_;
    }
    *pp = held_next_;
    held_next_ = nullptr;
    --ctx->acquired_;
  }
  locked_ = false;
  owner_ = nullptr;
  if (waiters_ > 0) {
    // Under wait_lock_, so a woken waiter cannot take, release and destroy
    // the mutex before we are done with it.
    // release: pairs with the acquire wait in lock_common().
    wake_seq_.fetch_add(1, std::memory_order_release);
    wake_seq_.notify_all();
  }
}

// --- resv -----------------------------------------------------------------------

errc resv::reserve_fences(unsigned n) {
  assert_held();
  std::size_t size = 0;
  std::size_t cap = 0;
  {
    lock_guard g(list_lock_);
    size = fences_.size();
    cap = fences_.capacity();
  }
  if (size + n <= cap) return errc::ok;
  // Allocate outside list_lock_; fences_ cannot change meanwhile because
  // only holders of the resv lock (us) modify it.
  std::vector<slot> grown;
  try {
    grown.reserve(std::max(size + n, 2 * cap));
  } catch (const std::bad_alloc&) {
    return errc::nomem;
  }
  {
    lock_guard g(list_lock_);
    for (auto& sl : fences_) grown.push_back(std::move(sl));  // within capacity
    fences_.swap(grown);
  }
  return errc::ok;  // the old storage (now in `grown`) is freed here, unlocked
}

void resv::add_fence(fence_ptr f, resv_usage u, lockdep::site s) {
  SVM_CHECK(f != nullptr, "add_fence of a null fence");
  assert_held(s);
  fence_ptr pruned;  // destroyed after list_lock_ is dropped
  lock_guard g(list_lock_);
  for (auto& sl : fences_) {
    if (sl.f == f) {
      if (u < sl.usage) sl.usage = u;  // promote, never demote
      return;
    }
  }
  for (auto& sl : fences_) {
    if (sl.f->is_signaled()) {
      pruned = std::move(sl.f);
      sl = {std::move(f), u};
      return;
    }
  }
  if (fences_.size() == fences_.capacity()) fence_sig::check_forbidden("allocation", s);
  fences_.push_back({std::move(f), u});
}

std::size_t resv::prune() {
  assert_held();
  lock_guard g(list_lock_);
  const auto it = std::remove_if(fences_.begin(), fences_.end(),
                                 [](const slot& sl) { return sl.f->is_signaled(); });
  const auto n = static_cast<std::size_t>(fences_.end() - it);
  fences_.erase(it, fences_.end());
  return n;
}

std::vector<fence_ptr> resv::fences(resv_usage u) const {
  std::vector<fence_ptr> out;
  lock_guard g(list_lock_);
  for (const auto& sl : fences_)
    if (sl.usage <= u && !sl.f->is_signaled()) out.push_back(sl.f);
  return out;
}

bool resv::test_signaled(resv_usage u) const {
  lock_guard g(list_lock_);
  for (const auto& sl : fences_)
    if (sl.usage <= u && !sl.f->is_signaled()) return false;
  return true;
}

std::size_t resv::num_slots() const {
  lock_guard g(list_lock_);
  return fences_.size();
}

errc resv::wait(resv_usage u, std::chrono::nanoseconds timeout) const {
  using clock = std::chrono::steady_clock;
  // fence::wait treats 24h and more as "forever"; keep that meaning and
  // avoid overflowing the deadline.
  const bool forever = timeout >= std::chrono::hours(24);
  const auto deadline = forever ? clock::time_point::max() : clock::now() + timeout;
  for (;;) {
    // Like dma_resv_wait_timeout's unlocked cursor: pick one unsignalled
    // fence under list_lock_, wait for it unlocked, then look again (fences
    // added meanwhile are waited for too).
    fence_ptr next;
    {
      lock_guard g(list_lock_);
      for (const auto& sl : fences_) {
        if (sl.usage <= u && !sl.f->is_signaled()) {
          next = sl.f;
          break;
        }
      }
    }
    if (!next) return errc::ok;
    std::chrono::nanoseconds left = std::chrono::hours(24);
    if (!forever) left = std::max(std::chrono::nanoseconds(0), std::chrono::nanoseconds(deadline - clock::now()));
    if (next->wait(left) == errc::timedout) return errc::timedout;
  }
}

}  // namespace svm
