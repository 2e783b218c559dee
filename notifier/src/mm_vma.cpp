// The VMA tree: lookup, split, merge, placement (kernel: mm/vma.c, mm/mmap.c).
// See svm/notifier/mm.h for the contracts and mm_impl.h for the internals.
#include <algorithm>
#include <cassert>
#include <cstdio>
#include <cstring>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

// ---- VMAs -------------------------------------------------------------------

const mm::vma* mm_impl::find_vma(const mm& m, va_t va) {
  auto& set = m.vmas_->set;
  mm::vma key;
  key.start = va;
  auto it = set.upper_bound(key);
  if (it == set.begin()) return nullptr;
  --it;
  return va < it->end ? &*it : nullptr;
}

mm::vma* mm_impl::find_vma_mut(mm& m, va_t va) { return const_cast<vma*>(find_vma(m, va)); }

mm::vma* mm_impl::first_ending_after(const mm& m, va_t start) {
  auto& set = m.vmas_->set;
  mm::vma key;
  key.start = start;
  auto it = set.upper_bound(key);
  if (it != set.begin()) {
    auto prev = std::prev(it);
    if (prev->end > start) return const_cast<vma*>(&*prev);
  }
  return it == set.end() ? nullptr : const_cast<vma*>(&*it);
}

mm::vma* mm_impl::next_vma(const mm& m, vma* v) {
  auto& set = m.vmas_->set;
  auto it = std::next(set.iterator_to(*v));
  return it == set.end() ? nullptr : &*it;
}

void mm_impl::split_at(mm& m, va_t va) {
  vma* v = find_vma_mut(m, va);
  if (!v || v->start == va) return;
  // A PMD mapping the new boundary cuts becomes 4K entries first (kernel:
  // vma_adjust_trans_huge in __split_vma): a THP stays one folio, PTE-mapped;
  // the huge zero page becomes 4K zero-page entries.
  if (!is_aligned(va, huge_size)) split_huge(m, va, va + 1);
  auto* tail = new vma(*v);  // both halves share the anon_vma, as in Linux
  tail->start = va;
  tail->pgoff = v->pgoff + (va - v->start) / page_size;
  v->end = va;
  insert_vma(m, tail);
}

bool mm_impl::mergeable(const vma& a, const vma& b) noexcept {
  if (a.end != b.start) return false;
  if (a.protection != b.protection || a.kind != b.kind || a.shared != b.shared || a.advice != b.advice ||
      a.account != b.account || a.backing != b.backing)
    return false;
  if (a.kind == vma_kind::io) return false;  // PFN maps are never merged (VM_PFNMAP | VM_IO: special)
  // Offsets continue: the file offset, or for anonymous memory the page
  // number the VMA was created at (moved VMAs keep theirs).
  if (b.pgoff != a.pgoff + (a.end - a.start) / page_size) return false;
  const std::uint64_t x = a.anon_vma.load(std::memory_order_relaxed), y = b.anon_vma.load(std::memory_order_relaxed);
  return x == 0 || y == 0 || x == y;
}

void mm_impl::merge_around(mm& m, va_t lo, va_t hi) {
  // Only boundaries that lie in [lo, hi] are candidates: the changed range's
  // own and its two edges (kernel: vma_merge_new_range / vma_modify merge
  // with prev and next only). A pair of untouched neighbours further out
  // stays as it is even when compatible (a DONTUNMAP source emptied of its
  // anon_vma is one such pair on Linux).
  vma* v = first_ending_after(m, lo > 0 ? lo - 1 : 0);
  while (v && v->end <= hi) {
    vma* n = next_vma(m, v);
    if (!n) break;
    if (mergeable(*v, *n)) {
      // The earlier VMA absorbs the later (kernel: vma_expand).
      v->end = n->end;
      if (v->anon_vma.load(std::memory_order_relaxed) == 0)
        v->anon_vma.store(n->anon_vma.load(std::memory_order_relaxed), std::memory_order_relaxed);
      erase_vma(m, n);
      continue;  // v may merge with its new next too
    }
    v = n;
  }
}

namespace {
std::atomic<std::uint64_t> next_anon_vma{1};
}  // namespace

std::uint64_t mm_impl::new_anon_vma() noexcept { return next_anon_vma.fetch_add(1, std::memory_order_relaxed); }

void mm_impl::anon_vma_prepare(const vma& v) noexcept {
  if (v.anon_vma.load(std::memory_order_relaxed) != 0) return;
  std::uint64_t expect = 0;
  // A racing fault may have prepared it: keep whichever identity won.
  (void)const_cast<vma&>(v).anon_vma.compare_exchange_strong(expect, new_anon_vma(), std::memory_order_relaxed);
}

bool mm_impl::range_free(const mm& m, va_t start, va_t end) {
  const vma* v = first_ending_after(m, start);
  return !v || v->start >= end;
}

result<va_t> mm_impl::get_unmapped_area(const mm& m, std::uint64_t len) {
  // Bottom-up first fit from mmap_base; 2M alignment for lengths of 2M or
  // more (as Linux does for anonymous THP-capable mappings).
  const std::uint64_t align = len >= huge_size ? huge_size : page_size;
  va_t cand = align_up(std::max(m.opts_.mmap_base, m.opts_.mmap_min_addr), align);
  for (const vma& v : m.vmas_->set) {
    if (v.end <= cand) continue;
    if (v.start >= cand + len) break;
    cand = align_up(v.end, align);
  }
  if (cand + len > m.opts_.mmap_limit || cand + len < cand) return errc::nomem;
  return cand;
}

void mm_impl::insert_vma(mm& m, vma* v) { m.vmas_->set.insert(*v); }

void mm_impl::erase_vma(mm& m, vma* v) {
  m.vmas_->set.erase(m.vmas_->set.iterator_to(*v));
  delete v;
}

void mm::assert_stable([[maybe_unused]] lockdep::site s) const {
#if SVM_LOCK_CHECKS
  if (!lockdep::is_held(&rmap_lock_)) mmap_lock_.assert_held_shared(s);
#endif
}

std::optional<vma_info> mm::find_vma(va_t va) const {
  assert_stable();
  const vma* v = mm_impl::find_vma(*this, va);
  if (!v) return std::nullopt;
  return v->info();
}

std::string mm::maps() {
  shared_lock_guard g(mmap_lock_);
  std::string out;
  char line[160];
  for (const vma& v : vmas_->set) {
    const char* name = v.kind == vma_kind::file ? " [svm file]"
                       : (v.kind == vma_kind::anonymous && v.shared) ? " /dev/zero (deleted)"
                                                                      : "";
    std::snprintf(line, sizeof line, "%08llx-%08llx %c%c%c%c %08llx 00:00 0%s\n",
                  static_cast<unsigned long long>(v.start), static_cast<unsigned long long>(v.end),
                  v.readable() ? 'r' : '-', v.writable() ? 'w' : '-', any(v.protection & prot::exec) ? 'x' : '-',
                  v.shared ? 's' : 'p', static_cast<unsigned long long>(v.pgoff * page_size), name);
    out += line;
  }
  return out;
}

std::vector<vma_info> mm::vmas() {
  shared_lock_guard g(mmap_lock_);
  std::vector<vma_info> out;
  for (const vma& v : vmas_->set) out.push_back(v.info());
  return out;
}

}  // namespace svm
