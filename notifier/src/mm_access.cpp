// CPU accesses through the CPU page table, faulting as needed.
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

// ---- CPU access -------------------------------------------------------------

template <class Op>
errc mm_impl::access(mm& m, va_t va, bool write, Op&& op) {
  // Past the user VA width (2^48 and up, non-canonical addresses included)
  // nothing is mapped, and the page table has no node to look in.
  if (va >= m.opts_.mmap_limit) return errc::fault;
  for (;;) {
    {
      epoch::guard g;
      pt::node* n = m.pt_.find_node(va, 0);
      bool done = false, retry = false;
      {
        lock_guard lk(n->lock);
        const std::uint64_t e = n->entries[entry_index(va, n->level)].load(std::memory_order_relaxed);
        if (n->dead || is_link(e)) {
          retry = true;
        } else if (cpu_pte::is_valid(e) && (!write || cpu_pte::is_writable(e)) && n->level <= 1) {
          // Every 4K piece of the huge zero page is the pool's zero frame.
          const pfn_t pfn =
              cpu_pte::pfn(e) + (n->level == 1 && !cpu_pte::is_zero(e) ? (va & (huge_size - 1)) / page_size : 0);
          std::byte* base = m.pool(cpu_pte::pool(e)).frame_data(pfn);
          // Under the PTE's node lock: the frame cannot be unmapped (and so
          // cannot be freed) while the access runs, as with a CPU's TLB.
          op(base + (va & (page_size - 1)));
          done = true;
        }
      }
      if (done) return errc::ok;
      if (retry) continue;
    }
    errc r = m.handle_mm_fault(va, write ? access::write : access::read);
    if (r != errc::ok) return r;
  }
}

errc mm::read(va_t va, std::span<std::byte> out) {
  shared_lock_guard g(mmap_lock_);
  std::size_t done = 0;
  while (done < out.size()) {
    const va_t a = va + done;
    const std::size_t n = std::min<std::size_t>(page_size - (a & (page_size - 1)), out.size() - done);
    errc r = mm_impl::access(*this, a, false, [&](std::byte* p) { frame_pool::load_bytes(p, out.data() + done, n); });
    if (r != errc::ok) return r;
    done += n;
  }
  return errc::ok;
}

errc mm::write(va_t va, std::span<const std::byte> in) {
  shared_lock_guard g(mmap_lock_);
  std::size_t done = 0;
  while (done < in.size()) {
    const va_t a = va + done;
    const std::size_t n = std::min<std::size_t>(page_size - (a & (page_size - 1)), in.size() - done);
    errc r = mm_impl::access(*this, a, true, [&](std::byte* p) { frame_pool::store_bytes(p, in.data() + done, n); });
    if (r != errc::ok) return r;
    done += n;
  }
  return errc::ok;
}

result<std::uint64_t> mm::atomic_fetch_add(va_t va, std::uint64_t v) {
  if (!is_aligned(va, 8)) return errc::inval;
  shared_lock_guard g(mmap_lock_);
  std::uint64_t old = 0;
  errc r = mm_impl::access(*this, va, true, [&](std::byte* p) {
    old = std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(p)).fetch_add(v, std::memory_order_seq_cst);
  });
  if (r != errc::ok) return r;
  return old;
}

result<std::uint64_t> mm::atomic_compare_exchange(va_t va, std::uint64_t expected, std::uint64_t desired) {
  if (!is_aligned(va, 8)) return errc::inval;
  shared_lock_guard g(mmap_lock_);
  std::uint64_t old = expected;
  errc r = mm_impl::access(*this, va, true, [&](std::byte* p) {
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(p)).compare_exchange_strong(old, desired,
                                                                                              std::memory_order_seq_cst);
  });
  if (r != errc::ok) return r;
  return old;
}

cpu_translation mm::cpu_translate(va_t va) const noexcept {
  cpu_translation out;
  if (va >= pt_.va_limit()) return out;
  const pt::translation t = pt_.translate(va);
  if (!cpu_pte::is_valid(t.entry)) return out;
  out.present = true;
  out.writable = cpu_pte::is_writable(t.entry);
  out.zero_page = cpu_pte::is_zero(t.entry);
  out.pool = cpu_pte::pool(t.entry);
  out.order = t.level * 9;
  out.huge_zero = out.zero_page && t.level == 1;
  // Every 4K piece of the huge zero page is the pool's zero frame.
  out.pfn = cpu_pte::pfn(t.entry) +
            (t.level == 1 && !out.zero_page ? (va & (huge_size - 1)) / page_size : 0);
  if (out.pool < pool_count()) out.generation = pool(out.pool).frame_generation(out.pfn);
  return out;
}

}  // namespace svm
