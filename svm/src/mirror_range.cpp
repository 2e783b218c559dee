// The range-based, VM-locked baseline (vm_internal.h): range objects with
// page arrays, the notifier-wide sequence, one VM-wide mirror lock.
#include "vm_internal.h"

namespace svm {

errc gpu_vm::range_mirror::service_page(va_t gva, access acc, bool may_migrate) {
  // The baseline is VM-locked: its faults hold vm.lock exclusively across
  // the whole service (lookup, hmm_range_fault, commit), as the range-based
  // drivers hold their VM or svms lock, so handler threads of one VM take
  // turns. Its invalidations take the other VM-wide lock, lock_, never
  // vm.lock: a callback may run inside this very fault's hmm_range_fault
  // (a copy-on-write break).
  lock_guard g(vm_.lock_);
  return vm_.service_page_locked(gva, acc, may_migrate);
}

std::uint64_t gpu_vm::range_mirror::read_begin(chunk& c, pt::node&, va_range) { return c.sub.read_begin(); }

void gpu_vm::range_mirror::guard_walk(hmm_range&, pt::node&, std::uint64_t, unsigned, unsigned) {}

bool gpu_vm::range_mirror::commit(chunk& c, pt::node& n, std::uint64_t snap, unsigned, unsigned, va_range win,
                                  std::span<const hmm_pfn> pages, detail::fn_ref<void()> write) {
  lock_guard bl(lock_);
  {
    lock_guard ln(n.lock);
    if (c.sub.read_retry(snap)) return false;
    write();
  }
  // The baseline's bookkeeping: the window becomes one range object holding
  // its page array, replacing what overlapped it.
  cut_locked(win);
  ranges_.emplace(win.start, svm_range{win.end, std::vector<hmm_pfn>(pages.begin(), pages.end())});
  return true;
}

void gpu_vm::range_mirror::own_migration(chunk&, interval_notifier& sub, std::uint64_t cur_seq) {
  lock_guard g(lock_);
  sub.set_seq(cur_seq);
}

bool gpu_vm::range_mirror::try_advance(chunk&, interval_notifier& sub, std::uint64_t cur_seq) {
  if (!lock_.try_lock()) return false;
  sub.set_seq(cur_seq);
  lock_.unlock();
  return true;
}

void gpu_vm::range_mirror::invalidate(chunk&, interval_notifier& sub, std::uint64_t cur_seq,
                                      std::span<const va_range> gpu, std::vector<va_range>& flush) {
  lock_guard g(lock_);
  sub.set_seq(cur_seq);
  for (const va_range& r : gpu) {
    cut_locked(r);
    vm_.zap_gpu(r, false, flush);
  }
}

std::size_t gpu_vm::range_mirror::ranges() const {
  lock_guard g(lock_);
  return ranges_.size();
}

void gpu_vm::range_mirror::cut_locked(va_range r) {
  auto it = ranges_.lower_bound(r.start);
  if (it != ranges_.begin() && std::prev(it)->second.end > r.start) --it;
  while (it != ranges_.end() && it->first < r.end) {
    const va_t start = it->first;
    svm_range old = std::move(it->second);
    it = ranges_.erase(it);
    // Keep the pieces outside r, each with its own slice of the page array.
    if (start < r.start)
      ranges_.emplace(start, svm_range{r.start, std::vector<hmm_pfn>(old.pages.begin(),
                                                                     old.pages.begin() + (r.start - start) / page_size)});
    if (old.end > r.end) {
      it = ranges_.emplace(r.end, svm_range{old.end, std::vector<hmm_pfn>(old.pages.begin() + (r.end - start) / page_size,
                                                                           old.pages.end())})
               .first;
      ++it;
    }
  }
}

}  // namespace svm
