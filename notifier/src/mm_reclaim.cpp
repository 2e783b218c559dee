// Reclaim (swap-out) and migration between pools (kernel: mm/vmscan.c, mm/migrate.c).
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

result<std::size_t> mm::reclaim(va_t addr, std::uint64_t length, bool blockable) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  const va_t end = addr + len;
  shared_lock_guard g(mmap_lock_);
  mmu_notifier_range r;
  if (errc e = mm_impl::start_fn(*this, r, mmu_notifier_event::clear, addr, end, nullptr, blockable); e != errc::ok)
    return e;
  pending_free f;
  std::size_t n = 0;
  errc err = errc::ok;
  swap_space& sw = *pools_->swap;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (!v->private_anon()) continue;
    const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
    mm_impl::split_huge(*this, s, e);
    (void)mm_impl::walk_locked(*this, s, e, [&](va_t, std::uint64_t pte, unsigned level) -> std::uint64_t {
      if (level != 0 || !cpu_pte::is_valid(pte) || cpu_pte::is_zero(pte) || cpu_pte::pool(pte) != 0) return pte;
      const pfn_t pfn = cpu_pte::pfn(pte);
      if (pool(0).refcount(pfn) != 1) return pte;  // shared (COW or page cache)
      auto slot = sw.store(pool(0).frame_data(pfn));
      if (!slot) {
        err = slot.error();
        return pte;
      }
      f.frames.emplace_back(0, pfn);
      ++n;
      return cpu_pte::make(*slot, 0, cpu_pte::swap);
    });
  }
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
  stats_.swap_outs.fetch_add(n, std::memory_order_relaxed);
  if (err != errc::ok) return err;
  return n;
}

result<std::size_t> mm::migrate(va_t addr, std::uint64_t length, unsigned target, const void* owner) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  if (target >= pool_count()) return errc::inval;
  const va_t end = addr + len;
  shared_lock_guard g(mmap_lock_);
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::migrate, addr, end, owner);
  pending_free f;
  std::size_t n = 0;
  errc err = errc::ok;
  frame_pool& dst = pool(target);
  const bool to_device = kind_of_pool(target) == pool_kind::device_private;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (!v->private_anon()) continue;
    const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
    mm_impl::split_huge(*this, s, e);
    (void)mm_impl::walk_locked(*this, s, e, [&](va_t, std::uint64_t pte, unsigned level) -> std::uint64_t {
      if (level != 0 || cpu_pte::is_zero(pte) || !(cpu_pte::is_valid(pte) || cpu_pte::is_devpriv(pte))) return pte;
      const unsigned src = cpu_pte::pool(pte);
      const pfn_t pfn = cpu_pte::pfn(pte);
      if (src == target || pool(src).refcount(pfn) != 1) return pte;
      auto nf = dst.alloc();
      if (!nf) {
        err = nf.error();
        return pte;
      }
      frame_pool::copy_frame(dst.frame_data(*nf), pool(src).frame_data(pfn));
      f.frames.emplace_back(src, pfn);
      ++n;
      return cpu_pte::make(*nf, target, (to_device ? cpu_pte::devpriv : cpu_pte::present) | (pte & cpu_pte::write));
    });
  }
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
  stats_.migrations.fetch_add(n, std::memory_order_relaxed);
  if (err != errc::ok) return err;
  return n;
}

}  // namespace svm
