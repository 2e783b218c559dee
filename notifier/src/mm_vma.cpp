// The VMA tree: lookup, split, merge, placement (kernel: mm/vma.c, mm/mmap.c).
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
  auto* tail = new vma;
  tail->start = va;
  tail->end = v->end;
  tail->protection = v->protection;
  tail->kind = v->kind;
  tail->shared = v->shared;
  tail->advice = v->advice;
  tail->backing = v->backing;
  tail->pgoff = v->pgoff + (va - v->start) / page_size;
  v->end = va;
  insert_vma(m, tail);
}

bool mm_impl::range_free(const mm& m, va_t start, va_t end) {
  const vma* v = first_ending_after(m, start);
  return !v || v->start >= end;
}

result<va_t> mm_impl::get_unmapped_area(const mm& m, std::uint64_t len) {
  // Bottom-up first fit from mmap_base; 2M alignment for lengths of 2M or
  // more (as Linux does for anonymous THP-capable mappings).
  const std::uint64_t align = len >= huge_size ? huge_size : page_size;
  va_t cand = align_up(m.opts_.mmap_base, align);
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

std::optional<vma_info> mm::find_vma(va_t va) const {
  mmap_lock_.assert_held_shared();
  const vma* v = mm_impl::find_vma(*this, va);
  if (!v) return std::nullopt;
  return v->info();
}

std::vector<vma_info> mm::vmas() {
  shared_lock_guard g(mmap_lock_);
  std::vector<vma_info> out;
  for (const vma& v : vmas_->set) out.push_back(v.info());
  return out;
}

}  // namespace svm
