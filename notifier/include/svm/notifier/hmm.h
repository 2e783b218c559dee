// hmm_range_fault: snapshot or fault in the CPU translations of a VA range
// for a device mirror (docs/contracts.md §2; kernel: mm/hmm.c).
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "svm/base/errc.h"
#include "svm/base/types.h"

namespace svm {

class mm;
class interval_notifier;

/// One entry of hmm_range::hmm_pfns: input request flags on entry, output
/// on return (kernel: unsigned long hmm_pfns[]).
///
///   bit 63     valid / (input) request fault
///   bit 62     write / (input) request write
///   bit 61     error (no VMA, no read permission, I/O VMA) — snapshot only
///   bits 56-60 map order: 0 (4K), 9 (2M) or 18 (1G)
///   bits 52-55 pool index (ours: which of the mm's frame pools the frame is in)
///   bits 0-51  frame number
using hmm_pfn = std::uint64_t;

inline constexpr hmm_pfn hmm_pfn_valid = std::uint64_t{1} << 63;
inline constexpr hmm_pfn hmm_pfn_write = std::uint64_t{1} << 62;
inline constexpr hmm_pfn hmm_pfn_error = std::uint64_t{1} << 61;
inline constexpr unsigned hmm_pfn_order_shift = 56;
inline constexpr hmm_pfn hmm_pfn_order_mask = std::uint64_t{0x1f} << hmm_pfn_order_shift;
inline constexpr unsigned hmm_pfn_pool_shift = 52;
inline constexpr hmm_pfn hmm_pfn_pool_mask = std::uint64_t{0xf} << hmm_pfn_pool_shift;
inline constexpr hmm_pfn hmm_pfn_flags = hmm_pfn_valid | hmm_pfn_write | hmm_pfn_error | hmm_pfn_order_mask |
                                         hmm_pfn_pool_mask;
/// Input requests share the output bits, as in the kernel.
inline constexpr hmm_pfn hmm_pfn_req_fault = hmm_pfn_valid;
inline constexpr hmm_pfn hmm_pfn_req_write = hmm_pfn_write;

/// The request flags by a shorter name: `.default_flags = hmm_req::fault`.
struct hmm_req {
  static constexpr hmm_pfn fault = hmm_pfn_req_fault;  ///< request a fault if the page is not present
  static constexpr hmm_pfn write = hmm_pfn_req_write;  ///< request a writable mapping (with `fault`)
};

[[nodiscard]] constexpr pfn_t hmm_pfn_to_pfn(hmm_pfn e) noexcept { return e & ~hmm_pfn_flags; }
[[nodiscard]] constexpr unsigned hmm_pfn_to_map_order(hmm_pfn e) noexcept {
  return static_cast<unsigned>((e & hmm_pfn_order_mask) >> hmm_pfn_order_shift);
}
[[nodiscard]] constexpr unsigned hmm_pfn_to_pool(hmm_pfn e) noexcept {
  return static_cast<unsigned>((e & hmm_pfn_pool_mask) >> hmm_pfn_pool_shift);
}

/// The range to fault or snapshot (kernel: struct hmm_range).
struct hmm_range {
  /// The notifier whose sequence guards the walk; its mm is the one walked.
  interval_notifier* notifier = nullptr;
  /// From notifier->read_begin().
  std::uint64_t notifier_seq = 0;
  va_t start = 0;  ///< page aligned
  va_t end = 0;    ///< exclusive, page aligned
  /// One entry per 4K page of [start, end): input requests, then output.
  std::span<hmm_pfn> hmm_pfns;
  /// Request flags for every page: req(i) = (hmm_pfns[i] & pfn_flags_mask)
  /// | default_flags.
  hmm_pfn default_flags = 0;
  /// Which bits of each hmm_pfns[i] input count as its own request (0: use
  /// only default_flags).
  hmm_pfn pfn_flags_mask = 0;
  /// Device-private pages of the pool owned by this are reported, not faulted.
  const void* dev_private_owner = nullptr;

  // ---- extensions (ours) ----
  /// The mm to walk when there is no notifier (with `is_valid`).
  svm::mm* mm = nullptr;
  /// Replaces the notifier-sequence check before each walk pass: return false
  /// to make hmm_range_fault return EBUSY (per-page-table sequence mode).
  std::function<bool()> is_valid = {};
};

/// Kernel: hmm_range_fault. Fill range.hmm_pfns per docs/contracts.md §2:
///  - present PTE: VALID (+WRITE if writable), the frame, the map order;
///  - absent and no fault requested: 0; fault requested: CPU fault (read,
///    or write for REQ_WRITE), then walk again from that page;
///  - write requested on a VMA without write: EPERM;
///  - no VMA, no read permission or an I/O VMA: EFAULT if a fault is
///    needed there, else ERROR on those entries;
///  - device-private page of `dev_private_owner`: VALID[|WRITE], its device
///    frame and pool, never faulted; another owner's, or a swap entry, with a
///    fault needed: faulted (migrated or swapped back); without: 0.
/// Before each walk pass it checks the notifier sequence (check_retry), or
/// range.is_valid, and returns EBUSY if it moved. On any return, entries
/// before the point reached hold their output, entries after it their input.
/// EINVAL: no notifier and no mm, unaligned or empty range, or a pfns span
/// of the wrong size (nothing written).
/// Locking: requires the mm's mmap_lock held shared (checked in debug
/// builds); takes node locks; faults may run invalidations, so the caller
/// must hold no driver lock that its own callback takes. Blocks.
[[nodiscard]] errc hmm_range_fault(hmm_range& range);

/// Calls of hmm_range_fault that reused a stale notifier sequence: the
/// same thread called it again with the notifier and notifier_seq that its
/// previous call had already found stale (EBUSY), instead of taking a new
/// one from interval_notifier::read_begin(). Such a retry loop can only
/// spin until its timeout. Debug builds also say so on stderr, once per
/// thread. Process-wide, relaxed (a statistic for tests and drivers).
[[nodiscard]] std::uint64_t hmm_stale_sequence_reuses() noexcept;

}  // namespace svm
