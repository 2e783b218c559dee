// hmm_range_fault (kernel: mm/hmm.c), docs/contracts.md §2.
#include "svm/notifier/hmm.h"

#include <algorithm>
#include <atomic>
#include <cstdio>

#include "mm_impl.h"
#include "svm/notifier/mm.h"
#include "svm/notifier/mmu_notifier.h"

namespace svm {

namespace {
constexpr hmm_pfn req_bits = hmm_pfn_req_fault | hmm_pfn_req_write;

hmm_pfn make_out(pfn_t pfn, unsigned pool, unsigned order, bool writable) {
  return hmm_pfn_valid | (writable ? hmm_pfn_write : 0) | (hmm_pfn{order} << hmm_pfn_order_shift) |
         (hmm_pfn{pool} << hmm_pfn_pool_shift) | pfn;
}
// The stale-sequence check: each thread remembers the (notifier, seq) its
// last call found stale; a call with the same pair is a retry loop that
// never refreshed its sequence.
std::atomic<std::uint64_t> stale_reuses{0};
struct stale_seen {
  const interval_notifier* notifier = nullptr;
  std::uint64_t seq = 0;
  bool reported = false;
};
thread_local stale_seen last_stale;
}  // namespace

std::uint64_t hmm_stale_sequence_reuses() noexcept { return stale_reuses.load(std::memory_order_relaxed); }

errc hmm_range_fault(hmm_range& range) {
  mm* m = range.notifier ? range.notifier->mm() : range.mm;
  if (!m) return errc::inval;
  if (range.end <= range.start || !is_aligned(range.start, page_size) || !is_aligned(range.end, page_size))
    return errc::inval;
  if (range.hmm_pfns.size() != (range.end - range.start) / page_size) return errc::inval;
  // The caller holds mmap_lock shared (checked by the lock validator in
  // debug builds; tells the analysis as much).
  m->mmap_lock_.assert_held_shared();

  va_t va = range.start;
  const mm::vma* v = nullptr;
  if (!range.is_valid && range.notifier && last_stale.notifier == range.notifier &&
      last_stale.seq == range.notifier_seq) {
    stale_reuses.fetch_add(1, std::memory_order_relaxed);
#ifndef NDEBUG
    if (!last_stale.reported)
      std::fprintf(stderr,
                   "svm: hmm_range_fault called again with the stale notifier sequence %llu: call "
                   "interval_notifier::read_begin() before each retry\n",
                   static_cast<unsigned long long>(range.notifier_seq));
#endif
    last_stale.reported = true;
  }
  for (;;) {
    // Before each walk pass: has an invalidation run since notifier_seq?
    if (range.is_valid) {
      if (!range.is_valid()) return errc::busy;
    } else if (range.notifier && range.notifier->check_retry(range.notifier_seq)) {
      last_stale.notifier = range.notifier;
      last_stale.seq = range.notifier_seq;
      return errc::busy;
    }
    const va_t pass_start = va;
    errc err = errc::ok;
    bool need_fault = false, fault_write = false;
    while (va < range.end) {
      hmm_pfn& slot = range.hmm_pfns[(va - range.start) / page_size];
      const hmm_pfn req = ((slot & range.pfn_flags_mask) | range.default_flags) & req_bits;
      const bool want = (req & hmm_pfn_req_fault) != 0;
      const bool want_write = want && (req & hmm_pfn_req_write) != 0;
      if (!v || va < v->start || va >= v->end) v = mm_impl::find_vma(*m, va);
      if (!v || v->kind == vma_kind::io || !v->readable()) {
        if (want) {
          err = errc::fault;
          break;
        }
        slot = hmm_pfn_error;
        va += page_size;
        continue;
      }
      const pt::translation t = m->pt_.translate(va);
      const std::uint64_t e = t.entry;
      hmm_pfn out = 0;
      bool fault = false;
      if (cpu_pte::is_valid(e)) {
        // Every 4K piece of the huge zero page is the pool's zero frame.
        const pfn_t pfn =
            cpu_pte::pfn(e) + (t.level == 1 && !cpu_pte::is_zero(e) ? (va & (huge_size - 1)) / page_size : 0);
        out = make_out(pfn, cpu_pte::pool(e), t.level * pt::bits_per_level, cpu_pte::is_writable(e));
        fault = want_write && !cpu_pte::is_writable(e);
      } else if (cpu_pte::is_devpriv(e) && range.dev_private_owner &&
                 m->pool_owner(cpu_pte::pool(e)) == range.dev_private_owner) {
        out = make_out(cpu_pte::pfn(e), cpu_pte::pool(e), 0, cpu_pte::is_writable(e));
      } else {
        fault = want;  // absent, swapped out, PROT_NONE leftover, another owner's device page
      }
      if (fault) {
        if (want_write && !v->writable()) {
          err = errc::perm;
          break;
        }
        need_fault = true;
        fault_write = want_write;
        break;
      }
      slot = out;
      va += page_size;
      if (t.level == 1 && cpu_pte::is_valid(e)) {
        // The rest of this huge leaf needs no new walk: consecutive frames,
        // same flags, while no page asks for more than the leaf gives.
        const va_t stop = std::min(range.end, align_down(va - page_size, huge_size) + huge_size);
        while (va < stop) {
          hmm_pfn& s2 = range.hmm_pfns[(va - range.start) / page_size];
          const hmm_pfn r2 = ((s2 & range.pfn_flags_mask) | range.default_flags) & req_bits;
          if ((r2 & hmm_pfn_req_fault) && (r2 & hmm_pfn_req_write) && !cpu_pte::is_writable(e)) break;
          if (!cpu_pte::is_zero(e)) out += 1;  // the huge zero page: the zero frame throughout
          s2 = out;
          va += page_size;
        }
      }
    }
    if (m->hooks_.hmm_after_walk) m->hooks_.hmm_after_walk(pass_start, va);
    if (err != errc::ok) return err;
    if (!need_fault) return errc::ok;
    // Fault the page in, then walk again from it (kernel: hmm_vma_fault
    // returns -EBUSY to the walk loop, which re-checks the sequence).
    if (errc r = m->handle_mm_fault(va, fault_write ? access::write : access::read); r != errc::ok) return r;
  }
}

}  // namespace svm
