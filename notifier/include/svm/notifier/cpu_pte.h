// The CPU page-table entry encoding of the mm model, for pt::radix_table.
#pragma once

#include <cstdint>

#include "svm/base/types.h"
#include "svm/pagetable/radix.h"

namespace svm {

/// CPU PTE bits (bit 0 belongs to the radix table: links).
///
///   bit 1      present: a translation the CPU may use (is_valid)
///   bit 2      writable
///   bit 3      the pool's zero page (present, never writable)
///   bit 4      swap entry (not present): bits 12.. hold the swap slot
///   bit 5      device-private entry (not present to the CPU): bits 12.. hold
///              a frame of pool `pool`, owned by that pool's owner
///   bit 6      PROT_NONE (not present): keeps the frame, like x86's
///              _PAGE_PROTNONE, so mprotect back restores it
///   bit 7      migration entry (not present): bits 12.. and 8-11 name the
///              frame being migrated; see the protocol below
///   bits 8-11  pool index of the frame (0: the mm's system pool)
///   bits 12-63 frame number, or swap slot
///
/// A huge leaf (level 1) is present (or PROT_NONE) and maps 512 frames with
/// consecutive numbers starting at its pfn.
///
/// Migration entries (kernel: the swap-type migration entry that
/// migrate_vma_setup leaves behind, svm/notifier/migrate.h). Only 4K entries
/// of private anonymous VMAs become migration entries, and only
/// migrate_vma_setup writes them, under the mmap lock (shared) and the node
/// lock, in place of a present system-page entry or a device-private entry.
/// The entry keeps the old entry's pool, frame and write bit (present and
/// devpriv cleared) and still holds the old entry's frame reference, so a
/// zap (munmap, MADV_DONTNEED, teardown) frees it like any other entry; the
/// migration holds one more reference of its own (isolation) until
/// migrate_vma_finalize. The protocol:
///   - a CPU fault or hmm_range_fault asked to fault that meets one waits
///     (yields and looks again) until it is gone; it is always replaced by
///     migrate_vma_finalize, which the migrating thread must call and which
///     takes no mmap lock, so the wait ends;
///   - migrate_vma_finalize replaces it by the new entry (or restores the old
///     one) only if the PTE is still that migration entry; a zap in between
///     leaves nothing to replace, and finalize then frees the new frame;
///   - mprotect, mremap and fork, which run with the mmap lock exclusive and
///     would change or copy it, restore the old entry first (the migration
///     of that page is abandoned; finalize sees the PTE changed);
///   - reclaim and mm::migrate skip it (it is not present).
/// A frame is collected by at most one migration at a time (the fork
/// family's isolation set), so a restored and re-collected entry cannot be
/// mistaken for the first migration's by its finalize.
struct cpu_pte {
  static constexpr std::uint64_t present = 1u << 1;   ///< bit 1: a translation the CPU may use
  static constexpr std::uint64_t write = 1u << 2;     ///< bit 2: the CPU may write through it
  static constexpr std::uint64_t zero = 1u << 3;      ///< bit 3: maps the pool's zero page (never writable)
  static constexpr std::uint64_t swap = 1u << 4;      ///< bit 4: swap entry, not present; bits 12.. hold the slot
  static constexpr std::uint64_t devpriv = 1u << 5;   ///< bit 5: device-private entry, not present to the CPU
  static constexpr std::uint64_t protnone = 1u << 6;  ///< bit 6: PROT_NONE, not present but keeps its frame
  static constexpr std::uint64_t migration = 1u << 7; ///< bit 7: migration entry, not present; keeps its frame
  static constexpr unsigned pool_shift = 8;           ///< lowest bit of the 4-bit pool index field
  static constexpr std::uint64_t pool_mask = 0xf;     ///< mask of the pool index, after shifting by pool_shift
  static constexpr unsigned max_pools = 16;           ///< pools an mm can address (the field's 16 values)

  /// An entry for frame (or swap slot) `pfn` of pool `pool`, with the bits
  /// in `flags` (present, write, ...) set.
  [[nodiscard]] static constexpr std::uint64_t make(pfn_t pfn, unsigned pool, std::uint64_t flags) noexcept {
    return (pfn << page_shift) | (std::uint64_t{pool} << pool_shift) | flags;
  }
  /// The frame number, or the swap slot of a swap entry (bits 12-63).
  [[nodiscard]] static constexpr pfn_t pfn(std::uint64_t e) noexcept { return e >> page_shift; }
  /// The index of the frame's pool in the mm (bits 8-11; 0: system pool).
  [[nodiscard]] static constexpr unsigned pool(std::uint64_t e) noexcept {
    return static_cast<unsigned>((e >> pool_shift) & pool_mask);
  }
  /// True if the entry is present, so the CPU may translate through it.
  [[nodiscard]] static constexpr bool is_valid(std::uint64_t e) noexcept { return (e & present) != 0; }
  /// True if the write bit is set.
  [[nodiscard]] static constexpr bool is_writable(std::uint64_t e) noexcept { return (e & write) != 0; }
  /// True if the entry maps the pool's zero page (4K or, at level 1, huge).
  [[nodiscard]] static constexpr bool is_zero(std::uint64_t e) noexcept { return (e & zero) != 0; }
  /// True for a swap entry; pfn() is then the swap slot.
  [[nodiscard]] static constexpr bool is_swap(std::uint64_t e) noexcept { return (e & swap) != 0; }
  /// True for a device-private entry; pfn() and pool() name the device frame.
  [[nodiscard]] static constexpr bool is_devpriv(std::uint64_t e) noexcept { return (e & devpriv) != 0; }
  /// True for a PROT_NONE entry, which keeps its frame while not present.
  [[nodiscard]] static constexpr bool is_protnone(std::uint64_t e) noexcept { return (e & protnone) != 0; }
  /// True for a migration entry; pfn() and pool() name the frame under migration.
  [[nodiscard]] static constexpr bool is_migration(std::uint64_t e) noexcept { return (e & migration) != 0; }
  /// An entry that holds a frame reference (present non-zero, PROT_NONE,
  /// device-private or migration).
  [[nodiscard]] static constexpr bool holds_frame(std::uint64_t e) noexcept {
    return ((e & (present | protnone | devpriv | migration)) != 0) && !is_zero(e);
  }
  /// Split of a huge leaf at `level` into sub-slot `index` one level down.
  [[nodiscard]] static constexpr std::uint64_t split(std::uint64_t e, unsigned level, unsigned index) noexcept {
    if (is_zero(e)) return e;
    const std::uint64_t pages = std::uint64_t{1} << (9 * (level - 1));
    return e + ((index * pages) << page_shift);
  }
};
static_assert(pt::entry_encoding<cpu_pte>);

/// The CPU page table type.
using cpu_page_table = pt::radix_table<cpu_pte>;

}  // namespace svm
