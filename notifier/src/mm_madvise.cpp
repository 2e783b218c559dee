// madvise (kernel: mm/madvise.c).
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

errc mm::madvise(va_t addr, std::uint64_t length, madvice advice) {
  if (advice != madvice::dontneed && advice != madvice::hugepage && advice != madvice::nohugepage)
    return errc::inval;  // outside the enum: nothing changes
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  const va_t end = addr + len;
  if (advice == madvice::dontneed) {
    shared_lock_guard g(mmap_lock_);
    bool hole = false;
    va_t cur = addr;
    for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
      if (v->kind == vma_kind::io) return errc::inval;
      if (v->start > cur) hole = true;
      cur = v->end;
    }
    if (cur < end) hole = true;
    for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
      const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
      mmu_notifier_range r;
      (void)mm_impl::start_fn(*this, r, mmu_notifier_event::clear, s, e);
      pending_free f;
      mm_impl::zap_range(*this, s, e, f, /*reclaim_tables=*/e - s >= huge_size);
      mm_impl::end_fn(*this, r);
      mm_impl::release(*this, f);
    }
    return hole ? errc::nomem : errc::ok;
  }
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  bool hole = false;
  va_t cur = addr;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (v->start > cur) hole = true;
    cur = v->end;
  }
  if (cur < end) hole = true;
  const huge_advice want = advice == madvice::hugepage ? huge_advice::hugepage : huge_advice::nohugepage;
  // Split only the VMAs whose advice changes (kernel: madvise_update_vma
  // returns early when the flags stay), then merge what changed.
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (v->advice == want) continue;
    if (v->start < addr) {
      mm_impl::split_at(*this, addr);
      v = mm_impl::find_vma_mut(*this, addr);
    }
    if (v->end > end) mm_impl::split_at(*this, end);
    v->advice = want;
  }
  mm_impl::merge_around(*this, addr, end);
  return hole ? errc::nomem : errc::ok;
}

}  // namespace svm
