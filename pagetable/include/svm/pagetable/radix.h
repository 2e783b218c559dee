// A generic multi-level radix page table with per-node locks and lock-free
// walkers.
//
// Shape: 4 (or 5) levels of 512 entries; leaves of 4K (level 0), 2M (level 1)
// or 1G (level 2). The entry encoding is a template parameter so that the CPU
// page tables (notifier/) and the device page tables (svm/) define their own
// bits; the table reserves only bit 0 (links to child nodes).
//
// Concurrency:
//  - translate() takes no lock: plain loads inside an epoch section. It sees
//    every entry either before or after any single store, never torn, and never
//    a freed node (nodes are retired through svm/base/epoch.h).
//  - populate() locks only the nodes whose entries it writes, one at a time,
//    after pinning them (pinned nodes are never freed).
//  - zap() locks each node whose entries it clears, splits partly covered huge
//    leaves, frees nodes that become empty, and reports the VA ranges whose
//    TLB entries must be invalidated.
//  - Node locks follow lock_order.h: parent before child, ascending address.
#pragma once

#include <algorithm>
#include <cassert>
#include <concepts>
#include <cstdint>
#include <vector>

#include "svm/base/epoch.h"
#include "svm/base/errc.h"
#include "svm/base/types.h"
#include "svm/pagetable/node.h"
#include "svm/pagetable/table_base.h"

namespace svm::pt {

/// What an entry encoding provides. Leaf entries never set bit 0 (link_bit);
/// 0 means "nothing here". Nonzero entries that are not valid (a swap entry,
/// say) are stored and counted, but are the encoding's business.
template <class E>
concept entry_encoding = requires(std::uint64_t e, unsigned level, unsigned index) {
  /// A translation a hardware walker may use.
  { E::is_valid(e) } -> std::same_as<bool>;
  /// The entry for sub-slot `index` (0..511) when a huge leaf at `level`
  /// (1 or 2) is split into a table one level down.
  { E::split(e, level, index) } -> std::same_as<std::uint64_t>;
};

/// A translation: the entry found (0 if none) and the level it sits at.
struct translation {
  std::uint64_t entry = 0;  ///< the entry, in the table's encoding (0: none)
  unsigned level = 0;       ///< 0: a 4K entry, 1: 2M, 2: 1G
  /// Bytes of VA the entry maps.
  [[nodiscard]] std::uint64_t size() const noexcept { return entry_span(level); }
  /// True when an entry was found.
  [[nodiscard]] explicit operator bool() const noexcept { return entry != 0; }
};

/// How zap() treats what it clears.
struct zap_options {
  /// Advance the sequence of every node where the zap ends its walk (the
  /// nodes holding cleared entries, and the nodes where it found the range
  /// empty): the per-page-table sequence mode's invalidation.
  bool bump_seq = false;
  /// A huge leaf only partly inside the range is split and only the covered
  /// part cleared (CPU page tables must keep the rest). False clears the
  /// whole leaf and reports its whole span for flushing (a device mirror may
  /// simply refault the rest).
  bool split_huge = true;
  /// Only leaves with (entry & match_mask) == match_value are cleared (and
  /// reported); others are left alone. The default matches everything. A
  /// driver that keeps two kinds of mapping in one table (SVM and BO) tags
  /// them with a software bit and zaps one kind.
  std::uint64_t match_mask = 0;
  std::uint64_t match_value = 0;  ///< see match_mask
};

/// A multi-level radix page table whose entries use encoding `E`: per-node
/// locks for writers, lock-free walkers inside epoch sections, 4K, 2M and 1G
/// leaves (docs/protocols.md, "Page tables"). The CPU page tables of the mm
/// and the device page tables are both instances.
template <entry_encoding E>
class radix_table : public table_base {
 public:
  /// An empty table shaped by `o`.
  explicit radix_table(options o = {}) : table_base(o) {}

  /// Lock-free translate: the entry covering `va` and its level. Opens an
  /// epoch section unless the caller is in one (nesting is cheap).
  /// Locking: none; may run anywhere, including notifier callbacks.
  [[nodiscard]] translation translate(va_t va) const noexcept {
    epoch::guard g;
    return translate_in_section(va);
  }

  /// translate() for a caller already inside an epoch section (a device
  /// engine while it runs kernels): the same walk without the guard's
  /// enter/leave. Walking outside a section could read a freed node, so
  /// debug builds check it.
  [[nodiscard]] translation translate_in_section(va_t va) const noexcept {
    assert(epoch::in_section() && "translate_in_section() outside an epoch section");
    if (va >= limit_) return {};
    const node* n = root_;
    for (unsigned l = top_;; --l) {
      // seq_cst (as cheap as acquire on x86-64 and AArch64): pairs with the
      // release stores of entries and links, and with the seq_cst unlink
      // store in free_if_empty() under the epoch protocol (epoch.h).
      std::uint64_t e = n->entries[entry_index(va, l)].load(std::memory_order_seq_cst);
      if (!is_link(e) || l == 0) return {e, l};
      n = link_target(e);
      walk_hook(n);
    }
  }

  /// Map [start, end) with leaves at `leaf_level` (0: 4K, 1: 2M, 2: 1G);
  /// `make_entry(va)` returns the leaf entry for the leaf at `va`. Existing
  /// leaves in the range are replaced. A huge leaf above the range's nodes is
  /// split first (its other entries keep their translations). Populating a
  /// huge leaf over an unpinned table of 4K entries frees that table; over a
  /// pinned one it writes the equivalent split entries into it instead.
  /// Allocation happens before any entry is written: on ENOMEM no entry
  /// changed (empty nodes it created may remain until freed).
  /// Locking: takes each target node's lock in turn; none held on return.
  /// Errors: EINVAL (unaligned, empty, bad level), EOVERFLOW, ERANGE, ENOMEM.
  template <class F>
  errc populate(va_t start, va_t end, unsigned leaf_level, F&& make_entry) {
    if (leaf_level > 2 || leaf_level > top_) return errc::inval;
    if (errc r = check_range(start, end, entry_span(leaf_level)); r != errc::ok) return r;
    const std::uint64_t node_span = entry_span(leaf_level + 1);
    std::vector<node*> nodes;
    for (va_t va = start; va < end; va = align_down(va, node_span) + node_span) {
      auto n = pin(va, leaf_level, &split_entry);
      if (!n) {
        for (node* p : nodes) unpin(p);
        return n.error();
      }
      nodes.push_back(*n);
    }
    epoch::guard g;
    for (node* n : nodes) {
      const va_t lo = std::max(start, n->base);
      const va_t hi = std::min(end, n->base + n->span());
      {
        lock_guard lk(n->lock);
        for (va_t va = lo; va < hi; va += entry_span(leaf_level)) {
          const unsigned idx = entry_index(va, leaf_level);
          const std::uint64_t e = make_entry(va);
          const std::uint64_t cur = n->entries[idx].load(std::memory_order_relaxed);
          if (is_link(cur)) replace_table_locked(*n, idx, e);
          else set_leaf_locked(*n, idx, e);
        }
      }
      unpin(n);
    }
    return errc::ok;
  }

  /// Clear [start, end) (4K aligned). `on_clear(va, old_entry, level)` runs
  /// for each nonzero leaf cleared, under that node's lock (it must not take
  /// page-table locks). Appends the VA ranges that need a TLB invalidation to
  /// `flush` (merged when adjacent). Frees nodes that become empty.
  /// Locking: takes node locks; none held on entry or return. May run inside
  /// a notifier callback.
  /// Errors: EINVAL/EOVERFLOW/ERANGE (nothing changed); ENOMEM if a needed
  /// split could not allocate (split_huge only; that huge leaf stays whole).
  template <class F>
  errc zap(va_t start, va_t end, std::vector<va_range>& flush, F&& on_clear, zap_options o = {}) {
    if (errc r = check_range(start, end, page_size); r != errc::ok) return r;
    epoch::guard g;
    zap_ctx<F> c{flush, on_clear, o, errc::ok};
    zap_node(root_, start, end, c);
    return c.err;
  }
  /// zap() without a per-entry callback.
  errc zap(va_t start, va_t end, std::vector<va_range>& flush, zap_options o = {}) {
    return zap(start, end, flush, [](va_t, std::uint64_t, unsigned) {}, o);
  }

  /// The split function the table uses, exposed for drivers calling pin().
  static std::uint64_t split_entry(std::uint64_t e, unsigned level, unsigned index) noexcept {
    return E::split(e, level, index);
  }

 private:
  template <class F>
  struct zap_ctx {
    std::vector<va_range>& flush;
    F& on_clear;
    zap_options opts;
    errc err;
  };

  static void add_flush(std::vector<va_range>& f, va_t s, va_t e) {
    if (!f.empty() && f.back().end == s) f.back().end = e;
    else f.push_back({s, e});
  }

  // Replace the link at n.entries[idx] by leaf `e`.
  void replace_table_locked(node& n, unsigned idx, std::uint64_t e) SVM_REQUIRES(n.lock) {
    node* c = link_target(n.entries[idx].load(std::memory_order_relaxed));
    {
      lock_guard lc(c->lock);
      if (c->level == 0 && c->pins.load(std::memory_order_seq_cst) == 0) {
        c->dead = true;
        // seq_cst: the unlink half of the epoch protocol (epoch.h).
        n.entries[idx].store(e, std::memory_order_seq_cst);
        n.add_links_locked(-1);
        if (e) n.add_leaves_locked(1);
      } else {
        fill_split_locked(*c, e, n.level);
        return;
      }
    }
    retire(c);
  }

  // Write the split of huge leaf `e` (at `level`) into table c, recursively.
  void fill_split_locked(node& c, std::uint64_t e, unsigned level) SVM_REQUIRES(c.lock) {
    for (unsigned i = 0; i < entries_per_node; ++i) {
      const std::uint64_t sub = e ? E::split(e, level, i) : 0;
      const std::uint64_t cur = c.entries[i].load(std::memory_order_relaxed);
      if (is_link(cur)) {
        node* g = link_target(cur);
        lock_guard lg(g->lock);
        fill_split_locked(*g, sub, c.level);
      } else {
        set_leaf_locked(c, i, sub);
      }
    }
  }

  // Returns false if n turned out dead (the caller reloads its slot).
  template <class F>
  bool zap_node(node* n, va_t s, va_t e, zap_ctx<F>& c) {
    const unsigned l = n->level;
    const std::uint64_t span = entry_span(l);
    if (l == 0) {
      va_t lo = e, hi = s;  // the span of what was cleared
      {
        lock_guard lk(n->lock);
        if (n->dead) return false;
        for (va_t va = s; va < e; va += span) {
          const unsigned idx = entry_index(va, 0);
          const std::uint64_t old = n->entries[idx].load(std::memory_order_relaxed);
          if (old == 0 || (old & c.opts.match_mask) != c.opts.match_value) continue;
          set_leaf_locked(*n, idx, 0);
          c.on_clear(va, old, 0u);
          lo = std::min(lo, va);
          hi = va + span;
        }
        if (c.opts.bump_seq) n->bump_seq_locked(entry_index(s, 0), entry_index(e - 1, 0));
      }
      if (lo < hi) add_flush(c.flush, lo, hi);
      free_if_empty(n);
      return true;
    }
    bool bumped = false;
    for (va_t slot = align_down(s, span); slot < e; slot += span) {
      const va_t a = std::max(s, slot), b = std::min(e, slot + span);
      const unsigned idx = entry_index(slot, l);
      for (;;) {
        const std::uint64_t ent = n->entries[idx].load(std::memory_order_seq_cst);  // epoch protocol
        if (is_link(ent)) {
          node* child = link_target(ent);
          if (zap_node(child, a, b, c)) break;
          continue;  // child died under us: reload the slot
        }
        if (ent == 0) {
          if (c.opts.bump_seq && !bumped) {
            lock_guard lk(n->lock);
            if (n->dead) return false;
            if (n->entries[idx].load(std::memory_order_relaxed) != 0) continue;
            // One advance for the whole walk here: it covers all of [s, e).
            n->bump_seq_locked(entry_index(s, l), entry_index(e - 1, l));
            bumped = true;
          }
          break;
        }
        if ((ent & c.opts.match_mask) != c.opts.match_value) break;  // not ours to clear
        const bool whole = (a == slot && b == slot + span) || !c.opts.split_huge;
        if (whole) {
          lock_guard lk(n->lock);
          if (n->dead) return false;
          if (n->entries[idx].load(std::memory_order_relaxed) != ent) continue;
          set_leaf_locked(*n, idx, 0);
          c.on_clear(slot, ent, l);
          if (c.opts.bump_seq) n->bump_seq_locked(idx, idx);
          add_flush(c.flush, slot, slot + span);
          break;
        }
        // Partly covered huge leaf: split it into a child table, then zap
        // the covered part of the child on the next turn of the loop.
        node* child = alloc_node(l - 1, slot, n);
        if (!child) {
          c.err = errc::nomem;
          break;
        }
        bool installed = false;
        {
          lock_guard lk(n->lock);
          if (n->dead) {
            free_unpublished(child);
            return false;
          }
          if (n->entries[idx].load(std::memory_order_relaxed) == ent) {
            install_child_locked(*n, idx, child, ent, &split_entry);
            installed = true;
          }
        }
        if (!installed) free_unpublished(child);
      }
    }
    free_if_empty(n);
    return true;
  }
};

}  // namespace svm::pt
