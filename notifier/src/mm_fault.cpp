// Faults: anonymous, zero page, THP, page cache, write-protect (COW), swap-in and device-private migration back (kernel: mm/memory.c, mm/huge_memory.c).
// See svm/notifier/mm.h for the contracts and mm_impl.h for the internals.
#include <algorithm>
#include <cassert>
#include <cstring>
#include <thread>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

// ---- faults -------------------------------------------------------------------

namespace {
bool thp_allowed(const mm_options& o, huge_advice a) {
  switch (o.thp) {
    case thp_mode::never: return false;
    case thp_mode::madvise: return a == huge_advice::hugepage;
    case thp_mode::always: return a != huge_advice::nohugepage;
  }
  return false;
}
}  // namespace

// Kernel: get_page() under the PTE lock. With the reference held, the frame
// (or swap slot) cannot be freed and reused while the fault works without the
// lock, so the final compare-and-install of the same entry value cannot be
// fooled by an entry that went away and came back (ABA).
mm_impl::pte_snap mm_impl::read_pte_get(mm& m, va_t va) {
  for (;;) {
    epoch::guard g;
    pt::node* n = m.pt_.find_node(va, 0);
    lock_guard lk(n->lock);
    const std::uint64_t e = n->entries[entry_index(va, n->level)].load(std::memory_order_relaxed);
    if (n->dead || is_link(e)) continue;
    pte_snap s{e, n->level, false};
    if (n->level == 0) {
      if (cpu_pte::is_swap(e)) {
        m.pools_->swap->get(cpu_pte::pfn(e));
        s.ref = true;
      } else if (cpu_pte::holds_frame(e)) {
        m.pool(cpu_pte::pool(e)).get(cpu_pte::pfn(e));
        s.ref = true;
      }
    }
    return s;
  }
}

void mm_impl::put_snap(mm& m, const pte_snap& s) {
  if (!s.ref) return;
  if (cpu_pte::is_swap(s.e)) m.pools_->swap->put(cpu_pte::pfn(s.e));
  else m.pool(cpu_pte::pool(s.e)).put(cpu_pte::pfn(s.e));
}

// One attempt at resolving a fault at `va`. errc::again: the PTE changed under
// us (or a huge leaf was split); look again.
errc mm_impl::fault_once(mm& m, const vma& v, va_t va, bool write) {
  const pte_snap snap = read_pte_get(m, va);
  struct drop {
    mm& m;
    const pte_snap& s;
    ~drop() { put_snap(m, s); }
  } drop_ref{m, snap};
  const pt::translation t{snap.e, snap.level};
  const std::uint64_t e = t.entry;
  frame_pool& sys = m.pool(0);
  const bool vw = v.writable();

  if (cpu_pte::is_valid(e)) {
    if (!write || cpu_pte::is_writable(e)) return errc::ok;  // spurious
    if (t.level == 1) {
      if (cpu_pte::is_zero(e)) {
        // Write to the huge zero page: a fresh THP replaces it (kernel:
        // do_huge_zero_wp_pmd); without one, split to 4K zero pages and
        // break COW on the one page below.
        if (auto hf = sys.alloc_huge()) {
          const va_t slot = align_down(va, huge_size);
          mmu_notifier_range r;
          (void)start_fn(m, r, mmu_notifier_event::clear, slot, slot + huge_size);
          bool ok = false;
          auto pn = m.pt_.pin(slot, 1, &cpu_page_table::split_entry);
          if (pn) {
            pt::node* n = *pn;
            {
              lock_guard lk(n->lock);
              const unsigned idx = entry_index(slot, 1);
              if (n->level == 1 && n->entries[idx].load(std::memory_order_relaxed) == e) {
                m.pt_.set_leaf_locked(*n, idx, cpu_pte::make(*hf, 0, cpu_pte::present | cpu_pte::write));
                ok = true;
              }
            }
            m.pt_.unpin(n);
          }
          end_fn(m, r);
          if (!ok) {
            for (pfn_t i = 0; i < frame_pool::huge_frames; ++i) sys.put(*hf + i);
            if (!pn) return pn.error();
            return errc::again;
          }
          m.stats_.thp_faults.fetch_add(1, std::memory_order_relaxed);
          m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
          return errc::ok;
        }
      }
      // Write to a write-protected huge page: split it (same translations),
      // then break COW on the 4K page (as do_huge_pmd_wp_page falls back).
      auto n = m.pt_.pin(va, 0, &cpu_page_table::split_entry);
      if (!n) return n.error();
      m.pt_.unpin(*n);
      return errc::again;
    }
    const unsigned pool = cpu_pte::pool(e);
    const pfn_t old = cpu_pte::pfn(e);
    if (v.shared || (!cpu_pte::is_zero(e) && m.pool(pool).refcount(old) == 2)) {  // the PTE's + ours
      // Shared mapping, or an exclusive anonymous page: upgrade in place. No
      // invalidation: adding a permission never makes a translation stale.
      auto r = install_pte(m, va, e, e | cpu_pte::write);
      if (!r) return r.error();
      if (*r) m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
      return *r ? errc::ok : errc::again;
    }
    // Copy on write (kernel: wp_page_copy): new frame, CLEAR on the page,
    // swap the PTE, and drop the old reference after range end.
    anon_vma_prepare(v);
    auto nf = sys.alloc();
    if (!nf) return nf.error();
    if (!cpu_pte::is_zero(e)) frame_pool::copy_frame(sys.frame_data(*nf), m.pool(pool).frame_data(old));
    mmu_notifier_range r;
    (void)start_fn(m, r, mmu_notifier_event::clear, va, va + page_size);
    auto ok = install_pte(m, va, e, cpu_pte::make(*nf, 0, cpu_pte::present | cpu_pte::write));
    end_fn(m, r);
    if (!ok || !*ok) {
      sys.put(*nf);
      return ok ? errc::again : ok.error();
    }
    if (!cpu_pte::is_zero(e)) m.pool(pool).put(old);
    m.stats_.cow_breaks.fetch_add(1, std::memory_order_relaxed);
    m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
    return errc::ok;
  }

  if (cpu_pte::is_protnone(e)) {
    // The VMA is accessible again (mprotect restores entries; this is a
    // leftover from a racing fault): make it present read-only.
    const std::uint64_t ne = (e & ~cpu_pte::protnone) | cpu_pte::present;
    if (t.level != 0) {
      auto n = m.pt_.pin(va, 0, &cpu_page_table::split_entry);
      if (!n) return n.error();
      m.pt_.unpin(*n);
      return errc::again;
    }
    auto r = install_pte(m, va, e, ne);
    if (!r) return r.error();
    return errc::again;
  }

  if (cpu_pte::is_swap(e)) {
    const std::uint64_t slot = cpu_pte::pfn(e);
    auto nf = sys.alloc();
    if (!nf) return nf.error();
    swap_space& sw = *m.pools_->swap;
    const bool exclusive = sw.refs(slot) == 2;  // the PTE's + ours
    sw.load(slot, sys.frame_data(*nf));
    const std::uint64_t flags = cpu_pte::present | ((write && exclusive && vw) ? cpu_pte::write : 0);
    auto r = install_pte(m, va, e, cpu_pte::make(*nf, 0, flags));
    if (!r || !*r) {
      sys.put(*nf);
      return r ? errc::again : r.error();
    }
    sw.put(slot);
    m.stats_.swap_ins.fetch_add(1, std::memory_order_relaxed);
    m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
    return errc::again;  // look again: a write may still need the COW path
  }

  // Under migration: handle_mm_fault waits for it to go.
  if (cpu_pte::is_migration(e)) return errc::again;

  if (cpu_pte::is_devpriv(e)) {
    // Device-private page: migrate it back to system memory. A pool with
    // pgmap ops does it through migrate_to_ram, which handle_mm_fault calls
    // (the entry appeared after it looked); the others right here.
    const unsigned pool = cpu_pte::pool(e);
    if (m.pool_ops(pool)) return errc::again;
    const pfn_t old = cpu_pte::pfn(e);
    auto nf = sys.alloc();
    if (!nf) return nf.error();
    mmu_notifier_range r;
    (void)start_fn(m, r, mmu_notifier_event::migrate, va, va + page_size, m.pool_owner(pool));
    // The device's mappings are gone now: copy, then switch the PTE.
    frame_pool::copy_frame(sys.frame_data(*nf), m.pool(pool).frame_data(old));
    auto ok = install_pte(m, va, e, cpu_pte::make(*nf, 0, cpu_pte::present | (e & cpu_pte::write)));
    end_fn(m, r);
    if (!ok || !*ok) {
      sys.put(*nf);
      return ok ? errc::again : ok.error();
    }
    m.pool(pool).put(old);
    m.stats_.migrations.fetch_add(1, std::memory_order_relaxed);
    return errc::again;
  }

  assert(e == 0);
  if (v.backing) {
    // Shared anonymous (shmem) or file-backed.
    const std::uint64_t pgoff = v.pgoff + (va - v.start) / page_size;
    if (!write && m.opts_.fault_around_bytes > page_size) {
      // Fault-around (kernel: do_fault_around / filemap_map_pages): map the
      // resident page-cache pages of an aligned window around `va`, clipped
      // to the VMA and to this 2M page table, where the PTE is empty. The
      // faulting page is among them when it is resident.
      const std::uint64_t nr = m.opts_.fault_around_bytes / page_size;
      const std::uint64_t pte_off = (va / page_size) % pt::entries_per_node;
      const std::uint64_t vma_off = (va - v.start) / page_size;
      const std::uint64_t vma_pages = (v.end - v.start) / page_size;
      const std::uint64_t from = std::max(align_down(pte_off, nr), pte_off - std::min(pte_off, vma_off));
      const std::uint64_t to = std::min({from + nr, std::uint64_t{pt::entries_per_node}, pte_off + vma_pages - vma_off});
      const va_t table = align_down(va, huge_size);
      bool mapped_self = false;
      for (std::uint64_t i = from; i < to; ++i) {
        const va_t a = table + i * page_size;
        const std::uint64_t off = v.pgoff + (a - v.start) / page_size;
        if (!v.backing->lookup(off)) continue;
        if (a != va && m.pt_.translate(a).entry != 0) continue;
        auto cp = v.backing->get_page(off);
        if (!cp) continue;
        const std::uint64_t ne = cpu_pte::make(*cp, 0, cpu_pte::present | (v.shared && vw ? cpu_pte::write : 0));
        auto r = install_pte(m, a, 0, ne);
        if (!r || !*r) {
          sys.put(*cp);
          if (!r) return r.error();
          continue;
        }
        if (a == va) mapped_self = true;
      }
      if (mapped_self) {
        m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
        return errc::ok;
      }
    }
    auto cp = v.backing->get_page(pgoff);
    if (!cp) return cp.error();
    frame_pool& fp = *v.backing->pool();
    assert(&fp == &sys && "files live in the mm's system pool");
    std::uint64_t ne;
    if (v.shared) {
      ne = cpu_pte::make(*cp, 0, cpu_pte::present | (vw ? cpu_pte::write : 0));
    } else if (write) {
      auto nf = sys.alloc();
      if (!nf) {
        fp.put(*cp);
        return nf.error();
      }
      frame_pool::copy_frame(sys.frame_data(*nf), fp.frame_data(*cp));
      fp.put(*cp);
      anon_vma_prepare(v);
      *cp = *nf;
      ne = cpu_pte::make(*nf, 0, cpu_pte::present | cpu_pte::write);
    } else {
      ne = cpu_pte::make(*cp, 0, cpu_pte::present);
    }
    auto r = install_pte(m, va, 0, ne);
    if (!r || !*r) {
      sys.put(*cp);
      return r ? errc::again : r.error();
    }
    m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
    return errc::ok;
  }

  // Private anonymous.
  const va_t slot = align_down(va, huge_size);
  if (v.private_anon() && thp_allowed(m.opts_, v.advice) && slot >= v.start && slot + huge_size <= v.end &&
      t.level >= 1 && !empty_table(m, slot)) {
    // No 4K table under this 2M slot (not even an empty one Linux would still
    // hold) and the slot is empty: the huge zero
    // page on a read (with use_zero_page), else a THP. Either way the VMA
    // gets its anon_vma (kernel: do_huge_pmd_anonymous_page prepares it
    // before choosing).
    anon_vma_prepare(v);
    if (!write && m.opts_.thp_use_zero_page && m.opts_.zero_page) {
      auto pn = m.pt_.pin(slot, 1, &cpu_page_table::split_entry);
      if (!pn) return pn.error();
      pt::node* n = *pn;
      bool ok = false;
      {
        lock_guard lk(n->lock);
        const unsigned idx = entry_index(slot, 1);
        if (n->level == 1 && n->entries[idx].load(std::memory_order_relaxed) == 0) {
          m.pt_.set_leaf_locked(*n, idx, cpu_pte::make(mm::zero_pfn(), 0, cpu_pte::present | cpu_pte::zero));
          ok = true;
        }
      }
      m.pt_.unpin(n);
      if (!ok) return errc::again;
      m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
      return errc::ok;
    }
    auto hf = sys.alloc_huge();
    if (hf) {
      auto pn = m.pt_.pin(slot, 1, &cpu_page_table::split_entry);
      if (!pn) {
        for (pfn_t i = 0; i < frame_pool::huge_frames; ++i) sys.put(*hf + i);
        return pn.error();
      }
      pt::node* n = *pn;
      bool ok = false;
      {
        lock_guard lk(n->lock);
        const unsigned idx = entry_index(slot, 1);
        if (n->level == 1 && n->entries[idx].load(std::memory_order_relaxed) == 0) {
          m.pt_.set_leaf_locked(*n, idx, cpu_pte::make(*hf, 0, cpu_pte::present | (vw ? cpu_pte::write : 0)));
          ok = true;
        }
      }
      m.pt_.unpin(n);
      if (!ok) {
        for (pfn_t i = 0; i < frame_pool::huge_frames; ++i) sys.put(*hf + i);
        return errc::again;
      }
      m.stats_.thp_faults.fetch_add(1, std::memory_order_relaxed);
      m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
      return errc::ok;
    }
    // No free aligned block: fall back to 4K.
  }
  if (!write && m.opts_.zero_page) {
    auto r = install_pte(m, va, 0, cpu_pte::make(mm::zero_pfn(), 0, cpu_pte::present | cpu_pte::zero));
    if (!r) return r.error();
    if (*r) m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
    return *r ? errc::ok : errc::again;
  }
  anon_vma_prepare(v);
  auto nf = sys.alloc();
  if (!nf) return nf.error();
  auto r = install_pte(m, va, 0, cpu_pte::make(*nf, 0, cpu_pte::present | (vw ? cpu_pte::write : 0)));
  if (!r || !*r) {
    sys.put(*nf);
    return r ? errc::again : r.error();
  }
  m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
  return errc::ok;
}

errc mm::handle_mm_fault(va_t va, access a) {
  mmap_lock_.assert_held_shared();
  va = align_down(va, page_size);
  const bool write = needs_write(a);
  unsigned ops_calls = 0;
  for (;;) {
    const vma* v = mm_impl::find_vma(*this, va);
    if (!v || v->kind == vma_kind::io) return errc::fault;
    if (write && !v->writable()) return v->accessible() ? errc::perm : errc::fault;
    if (!write && !v->accessible()) return errc::fault;  // PROT_WRITE implies read (x86)
    // A lock-free look first, for the two cases that leave the fault path:
    const std::uint64_t e = pt_.translate(va).entry;
    if (cpu_pte::is_migration(e)) {
      // Kernel: migration_entry_wait. The migrating thread's finalize
      // (which takes no mmap lock) always replaces the entry.
      std::this_thread::yield();
      continue;
    }
    if (cpu_pte::is_devpriv(e)) {
      if (dev_pagemap_ops* ops = pool_ops(cpu_pte::pool(e))) {
        // Kernel: do_swap_page -> pgmap->ops->migrate_to_ram, then the
        // fault is retried. An owner that leaves the page on the device
        // every time gets the fault refused, not an endless loop.
        if (ops_calls++ == max_migrate_to_ram_calls) return errc::fault;
        const errc r = ops->migrate_to_ram(*this, va);
        if (r == errc::nomem) return r;
        if (r != errc::ok && r != errc::again) return errc::fault;
        continue;
      }
    }
    errc r = mm_impl::fault_once(*this, *v, va, write);
    if (r != errc::again) return r;
  }
}

}  // namespace svm
