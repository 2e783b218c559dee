// mprotect (kernel: mm/mprotect.c).
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

errc mm::mprotect(va_t addr, std::uint64_t length, prot p) {
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (static_cast<std::uint32_t>(p) & ~prot_bits) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::nomem;
  const va_t end = addr + len;
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  const vma* v0 = mm_impl::find_vma(*this, addr);
  if (!v0) return errc::nomem;
  // The mapped prefix of [addr, end): Linux changes it, then reports the hole.
  va_t covered = v0->end;
  for (vma* v = mm_impl::next_vma(*this, const_cast<vma*>(v0)); v && covered < end && v->start == covered;
       v = mm_impl::next_vma(*this, v))
    covered = v->end;
  covered = std::min(covered, end);
  // The new flags of a VMA (kernel: mprotect_fixup): making private memory
  // writable charges it (VM_ACCOUNT); making never-faulted private
  // anonymous memory read-only uncharges it again.
  auto new_account = [&](const vma& v) {
    if (v.shared || v.kind == vma_kind::io) return v.account;
    if (any(p & prot::write)) return v.account || v.writable() ? v.account : true;
    if (v.account && v.private_anon() && v.anon_vma.load(std::memory_order_relaxed) == 0) return false;
    return v.account;
  };
  bool changes = false;
  for (const vma* v = v0; v && v->start < covered; v = mm_impl::next_vma(*this, const_cast<vma*>(v)))
    if (v->protection != p || new_account(*v) != v->account) changes = true;
  if (!changes) return covered < end ? errc::nomem : errc::ok;  // nothing to do: no split, no event
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::protection_vma, addr, covered);
  const bool accessible = any(p & (prot::read | prot::write));
  for (vma* v = mm_impl::find_vma_mut(*this, addr); v && v->start < covered; v = mm_impl::next_vma(*this, v)) {
    const bool acct = new_account(*v);
    if (v->protection == p && acct == v->account) continue;  // this VMA stays whole
    if (v->start < addr) {
      mm_impl::split_at(*this, addr);
      v = mm_impl::find_vma_mut(*this, addr);
    }
    if (v->end > covered) mm_impl::split_at(*this, covered);
    v->protection = p;
    v->account = acct;
    const bool shared = v->shared;
    (void)mm_impl::walk_locked(*this, v->start, v->end, [&](va_t, std::uint64_t e, unsigned) -> std::uint64_t {
      // A page under migration stays where it is (cpu_pte.h), then gets the
      // new protection like any other entry.
      if (cpu_pte::is_migration(e)) e = mm_impl::unmigrate(*this, e);
      if (!accessible) {
        if (cpu_pte::is_valid(e)) return (e & ~(cpu_pte::present | cpu_pte::write)) | cpu_pte::protnone;
        return e;
      }
      if (cpu_pte::is_protnone(e)) {
        e = (e & ~cpu_pte::protnone) | cpu_pte::present;
        if (shared && any(p & prot::write)) e |= cpu_pte::write;
        return e;
      }
      if (!any(p & prot::write)) return e & ~cpu_pte::write;
      return e;  // gaining write: write faults upgrade (COW stays intact)
    });
  }
  mm_impl::merge_around(*this, addr, covered);
  mm_impl::end_fn(*this, r);
  return covered < end ? errc::nomem : errc::ok;
}

}  // namespace svm
