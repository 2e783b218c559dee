// mmap and munmap (kernel: mm/mmap.c, mm/vma.c).
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

// ---- system calls -------------------------------------------------------------


result<va_t> mm::mmap(va_t addr, std::uint64_t length, prot p, map flags, std::shared_ptr<svm::file> backing,
                      std::uint64_t offset) {
  const auto f = static_cast<std::uint32_t>(flags);
  if (length == 0) return errc::inval;
  if ((static_cast<std::uint32_t>(p) & ~prot_bits) || (f & ~map_bits)) return errc::inval;
  const bool shared = any(flags & map::shared), priv = any(flags & map::private_);
  if (shared == priv) return errc::inval;
  const bool anon = any(flags & map::anonymous), io = any(flags & map::io);
  if (int(anon) + int(io) + int(bool(backing)) != 1) return errc::inval;
  if (!is_aligned(offset, page_size)) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length) return errc::nomem;
  const bool fixed = any(flags & (map::fixed | map::fixed_noreplace));
  if (fixed && !is_aligned(addr, page_size)) return errc::inval;
  if (fixed && (addr + len < addr || addr + len > opts_.mmap_limit)) return errc::nomem;
  if (fixed && addr < opts_.mmap_min_addr) return errc::perm;  // as Linux's security_mmap_addr
  if (backing && backing->pool().get() != &pool(0)) return errc::inval;

  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  if (torn_down_) return errc::nomem;
  va_t at;
  if (fixed) {
    if (!mm_impl::range_free(*this, addr, addr + len) && any(flags & map::fixed_noreplace)) return errc::exist;
    at = addr;  // MAP_FIXED unmaps what is there below, once nothing else can fail
  } else if (addr && addr <= opts_.mmap_limit &&
             (addr = std::max(align_up(addr, page_size), opts_.mmap_min_addr)) != 0 &&  // round_hint_to_min
             addr + len > addr && addr + len <= opts_.mmap_limit &&
             mm_impl::range_free(*this, addr, addr + len)) {
    at = addr;
  } else {
    auto a = mm_impl::get_unmapped_area(*this, len);
    if (!a) return a.error();
    at = *a;
  }
  std::shared_ptr<svm::file> shmem;
  if (anon && shared) {
    auto obj = svm::file::create(pools_->pools[0].pool, len);  // shmem
    if (!obj) return errc::nomem;
    shmem = std::move(*obj);
  }
  if (fixed && !mm_impl::range_free(*this, at, at + len)) {
    if (errc r = mm_impl::do_munmap(*this, at, at + len); r != errc::ok) return r;
  }
  auto* v = new vma;
  v->start = at;
  v->end = at + len;
  v->protection = p;
  v->shared = shared;
  v->kind = io ? vma_kind::io : backing ? vma_kind::file : vma_kind::anonymous;
  // VM_ACCOUNT: private writable memory is charged (kernel: accountable_mapping).
  v->account = !shared && !io && any(p & prot::write);
  if (backing) {
    v->backing = std::move(backing);
    v->pgoff = offset / page_size;
  } else if (shmem) {
    v->backing = std::move(shmem);
  } else {
    v->pgoff = at / page_size;  // anonymous: the page number it was created at
  }
  mm_impl::insert_vma(*this, v);
  mm_impl::merge_around(*this, at, at + len);
  return at;
}

errc mm_impl::do_munmap(mm& m, va_t start, va_t end) {
  vma* first = first_ending_after(m, start);
  if (!first || first->start >= end) return errc::ok;  // nothing mapped
  split_at(m, start);
  split_at(m, end);
  // The event covers the mapped span only.
  first = first_ending_after(m, start);
  va_t lo = std::max(start, first->start), hi = lo;
  for (vma* v = first; v && v->start < end; v = next_vma(m, v)) hi = std::min(end, v->end);
  mmu_notifier_range r;
  (void)start_fn(m, r, mmu_notifier_event::unmap, lo, hi);
  pending_free f;
  zap_range(m, lo, hi, f);
  for (vma* v = first_ending_after(m, start); v && v->start < end;) {
    vma* nx = next_vma(m, v);
    erase_vma(m, v);
    v = nx;
  }
  free_tables(m, start, end);
  end_fn(m, r);
  release(m, f);
  return errc::ok;
}

errc mm::munmap(va_t addr, std::uint64_t length) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len < addr || addr + len > opts_.mmap_limit) return errc::inval;
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  return mm_impl::do_munmap(*this, addr, addr + len);
}

}  // namespace svm
