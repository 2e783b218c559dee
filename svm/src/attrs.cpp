// SVM memory attributes of a gpu_vm (madvise-like, as xe's
// DRM_IOCTL_XE_MADVISE): an interval map from GPU VA ranges to svm_attrs,
// read by the fault path and prefetch (migrate.cpp), and the residency
// report of query_attrs. docs/migration.md describes the design.
#include <algorithm>

#include "check.h"
#include "vm_internal.h"

namespace svm {

namespace {

bool valid_attrs(const svm_attrs& a) noexcept {
  if (a.preferred != mem_location::system && a.preferred != mem_location::vram) return false;
  if (a.atomics != atomic_mode::any && a.atomics != atomic_mode::device) return false;
  return a.granularity == page_size || a.granularity == (std::uint64_t{64} << 10) || a.granularity == huge_size;
}

}  // namespace

errc gpu_vm::check_attr_range(va_t gpu_va, std::uint64_t size) const {
  if (size == 0 || !is_aligned(gpu_va | size, page_size)) return errc::inval;
  if (gpu_va + size < gpu_va) return errc::overflow;
  if (gpu_va + size > pt_.va_limit()) return errc::inval;
  if (released_) return errc::noent;
  // The mirror must cover the whole range: the full-mm mirror up to the
  // mm's VA limit, or one window.
  va_t cpu;
  va_range allowed;
  if (!to_cpu_locked(gpu_va, cpu, allowed)) return errc::inval;
  if (gpu_va + size > allowed.end) return errc::inval;
  return errc::ok;
}

errc gpu_vm::set_attrs(va_t gpu_va, std::uint64_t size, const svm_attrs& a) {
  if (!valid_attrs(a)) return errc::inval;
  // Exclusive: a fault in service read the old attributes; none is while
  // we hold it, and the zap below comes before any new one.
  lock_guard g(lock_);
  if (const errc e = check_attr_range(gpu_va, size); e != errc::ok) return e;
  const va_t end = gpu_va + size;
  bool changed = false;
  {
    lock_guard al(attrs_lock_);
    changed = edit_attrs_locked(gpu_va, end, a);
    std::size_t dev_atomics = 0;
    for (const auto& [start, ent] : attrs_) dev_atomics += ent.a.atomics == atomic_mode::device ? 1 : 0;
    device_atomic_ranges_.store(dev_atomics, std::memory_order_relaxed);
  }
  if (changed) {
    std::vector<va_range> flush;
    zap_gpu({gpu_va, end}, false, flush);
    flush_tlb(flush);
  }
  return errc::ok;
}

bool gpu_vm::edit_attrs_locked(va_t gpu_va, va_t end, const svm_attrs& a) {
  // Did any page of the range hold other attributes? (Pages outside every
  // stored range hold the defaults.)
  bool changed = false;
  {
    va_t at = gpu_va;
    auto it = attrs_.upper_bound(gpu_va);
    if (it != attrs_.begin() && std::prev(it)->second.end > gpu_va) --it;
    for (; at < end && !changed; ++it) {
      if (it == attrs_.end() || it->first >= end) {
        changed = a != svm_attrs{};  // a default-valued gap remains
        break;
      }
      if (it->first > at && a != svm_attrs{}) changed = true;  // a default gap before it
      if (it->second.a != a) changed = true;
      at = it->second.end;
    }
  }
  // Cut [gpu_va, end) out of the map (trimming the ranges across its
  // edges), then insert it unless it holds the defaults, then merge equal
  // neighbours.
  auto it = attrs_.lower_bound(gpu_va);
  if (it != attrs_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > gpu_va) {
      const attr_entry tail = prev->second;
      prev->second.end = gpu_va;
      if (tail.end > end) attrs_.emplace(end, attr_entry{tail.end, tail.a});
    }
  }
  for (it = attrs_.lower_bound(gpu_va); it != attrs_.end() && it->first < end;) {
    if (it->second.end > end) {
      const attr_entry tail = it->second;
      attrs_.erase(it);
      attrs_.emplace(end, tail);
      break;
    }
    it = attrs_.erase(it);
  }
  if (a != svm_attrs{}) {
    auto [ins, ok] = attrs_.emplace(gpu_va, attr_entry{end, a});
    SVM_CHECK(ok, "attribute map: the cut range is still occupied");
    // Merge with equal neighbours.
    if (ins != attrs_.begin()) {
      auto prev = std::prev(ins);
      if (prev->second.end == ins->first && prev->second.a == ins->second.a) {
        prev->second.end = ins->second.end;
        attrs_.erase(ins);
        ins = prev;
      }
    }
    auto next = std::next(ins);
    if (next != attrs_.end() && next->first == ins->second.end && next->second.a == ins->second.a) {
      ins->second.end = next->second.end;
      attrs_.erase(next);
    }
  }
  return changed;
}

bool gpu_vm::atomic_gate(va_range win, std::size_t except, std::span<bool> out) const {
  lock_guard al(attrs_lock_);
  auto it = attrs_.upper_bound(win.start);
  if (it != attrs_.begin()) --it;
  bool uniform = true;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const va_t gva = win.start + i * page_size;
    while (it != attrs_.end() && it->second.end <= gva) ++it;
    const bool in = it != attrs_.end() && it->first <= gva && it->second.a.atomics == atomic_mode::device;
    out[i] = in && i != except;
    if (i > 0 && out[i] != out[0]) uniform = false;
  }
  return uniform;
}

svm_attrs gpu_vm::attrs_at(va_t gva) const {
  lock_guard al(attrs_lock_);
  auto it = attrs_.upper_bound(gva);
  if (it == attrs_.begin()) return {};
  --it;
  return gva < it->second.end ? it->second.a : svm_attrs{};
}

result<std::vector<attr_range>> gpu_vm::query_attrs(va_t gpu_va, std::uint64_t size) {
  shared_lock_guard g(lock_);
  if (const errc e = check_attr_range(gpu_va, size); e != errc::ok) return e;
  const va_t end = gpu_va + size;
  std::vector<attr_range> out;
  {
    lock_guard al(attrs_lock_);
    va_t at = gpu_va;
    auto it = attrs_.upper_bound(gpu_va);
    if (it != attrs_.begin() && std::prev(it)->second.end > gpu_va) --it;
    for (; at < end;) {
      if (it == attrs_.end() || it->first >= end) {
        out.push_back({{at, end}, svm_attrs{}, 0, 0});
        break;
      }
      if (it->first > at) {
        out.push_back({{at, it->first}, svm_attrs{}, 0, 0});
        at = it->first;
      }
      const va_t e = std::min(end, it->second.end);
      out.push_back({{at, e}, it->second.a, 0, 0});
      at = e;
      ++it;
    }
  }
  // Residency from the CPU page table (lock-free reads).
  va_t cpu;
  va_range allowed;
  SVM_CHECK(to_cpu_locked(gpu_va, cpu, allowed), "query_attrs: range checked above");
  const va_t delta = cpu - gpu_va;  // modular: cpu = gpu + delta
  for (attr_range& r : out) {
    for (va_t p = r.range.start; p < r.range.end; p += page_size) {
      const va_t c = p + delta;
      if (in_vram(c)) {
        ++r.vram_pages;
      } else if (mm_.cpu_translate(c).present) {
        ++r.system_pages;
      }
    }
  }
  return out;
}

bool gpu_vm::in_vram(va_t cpu) const noexcept {
  if (vram_pool_ == 0) return false;
  const pt::translation t = mm_.raw_pte(align_down(cpu, page_size));
  return t.level == 0 && cpu_pte::is_devpriv(t.entry) && cpu_pte::pool(t.entry) == vram_pool_;
}

}  // namespace svm
