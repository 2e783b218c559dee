// Private parts of svm::mm shared by mm.cpp and hmm.cpp.
#pragma once

#include <atomic>
#include <memory>
#include <utility>
#include <vector>

#include <boost/intrusive/set.hpp>

#include "svm/base/epoch.h"
#include "svm/notifier/migrate.h"
#include "svm/notifier/mm.h"

namespace svm {

/// Valid bits of prot and map (system-call argument checks).
inline constexpr std::uint32_t prot_bits = 7;
inline constexpr std::uint32_t map_bits = 63;

/// One VMA (kernel: struct vm_area_struct).
/// Protection: every field is guarded by the owning mm's mmap_lock (changed
/// only with it held exclusively). `hook` is a member of mm::vma_tree::set,
/// membership guarded by the same lock.
struct mm::vma {
  boost::intrusive::set_member_hook<boost::intrusive::link_mode<boost::intrusive::safe_link>> hook;
  va_t start = 0, end = 0;
  prot protection = prot::none;
  vma_kind kind = vma_kind::anonymous;
  bool shared = false;
  huge_advice advice = huge_advice::none;
  std::shared_ptr<svm::file> backing;
  std::uint64_t pgoff = 0;
  bool account = false;  ///< VM_ACCOUNT
  /// Identity of the VMA's anon_vma (0: none yet). Set once, from 0, by the
  /// first fault that gives the VMA an anonymous page (anon_vma_prepare),
  /// which runs under mmap_lock shared: hence atomic (relaxed: the value is
  /// an identity only, read for merging and fork under mmap_lock exclusive).
  std::atomic<std::uint64_t> anon_vma{0};

  vma() = default;
  /// A copy that is not in any tree (split, fork, mremap).
  vma(const vma& o)
      : start(o.start), end(o.end), protection(o.protection), kind(o.kind), shared(o.shared), advice(o.advice),
        backing(o.backing), pgoff(o.pgoff), account(o.account),
        anon_vma(o.anon_vma.load(std::memory_order_relaxed)) {}
  vma& operator=(const vma&) = delete;

  [[nodiscard]] bool readable() const noexcept { return any(protection & prot::read); }
  [[nodiscard]] bool writable() const noexcept { return any(protection & prot::write); }
  [[nodiscard]] bool accessible() const noexcept { return any(protection & (prot::read | prot::write)); }
  [[nodiscard]] bool private_anon() const noexcept { return kind == vma_kind::anonymous && !shared; }
  [[nodiscard]] vma_info info() const {
    return {start, end, protection, kind, shared, advice, backing, pgoff,
            anon_vma.load(std::memory_order_relaxed) != 0, account};
  }
};

struct mm::vma_by_start {
  bool operator()(const vma& a, const vma& b) const noexcept { return a.start < b.start; }
};

struct mm::vma_tree {
  using set_t = boost::intrusive::set<
      vma, boost::intrusive::member_hook<vma, decltype(vma::hook), &vma::hook>,
      boost::intrusive::compare<vma_by_start>>;
  set_t set;
  ~vma_tree() { set.clear_and_dispose([](vma* v) { delete v; }); }
};

/// Frames and swap slots whose references drop after invalidate_range_end.
struct mm::pending_free {
  std::vector<std::pair<unsigned, pfn_t>> frames;  ///< (pool, pfn)
  std::vector<std::uint64_t> swap_slots;
};

/// Swap space shared by a fork family: slots of page_size bytes with a
/// reference count (each swap PTE holds one).
/// Thread safety: every member takes the swap lock (rank leaf).
class swap_space {
 public:
  explicit swap_space(std::size_t capacity) : capacity_(capacity) {}
  /// Copy a frame out into a new slot (refcount 1). ENOMEM when full.
  [[nodiscard]] result<std::uint64_t> store(const std::byte* frame);
  /// Copy a slot's bytes into a frame.
  void load(std::uint64_t slot, std::byte* frame);
  void get(std::uint64_t slot);
  void put(std::uint64_t slot);
  [[nodiscard]] std::uint32_t refs(std::uint64_t slot) const;
  [[nodiscard]] std::size_t used() const;

 private:
  static constexpr lock_class lock_class_{"swap_space", lockdep::rank::leaf};
  struct slot {
    std::uint32_t refs = 0;
    std::unique_ptr<std::byte[]> data;
  };
  const std::size_t capacity_;
  mutable mutex lock_{lock_class_};
  std::vector<slot> slots_ SVM_GUARDED_BY(lock_);
  std::vector<std::uint64_t> free_ SVM_GUARDED_BY(lock_);
  std::size_t used_ SVM_GUARDED_BY(lock_) = 0;
};

/// The mm's internal operations (a friend; keeps the public header small).
struct mm_impl {
  using vma = mm::vma;
  using pending_free = mm::pending_free;
  static const vma* find_vma(const mm& m, va_t va) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static vma* find_vma_mut(mm& m, va_t va) SVM_REQUIRES(m.mmap_lock_);
  /// The first VMA that ends above `start` (or nullptr).
  static vma* first_ending_after(const mm& m, va_t start) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static vma* next_vma(const mm& m, vma* v) SVM_REQUIRES_SHARED(m.mmap_lock_);
  /// Make sure no VMA straddles `va` (kernel: split_vma).
  static void split_at(mm& m, va_t va) SVM_REQUIRES(m.mmap_lock_);
  /// Whether `b` may be merged onto the end of `a` (adjacent, same flags,
  /// same backing with contiguous offsets, compatible anon_vma; kernel:
  /// can_vma_merge_after / is_mergeable_anon_vma).
  static bool mergeable(const vma& a, const vma& b) noexcept;
  /// Merge every compatible adjacent pair among the VMAs that touch
  /// [lo, hi] (the changed range and its neighbours; kernel: vma_merge).
  static void merge_around(mm& m, va_t lo, va_t hi) SVM_REQUIRES(m.mmap_lock_);
  /// A fresh anon_vma identity.
  static std::uint64_t new_anon_vma() noexcept;
  /// Give `v` an anon_vma if it has none (kernel: anon_vma_prepare).
  static void anon_vma_prepare(const vma& v) noexcept;
  static bool range_free(const mm& m, va_t start, va_t end) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static result<va_t> get_unmapped_area(const mm& m, std::uint64_t len) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static void insert_vma(mm& m, vma* v) SVM_REQUIRES(m.mmap_lock_);
  static void erase_vma(mm& m, vma* v) SVM_REQUIRES(m.mmap_lock_);
  /// Move VMA `v` and its PTEs to `target` as a VMA of `new_len` bytes
  /// (kernel: move_vma / copy_vma); `v` is freed. The caller raised UNMAP
  /// over the old range.
  static void move_vma(mm& m, vma* v, va_t target, std::uint64_t new_len) SVM_REQUIRES(m.mmap_lock_);
  /// MREMAP_DONTUNMAP of [lo, hi), which lies in one VMA, to `to` (free):
  /// the PTEs move into a copy of that part of the VMA, merged at its new
  /// place; the source VMA stays whole and unmerged, and drops its anon_vma
  /// only when all of it moved. The caller raised UNMAP over [lo, hi).
  static void move_range_keep(mm& m, va_t lo, va_t hi, va_t to) SVM_REQUIRES(m.mmap_lock_);

  static void collect(const mm& m, pending_free& f, std::uint64_t e, unsigned level);
  static void release(const mm& m, pending_free& f);
  /// Clear the PTEs of [start, end), collecting the references to drop.
  /// Zap [start, end) and collect what it held into `f`. Slots whose 4K
  /// entries it emptied keep an empty page table (mm::empty_tables_); with
  /// `reclaim_tables` (MADV_DONTNEED of 2M or more) the tables left with no
  /// entry are reclaimed instead.
  static void zap_range(mm& m, va_t start, va_t end, pending_free& f, bool reclaim_tables = false);
  static cpu_page_table& page_table(mm& m) noexcept { return m.pt_; }
  /// Note that 4K entries of these 2M slots were emptied (their table stays).
  static void keep_tables(mm& m, const std::vector<va_t>& slots);
  /// munmap's free_pgtables: forget the empty tables of the slots of
  /// [start, end) that no VMA touches any more.
  static void free_tables(mm& m, va_t start, va_t end) SVM_REQUIRES(m.mmap_lock_);
  /// Whether Linux would have a 4K page table at `slot` with no entry in it.
  static bool empty_table(const mm& m, va_t slot);
  static errc do_munmap(mm& m, va_t start, va_t end) SVM_REQUIRES(m.mmap_lock_);
  static void split_huge(mm& m, va_t start, va_t end);
  /// fn(va, entry, level) -> new entry, for each nonzero leaf in [start,
  /// end), under that leaf's node lock. Partly covered huge leaves are split.
  template <class F>
  static errc walk_locked(mm& m, va_t start, va_t end, F&& fn);
  /// Replace the 4K entry at `va` by `ne` if it still is `expect`.
  static result<bool> install_pte(mm& m, va_t va, std::uint64_t expect, std::uint64_t ne);
  /// A PTE read under its node lock, with a reference taken on the frame
  /// (4K entries) or swap slot it names.
  struct pte_snap {
    std::uint64_t e = 0;
    unsigned level = 0;
    bool ref = false;
  };
  static pte_snap read_pte_get(mm& m, va_t va);
  static void put_snap(mm& m, const pte_snap& s);
  static errc fault_once(mm& m, const vma& v, va_t va, bool write) SVM_REQUIRES_SHARED(m.mmap_lock_);
  template <class Op>
  static errc access(mm& m, va_t va, bool write, Op&& op) SVM_REQUIRES_SHARED(m.mmap_lock_);
  /// The entry a migration entry replaced (device-private for a
  /// device-private pool, present otherwise), with its write bit.
  static std::uint64_t unmigrate(const mm& m, std::uint64_t e) noexcept;
  /// migrate_vma's three steps (mm_migrate.cpp).
  static errc migrate_setup(mm& m, migrate_vma& a) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static errc migrate_pages(mm& m, migrate_vma& a) SVM_REQUIRES_SHARED(m.mmap_lock_);
  static errc migrate_finalize(mm& m, migrate_vma& a);
  static errc start_fn(mm& m, mmu_notifier_range& r, mmu_notifier_event ev, va_t s, va_t e,
                    const void* owner = nullptr, bool blockable = true);
  static void end_fn(mm& m, mmu_notifier_range& r);
};

// ---- walk_locked (used by mprotect, fork, reclaim, migrate) ----

template <class F>
inline errc mm_impl::walk_locked(mm& m, va_t start, va_t end, F&& fn) {
  va_t va = start;
  while (va < end) {
    epoch::guard g;
    pt::node* n = m.pt_.find_node(va, 0);
    const unsigned l = n->level;
    const unsigned idx = pt::entry_index(va, l);
    const std::uint64_t span = pt::entry_span(l);
    const std::uint64_t e = n->entries[idx].load(std::memory_order_acquire);
    if (pt::is_link(e)) continue;  // a child appeared: look again
    if (e == 0 && l > 0) {
      va = align_down(va, span) + span;
      continue;
    }
    if (l >= 2) {  // the model never maps 1G leaves
      va = align_down(va, span) + span;
      continue;
    }
    if (l == 1) {
      const va_t slot = align_down(va, huge_size);
      if (slot < start || slot + huge_size > end) {
        auto p = m.pt_.pin(va, 0, &cpu_page_table::split_entry);
        if (!p) return p.error();
        m.pt_.unpin(*p);
        continue;
      }
      bool retry = false;
      {
        lock_guard lk(n->lock);
        if (n->dead || n->entries[idx].load(std::memory_order_relaxed) != e) {
          retry = true;
        } else {
          const std::uint64_t ne = fn(slot, e, 1u);
          if (ne != e) m.pt_.set_leaf_locked(*n, idx, ne);
        }
      }
      if (!retry) va = slot + huge_size;
      continue;
    }
    const va_t node_end = std::min(end, n->base + n->span());
    bool dead = false;
    {
      lock_guard lk(n->lock);
      if (n->dead) {
        dead = true;
      } else {
        for (va_t a = va; a < node_end; a += page_size) {
          const unsigned i = pt::entry_index(a, 0);
          const std::uint64_t old = n->entries[i].load(std::memory_order_relaxed);
          if (old == 0) continue;
          const std::uint64_t ne = fn(a, old, 0u);
          if (ne != old) m.pt_.set_leaf_locked(*n, i, ne);
        }
      }
    }
    if (dead) continue;
    if (n->valid_count() == 0) m.pt_.free_if_empty(n);
    va = node_end;
  }
  return errc::ok;
}


}  // namespace svm
