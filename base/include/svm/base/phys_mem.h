// The physical-memory interface: how device code reaches the bytes of a
// frame without depending on the component that owns the frames.
//
// notifier/ (the CPU frame pool of the mm model) implements it, and
// device_sim/ (its VRAM pool too) reads and writes through it. Frames are
// page_size bytes; a frame number names one frame of one pool.
//
// Concurrency: the CPU model and the device may race on the same bytes, as
// CPU threads and a GPU do on real shared memory. Every access to frame bytes
// therefore goes through std::atomic_ref on naturally aligned 1/2/4/8-byte
// units (relaxed unless an atomic operation asks for more), which keeps such
// races defined and ThreadSanitizer-clean. Bulk copies of a whole frame are
// done only while no device can translate to it (after invalidation).
#pragma once

#include <cstddef>
#include <cstdint>

#include "svm/base/types.h"

namespace svm {

/// Which memory a frame number refers to.
enum class aperture : std::uint8_t { system = 0, vram = 1 };

/// Physical memory as the device reads it: frame numbers to bytes. The mm's
/// frame pools (notifier/) implement it; the device's walker and copy engine
/// (device_sim/) read through it, so neither depends on the other.
class phys_mem {
 public:
  virtual ~phys_mem() = default;

  /// The page_size bytes of frame `pfn`, or nullptr if `pfn` is not a frame
  /// of this pool. The pointer stays valid for the pool's lifetime (frames
  /// are recycled, never unmapped), so a stale translation reads recycled
  /// bytes rather than crashing; the access oracle is what catches it.
  [[nodiscard]] virtual std::byte* frame_data(pfn_t pfn) noexcept = 0;

  /// The frame's generation: it advances every time the frame is freed, so a
  /// (pfn, generation) pair names one lifetime of one frame.
  [[nodiscard]] virtual std::uint64_t frame_generation(pfn_t pfn) const noexcept = 0;

  /// Number of frames in the pool (valid pfns are [0, frame_count())).
  [[nodiscard]] virtual pfn_t frame_count() const noexcept = 0;
};

}  // namespace svm
