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

result<va_t> mm::mremap(va_t old_addr, std::uint64_t old_length, std::uint64_t new_length, mremap_flags flags,
                        va_t new_addr) {
  const auto fl = static_cast<std::uint32_t>(flags);
  if (fl & ~7u) return errc::inval;
  const bool maymove = any(flags & mremap_flags::maymove), fixed = any(flags & mremap_flags::fixed),
             dontunmap = any(flags & mremap_flags::dontunmap);
  if (!is_aligned(old_addr, page_size)) return errc::inval;
  if ((fixed || dontunmap) && !maymove) return errc::inval;
  const std::uint64_t old_len = align_up(old_length, page_size), new_len = align_up(new_length, page_size);
  if (old_len == 0 || new_len == 0 || old_len < old_length || new_len < new_length) return errc::inval;
  if (dontunmap && old_len != new_len) return errc::inval;
  if (old_addr + old_len < old_addr || old_addr + old_len > opts_.mmap_limit) return errc::inval;
  if (fixed) {
    if (!is_aligned(new_addr, page_size)) return errc::inval;
    if (new_addr + new_len < new_addr || new_addr + new_len > opts_.mmap_limit) return errc::inval;
    if (new_addr < old_addr + old_len && old_addr < new_addr + new_len) return errc::inval;  // onto itself
  }
  lock_guard g(mmap_lock_);
  vma* v = mm_impl::find_vma_mut(*this, old_addr);
  if (!v || old_addr + old_len > v->end) return errc::fault;
  if (dontunmap && !v->private_anon()) return errc::inval;

  if (!fixed && !dontunmap && new_len <= old_len) {  // shrink (or same size) in place
    if (new_len < old_len) (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
    return old_addr;
  }
  if (!fixed && !dontunmap && new_len > old_len && old_addr + old_len == v->end && old_addr + new_len <= opts_.mmap_limit &&
      mm_impl::range_free(*this, v->end, old_addr + new_len)) {  // grow in place
    v->end = old_addr + new_len;
    if (v->backing && v->kind == vma_kind::anonymous) v->backing->grow((v->end - v->start) + v->pgoff * page_size);
    return old_addr;
  }
  if (!maymove) return errc::nomem;

  va_t target;
  std::uint64_t move_len = old_len;
  if (fixed) {
    (void)mm_impl::do_munmap(*this, new_addr, new_addr + new_len);
    target = new_addr;
    if (new_len < old_len) {
      (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
      move_len = new_len;
    }
  } else {
    auto a = mm_impl::get_unmapped_area(*this, new_len);
    if (!a) return a.error();
    target = *a;
  }
  mm_impl::split_at(*this, old_addr);
  mm_impl::split_at(*this, old_addr + move_len);
  v = mm_impl::find_vma_mut(*this, old_addr);
  assert(v && v->start == old_addr && v->end == old_addr + move_len);

  // UNMAP over the old range, then move the PTEs: frames keep their
  // references, so nothing is freed.
  struct moved {
    va_t va;
    std::uint64_t e;
    unsigned level;
  };
  std::vector<moved> ptes;
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + move_len);
  std::vector<va_range> flush;
  (void)pt_.zap(old_addr, old_addr + move_len, flush,
                [&](va_t va, std::uint64_t e, unsigned level) { ptes.push_back({va, e, level}); });
  for (const moved& mv : ptes) {
    const va_t nva = mv.va - old_addr + target;
    if (mv.level == 1 && is_aligned(nva, huge_size)) {
      [[maybe_unused]] errc pe = pt_.populate(nva, nva + huge_size, 1, [&](va_t) { return mv.e; });
      assert(pe == errc::ok);
    } else {
      const unsigned n = mv.level == 1 ? pt::entries_per_node : 1;
      for (unsigned i = 0; i < n; ++i) {
        const std::uint64_t e = mv.level == 1 ? cpu_pte::split(mv.e, 1, i) : mv.e;
        [[maybe_unused]] errc pe =
            pt_.populate(nva + i * page_size, nva + (i + 1) * page_size, 0, [&](va_t) { return e; });
        assert(pe == errc::ok);
      }
    }
  }
  auto* nv = new vma(*v);
  nv->start = target;
  nv->end = target + new_len;
  if (nv->backing && nv->kind == vma_kind::anonymous) nv->backing->grow(new_len + nv->pgoff * page_size);
  if (!dontunmap) mm_impl::erase_vma(*this, v);
  mm_impl::insert_vma(*this, nv);
  mm_impl::end_fn(*this, r);
  return target;
}

}  // namespace svm
