// The device MMU's translation caches: the TLB policy interface and the
// default set-associative implementation.
//
// One TLB belongs to one engine and is touched only by that engine's thread
// (lookups, inserts, and the flushes the engine performs when it
// acknowledges a TLB invalidation). It therefore needs no locks and no
// atomics; cross-engine coherence is the invalidation protocol's job (see
// device.h, "TLB invalidation").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "svm/base/phys_mem.h"
#include "svm/base/types.h"

namespace svm::dev {

/// A GPU VM identifier as the device sees it (the ASID of a TLB tag).
using vm_id = std::uint32_t;
/// Largest vm id the device accepts (ids are [0, max_vm_id]).
inline constexpr vm_id max_vm_id = 0xfffe;

/// One cached translation: a leaf of the device page table at `level`
/// (0: 4K, 1: 2M, 2: 1G) covering [base, base + 4K << 9*level).
struct tlb_entry {
  /// (vm + 1) << 48 | (base >> shift(level)) << 2 | level; 0 when the slot
  /// is empty. Compared whole on lookup.
  std::uint64_t tag = 0;
  std::uint64_t pte = 0;         ///< the leaf entry as walked (dev_pte encoding)
  va_t base = 0;                 ///< VA the leaf starts at
  phys_mem* mem = nullptr;       ///< the memory the aperture of `pte` names
  std::byte* host = nullptr;     ///< frame_data() of the frame for 4K leaves, else nullptr
  std::uint8_t level = 0;        ///< leaf level: 0 (4K), 1 (2M) or 2 (1G)

  /// The tag of a level-`level` translation of `va` in `vm` (the `tag` layout above).
  [[nodiscard]] static constexpr std::uint64_t make_tag(vm_id vm, va_t va, unsigned level) noexcept {
    return (std::uint64_t{vm + 1} << 48) | ((va >> (page_shift + 9 * level)) << 2) | level;
  }
  /// The VM this entry belongs to, decoded from `tag` (meaningless for an empty slot).
  [[nodiscard]] constexpr vm_id vm() const noexcept { return static_cast<vm_id>(tag >> 48) - 1; }
  /// Bytes the leaf covers: 4K, 2M or 1G for level 0, 1 or 2.
  [[nodiscard]] constexpr std::uint64_t span() const noexcept {
    return std::uint64_t{1} << (page_shift + 9 * level);
  }
};

/// Geometry of a set-associative TLB.
struct tlb_config {
  std::size_t sets = 64;  ///< power of two, >= 1
  std::size_t ways = 8;   ///< >= 1
};

/// Counters a TLB keeps (owner-thread only; read racily for statistics).
struct tlb_counters {
  std::uint64_t inserts = 0;        ///< insert() calls, including ones that replaced a same-tag entry
  std::uint64_t evictions = 0;      ///< valid entries displaced by an insert
  std::uint64_t invalidated = 0;    ///< entries dropped by invalidate()/flush()
};

/// The TLB policy: what a translation cache must do. Implementations are
/// owned by one engine and called only from its thread.
///
/// Contract:
///  - lookup(vm, va) returns an entry of `vm` whose span contains `va` and
///    that was inserted and not dropped since, or nullptr. It must never
///    return an entry dropped by invalidate()/flush_all(); it may forget
///    entries at any time (capacity, policy).
///  - insert(e) caches `e`; a later lookup inside its span may return it.
///  - invalidate(vm, r) drops every entry of `vm` whose span overlaps `r`
///    (the whole huge entry, even if `r` covers part of it).
///  - flush_all() drops everything.
/// The pointer lookup() returns stays valid until the next insert,
/// invalidate or flush on the same TLB.
class tlb_model {
 public:
  virtual ~tlb_model() = default;
  /// The cached entry of `vm` whose span contains `va`, or nullptr on a miss.
  [[nodiscard]] virtual const tlb_entry* lookup(vm_id vm, va_t va) noexcept = 0;
  /// Cache `e`, possibly evicting another entry.
  virtual void insert(const tlb_entry& e) noexcept = 0;
  /// Drop every entry of `vm` whose span overlaps `r`.
  virtual void invalidate(vm_id vm, va_range r) noexcept = 0;
  /// Drop every entry of every VM.
  virtual void flush_all() noexcept = 0;
  /// The counters accumulated so far.
  [[nodiscard]] virtual tlb_counters counters() const noexcept = 0;
  /// Number of valid entries (O(capacity); for tests).
  [[nodiscard]] virtual std::size_t occupancy() const noexcept = 0;
};

/// A unified set-associative TLB caching 4K, 2M and 1G leaves in one array
/// of sets x ways entries. An entry of level L lives in set
/// hash(vm, va >> shift(L)) mod sets; lookup probes the 4K set, then the 2M
/// set, then the 1G set. Replacement is round-robin per set (no state is
/// written on a hit, so a hit is a few compares).
class set_assoc_tlb final : public tlb_model {
 public:
  /// An empty TLB of geometry `c`: sets rounded up to a power of two (at
  /// least 1), ways clamped to [1, 255].
  explicit set_assoc_tlb(tlb_config c = {});

  [[nodiscard]] const tlb_entry* lookup(vm_id vm, va_t va) noexcept override {
    for (unsigned level = 0; level < 3; ++level) {
      if (!(level_mask_ & (1u << level))) continue;
      const std::uint64_t tag = tlb_entry::make_tag(vm, va, level);
      tlb_entry* set = &entries_[set_of(tag) * ways_];
      for (std::size_t w = 0; w < ways_; ++w)
        if (set[w].tag == tag) return &set[w];
    }
    return nullptr;
  }
  void insert(const tlb_entry& e) noexcept override;
  void invalidate(vm_id vm, va_range r) noexcept override;
  void flush_all() noexcept override;
  [[nodiscard]] tlb_counters counters() const noexcept override { return counters_; }
  [[nodiscard]] std::size_t occupancy() const noexcept override;

  /// Number of sets in use (tlb_config::sets after rounding).
  [[nodiscard]] std::size_t sets() const noexcept { return sets_; }
  /// Entries per set (tlb_config::ways after clamping).
  [[nodiscard]] std::size_t ways() const noexcept { return ways_; }
  /// The set a translation of (vm, va) at `level` maps to (for tests that
  /// build conflicting addresses).
  [[nodiscard]] std::size_t set_index(vm_id vm, va_t va, unsigned level) const noexcept {
    return set_of(tlb_entry::make_tag(vm, va, level));
  }

 private:
  [[nodiscard]] std::size_t set_of(std::uint64_t tag) const noexcept {
    // Low vpn bits select the set (sequential pages spread over sets); the
    // level and vm are folded in so that 2M/1G entries and other VMs do not
    // all land in set 0.
    const std::uint64_t h = (tag >> 2) ^ ((tag & 3) * 0x9e37) ^ ((tag >> 48) * 0x85eb);
    return static_cast<std::size_t>(h & (sets_ - 1));
  }

  std::size_t sets_;
  std::size_t ways_;
  std::vector<tlb_entry> entries_;   // sets_ * ways_, set-major
  std::vector<std::uint8_t> next_;   // round-robin victim per set
  unsigned level_mask_ = 0;          // levels present (skip probing empty ones)
  tlb_counters counters_;
};

/// Factory for the default model.
[[nodiscard]] std::unique_ptr<tlb_model> make_set_assoc_tlb(tlb_config c);

}  // namespace svm::dev
