// mremap (kernel: mm/mremap.c).
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

namespace {
// Move the PTEs of [s, e) to `target` (kernel: move_page_tables): frames keep
// their references, so nothing is freed. A PMD moves whole when the target
// slot is 2M aligned, else it is split into 4K entries on the way.
void move_ptes(mm& m, va_t s, va_t e, va_t target) {
  cpu_page_table& pt = mm_impl::page_table(m);
  std::vector<va_t> emptied;  // source slots whose 4K entries moved out: their tables stay
  // Linux moves extent by extent, each inside one source and one target 2M
  // slot, and gives the target a 4K table wherever the source slot has one,
  // even an empty one (kernel: move_page_tables, alloc_new_pmd + pte_alloc).
  std::vector<va_t> target_tables;
  for (va_t a = s; a < e;) {
    const va_t src_slot = align_down(a, huge_size);
    const va_t d = a - s + target;
    const va_t ext_end = std::min({e, src_slot + huge_size, a + (align_down(d, huge_size) + huge_size - d)});
    if (pt.translate(a).level == 0 || mm_impl::empty_table(m, src_slot)) target_tables.push_back(align_down(d, huge_size));
    a = ext_end;
  }
  struct moved {
    va_t va;
    std::uint64_t e;
    unsigned level;
  };
  std::vector<moved> ptes;
  std::vector<va_range> flush;
  (void)pt.zap(s, e, flush, [&](va_t va, std::uint64_t pte, unsigned level) {
    // A page under migration moves as the entry it was (cpu_pte.h: the
    // migration is abandoned; its finalize finds the old PTE gone).
    ptes.push_back({va, cpu_pte::is_migration(pte) ? mm_impl::unmigrate(m, pte) : pte, level});
    if (level == 0 && (emptied.empty() || emptied.back() != align_down(va, huge_size)))
      emptied.push_back(align_down(va, huge_size));
  });
  mm_impl::keep_tables(m, emptied);
  mm_impl::keep_tables(m, target_tables);
  for (const moved& mv : ptes) {
    const va_t nva = mv.va - s + target;
    if (mv.level == 1 && is_aligned(nva, huge_size)) {
      [[maybe_unused]] errc pe = pt.populate(nva, nva + huge_size, 1, [&](va_t) { return mv.e; });
      assert(pe == errc::ok);
    } else {
      const unsigned n = mv.level == 1 ? pt::entries_per_node : 1;
      for (unsigned i = 0; i < n; ++i) {
        const std::uint64_t pte = mv.level == 1 ? cpu_pte::split(mv.e, 1, i) : mv.e;
        [[maybe_unused]] errc pe =
            pt.populate(nva + i * page_size, nva + (i + 1) * page_size, 0, [&](va_t) { return pte; });
        assert(pe == errc::ok);
      }
    }
  }
}
}  // namespace

result<va_t> mm::mremap(va_t old_addr, std::uint64_t old_length, std::uint64_t new_length, mremap_flags flags,
                        va_t new_addr) {
  const auto fl = static_cast<std::uint32_t>(flags);
  if (fl & ~7u) return errc::inval;
  const bool maymove = any(flags & mremap_flags::maymove), fixed = any(flags & mremap_flags::fixed),
             dontunmap = any(flags & mremap_flags::dontunmap);
  if (!is_aligned(old_addr, page_size)) return errc::inval;
  if ((fixed || dontunmap) && !maymove) return errc::inval;
  const std::uint64_t old_len = align_up(old_length, page_size), new_len = align_up(new_length, page_size);
  if (new_len == 0 || old_len < old_length || new_len < new_length) return errc::inval;
  if (dontunmap && old_len != new_len) return errc::inval;
  if (old_addr + old_len < old_addr || old_addr + old_len > opts_.mmap_limit) return errc::inval;
  if (fixed) {
    if (!is_aligned(new_addr, page_size)) return errc::inval;
    if (new_addr + new_len < new_addr || new_addr + new_len > opts_.mmap_limit) return errc::inval;
    if (new_addr < old_addr + old_len && old_addr < new_addr + new_len) return errc::inval;  // onto itself
  }
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  vma* v = mm_impl::find_vma_mut(*this, old_addr);
  if (!v) return errc::fault;
  if (old_len == 0) {
    // A second mapping of the same shared object (Linux: old_size 0 on a
    // shared mapping duplicates it); needs MAYMOVE, and shared memory.
    if (!v->shared || dontunmap) return errc::inval;
    if (!maymove) return errc::nomem;
    va_t target;
    if (fixed) {
      (void)mm_impl::do_munmap(*this, new_addr, new_addr + new_len);
      target = new_addr;
    } else {
      auto a = mm_impl::get_unmapped_area(*this, new_len);
      if (!a) return a.error();
      target = *a;
    }
    auto* nv = new vma(*v);
    nv->start = target;
    nv->end = target + new_len;
    nv->pgoff = v->pgoff + (old_addr - v->start) / page_size;
    mm_impl::insert_vma(*this, nv);
    mm_impl::merge_around(*this, target, target + new_len);
    return target;
  }

  std::uint64_t cur_len = old_len;
  if (fixed && new_len < old_len) {
    // A shrinking move: what is kept must lie in one VMA (EFAULT, nothing
    // changed); then the tail goes, wherever it lies (kernel: mremap_to).
    if (old_addr + new_len > v->end) return errc::fault;
    (void)mm_impl::do_munmap(*this, new_addr, new_addr + new_len);
    (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
    cur_len = new_len;
    v = mm_impl::find_vma_mut(*this, old_addr);
    if (!v) return errc::fault;
  }

  // A pure move (FIXED, same size) may span several VMAs and the gaps
  // between them (Linux 6.17+): each VMA moves by the same offset.
  if (fixed && old_len == new_len && old_addr + old_len > v->end) {
    for (vma* w = v; w && w->start < old_addr + old_len; w = mm_impl::next_vma(*this, w))
      if (w->kind == vma_kind::io) return errc::fault;  // PFN maps do not move in a batch
    if (dontunmap) {
      // The source VMAs stay exactly as they are: no split at the range's
      // ends, no merge (kernel: remap_move -> move_vma with DONTUNMAP never
      // touches the source's boundaries).
      std::vector<std::pair<va_t, va_t>> pieces;
      for (vma* w = v; w && w->start < old_addr + old_len; w = mm_impl::next_vma(*this, w))
        pieces.emplace_back(std::max(w->start, old_addr), std::min(w->end, old_addr + old_len));
      mmu_notifier_range r;
      (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + old_len);
      for (auto [lo, hi] : pieces) {
        const va_t to = lo - old_addr + new_addr;
        (void)mm_impl::do_munmap(*this, to, to + (hi - lo));
        mm_impl::move_range_keep(*this, lo, hi, to);
      }
      mm_impl::end_fn(*this, r);
      return new_addr;
    }
    // Each VMA moves on its own (kernel: remap_move): only its own target
    // range is unmapped first, so what lies opposite a gap stays mapped.
    mm_impl::split_at(*this, old_addr);
    mm_impl::split_at(*this, old_addr + old_len);
    std::vector<std::pair<va_t, va_t>> pieces;
    for (vma* w = mm_impl::find_vma_mut(*this, old_addr); w && w->start < old_addr + old_len;
         w = mm_impl::next_vma(*this, w))
      pieces.emplace_back(w->start, w->end);
    mmu_notifier_range r;
    (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + old_len);
    for (auto [lo, hi] : pieces) {
      const va_t to = lo - old_addr + new_addr;
      (void)mm_impl::do_munmap(*this, to, to + (hi - lo));
      mm_impl::move_vma(*this, mm_impl::find_vma_mut(*this, lo), to, hi - lo);
    }
    mm_impl::merge_around(*this, new_addr, new_addr + new_len);
    mm_impl::end_fn(*this, r);
    return new_addr;
  }

  if (!fixed && !dontunmap && new_len <= old_len) {
    // Shrink (or keep) in place: the tail goes, whatever VMAs it spans.
    if (new_len < old_len) (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
    return old_addr;
  }
  if (old_addr + cur_len > v->end) return errc::fault;
  if (dontunmap && v->kind == vma_kind::io) return errc::inval;

  if (!fixed && !dontunmap && new_len > old_len && old_addr + old_len == v->end &&
      old_addr + new_len <= opts_.mmap_limit && mm_impl::range_free(*this, v->end, old_addr + new_len)) {
    // Grow in place. Shmem keeps its size: the new pages lie past its end.
    v->end = old_addr + new_len;
    mm_impl::merge_around(*this, v->end, v->end);  // with the next VMA only (kernel: vma_merge_extend)
    return old_addr;
  }
  if (!maymove) return errc::nomem;

  va_t target;
  std::uint64_t move_len = old_len;
  if (fixed) {
    (void)mm_impl::do_munmap(*this, new_addr, new_addr + new_len);
    target = new_addr;
    move_len = cur_len;
  } else {
    auto a = mm_impl::get_unmapped_area(*this, new_len);
    if (!a) return a.error();
    target = *a;
  }
  mmu_notifier_range r;
  if (dontunmap) {
    (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + move_len);
    mm_impl::move_range_keep(*this, old_addr, old_addr + move_len, target);
    mm_impl::end_fn(*this, r);
    return target;
  }
  mm_impl::split_at(*this, old_addr);
  mm_impl::split_at(*this, old_addr + move_len);
  v = mm_impl::find_vma_mut(*this, old_addr);
  assert(v && v->start == old_addr && v->end == old_addr + move_len);

  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + move_len);
  mm_impl::move_vma(*this, v, target, new_len);
  mm_impl::merge_around(*this, target, target + new_len);
  mm_impl::end_fn(*this, r);
  return target;
}

void mm_impl::move_range_keep(mm& m, va_t lo, va_t hi, va_t to) {
  vma* v = find_vma_mut(m, lo);
  assert(v && v->start <= lo && hi <= v->end);
  const bool whole = v->start == lo && v->end == hi;
  auto* nv = new vma(*v);
  nv->start = to;
  nv->end = to + (hi - lo);
  nv->pgoff = v->pgoff + (lo - v->start) / page_size;
  // As in move_vma: a never-faulted anonymous VMA takes its new place's page
  // number (kernel: copy_vma).
  if (nv->private_anon() && nv->anon_vma.load(std::memory_order_relaxed) == 0) nv->pgoff = to / page_size;
  move_ptes(m, lo, hi, to);
  insert_vma(m, nv);
  merge_around(m, to, to + (hi - lo));
  // The source keeps its place, flags and offset. Its anon_vma goes only when
  // every page of it moved and the copy did not merge back into it (kernel:
  // dontunmap_complete, new_vma != vma && the whole VMA was the range).
  vma* w = find_vma_mut(m, lo);
  if (whole && w && w->start == lo && w->end == hi) w->anon_vma.store(0, std::memory_order_relaxed);
}

void mm_impl::move_vma(mm& m, vma* v, va_t target, std::uint64_t new_len) {
  move_ptes(m, v->start, v->end, target);
  auto* nv = new vma(*v);
  nv->start = target;
  nv->end = target + new_len;
  // An anonymous VMA that never had a page takes the page number of its new
  // place (kernel: copy_vma), so it can merge there; a faulted one keeps
  // its offset (its pages' rmap index).
  if (nv->private_anon() && nv->anon_vma.load(std::memory_order_relaxed) == 0) nv->pgoff = target / page_size;
  const va_t old_start = v->start, old_end = v->end;
  mm_impl::erase_vma(m, v);
  mm_impl::insert_vma(m, nv);
  mm_impl::free_tables(m, old_start, old_end);  // the old range is unmapped (kernel: move_vma -> do_vmi_munmap)
}

}  // namespace svm
