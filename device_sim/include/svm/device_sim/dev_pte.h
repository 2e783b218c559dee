// The simulated device's hardware page-table entry and its page table.
//
// The device walks a pt::radix_table<dev_pte> per VM (the driver, svm/, owns
// and writes it; the device only reads it, lock-free, inside an epoch
// section). The encoding is the device's own, like a real GPU's PTE format:
//
//   bit 0       reserved by the radix table (link to a child node); always 0
//   bit 1       valid: the walker may use this translation
//   bit 2       writable: stores and atomics allowed (atomics need write)
//   bit 3       aperture: 0 system memory (the VM's phys_mem), 1 device VRAM
//   bit 4       no-atomic: atomics fault even where the entry is writable
//               (system memory whose range asks for device atomics: the
//               fault migrates it first, as xe's PTEs without atomic access
//               make it do)
//   bits 12..51 pfn of the first 4K frame the leaf maps; a 2M (1G) leaf maps
//               512 (262144) consecutive frames of its aperture
//
// Everything else is zero. A zero entry means "nothing mapped"; a nonzero
// entry without the valid bit faults like a zero one.
#pragma once

#include <cstdint>

#include "svm/base/phys_mem.h"
#include "svm/base/types.h"
#include "svm/pagetable/radix.h"

namespace svm::dev {

/// The device's PTE encoding (see the layout above): static helpers that
/// build and decode raw 64-bit entries for the radix page table.
struct dev_pte {
  static constexpr std::uint64_t valid_bit = std::uint64_t{1} << 1;  ///< bit 1: the translation may be used
  static constexpr std::uint64_t write_bit = std::uint64_t{1} << 2;  ///< bit 2: stores and atomics allowed
  static constexpr std::uint64_t vram_bit = std::uint64_t{1} << 3;   ///< bit 3: frame is in VRAM, not system memory
  static constexpr std::uint64_t no_atomic_bit = std::uint64_t{1} << 4;  ///< bit 4: atomics fault here
  static constexpr unsigned pfn_shift = 12;  ///< bit position of the pfn field
  /// Mask of the 40-bit pfn field, bits 12..51.
  static constexpr std::uint64_t pfn_mask = ((std::uint64_t{1} << 40) - 1) << pfn_shift;

  /// A valid leaf entry for frame `pfn` of aperture `ap`; `atomics` false
  /// sets no_atomic_bit.
  [[nodiscard]] static constexpr std::uint64_t make(aperture ap, pfn_t pfn, bool writable,
                                                    bool atomics = true) noexcept {
    return ((pfn << pfn_shift) & pfn_mask) | valid_bit | (writable ? write_bit : 0) |
           (ap == aperture::vram ? vram_bit : 0) | (atomics ? 0 : no_atomic_bit);
  }
  /// True if `e` is a leaf (not a child link) with the valid bit set.
  [[nodiscard]] static constexpr bool is_valid(std::uint64_t e) noexcept {
    return (e & pt::link_bit) == 0 && (e & valid_bit) != 0;
  }
  /// True if `e` has the writable bit set (meaningful only for a valid entry).
  [[nodiscard]] static constexpr bool is_writable(std::uint64_t e) noexcept { return (e & write_bit) != 0; }
  /// True if an atomic may use `e`: writable and without no_atomic_bit.
  [[nodiscard]] static constexpr bool allows_atomics(std::uint64_t e) noexcept {
    return (e & (write_bit | no_atomic_bit)) == write_bit;
  }
  /// True if a valid `e` lets access `acc` through: reads and prefetches
  /// always, stores if writable, atomics if allows_atomics().
  [[nodiscard]] static constexpr bool permits(std::uint64_t e, access acc) noexcept {
    return acc == access::atomic ? allows_atomics(e) : (!needs_write(acc) || is_writable(e));
  }
  /// The memory `e`'s frame lives in: VRAM if vram_bit is set, else system memory.
  [[nodiscard]] static constexpr aperture aperture_of(std::uint64_t e) noexcept {
    return (e & vram_bit) ? aperture::vram : aperture::system;
  }
  /// The first frame number `e` maps, within its aperture.
  [[nodiscard]] static constexpr pfn_t pfn(std::uint64_t e) noexcept { return (e & pfn_mask) >> pfn_shift; }
  /// The same entry with the writable bit cleared (e.g. for a COW mirror).
  [[nodiscard]] static constexpr std::uint64_t read_only(std::uint64_t e) noexcept { return e & ~write_bit; }

  /// Sub-entry `index` of a huge leaf at `level` (1: 2M, 2: 1G) split one
  /// level down: same flags, pfn advanced by index * 512^(level-1) frames.
  [[nodiscard]] static constexpr std::uint64_t split(std::uint64_t e, unsigned level, unsigned index) noexcept {
    const std::uint64_t frames = std::uint64_t{index} << (pt::bits_per_level * (level - 1));
    return e + (frames << pfn_shift);
  }
};
static_assert(pt::entry_encoding<dev_pte>);

/// A device page table: one per GPU VM, written by the driver, walked by the
/// device's MMU.
using dev_page_table = pt::radix_table<dev_pte>;

}  // namespace svm::dev
