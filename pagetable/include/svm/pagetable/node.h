// One page-table page: 512 atomic entries, its own lock, and the counters of
// the per-page-table sequence mode.
#pragma once

#include <atomic>
#include <cstdint>

#include "svm/base/mutex.h"
#include "svm/base/types.h"

namespace svm::pt {

inline constexpr unsigned bits_per_level = 9;
inline constexpr unsigned entries_per_node = 1u << bits_per_level;

/// Bit 0 of an entry is the table's own: set, it marks a link to a child
/// node (the node's address | 1). Leaf entries of every encoding keep it clear.
inline constexpr std::uint64_t link_bit = 1;

/// log2 of the VA span of one entry at `level` (0: 4K, 1: 2M, 2: 1G, ...).
[[nodiscard]] constexpr unsigned entry_shift(unsigned level) noexcept {
  return page_shift + bits_per_level * level;
}
[[nodiscard]] constexpr std::uint64_t entry_span(unsigned level) noexcept {
  return std::uint64_t{1} << entry_shift(level);
}
[[nodiscard]] constexpr unsigned entry_index(va_t va, unsigned level) noexcept {
  return static_cast<unsigned>((va >> entry_shift(level)) & (entries_per_node - 1));
}

struct node;
[[nodiscard]] inline bool is_link(std::uint64_t e) noexcept { return (e & link_bit) != 0; }
[[nodiscard]] inline node* link_target(std::uint64_t e) noexcept {
  return reinterpret_cast<node*>(e & ~link_bit);
}
[[nodiscard]] inline std::uint64_t make_link(node* n) noexcept {
  return reinterpret_cast<std::uint64_t>(n) | link_bit;
}

/// A page-table page.
///
/// Protection:
///  - entries: written only under `lock` (release stores, so a lock-free
///    walker's acquire load of a link sees the child's initialised contents);
///    read lock-free by walkers inside an epoch section (svm/base/epoch.h).
///  - lock: rank pt_node, key (top level - level, base): parent before child,
///    ascending address within a level.
///  - seq: advanced under `lock` by invalidations that reach this node (see
///    radix_table::zap with bump_seq). Per-page-table sequence mode: a fault
///    snapshots it (acquire) before walking the CPU page table and compares
///    it under `lock` before writing; a change means retry. The increment is
///    a release store under the lock, pairing with that acquire snapshot.
///  - inval_log: which entries the last two advances of seq covered, so that
///    a fault can tell an invalidation of other entries of this node from
///    one of its own window (see unchanged_since). One word, written (relaxed)
///    under `lock` just before the seq release store that it describes:
///      bits  0..8 / 9..17   first / last index of the latest advance,
///      bits 18..26 / 27..35 first / last index of the one before it,
///      bits 36..63          the low 28 bits of seq after the latest advance.
///    Its tag lets a lock-free reader notice that it raced an advance.
///  - inval_active: count of invalidations between start and end that
///    reached this node; incremented/decremented by drivers that track
///    invalidation per node (atomic; pairs with the acquire load in
///    invalidation_active()).
///  - n_links, n_leaves: counts of link and nonzero leaf entries; written
///    under `lock`, read racily (relaxed) by statistics and by the
///    empty-node check, which rechecks under the lock.
///  - pins: holders that keep this node from being freed (a fault's window
///    leaves, populate in progress). Incremented before taking `lock` and
///    rechecking `dead`; the free path checks it under `lock`. seq_cst on
///    both sides so that a pin and a concurrent free cannot miss each other.
///  - dead: set under `lock` (and the parent's) when the node is unlinked;
///    whoever finds it set after locking must retry from the root.
///  - level, base, parent: immutable after publication.
struct alignas(64) node {
  static constexpr unsigned log_slot_bits = 2 * bits_per_level;
  static constexpr std::uint64_t log_slot_mask = (std::uint64_t{1} << log_slot_bits) - 1;
  static constexpr unsigned log_tag_shift = 2 * log_slot_bits;
  static constexpr std::uint64_t log_tag_mask = (std::uint64_t{1} << (64 - log_tag_shift)) - 1;

  std::atomic<std::uint64_t> entries[entries_per_node];
  std::atomic<std::uint64_t> seq{0};
  va_t base = 0;
  node* parent = nullptr;
  // no_unique_address: the fields below may use the lock's tail padding
  // (the lock-order validator's build), keeping the node at one extra line.
  [[no_unique_address]] mutable mutex lock;
  std::atomic<std::uint32_t> pins{0};
  std::atomic<std::uint16_t> n_links{0};
  std::atomic<std::uint16_t> n_leaves{0};
  std::atomic<std::uint16_t> inval_active{0};
  bool dead GUARDED_BY(lock) = false;
  std::uint8_t level = 0;
  std::atomic<std::uint64_t> inval_log{0};

  node(unsigned lvl, va_t b, node* p, unsigned top_level) noexcept;

  /// VA span covered by the whole node.
  [[nodiscard]] std::uint64_t span() const noexcept { return entry_span(level + 1u); }
  [[nodiscard]] std::uint32_t valid_count() const noexcept {
    return n_links.load(std::memory_order_relaxed) + n_leaves.load(std::memory_order_relaxed);
  }

  /// Locking: requires lock. Advances seq (the per-page-table sequence) for
  /// a change to entries [first, last] (indices in this node; the default is
  /// the whole node, for a change with no narrower extent).
  void bump_seq_locked(unsigned first = 0, unsigned last = entries_per_node - 1) REQUIRES(lock) {
    const std::uint64_t next = seq.load(std::memory_order_relaxed) + 1;
    const std::uint64_t prev = inval_log.load(std::memory_order_relaxed) & log_slot_mask;
    // relaxed: published by the release store of seq just below, and a
    // reader that sees an older seq rejects the word by its tag.
    inval_log.store(((next & log_tag_mask) << log_tag_shift) | (prev << log_slot_bits) | first |
                        (std::uint64_t{last} << bits_per_level),
                    std::memory_order_relaxed);
    seq.store(next, std::memory_order_release);
  }

  /// True when no advance of seq since `snap` touched entries [first, last]:
  /// either seq is still `snap`, or it moved by at most two and both logged
  /// extents miss [first, last]. Exact under `lock`. Lock-free it may err
  /// either way only while racing an advance, so a caller treats a lock-free
  /// answer as a hint and decides under the lock (the fault's commit does).
  [[nodiscard]] bool unchanged_since(std::uint64_t snap, unsigned first, unsigned last) const noexcept {
    const std::uint64_t cur = seq.load(std::memory_order_acquire);  // pairs with bump_seq_locked
    if (cur == snap) return true;
    if (cur - snap > 2) return false;
    const std::uint64_t w = inval_log.load(std::memory_order_relaxed);
    if ((w >> log_tag_shift) != (cur & log_tag_mask)) return false;  // an advance raced this read
    auto hits = [&](std::uint64_t slot) {
      const auto lo = static_cast<unsigned>(slot & (entries_per_node - 1));
      const auto hi = static_cast<unsigned>((slot >> bits_per_level) & (entries_per_node - 1));
      return lo <= last && first <= hi;
    };
    if (hits(w & log_slot_mask)) return false;
    return cur - snap == 1 || !hits((w >> log_slot_bits) & log_slot_mask);
  }
  /// Adjust the entry counts. Only lock holders write them, so a plain
  /// load/store pair suffices (no read-modify-write on the populate path).
  void add_leaves_locked(int d) REQUIRES(lock) {
    n_leaves.store(static_cast<std::uint16_t>(n_leaves.load(std::memory_order_relaxed) + d),
                   std::memory_order_relaxed);
  }
  void add_links_locked(int d) REQUIRES(lock) {
    n_links.store(static_cast<std::uint16_t>(n_links.load(std::memory_order_relaxed) + d),
                  std::memory_order_relaxed);
  }
  /// Lock-free snapshot of seq for a later compare under the lock.
  [[nodiscard]] std::uint64_t read_seq() const noexcept { return seq.load(std::memory_order_acquire); }
  [[nodiscard]] bool invalidation_active() const noexcept {
    return inval_active.load(std::memory_order_acquire) != 0;
  }
};

/// Lock-order key of a node: parents (higher level) first, then ascending
/// base address within a level.
[[nodiscard]] constexpr std::uint64_t node_lock_key(unsigned level, va_t base, unsigned top_level) noexcept {
  return (static_cast<std::uint64_t>(top_level - level) << 58) | (base >> page_shift);
}

}  // namespace svm::pt

namespace svm::pt {
static_assert(sizeof(node) == 4096 + 64, "a node is one page of entries plus one cache line");
}  // namespace svm::pt
