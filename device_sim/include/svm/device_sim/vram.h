// The device's VRAM: a pool of 4K frames holding real bytes, with a
// capacity limit. It implements the physical-memory interface, so the MMU
// and the copy engine reach VRAM frames exactly as they reach system ones.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/phys_mem.h"

namespace svm::dev {

/// Device VRAM: a fixed-capacity pool of 4K frames with real backing bytes,
/// allocated and freed by the driver and accessed through phys_mem.
class vram_pool final : public phys_mem {
 public:
  /// A pool of `bytes / page_size` frames (rounded down). The bytes are
  /// reserved up front, zero (the host faults them in lazily).
  explicit vram_pool(std::uint64_t bytes);
  ~vram_pool() override;
  vram_pool(const vram_pool&) = delete;
  vram_pool& operator=(const vram_pool&) = delete;

  /// Allocate `count` contiguous frames whose first pfn is a multiple of
  /// `align` frames (1 for any; 512 for a 2M leaf). The frames are zeroed.
  /// Errors: ENOMEM when no such run is free (the pool is unchanged);
  /// EINVAL for count 0 or an align that is not a power of two.
  /// Locking: takes lock_ (leaf); never blocks otherwise.
  [[nodiscard]] result<pfn_t> alloc(std::size_t count = 1, std::size_t align = 1) SVM_EXCLUDES(lock_);

  /// Free `count` frames from `pfn`, advancing their generations.
  /// Errors: EINVAL if any of them is out of range or not allocated (nothing
  /// is freed then). The caller must have made sure no device can still
  /// translate to them (PTE cleared and TLBs invalidated).
  /// Locking: takes lock_ (leaf).
  errc free(pfn_t pfn, std::size_t count = 1) SVM_EXCLUDES(lock_);

  [[nodiscard]] std::byte* frame_data(pfn_t pfn) noexcept override {
    return pfn < frames_ ? bytes_ + pfn * page_size : nullptr;
  }
  [[nodiscard]] std::uint64_t frame_generation(pfn_t pfn) const noexcept override {
    // acquire: pairs with the release increment in free().
    return pfn < frames_ ? gen_[pfn].load(std::memory_order_acquire) : 0;
  }
  [[nodiscard]] pfn_t frame_count() const noexcept override { return frames_; }

  /// Frames allocated now (racy snapshot).
  [[nodiscard]] std::size_t used_frames() const noexcept { return used_hint_.load(std::memory_order_relaxed); }
  /// Total size of the pool in bytes (frame count times page_size); fixed at construction.
  [[nodiscard]] std::uint64_t capacity_bytes() const noexcept { return frames_ * page_size; }

 private:
  static constexpr lock_class lock_class_{"device.vram", lockdep::rank::leaf};

  const pfn_t frames_;            // immutable
  std::byte* bytes_;              // immutable; frames_ * page_size bytes (calloc: 16-byte aligned)
  std::unique_ptr<std::atomic<std::uint64_t>[]> gen_;  // per frame; see frame_generation()
  mutable mutex lock_{lock_class_};
  std::vector<bool> used_ SVM_GUARDED_BY(lock_);
  pfn_t hint_ SVM_GUARDED_BY(lock_) = 0;  // where the next first-fit scan starts
  std::atomic<std::size_t> used_hint_{0};  // mirrors the count of used_; relaxed, statistics
};

}  // namespace svm::dev
