// The CPU frame pool of the mm model: 4K frames holding real bytes, each with
// a reference count and a generation. It implements svm::phys_mem, so device
// code reaches frame bytes without depending on notifier/.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/phys_mem.h"
#include "svm/base/types.h"

namespace svm {

/// A pool of `page_size` frames (a "node" in NUMA terms, or a device's
/// private memory). Frame 0 is reserved: it is the pool's zero page, never
/// allocated, never freed, and never written by the mm.
///
/// Reference counting (kernel: struct page::_refcount): alloc() hands out a
/// frame with refcount 1; every PTE that maps it and every page-cache slot
/// that holds it owns one reference. put() of the last reference frees it:
/// the generation advances (release) and the frame returns to the free set.
/// The mm drops the references of unmapped frames only after
/// invalidate_range_end, so a frame is never free while a device may still
/// translate to it.
///
/// Thread safety: every member function may be called concurrently.
class frame_pool final : public phys_mem {
 public:
  /// Frames per huge (2M) allocation.
  static constexpr pfn_t huge_frames = huge_size / page_size;

  /// A pool of `frames` frames (rounded up to a multiple of 512, at least
  /// 1024 so that one aligned huge block besides frame 0 exists).
  explicit frame_pool(pfn_t frames = 16384, aperture ap = aperture::system);
  /// The tag that selects the exact-size constructor.
  struct exact_t {
    explicit exact_t() = default;
  };
  /// A pool with exactly `frames` frames (at least 1), frame 0 the zero
  /// page: `frames - 1` can be allocated. Its layout is still rounded up to
  /// whole 2M blocks; the frames past `frames` are taken for good (they are
  /// never handed out). A device's VRAM sized in bytes uses it.
  frame_pool(exact_t, pfn_t frames, aperture ap);
  ~frame_pool() override;
  frame_pool(const frame_pool&) = delete;
  frame_pool& operator=(const frame_pool&) = delete;

  /// A zero-filled frame with refcount 1, or ENOMEM.
  /// Locking: takes the pool lock (rank leaf); may run anywhere, including a
  /// notifier callback, but must not be called under a page-table node lock
  /// held across a blocking wait (it never blocks beyond the pool lock).
  [[nodiscard]] result<pfn_t> alloc();
  /// 512 zero-filled frames, 2M aligned in frame numbers (pfn % 512 == 0),
  /// each with refcount 1; ENOMEM if no fully free aligned block exists.
  /// Locking: as alloc().
  [[nodiscard]] result<pfn_t> alloc_huge();

  /// Take a reference. `pfn` must be allocated. Lock-free.
  void get(pfn_t pfn) noexcept;
  /// Drop a reference; the last one frees the frame (generation advances).
  /// Locking: may take the pool lock (rank leaf). Never blocks otherwise.
  void put(pfn_t pfn) noexcept;
  /// Racy snapshot of a frame's reference count (0: free).
  [[nodiscard]] std::uint32_t refcount(pfn_t pfn) const noexcept;
  /// References held by page caches (svm::file slots): 0 or 1. Set and
  /// cleared by svm::file. mapcount = refcount - cache_refs at rest.
  [[nodiscard]] std::uint32_t cache_refs(pfn_t pfn) const noexcept;
  /// Kernel: folio_head / folio_order. A frame from alloc_huge() belongs to
  /// an order-9 folio until it is freed; the folio's frames return to the
  /// free set together, when the last of them is put (as a large folio is
  /// freed whole). Other frames are order 0. Lock-free snapshot.
  [[nodiscard]] unsigned folio_order(pfn_t pfn) const noexcept;
  /// Mark `pfn` as held (or no longer held) by a page cache slot.
  void set_cache_ref(pfn_t pfn, bool held) noexcept;

  /// The zero page of this pool (frame 0).
  [[nodiscard]] static constexpr pfn_t zero_pfn() noexcept { return 0; }

  // phys_mem
  [[nodiscard]] std::byte* frame_data(pfn_t pfn) noexcept override;
  [[nodiscard]] std::uint64_t frame_generation(pfn_t pfn) const noexcept override;
  [[nodiscard]] pfn_t frame_count() const noexcept override { return count_; }

  /// The memory this pool's frame numbers refer to (system RAM or VRAM), as
  /// given at construction.
  [[nodiscard]] aperture kind() const noexcept { return aperture_; }
  /// Frames currently free (racy snapshot).
  [[nodiscard]] pfn_t free_frames() const noexcept;
  /// Frames that can be allocated at all (immutable): frame_count() - 1, or
  /// `frames - 1` for an exact pool.
  [[nodiscard]] pfn_t capacity() const noexcept { return capacity_; }

  /// Fault injection for tests: while it returns true, alloc()/alloc_huge()
  /// fail with ENOMEM. Set before concurrent use.
  void set_alloc_failure(std::function<bool(bool huge)> f) { alloc_fail_ = std::move(f); }

  // Byte helpers. Every access goes through std::atomic_ref on naturally
  // aligned units (phys_mem.h), relaxed: CPU and device may race on bytes.
  /// Copy a whole frame.
  static void copy_frame(std::byte* dst, const std::byte* src) noexcept;
  /// Zero a whole frame.
  static void zero_frame(std::byte* dst) noexcept;
  /// Copy `n` bytes out of frame memory at `p` into `out`.
  static void load_bytes(const std::byte* p, std::byte* out, std::size_t n) noexcept;
  /// Copy `n` bytes from `in` into frame memory at `p`.
  static void store_bytes(std::byte* p, const std::byte* in, std::size_t n) noexcept;

 private:
  struct frame_meta {
    /// atomic: get()/put() use acq_rel RMWs so the freeing put() sees every
    /// earlier holder's writes; alloc() stores 1 under the pool lock.
    std::atomic<std::uint32_t> refs{0};
    /// atomic: advanced with a release RMW by the freeing put(); pairs with
    /// the acquire load in frame_generation() (the oracle's lock-free query).
    std::atomic<std::uint64_t> gen{0};
    /// atomic, relaxed: 9 while the frame belongs to a live THP folio (set
    /// by alloc_huge under the pool lock, cleared when the folio is freed);
    /// read lock-free by folio_order().
    std::atomic<std::uint8_t> order{0};
    /// atomic, relaxed: page-cache references (see cache_refs()).
    std::atomic<std::uint8_t> cache{0};
  };
  void release_frame_locked(pfn_t pfn) SVM_REQUIRES(lock_);
  bool take_frame_locked(pfn_t pfn) SVM_REQUIRES(lock_);

  static constexpr lock_class lock_class_{"frame_pool", lockdep::rank::leaf};
  const pfn_t count_;               // immutable
  const aperture aperture_;         // immutable
  pfn_t capacity_ = 0;              // immutable after construction
  std::byte* bytes_ = nullptr;      // immutable pointer; contents via atomic_ref
  std::unique_ptr<frame_meta[]> meta_;  // immutable array; fields atomic
  /// On its own cache line, with the state it guards: alloc() and put()
  /// write it for every frame, while device accesses read the immutable
  /// fields above (frame_data()) lock-free; sharing a line would make every
  /// allocation cost every engine a cache miss.
  alignas(64) mutable mutex lock_{lock_class_};
  /// Bit i set: frame i is free.
  std::vector<std::uint64_t> free_bits_ SVM_GUARDED_BY(lock_);
  /// Free frames per 512-frame block (for alloc_huge).
  std::vector<std::uint16_t> block_free_ SVM_GUARDED_BY(lock_);
  /// Per block holding a THP folio: its frames whose last reference was
  /// dropped; at 512 the folio is freed whole.
  std::vector<std::uint16_t> folio_dead_ SVM_GUARDED_BY(lock_);
  std::size_t cursor_ SVM_GUARDED_BY(lock_) = 0;  ///< word where alloc() starts looking
  /// atomic, relaxed: statistics only.
  std::atomic<pfn_t> free_count_{0};
  std::function<bool(bool)> alloc_fail_;  // set before concurrent use
};

}  // namespace svm
