// The device's VRAM manager: one frame pool for BOs and migrated SVM
// chunks, and the eviction policy that makes room (svm/svm/vram.h).
#include "svm/svm/vram.h"

#include <algorithm>

namespace svm {

// ---- lru_policy --------------------------------------------------------------

void lru_policy::inserted(vram_object& o) {
  if (pos_.contains(&o)) return touched(o);
  lru_.push_back(&o);
  pos_.emplace(&o, std::prev(lru_.end()));
}

void lru_policy::touched(vram_object& o) {
  auto it = pos_.find(&o);
  if (it == pos_.end()) return;
  lru_.splice(lru_.end(), lru_, it->second);
}

void lru_policy::removed(vram_object& o) {
  auto it = pos_.find(&o);
  if (it == pos_.end()) return;
  lru_.erase(it->second);
  pos_.erase(it);
}

void lru_policy::order(std::vector<vram_object*>& out) const { out.insert(out.end(), lru_.begin(), lru_.end()); }

// ---- vram_manager ------------------------------------------------------------

vram_manager::vram_manager(std::uint64_t bytes, std::unique_ptr<eviction_policy> policy)
    : pool_(std::make_shared<frame_pool>(frame_pool::exact_t{}, bytes / page_size + 1,
                                         aperture::vram)),
      policy_(policy ? std::move(policy) : std::make_unique<lru_policy>()) {}

namespace {
bool skipped(const vram_object* o, const vram_object* self, const evict_context& cx) {
  return o == self || (cx.vm_shared && o->vm() == cx.vm_shared);
}
}  // namespace

errc vram_manager::alloc(std::size_t n, std::vector<pfn_t>& out, const vram_object* self, const evict_context& cx) {
  auto fail = [&] {
    alloc_failures_.fetch_add(1, std::memory_order_relaxed);
    return errc::nomem;
  };
  if (n == 0 || n > pool_->capacity()) return fail();
  std::vector<vram_object*> order;
  {
    // More than free frames plus what every idle other object holds: no
    // eviction could make room, so evict nothing.
    lock_guard g(lock_);
    policy_->order(order);
    std::size_t evictable = 0;
    for (vram_object* o : order)
      if (!skipped(o, self, cx) && o->busy_.load(std::memory_order_relaxed) == 0) evictable += o->resident_frames();
    if (n > pool_->free_frames() + evictable) return fail();
  }
  std::vector<pfn_t> got;
  got.reserve(n);
  std::vector<const vram_object*> tried;
  while (got.size() < n) {
    if (result<pfn_t> f = pool_->alloc()) {
      got.push_back(*f);
      continue;
    }
    // Short: evict the first idle object in policy order not tried yet.
    vram_object* victim = nullptr;
    {
      lock_guard g(lock_);
      order.clear();
      policy_->order(order);
      for (vram_object* o : order) {
        if (skipped(o, self, cx) || o->busy_.load(std::memory_order_relaxed) != 0) continue;
        if (std::find(tried.begin(), tried.end(), o) != tried.end()) continue;
        victim = o;
        // Written under lock_; remove() reads it under lock_ or waits on it.
        victim->busy_.store(1, std::memory_order_relaxed);
        break;
      }
    }
    if (!victim) {
      put(got);
      return fail();
    }
    tried.push_back(victim);
    const errc e = victim->evict(cx);
    {
      lock_guard g(lock_);
      if (e == errc::ok && victim->registered_) {
        policy_->removed(*victim);
        victim->registered_ = false;
      }
      // release: pairs with the acquire load in remove(), so its caller sees
      // everything evict() did before it frees the object.
      victim->busy_.store(0, std::memory_order_release);
    }
    victim->busy_.notify_all();
    if (e == errc::ok)
      evictions_.fetch_add(1, std::memory_order_relaxed);
    else if (e == errc::busy)
      evict_busy_.fetch_add(1, std::memory_order_relaxed);
  }
  out.insert(out.end(), got.begin(), got.end());
  return errc::ok;
}

void vram_manager::put(std::span<const pfn_t> frames) noexcept {
  for (pfn_t p : frames) pool_->put(p);
}

void vram_manager::insert(vram_object& o) {
  lock_guard g(lock_);
  if (o.registered_) {
    policy_->touched(o);
    return;
  }
  o.registered_ = true;
  policy_->inserted(o);
}

void vram_manager::touch(vram_object& o) {
  lock_guard g(lock_);
  if (o.registered_) policy_->touched(o);
}

void vram_manager::remove(vram_object& o) {
  for (;;) {
    {
      lock_guard g(lock_);
      if (o.registered_) {
        policy_->removed(o);
        o.registered_ = false;
      }
      // acquire: pairs with the release store after evict() returned.
      if (o.busy_.load(std::memory_order_acquire) == 0) return;
    }
    o.busy_.wait(1, std::memory_order_acquire);
  }
}

vram_stats vram_manager::stats() const noexcept {
  vram_stats s;
  s.capacity_frames = pool_->capacity();
  s.used_frames = pool_->capacity() - std::min<std::uint64_t>(pool_->free_frames(), pool_->capacity());
  s.evictions = evictions_.load(std::memory_order_relaxed);
  s.evict_busy = evict_busy_.load(std::memory_order_relaxed);
  s.alloc_failures = alloc_failures_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace svm
