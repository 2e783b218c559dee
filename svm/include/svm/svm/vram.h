// One VRAM per device, shared by every gpu_vm on it: the BOs of every VM
// and the SVM chunks migrated into device memory, under one eviction
// policy.
//
// ## Frames
// The VRAM is a frame_pool of aperture::vram with exactly vram_bytes / 4K
// allocatable frames (and frame 0, its zero page, never handed out). The device reaches
// it through dev::device::vram_memory(), so a device PTE of aperture::vram
// names a frame of this pool. Every mm a gpu_vm mirrors attaches the same
// pool as pool_kind::device_private with the driver as owner: a migrated
// SVM page is a device-private CPU PTE naming a frame here. A frame is
// freed by its last put(), whoever holds it (a BO, or the CPU PTEs of the
// mms mapping the device-private page).
//
// ## Eviction
// A vram_object is something that holds VRAM frames and can move them to
// system memory: a BO, or an SVM chunk (a range of a mirrored mm migrated
// to VRAM). Objects register while resident; the eviction_policy orders
// them (lru_policy by default: least recently inserted or touched first).
// alloc() takes free frames first, then evicts objects in policy order
// until enough frames are free, then takes them:
//
//   alloc(n, self)                       evictor (same thread)
//   --------------                       ---------------------
//   n > capacity: ENOMEM                 lock; pick victim v (not self, not
//   n > free + evictable: ENOMEM           busy); v.busy = 1; unlock
//   take free frames                     v.evict(cx)  (no manager lock held)
//   short: evict one, take again         lock; v.busy = 0; notify; unlock
//   nothing left to evict: give the
//     frames back, ENOMEM
//
// vram_object::evict runs with no manager lock held and takes only
// try-locks of its owner (the victim VM's vm.lock), or, for an SVM chunk,
// the victim mm's rmap lock shared (mm::rmap_read_guard), which only that
// mm's mmap_lock writers hold, for the length of a VMA change, and which no
// allocating thread holds: it never blocks on a lock the allocating thread may hold, so
// an allocation in one VM can evict another VM's BO without a lock-order
// cycle (the kernel's TTM evicts under a trylock of the victim's
// reservation for the same reason). A victim it cannot lock now answers
// EBUSY and is skipped. remove() waits while an eviction of its object is
// in progress (busy), so an object is never freed under its evictor.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"
#include "svm/notifier/frame_pool.h"

namespace svm {

class vram_manager;

/// What an eviction's caller already holds, so that an object of the same
/// VM can be evicted without taking a lock its caller holds.
struct evict_context {
  /// The gpu_vm whose vm.lock the allocating thread holds exclusive (its
  /// BOs are evicted in place), or null.
  const void* vm_exclusive = nullptr;
  /// The gpu_vm whose vm.lock the allocating thread holds shared (its BOs
  /// cannot be evicted now: skipped), or null.
  const void* vm_shared = nullptr;
};

/// Something that holds VRAM frames and can move them to system memory (a
/// BO, an SVM chunk). Registered with vram_manager::insert() while
/// resident; the manager calls evict() to make room.
class vram_object {
 public:
  virtual ~vram_object() = default;
  /// Move this object's frames out of VRAM, freeing them. Runs with no
  /// manager lock held, on the allocating thread; must not block on a lock
  /// the allocating thread may hold (use try-locks, or locks no allocating
  /// thread holds; see the file comment).
  /// ok: frames were freed (or none were left; the object is then removed
  /// from the policy); EBUSY: cannot now (skipped for this allocation);
  /// any other error: the eviction failed and the object stays as it was.
  virtual errc evict(const evict_context& cx) = 0;
  /// Frames it holds (an upper bound; for the "could eviction free
  /// enough" check). Called under the manager lock: must not lock.
  [[nodiscard]] virtual std::size_t resident_frames() const noexcept = 0;
  /// The gpu_vm it belongs to (for evict_context's skip rule).
  [[nodiscard]] virtual const void* vm() const noexcept = 0;

 private:
  friend class vram_manager;
  bool registered_ = false;  // guarded by the manager's lock
  /// 1 while the manager runs evict() on it (written under the manager's
  /// lock; remove() waits on it with std::atomic::wait).
  std::atomic<std::uint32_t> busy_{0};
};

/// Orders the resident objects for eviction. Every call is made under the
/// manager's lock (a leaf lock): implementations must not lock or block.
class eviction_policy {
 public:
  virtual ~eviction_policy() = default;
  /// `o` became resident.
  virtual void inserted(vram_object& o) = 0;
  /// `o` was used (a device fault mapped it, or it was migrated again).
  virtual void touched(vram_object& o) = 0;
  /// `o` is no longer resident.
  virtual void removed(vram_object& o) = 0;
  /// Append the resident objects, first to evict first.
  virtual void order(std::vector<vram_object*>& out) const = 0;
};

/// The default policy: least recently inserted or touched first.
class lru_policy final : public eviction_policy {
 public:
  /// Appends `o` as the most recently used.
  void inserted(vram_object& o) override;
  /// Moves `o` to the most recently used end.
  void touched(vram_object& o) override;
  /// Drops `o` from the list.
  void removed(vram_object& o) override;
  /// The list from least to most recently used.
  void order(std::vector<vram_object*>& out) const override;

 private:
  std::list<vram_object*> lru_;  // front: least recently used
  std::unordered_map<vram_object*, std::list<vram_object*>::iterator> pos_;
};

/// VRAM counters (relaxed, statistics only).
struct vram_stats {
  std::uint64_t capacity_frames = 0;  ///< frames that can be allocated at all
  std::uint64_t used_frames = 0;      ///< frames allocated now
  std::uint64_t evictions = 0;        ///< objects evicted to make room
  std::uint64_t evict_busy = 0;       ///< victims skipped because they answered EBUSY
  std::uint64_t alloc_failures = 0;   ///< alloc() calls that returned ENOMEM
};

/// The device's VRAM and its eviction policy (see the file comment).
/// Thread safety: every member function may be called concurrently.
class vram_manager {
 public:
  /// VRAM of `bytes` (a page multiple): bytes / 4K allocatable frames,
  /// plus frame 0, the zero page, which is never handed out; with
  /// `policy` (null: lru_policy).
  explicit vram_manager(std::uint64_t bytes, std::unique_ptr<eviction_policy> policy = nullptr);
  vram_manager(const vram_manager&) = delete;
  vram_manager& operator=(const vram_manager&) = delete;

  /// The frames (aperture::vram). Shared with the device and every mm that
  /// attached it.
  [[nodiscard]] const std::shared_ptr<frame_pool>& pool() const noexcept { return pool_; }

  /// Allocate `n` zeroed frames (refcount 1 each) into `out` (appended),
  /// all or none, evicting other objects in policy order as needed; `self`
  /// (may be null) is never evicted. ENOMEM, with `out` unchanged: n is 0
  /// or more than the capacity; more than the free frames plus every other
  /// idle object's frames (checked before anything is evicted); or the
  /// evictions could not free enough (the frames taken are given back;
  /// objects evicted on the way stay in system memory with their data).
  /// Locking: takes the manager's lock (leaf) briefly, never across evict().
  [[nodiscard]] errc alloc(std::size_t n, std::vector<pfn_t>& out, const vram_object* self = nullptr,
                           const evict_context& cx = {}) SVM_EXCLUDES(lock_);
  /// Drop one reference of each frame (frame_pool::put).
  void put(std::span<const pfn_t> frames) noexcept;

  /// Register `o` as resident (idempotent: a registered object is touched).
  void insert(vram_object& o) SVM_EXCLUDES(lock_);
  /// `o` was used: the policy moves it (no-op if not registered).
  void touch(vram_object& o) SVM_EXCLUDES(lock_);
  /// Unregister `o` (no-op if not registered). Waits while an eviction of
  /// `o` is in progress, so after it returns no evictor uses `o`. Must not
  /// be called from `o`'s own evict().
  void remove(vram_object& o) SVM_EXCLUDES(lock_);

  /// A snapshot of the counters.
  [[nodiscard]] vram_stats stats() const noexcept;

 private:
  static constexpr lock_class lock_class_{"vram_manager", lockdep::rank::leaf};
  std::shared_ptr<frame_pool> pool_;  // immutable
  mutable mutex lock_{lock_class_};
  /// The policy and the registered flags of the objects.
  std::unique_ptr<eviction_policy> policy_ SVM_GUARDED_BY(lock_);
  std::atomic<std::uint64_t> evictions_{0}, evict_busy_{0}, alloc_failures_{0};
};

}  // namespace svm
