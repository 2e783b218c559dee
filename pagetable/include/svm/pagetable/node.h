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
///  - inval_log: which entries the recent advances of seq covered, so that a
///    fault can tell an invalidation of other entries of this node from one
///    of its own window (see unchanged_since). Two generations, each the
///    seq it starts after (its base) and the extent (first..last index) that
///    covers every advance since: the young one restarts every
///    log_generation advances, the old one is the young one before that. One
///    word, written (relaxed) under `lock` just before the seq release store
///    that it describes:
///      bits  0..17  young extent (first | last << 9; first > last: none)
///      bits 18..35  old extent
///      bits 36..49  young base, low 14 bits
///      bits 50..63  old base, low 14 bits
///    Under `lock` the word always describes seq exactly; read lock-free it
///    may describe a later seq, so that answer is only a hint.
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
  static constexpr unsigned log_generation = 8;  ///< advances per young generation
  static constexpr unsigned log_ext_bits = 2 * bits_per_level;  ///< bits of one extent in inval_log
  static constexpr std::uint64_t log_ext_mask = (std::uint64_t{1} << log_ext_bits) - 1;  ///< one extent's bits
  /// An extent that covers nothing (first 511, last 0).
  static constexpr std::uint64_t log_no_extent = entries_per_node - 1;
  static constexpr unsigned log_base_bits = 14;  ///< bits of one generation's base in inval_log
  static constexpr std::uint64_t log_base_mask = (std::uint64_t{1} << log_base_bits) - 1;  ///< one base's bits
  /// inval_log of a fresh node: both extents empty, both bases 0.
  static constexpr std::uint64_t log_empty = log_no_extent | (log_no_extent << log_ext_bits);

  std::atomic<std::uint64_t> entries[entries_per_node];  ///< the 512 entries (see Protection above)
  std::atomic<std::uint64_t> seq{0};  ///< per-page-table sequence (see Protection above)
  va_t base = 0;           ///< first VA the node covers; immutable
  node* parent = nullptr;  ///< the node one level up (null for the root); immutable
  // no_unique_address: the fields below may use the lock's tail padding
  // (the lock-order validator's build), keeping the node at one extra line.
  [[no_unique_address]] mutable mutex lock;    ///< the node lock (rank pt_node; see Protection above)
  std::atomic<std::uint32_t> pins{0};          ///< holders keeping the node alive
  std::atomic<std::uint16_t> n_links{0};       ///< link entries; written under lock
  std::atomic<std::uint16_t> n_leaves{0};      ///< nonzero leaf entries; written under lock
  std::atomic<std::uint16_t> inval_active{0};  ///< invalidations in progress that reached the node
  bool dead SVM_GUARDED_BY(lock) = false;      ///< unlinked: retry from the root
  std::uint8_t level = 0;                      ///< 0 holds 4K entries; immutable
  std::atomic<std::uint64_t> inval_log{log_empty};  ///< recent seq advances' extents

  /// A fresh node at `lvl` covering from `b`, under `p`, in a table whose root is at `top_level`.
  node(unsigned lvl, va_t b, node* p, unsigned top_level) noexcept;

  /// VA span covered by the whole node.
  [[nodiscard]] std::uint64_t span() const noexcept { return entry_span(level + 1u); }
  /// Links plus nonzero leaves (racy unless under lock).
  [[nodiscard]] std::uint32_t valid_count() const noexcept {
    return n_links.load(std::memory_order_relaxed) + n_leaves.load(std::memory_order_relaxed);
  }

  /// An extent grown to cover [first, last] too.
  [[nodiscard]] static constexpr std::uint64_t widen(std::uint64_t ext, unsigned first, unsigned last) noexcept {
    unsigned lo = static_cast<unsigned>(ext & (entries_per_node - 1));
    unsigned hi = static_cast<unsigned>(ext >> bits_per_level);
    if (lo > hi) {
      lo = first;
      hi = last;
    } else {
      lo = lo < first ? lo : first;
      hi = hi > last ? hi : last;
    }
    return lo | (std::uint64_t{hi} << bits_per_level);
  }

  /// Locking: requires lock. Advances seq (the per-page-table sequence) for
  /// a change to entries [first, last] (indices in this node; the default is
  /// the whole node, for a change with no narrower extent).
  void bump_seq_locked(unsigned first = 0, unsigned last = entries_per_node - 1) SVM_REQUIRES(lock) {
    const std::uint64_t cur = seq.load(std::memory_order_relaxed), next = cur + 1;
    const std::uint64_t w = inval_log.load(std::memory_order_relaxed);
    std::uint64_t young = w & log_ext_mask, old = (w >> log_ext_bits) & log_ext_mask;
    std::uint64_t young_base = (w >> (2 * log_ext_bits)) & log_base_mask;
    std::uint64_t old_base = w >> (2 * log_ext_bits + log_base_bits);
    if (((next - young_base) & log_base_mask) > log_generation) {  // the young generation is full
      old = young;
      old_base = young_base;
      young = log_no_extent;
      young_base = cur & log_base_mask;
    }
    young = widen(young, first, last);
    old = widen(old, first, last);
    // relaxed: published by the release store of seq just below.
    inval_log.store(young | (old << log_ext_bits) | (young_base << (2 * log_ext_bits)) |
                        (old_base << (2 * log_ext_bits + log_base_bits)),
                    std::memory_order_relaxed);
    seq.store(next, std::memory_order_release);
  }

  /// True when no advance of seq since `snap` touched entries [first, last]:
  /// seq is still `snap`, or the youngest generation of the log that began
  /// at or before `snap` has an extent that misses [first, last]. Exact
  /// under `lock` (false when `snap` is older than both generations). Read
  /// lock-free it may err either way while racing an advance, so a caller
  /// treats that answer as a hint and decides under the lock (the fault's
  /// commit does).
  [[nodiscard]] bool unchanged_since(std::uint64_t snap, unsigned first, unsigned last) const noexcept {
    const std::uint64_t cur = seq.load(std::memory_order_acquire);  // pairs with bump_seq_locked
    if (cur == snap) return true;
    const std::uint64_t w = inval_log.load(std::memory_order_relaxed);
    // A generation's base: the latest seq at or below cur with its low bits.
    auto base_of = [cur](std::uint64_t low) { return cur - ((cur - low) & log_base_mask); };
    const std::uint64_t young_base = base_of((w >> (2 * log_ext_bits)) & log_base_mask);
    const std::uint64_t old_base = base_of(w >> (2 * log_ext_bits + log_base_bits));
    std::uint64_t ext;
    if (snap >= young_base && snap < cur) ext = w & log_ext_mask;
    else if (snap >= old_base && snap < cur) ext = (w >> log_ext_bits) & log_ext_mask;
    else return false;
    const auto lo = static_cast<unsigned>(ext & (entries_per_node - 1));
    const auto hi = static_cast<unsigned>(ext >> bits_per_level);
    return lo > hi || hi < first || last < lo;
  }
  /// Adjust the entry counts. Only lock holders write them, so a plain
  /// load/store pair suffices (no read-modify-write on the populate path).
  void add_leaves_locked(int d) SVM_REQUIRES(lock) {
    n_leaves.store(static_cast<std::uint16_t>(n_leaves.load(std::memory_order_relaxed) + d),
                   std::memory_order_relaxed);
  }
  /// Adjust the link count (see add_leaves_locked).
  void add_links_locked(int d) SVM_REQUIRES(lock) {
    n_links.store(static_cast<std::uint16_t>(n_links.load(std::memory_order_relaxed) + d),
                  std::memory_order_relaxed);
  }
  /// Lock-free snapshot of seq for a later compare under the lock.
  [[nodiscard]] std::uint64_t read_seq() const noexcept { return seq.load(std::memory_order_acquire); }
  /// True while an invalidation that reached this node is between start and end.
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
