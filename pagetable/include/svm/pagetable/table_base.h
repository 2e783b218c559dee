// The encoding-independent core of the radix page table: node allocation,
// pinning, freeing of empty nodes, deferred reclamation and accounting.
// radix_table<E> (svm/pagetable/radix.h) builds the encoding-aware operations
// on top; drivers normally use that.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "svm/base/errc.h"
#include "svm/base/types.h"
#include "svm/pagetable/node.h"

namespace svm::pt {

/// How a table is shaped.
struct options {
  /// 4 levels of 512 entries (48-bit VA) or 5 (57-bit).
  unsigned levels = 4;
};

/// Live accounting, read by walking the tree (O(nodes); no hot-path counters).
struct table_stats {
  std::size_t nodes = 0;            ///< live nodes, the root included
  std::size_t bytes = 0;            ///< bytes of live nodes
  std::size_t leaves_4k = 0;        ///< nonzero level-0 entries
  std::size_t leaves_2m = 0;        ///< nonzero level-1 leaf entries
  std::size_t leaves_1g = 0;        ///< nonzero level-2 leaf entries
  std::size_t nodes_allocated = 0;  ///< ever allocated (the root included)
  std::size_t nodes_reclaimed = 0;  ///< freed after their grace period
  std::size_t nodes_retired = 0;    ///< unlinked, possibly still waiting for walkers
};

/// Test hooks, compiled in always and costing one predictable branch when
/// unset. Set them before concurrent use; they must outlive the table's use.
struct test_hooks {
  /// Called by translate() after it loaded a link to `n` and before it reads
  /// any entry of `n`: a test can park the walker here.
  std::function<void(const node* n)> on_walk_node;
};

/// The encoding-independent part of a radix page table: nodes, pins, range
/// checks, node lifetime (epoch reclamation) and statistics. radix_table<E>
/// adds the walks that need the entry encoding.
class table_base {
 public:
  /// An empty table (the root node only) with `o.levels` levels.
  explicit table_base(options o);
  ~table_base();
  table_base(const table_base&) = delete;
  table_base& operator=(const table_base&) = delete;

  /// Number of levels (4 or 5).
  [[nodiscard]] unsigned levels() const noexcept { return top_ + 1; }
  /// The root's level (levels() - 1).
  [[nodiscard]] unsigned top_level() const noexcept { return top_; }
  /// One past the highest VA the table can map (2^48 or 2^57).
  [[nodiscard]] va_t va_limit() const noexcept { return limit_; }
  /// The root node: never freed while the table lives (a device walks from it).
  [[nodiscard]] node* root() const noexcept { return root_; }

  /// Validate [start, end) for an operation at `align` granularity:
  /// EOVERFLOW if end < start (a wrapped end), EINVAL if empty or unaligned,
  /// ERANGE if end is past va_limit().
  [[nodiscard]] errc check_range(va_t start, va_t end, std::uint64_t align) const noexcept;

  /// Make sure a node at `level` covering `va` exists and pin it, creating
  /// missing nodes on the way and splitting any huge leaf above `level` into
  /// an equivalent table (so translations do not change). `split` produces
  /// the entries of the split; nullptr means a huge leaf on the path is an
  /// error (EEXIST).
  /// Locking: takes and releases node locks along the path one at a time;
  /// holds none on return. Must not be called with node locks held. Does not
  /// block beyond node locks; may run inside a notifier callback.
  /// Errors: ENOMEM (allocation failed; nothing published), EEXIST, EINVAL
  /// (level above the top or va out of range).
  using split_fn = std::uint64_t (*)(std::uint64_t huge, unsigned level, unsigned index) noexcept;
  /// See above: the pinned node, or ENOMEM, EEXIST, EINVAL.
  [[nodiscard]] result<node*> pin(va_t va, unsigned level, split_fn split);

  /// Drop a pin; frees the node (and empty ancestors) if it became empty.
  /// Locking: none held on entry; takes parent and node locks.
  void unpin(node* n);

  /// Lock-free: does any nonzero leaf entry lie in [start, end)? Skips
  /// empty subtrees. Opens an epoch section. A hint under concurrency.
  [[nodiscard]] bool any_leaf(va_t start, va_t end) const noexcept;

  /// Lock-free lookup of the deepest existing node covering `va` at `level`
  /// or above. Caller must be inside an epoch section (svm/base/epoch.h)
  /// and must not use the pointer after leaving it unless it pinned it.
  [[nodiscard]] node* find_node(va_t va, unsigned level) const noexcept;

  /// Write a leaf entry (0 clears) and keep the node's counts.
  /// Locking: requires n.lock. The entry must not be a link.
  void set_leaf_locked(node& n, unsigned idx, std::uint64_t e) SVM_REQUIRES(n.lock);

  /// Free `n` and then its ancestors while they are empty, unpinned and not
  /// the root. Caller must be inside an epoch section.
  /// Locking: none held; takes parent then child.
  void free_if_empty(node* n);

  /// Walk the tree and count nodes, bytes and leaves. Takes no lock (counts
  /// are racy under concurrent change); opens an epoch section.
  [[nodiscard]] table_stats stats() const;

  /// Install test hooks (before concurrent use).
  void set_test_hooks(test_hooks h) { hooks_ = std::move(h); has_hooks_ = bool(hooks_.on_walk_node); }

  /// Fault injection: when set, every node allocation asks it first and
  /// fails with ENOMEM if it returns true. Set before concurrent use.
  void set_alloc_failure(std::function<bool(unsigned level)> f) { alloc_fail_ = std::move(f); }

 protected:
  /// nullptr on failure (real or injected). The node is unpublished.
  node* alloc_node(unsigned level, va_t base, node* parent);
  /// Free a node that was never published.
  void free_unpublished(node* n) noexcept;
  /// Mark-dead-and-unlink already done by the caller: hand to epoch reclaim.
  void retire(node* n) noexcept;
  /// Install a child under parent slot `idx`, converting a huge leaf `old`
  /// (nonzero) into the child's split entries.
  void install_child_locked(node& parent, unsigned idx, node* child, std::uint64_t old, split_fn split)
      SVM_REQUIRES(parent.lock);

  /// Run the on_walk_node hook, if set (a walker calls it per node).
  void walk_hook(const node* n) const {
    if (has_hooks_) [[unlikely]]
      hooks_.on_walk_node(n);
  }

  unsigned top_;  ///< the root's level; immutable
  va_t limit_;    ///< one past the highest mappable VA; immutable
  node* root_;    ///< the root node; immutable, freed by the destructor

 private:
  static void reclaim(void* obj, void* ctx) noexcept;
  void destroy_subtree(node* n) noexcept;

  test_hooks hooks_;
  bool has_hooks_ = false;
  std::function<bool(unsigned)> alloc_fail_;
  // Accounting; relaxed (statistics only, never used for decisions).
  std::atomic<std::size_t> allocated_{0};
  std::atomic<std::size_t> live_{0};
  std::atomic<std::size_t> retired_{0};
  std::atomic<std::size_t> reclaimed_{0};
};

}  // namespace svm::pt
