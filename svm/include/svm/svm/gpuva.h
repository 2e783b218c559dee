// The GPU VA mapping tree of VM_BIND (after the kernel's drm_gpuvm): which
// BO range backs which GPU VA range, with split/merge planning.
//
// A VM_BIND map or unmap is two steps (docs/contracts.md §4):
//   1. plan_map() / plan_unmap() validate the request and compute the list
//      of steps (the kernel's drm_gpuvm_sm_map / sm_unmap ops). Every
//      allocation happens here: the ops, the new mapping nodes, the room to
//      park the removed ones. An error leaves the tree unchanged, and so does
//      dropping a plan without committing it.
//   2. commit() applies the steps. It allocates nothing and cannot fail; a
//      visitor sees each step right after it is applied, so the driver can
//      clear and write PTEs per step. The removed nodes stay alive inside the
//      plan until the plan is destroyed, so the visitor (and anything the
//      driver queued) may still read them; destroy the plan after dropping
//      the VM lock to keep the frees out of the critical section.
//
// The steps, for a request [va, va + size):
//   - unmap: an existing mapping entirely inside the request goes away;
//   - remap: an existing mapping that sticks out of the request on one or
//     both sides is replaced by its remaining pieces `prev` ([start, va)) and
//     `next` ([va + size, end)), which keep their BO and BO offsets;
//   - map (plan_map only, always last): the new mapping.
// They come in address order: [merged left neighbour unmap], the
// overlapped mappings, [merged right neighbour unmap], map.
//
// Merging (optional, gpuva_tree_options::merge, on by default): a new
// mapping absorbs a neighbour - an untouched mapping that ends exactly at va
// or starts exactly at va + size, or the `prev`/`next` piece of a remap -
// when it has the same BO and flags and is contiguous in BO offset. The
// absorbed neighbour is removed (an unmap step flagged `merged`, or a remap
// that loses that piece) and the map step's node covers the union. PTE work
// never grows with merging: a merged neighbour's translation does not
// change, so its clear_range() is empty and the map step's write_range() is
// just the request. With merging on, the tree never holds two adjacent
// mergeable mappings. The kernel's drm_gpuvm does not merge (it only passes
// a `keep` hint); we do because it keeps repeated adjacent binds of one BO
// (a sparse-residency pattern) from fragmenting the tree. Unmap never merges
// (it cannot create new adjacencies).
//
// Thread safety: the tree is protected by its VM's lock (gpu_vm::lock_,
// an svm::shared_mutex of rank vm), which the tree references and asserts in
// debug builds (it cannot tell shared from exclusive, so it asserts "held"):
//   - lookups and iteration: the VM lock held, shared or exclusive;
//   - plan_map / plan_unmap / commit: the VM lock held EXCLUSIVELY, from the
//     plan until its commit (or until the plan is dropped). commit() checks
//     that the tree did not change since the plan (a generation counter) and
//     aborts otherwise: that is a locking bug in the caller.
// The gpu_vm should declare its tree SVM_GUARDED_BY(lock_) so that clang checks
// its accesses statically.
#pragma once

#include <concepts>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include <boost/intrusive/set.hpp>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"

namespace svm {

/// An opaque BO handle; the tree only compares handles.
using bo_handle = std::uint64_t;
/// Mapping flags (read-only, caching...), opaque to the tree except that
/// mappings merge only when their flags are equal.
using gpuva_flags = std::uint32_t;

/// One BO mapping (struct drm_gpuva): GPU VA [start, end), 4K aligned, backed
/// by `bo` from `bo_offset`. Immutable once created: a split replaces the
/// node, so a pointer to a mapping stays valid (and its fields stay the same)
/// until the plan that removes it is destroyed.
class gpuva {
 public:
  /// The GPU VA range [start, end) this mapping covers.
  [[nodiscard]] va_range range() const noexcept { return range_; }
  /// First GPU VA of the mapping (inclusive, 4K aligned).
  [[nodiscard]] va_t start() const noexcept { return range_.start; }
  /// One past the last GPU VA of the mapping (exclusive, 4K aligned).
  [[nodiscard]] va_t end() const noexcept { return range_.end; }
  /// Length of the mapping in bytes (end - start).
  [[nodiscard]] std::uint64_t size() const noexcept { return range_.size(); }
  /// The BO that backs the mapping.
  [[nodiscard]] bo_handle bo() const noexcept { return bo_; }
  /// The BO offset, in bytes, that backs start().
  [[nodiscard]] std::uint64_t bo_offset() const noexcept { return offset_; }
  /// The mapping's flags, as given in the map request.
  [[nodiscard]] gpuva_flags flags() const noexcept { return flags_; }
  /// The BO offset that backs GPU VA `va` (precondition: range().contains(va)).
  [[nodiscard]] std::uint64_t bo_offset_at(va_t va) const noexcept { return offset_ + (va - range_.start); }

  /// Makes a mapping of GPU VA `r` backed by `bo` from BO offset `offset`;
  /// nodes are created by gpuva_tree's planning, not by drivers.
  gpuva(va_range r, bo_handle bo, std::uint64_t offset, gpuva_flags flags) noexcept
      : range_(r), bo_(bo), offset_(offset), flags_(flags) {}
  gpuva(const gpuva&) = delete;
  gpuva& operator=(const gpuva&) = delete;

 private:
  friend class gpuva_tree;
  const va_range range_;
  const bo_handle bo_;
  const std::uint64_t offset_;
  const gpuva_flags flags_;
  /// Membership of gpuva_tree::by_va_ (the VA rb-tree) and by_bo_ (the
  /// per-BO index): changed only by gpuva_tree::commit(), under the VM lock
  /// held exclusively.
  boost::intrusive::set_member_hook<> va_hook_;
  boost::intrusive::set_member_hook<> bo_hook_;

 public:
  /// Boost.Intrusive hook option selecting va_hook_ (for the VA rb-tree).
  using va_hook_t = boost::intrusive::member_hook<gpuva, boost::intrusive::set_member_hook<>, &gpuva::va_hook_>;
  /// Boost.Intrusive hook option selecting bo_hook_ (for the per-BO index).
  using bo_hook_t = boost::intrusive::member_hook<gpuva, boost::intrusive::set_member_hook<>, &gpuva::bo_hook_>;
};

/// The kind of a plan step: add a mapping, split one, or remove one.
enum class gpuva_op_kind : std::uint8_t { map, remap, unmap };
/// The step kind's name ("map", "remap", "unmap").
[[nodiscard]] const char* to_string(gpuva_op_kind k) noexcept;

/// One step of a plan (struct drm_gpuva_op).
struct gpuva_op {
  /// What this step does; says which of the pointers below are set.
  gpuva_op_kind kind = gpuva_op_kind::map;
  /// unmap, remap: the mapping removed.
  const gpuva* old = nullptr;
  /// remap: the piece of `old` that stays before the request, [start, va)
  /// (a new node; null if none, but `prev` and `next` are never both null).
  const gpuva* prev = nullptr;
  /// remap: the piece of `old` that stays after the request, [va + size, end)
  /// (a new node; null if none, but `prev` and `next` are never both null).
  const gpuva* next = nullptr;
  /// map: the new mapping (possibly extended over merged neighbours).
  const gpuva* map = nullptr;
  /// unmap: `old` was a neighbour absorbed by the new mapping; its
  /// translation does not change.
  bool merged = false;
  /// The request range of the plan this step belongs to.
  va_range req;

  /// The GPU VA whose PTEs this step must clear: old ∩ request (empty for a
  /// merged neighbour and for map). The kernel's
  /// drm_gpuva_op_remap_to_unmap_range, generalised.
  [[nodiscard]] va_range clear_range() const noexcept;
  /// The GPU VA whose PTEs this step must write: the request for map (a
  /// merged neighbour keeps its PTEs, which already translate the same),
  /// empty otherwise.
  [[nodiscard]] va_range write_range() const noexcept;
};

/// A driver's per-step callbacks (struct drm_gpuvm_ops sm_step_*). Called by
/// commit() right after each step is applied, with the VM lock held
/// exclusively; they must not fail, allocate or take the VM lock. Whatever
/// can fail (page-table node allocation) belongs at plan time, by iterating
/// gpuva_plan::ops() before committing.
class gpuva_ops_visitor {
 public:
  virtual ~gpuva_ops_visitor() = default;
  /// Called after a map step: `op.map` is now in the tree.
  virtual void sm_step_map(const gpuva_op& op) noexcept = 0;
  /// Called after a remap step: `op.old` is replaced by `op.prev`/`op.next`.
  virtual void sm_step_remap(const gpuva_op& op) noexcept = 0;
  /// Called after an unmap step: `op.old` is no longer in the tree.
  virtual void sm_step_unmap(const gpuva_op& op) noexcept = 0;
};
/// Dispatch `op` to the matching callback of `v`.
void visit(const gpuva_op& op, gpuva_ops_visitor& v) noexcept;

class gpuva_tree;

/// A planned VM_BIND map or unmap (the kernel's drm_gpuva_ops list plus the
/// preallocated nodes). Move-only. Dropping it uncommitted changes nothing;
/// dropping it committed frees the mappings it removed.
class gpuva_plan {
 public:
  gpuva_plan() = default;
  /// Takes over another plan's steps and nodes.
  gpuva_plan(gpuva_plan&&) noexcept = default;
  /// Takes over another plan's steps and nodes; this plan's own are dropped
  /// (freeing its removed mappings if it was committed).
  gpuva_plan& operator=(gpuva_plan&&) noexcept = default;
  gpuva_plan(const gpuva_plan&) = delete;
  gpuva_plan& operator=(const gpuva_plan&) = delete;
  ~gpuva_plan() = default;

  /// The planned steps, in the order commit() applies them.
  [[nodiscard]] std::span<const gpuva_op> ops() const noexcept { return ops_; }
  /// True if the plan has no steps (e.g. an unmap of an unmapped range).
  [[nodiscard]] bool empty() const noexcept { return ops_.empty(); }
  /// True once gpuva_tree::commit() has applied this plan.
  [[nodiscard]] bool committed() const noexcept { return committed_; }
  /// The request range.
  [[nodiscard]] va_range range() const noexcept { return req_; }

 private:
  friend class gpuva_tree;
  const gpuva_tree* tree_ = nullptr;
  std::uint64_t gen_ = 0;  ///< the tree's generation when planned
  bool committed_ = false;
  va_range req_;
  std::vector<gpuva_op> ops_;
  /// Nodes created by the plan; ownership passes to the tree at commit.
  std::vector<std::unique_ptr<gpuva>> new_nodes_;
  /// Nodes removed by commit (capacity reserved at plan time).
  std::vector<std::unique_ptr<gpuva>> removed_;
};

/// A VM_BIND map request (the drm_gpuvm_map_req of the kernel, plus the BO
/// size for the bounds check).
struct gpuva_map_req {
  va_t va = 0;                 ///< first GPU VA to map (4K aligned)
  std::uint64_t size = 0;      ///< bytes to map (non-zero, 4K aligned)
  bo_handle bo = 0;            ///< the BO that backs the mapping
  std::uint64_t bo_offset = 0; ///< BO offset, in bytes, that backs `va` (4K aligned)
  std::uint64_t bo_size = 0;  ///< the BO's size: bo_offset + size must not exceed it
  gpuva_flags flags = 0;       ///< the new mapping's flags
};

/// The hook for the BO check that the tree cannot do itself: tell unknown
/// BOs apart (errc::noent) and give the size of known ones.
class gpuva_bo_resolver {
 public:
  virtual ~gpuva_bo_resolver() = default;
  /// Locking: called by plan_map with the VM lock held exclusively; must not
  /// take it.
  [[nodiscard]] virtual result<std::uint64_t> bo_size(bo_handle bo) const = 0;
};

/// Construction-time settings of a gpuva_tree.
struct gpuva_tree_options {
  /// The GPU VA the tree manages (drm_gpuvm's mm_start/mm_range); requests
  /// outside it are -EINVAL.
  va_range managed{0, std::uint64_t{1} << 48};
  /// Merge a new mapping with contiguous neighbours (see the file comment).
  bool merge = true;
};

/// The mapping tree: a Boost.Intrusive rb-tree by start address, plus a
/// per-BO index (ordered by BO, then address) for eviction and BO teardown.
/// No allocation on lookups or at commit.
///
/// Locking: see the file comment. Every function asserts the VM lock held
/// in debug builds. None blocks. None may run inside a notifier callback
/// (the VM lock is outside mmap_lock).
class gpuva_tree {
 public:
  /// Makes an empty tree guarded by `vm_lock` (the owning VM's lock, which
  /// must outlive the tree).
  explicit gpuva_tree(const shared_mutex& vm_lock, gpuva_tree_options opts = {});
  /// Frees every mapping. The caller guarantees no plan of this tree is
  /// still to be committed.
  ~gpuva_tree();
  gpuva_tree(const gpuva_tree&) = delete;
  gpuva_tree& operator=(const gpuva_tree&) = delete;

  // --- lookups ----------------------------------------------------------------
  // Locking: the VM lock held, shared is enough; no allocation; never blocks.
  /// The mapping containing `va`, or null.
  [[nodiscard]] const gpuva* find(va_t va) const;
  /// The first mapping (by address) overlapping `r`, or null.
  [[nodiscard]] const gpuva* first_overlap(va_range r) const;
  /// The mapping after `v` in address order, or null.
  [[nodiscard]] const gpuva* next(const gpuva& v) const;
  /// Calls f(const gpuva&) for each mapping overlapping `r`, in address order.
  template <class F>
  void for_each_overlap(va_range r, F&& f) const {
    for (const gpuva* v = first_overlap(r); v != nullptr && v->start() < r.end; v = next(*v)) f(*v);
  }
  /// Calls f(const gpuva&) for each mapping, in address order.
  template <class F>
  void for_each(F&& f) const {
    assert_locked();
    for (const gpuva& v : by_va_) f(v);
  }
  /// Calls f(const gpuva&) for each mapping of `bo`, in address order
  /// (drm_gpuvm_bo_for_each_va).
  template <class F>
  void for_each_bo_mapping(bo_handle bo, F&& f) const {
    assert_locked();
    for (auto it = by_bo_.lower_bound(bo_key{bo, 0}); it != by_bo_.end() && it->bo() == bo; ++it) f(*it);
  }
  /// True if no mapping overlaps `r`.
  [[nodiscard]] bool is_free(va_range r) const { return first_overlap(r) == nullptr; }
  /// The number of mappings in the tree.
  [[nodiscard]] std::size_t size() const;
  /// True if the tree holds no mapping.
  [[nodiscard]] bool empty() const { return size() == 0; }
  /// The options the tree was built with.
  [[nodiscard]] const gpuva_tree_options& options() const noexcept { return opts_; }

  // --- VM_BIND --------------------------------------------------------------
  // Locking: the VM lock held exclusively from plan_* to commit (or to dropping
  // the plan). plan_* allocate; commit does not. Neither blocks.
  /// Plan a map of `req`. Errors, with the tree unchanged: zero size or
  /// unaligned va/size/bo_offset -> inval; va + size overflows -> overflow;
  /// outside options().managed -> inval; bo_offset + size past bo_size (or
  /// overflowing) -> inval; out of memory -> nomem.
  [[nodiscard]] result<gpuva_plan> plan_map(const gpuva_map_req& req);
  /// The same, asking `bos` for the BO's size: unknown BO -> its error
  /// (noent), checked after the range checks.
  [[nodiscard]] result<gpuva_plan> plan_map(va_t va, std::uint64_t size, bo_handle bo,
                                            std::uint64_t bo_offset, gpuva_flags flags,
                                            const gpuva_bo_resolver& bos);
  /// Plan an unmap of [va, va + size): whole mappings inside go, the edges
  /// are trimmed, holes are fine (an empty plan if nothing is mapped).
  /// Errors as for plan_map's range checks, with the tree unchanged.
  [[nodiscard]] result<gpuva_plan> plan_unmap(va_t va, std::uint64_t size);

  /// Apply `plan`. Allocates nothing, cannot fail. Precondition (checked,
  /// abort on violation): the plan came from this tree, was not committed,
  /// and the tree has not changed since it was made.
  void commit(gpuva_plan& plan) { commit_impl(plan, nullptr, nullptr); }
  /// The same, calling the visitor's sm_step_* after each step.
  void commit(gpuva_plan& plan, gpuva_ops_visitor& v) {
    commit_impl(plan, [](void* vv, const gpuva_op& op) noexcept {
      visit(op, *static_cast<gpuva_ops_visitor*>(vv));
    }, &v);
  }
  /// The same, calling f(const gpuva_op&) (which must not throw) after each step.
  template <class F>
    requires std::invocable<F&, const gpuva_op&>
  void commit(gpuva_plan& plan, F&& f) {
    commit_impl(plan, [](void* ff, const gpuva_op& op) noexcept { (*static_cast<std::remove_reference_t<F>*>(ff))(op); },
                const_cast<void*>(static_cast<const void*>(&f)));
  }

  /// Structural self-check for tests: ordered, non-overlapping, aligned,
  /// inside the managed range, the BO index matching, and (with merge on) no
  /// two adjacent mergeable mappings. Returns false on the first violation.
  [[nodiscard]] bool check_invariants() const;

 private:
  struct va_key {
    using type = va_t;
    type operator()(const gpuva& v) const noexcept { return v.start(); }
  };
  using bo_key = std::pair<bo_handle, va_t>;
  struct bo_key_of {
    using type = bo_key;
    type operator()(const gpuva& v) const noexcept { return {v.bo(), v.start()}; }
  };
  using va_set = boost::intrusive::set<gpuva, gpuva::va_hook_t, boost::intrusive::key_of_value<va_key>,
                                       boost::intrusive::constant_time_size<true>>;
  using bo_set = boost::intrusive::set<gpuva, gpuva::bo_hook_t, boost::intrusive::key_of_value<bo_key_of>,
                                       boost::intrusive::constant_time_size<false>>;
  using step_fn = void (*)(void*, const gpuva_op&) noexcept;

  void assert_locked() const;
  errc check_range(va_t va, std::uint64_t size) const;
  gpuva_plan new_plan(va_range req) const;
  void plan_overlaps(gpuva_plan& p, va_range req, bool merge_left, bool merge_right) const;
  void commit_impl(gpuva_plan& plan, step_fn fn, void* arg);
  void link(gpuva* v);
  void unlink(gpuva* v);

  const shared_mutex& vm_lock_;     // immutable; guards everything below
  const gpuva_tree_options opts_;  // immutable
  va_set by_va_;                   // VM lock
  bo_set by_bo_;                   // VM lock
  std::uint64_t gen_ = 0;          // VM lock; bumped by every commit
};

}  // namespace svm
