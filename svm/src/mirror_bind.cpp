// Taking GPU VA ranges out of the SVM mirror and giving them back (the
// analogue of unbinding and rebinding part of xe's CPU-address-mirror
// VMA). The state is gpu_vm::unbound_ (see its comment in gpu_vm.h for why
// a fault racing mirror_unbind() cannot leave a PTE behind); the fault path
// consults it through to_cpu_locked() -> trim_unbound_locked().
#include <algorithm>

#include "vm_internal.h"

namespace svm {

namespace {

// Checks that need no lock, shared by both calls (the order of add_window's).
errc check_args(mirror_kind k, va_t gpu_va, std::uint64_t size, va_t limit) noexcept {
  if (k != mirror_kind::full_mm && k != mirror_kind::windows) return errc::inval;
  if (size == 0 || !is_aligned(gpu_va | size, page_size)) return errc::inval;
  if (gpu_va + size < gpu_va) return errc::overflow;
  if (gpu_va + size > limit) return errc::inval;
  return errc::ok;
}

}  // namespace

errc gpu_vm::check_mirror_range_locked(va_range r) const {
  if (released_) return errc::noent;  // the mirror went with the mm
  if (cfg_.mirror != mirror_kind::windows) return errc::ok;
  // Every page must lie in some window: walk the windows that start at or
  // before the uncovered remainder's start (windows never overlap).
  va_t at = r.start;
  while (at < r.end) {
    auto w = std::find_if(windows_.begin(), windows_.end(),
                          [at](const window& x) { return at >= x.gpu && at < x.gpu + x.size; });
    if (w == windows_.end()) return errc::inval;
    at = w->gpu + w->size;
  }
  return errc::ok;
}

bool gpu_vm::trim_unbound_locked(va_t gva, va_range& allowed) const {
  if (unbound_.empty()) return true;
  auto next = unbound_.upper_bound(gva);  // the first range starting past gva
  if (next != unbound_.end()) allowed.end = std::min(allowed.end, next->first);
  if (next != unbound_.begin()) {
    const auto prev = std::prev(next);
    if (gva < prev->second) return false;  // inside a range out of the mirror
    allowed.start = std::max(allowed.start, prev->second);
  }
  return true;
}

errc gpu_vm::mirror_unbind(va_t gpu_va, std::uint64_t size) {
  const va_t limit = cfg_.mirror == mirror_kind::full_mm ? std::min<va_t>(pt_.va_limit(), mm_va_limit_) : pt_.va_limit();
  if (const errc e = check_args(cfg_.mirror, gpu_va, size, limit); e != errc::ok) return e;
  va_range r{gpu_va, gpu_va + size};
  // Exclusive: no fault is between its lookup and its commit while we hold
  // it (the argument at unbound_).
  lock_guard g(lock_);
  if (const errc e = check_mirror_range_locked(r); e != errc::ok) return e;
  // Record the range, merging it with the ranges it overlaps or touches.
  auto it = unbound_.upper_bound(r.start);
  if (it != unbound_.begin() && std::prev(it)->second >= r.start) --it;
  while (it != unbound_.end() && it->first <= r.end) {
    r.start = std::min(r.start, it->first);
    r.end = std::max(r.end, it->second);
    it = unbound_.erase(it);
  }
  unbound_.emplace(r.start, r.end);
  // Clear the mirror's PTEs of the range asked for (BO PTEs stay), then
  // shoot the device TLB down, all before a fault can run again.
  std::vector<va_range> flush;
  zap_gpu({gpu_va, gpu_va + size}, false, flush);
  flush_tlb(flush);
  return errc::ok;
}

errc gpu_vm::mirror_bind(va_t gpu_va, std::uint64_t size) {
  const va_t limit = cfg_.mirror == mirror_kind::full_mm ? std::min<va_t>(pt_.va_limit(), mm_va_limit_) : pt_.va_limit();
  if (const errc e = check_args(cfg_.mirror, gpu_va, size, limit); e != errc::ok) return e;
  const va_range r{gpu_va, gpu_va + size};
  lock_guard g(lock_);
  if (const errc e = check_mirror_range_locked(r); e != errc::ok) return e;
  // Remove r from the ranges, keeping the pieces of those that straddle its
  // edges. Nothing to map: the next faults fill it.
  auto it = unbound_.upper_bound(r.start);
  if (it != unbound_.begin() && std::prev(it)->second > r.start) --it;
  while (it != unbound_.end() && it->first < r.end) {
    const va_t s = it->first, e = it->second;
    it = unbound_.erase(it);
    if (s < r.start) unbound_.emplace(s, r.start);
    if (e > r.end) {
      unbound_.emplace(r.end, e);
      break;
    }
  }
  return errc::ok;
}

std::vector<va_range> gpu_vm::mirror_unbound() const {
  shared_lock_guard g(lock_);
  std::vector<va_range> out;
  out.reserve(unbound_.size());
  for (const auto& [s, e] : unbound_) out.push_back({s, e});
  return out;
}

}  // namespace svm
