// fork: copying an address space (kernel: kernel/fork.c, copy_page_range in mm/memory.c).
// See svm/notifier/mm.h for the contracts and mm_impl.h for the internals.
#include <algorithm>
#include <cassert>
#include <cstring>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

result<std::unique_ptr<mm>> mm::fork() {
  lock_guard g(mmap_lock_);
  if (torn_down_) return errc::inval;
  std::unique_ptr<mm> child(new mm(opts_, pools_));
  struct copied {
    va_t va;
    std::uint64_t e;
    unsigned level;
  };
  std::vector<copied> ptes;
  {
    lock_guard cg(child->mmap_lock_);
    for (const vma& v : vmas_->set) {
      auto* c = new vma(v);
      // The child's VMAs get anon_vmas of their own (kernel: anon_vma_fork).
      if (c->anon_vma.load(std::memory_order_relaxed) != 0)
        c->anon_vma.store(mm_impl::new_anon_vma(), std::memory_order_relaxed);
      mm_impl::insert_vma(*child, c);
    }
  }
  // With every mmap_lock writer (mm.h); after the child's mmap_lock, which
  // ranks outside it. Nothing of the parent changed before this point.
  lock_guard rmap_hold(rmap_lock_);
  // Kernel: vma_needs_copy. Only VMAs with anonymous pages (an anon_vma)
  // and PFN maps need their PTEs copied; the child faults the rest in from
  // the page cache or as fresh anonymous memory, so their PTEs are left
  // alone on both sides (shared mappings, never-written private ones).
  auto needs_copy = [](const vma& v) {
    return v.kind == vma_kind::io || v.anon_vma.load(std::memory_order_relaxed) != 0;
  };
  if (!vmas_->set.empty()) {
    const va_t lo = vmas_->set.begin()->start, hi = std::prev(vmas_->set.end())->end;
    mmu_notifier_range r;
    (void)mm_impl::start_fn(*this, r, mmu_notifier_event::protection_page, lo, hi);
    for (const vma& v : vmas_->set) {
      if (!needs_copy(v)) continue;
      const bool cow = !v.shared;
      (void)mm_impl::walk_locked(*this, v.start, v.end, [&](va_t va, std::uint64_t e, unsigned level) {
        // A page under migration stays where it is (cpu_pte.h): the child
        // must not get an entry no finalize would ever replace.
        if (cpu_pte::is_migration(e)) e = mm_impl::unmigrate(*this, e);
        // Device-private entries are copied like present ones: both sides
        // keep the device frame, read-only (kernel: copy_nonpresent_pte
        // makes a writable device-private entry read-only in both).
        if (cpu_pte::is_swap(e)) {
          pools_->swap->get(cpu_pte::pfn(e));
        } else if (cpu_pte::holds_frame(e)) {
          const pfn_t n = pfn_t{1} << (9 * level);
          for (pfn_t i = 0; i < n; ++i) pool(cpu_pte::pool(e)).get(cpu_pte::pfn(e) + i);
        }
        if (cow) e &= ~cpu_pte::write;
        ptes.push_back({va, e, level});
        return e;
      });
    }
    mm_impl::end_fn(*this, r);
  }
  // Empty 4K tables of copied VMAs are copied too (kernel: copy_pte_range
  // allocates the child's table before it copies entries).
  std::vector<va_t> tables;
  {
    lock_guard pt(tables_lock_);
    for (va_t slot : empty_tables_)
      for (const vma& v : vmas_->set)
        if (v.start < slot + huge_size && slot < v.end && needs_copy(v)) {
          tables.push_back(slot);
          break;
        }
  }
  mm_impl::keep_tables(*child, tables);
  // The child is not visible to anyone yet.
  for (const copied& c : ptes) {
    errc pe = child->pt_.populate(c.va, c.va + entry_span(c.level), c.level, [&](va_t) { return c.e; });
    if (pe != errc::ok) return pe;  // the child's teardown drops what it holds
  }
  return child;
}

}  // namespace svm
