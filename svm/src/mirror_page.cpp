// The page-centric mirror: no per-range objects, the device page table is
// the state. Its faults hold vm.lock shared, so faults of one VM run in
// parallel; the sequence is the page-table node's (seq_mode::pgtable) or
// the chunk notifier's under the chunk's mirror lock (seq_mode::notifier).
#include "vm_internal.h"

namespace svm {

errc gpu_vm::page_mirror::service_page(va_t gva, access acc, bool may_migrate) {
  shared_lock_guard g(vm_.lock_);
  return vm_.service_page_locked(gva, acc, may_migrate);
}

void gpu_vm::page_mirror::service_block(std::span<const va_t> pages, std::span<const access> accs,
                                        std::span<const std::uint8_t> may_migrate, std::span<errc> out) {
  shared_lock_guard g(vm_.lock_);
  vm_.service_block_locked(pages, accs, may_migrate, out);
}

std::uint64_t gpu_vm::page_mirror::read_begin(chunk& c, pt::node& n, va_range cwin) {
  if (seq_ == seq_mode::pgtable) {
    const std::uint64_t snap = n.read_seq();
    vm_.mm_.read_begin_range(cwin.start, cwin.end);
    return snap;
  }
  return c.sub.read_begin();
}

void gpu_vm::page_mirror::guard_walk(hmm_range& range, pt::node& n, std::uint64_t snap, unsigned first,
                                     unsigned last) {
  if (seq_ != seq_mode::pgtable) return;  // the notifier sequence guards the walk
  pt::node* np = &n;
  range.is_valid = [np, snap, first, last] { return np->unchanged_since(snap, first, last); };
}

bool gpu_vm::page_mirror::commit(chunk& c, pt::node& n, std::uint64_t snap, unsigned first, unsigned last,
                                 va_range, std::span<const hmm_pfn>, detail::fn_ref<void()> write) {
  if (seq_ == seq_mode::pgtable) {
    lock_guard ln(n.lock);
    if (!n.unchanged_since(snap, first, last)) return false;
    write();
    return true;
  }
  shared_lock_guard ml(c.mirror_lock);
  lock_guard ln(n.lock);
  if (c.sub.read_retry(snap)) return false;
  write();
  return true;
}

void gpu_vm::page_mirror::own_migration(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) {
  if (seq_ != seq_mode::notifier) return;  // faults do not read the notifier sequence
  lock_guard g(c.mirror_lock);
  sub.set_seq(cur_seq);
}

bool gpu_vm::page_mirror::try_advance(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) {
  if (seq_ != seq_mode::notifier) return true;
  if (!c.mirror_lock.try_lock()) return false;
  sub.set_seq(cur_seq);
  c.mirror_lock.unlock();
  return true;
}

void gpu_vm::page_mirror::invalidate(chunk& c, interval_notifier& sub, std::uint64_t cur_seq,
                                     std::span<const va_range> gpu, std::vector<va_range>& flush) {
  if (seq_ == seq_mode::notifier) {
    lock_guard g(c.mirror_lock);
    sub.set_seq(cur_seq);
    for (const va_range& r : gpu) vm_.zap_gpu(r, false, flush);
    return;
  }
  // Per-node sequences: the zap advances the sequence of every node it
  // clears entries in (zap_options::bump_seq).
  for (const va_range& r : gpu) vm_.zap_gpu(r, false, flush);
}

}  // namespace svm
