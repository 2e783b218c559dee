// TLB shootdown: the invalidation log, the engines' acknowledgement wait,
// and the no-op kick a cancel uses to send engines down their slow path.
#include "device_impl.h"

namespace svm::dev {

std::uint64_t device::impl::read_invalidations_locked(std::uint64_t seen, tlb_model& tlb) {
  const std::uint64_t now = inval_next_;
  if (now - seen > inval_log_size) {
    tlb.flush_all();
  } else {
    for (std::uint64_t s = seen + 1; s <= now; ++s) {
      const log_entry& e = inval_log_[s % inval_log_size];
      if (!e.r.empty()) tlb.invalidate(e.vm, e.r);  // empty: a cancel's kick
    }
  }
  return now;
}


void device::impl::kick_engines() {
  lock_guard g(inval_lock_);
  const std::uint64_t s = ++inval_next_;
  inval_log_[s % inval_log_size] = {s, 0, {}};
  inval_seq_.store(s, std::memory_order_seq_cst);
}

errc device::impl::invalidate_tlb(vm_id vm, va_range r) {
  if (detail::tl_engine) return errc::inval;  // would wait for its own access
  if (r.empty()) return errc::ok;
  std::uint64_t s;
  {
    lock_guard g(inval_lock_);
    s = ++inval_next_;
    inval_log_[s % inval_log_size] = {s, vm, {align_down(r.start, page_size), align_up(r.end, page_size)}};
    inval_seq_.store(s, std::memory_order_seq_cst);
  }
  // One check per engine: done once it acknowledged s, or is not running
  // (idle/stalled engines recheck before touching their TLB again).
  const auto done = [s](std::uint32_t w) { return (w & 3) != mode_running || ack_reached(w, s); };
  for (auto& e : engines_) {
    std::uint32_t w = e->status.load(std::memory_order_seq_cst);
    for (int i = 0; i < 256 && !done(w); ++i) {
      SVM_CPU_RELAX();
      w = e->status.load(std::memory_order_seq_cst);
    }
    if (done(w)) continue;
    inval_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (!done(w = e->status.load(std::memory_order_seq_cst))) e->status.wait(w, std::memory_order_seq_cst);
    inval_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
  invalidations_.fetch_add(1, std::memory_order_relaxed);
  return errc::ok;
}

}  // namespace svm::dev
