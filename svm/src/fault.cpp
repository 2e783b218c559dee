// gpu_vm's fault path: the records of one batch, coalesced per page; BO
// faults (populate from the BO's frames); SVM faults through the retry loop
// around hmm_range_fault, whose sequence and commit steps belong to the
// mirror implementation (vm_internal.h).
#include <algorithm>
#include <bit>
#include <chrono>

#include "check.h"
#include "vm_internal.h"

namespace svm {

using dev::dev_pte;
using detail::bump;
using detail::intersect;
using detail::now_ns;
using detail::span_scope;
using clock_type = std::chrono::steady_clock;

namespace {
// An hmm_range over the CPU window `cwin` of chunk notifier `sub`, from the
// sequence snapshot `snap`, with the request flags of `pfns` (masked) and
// `dflt` for every page.
hmm_range window_range(interval_notifier& sub, std::uint64_t snap, va_range cwin, std::span<hmm_pfn> pfns,
                       hmm_pfn dflt, hmm_pfn mask, const void* owner) {
  hmm_range r;
  r.notifier = &sub;
  r.notifier_seq = snap;
  r.start = cwin.start;
  r.end = cwin.end;
  r.hmm_pfns = pfns;
  r.default_flags = dflt;
  r.pfn_flags_mask = mask;
  r.dev_private_owner = owner;
  return r;
}
}  // namespace

// ---- the fault path -----------------------------------------------------------

std::uint64_t gpu_vm::service(std::span<dev::fault_record> recs) {
  bump(ctr_->batches);
  bump(ctr_->faults_raised, recs.size());
  // Evicted VRAM BOs these records touch come back first (under vm.lock
  // exclusive, which the service below does not hold).
  if (evicted_bos_.load(std::memory_order_relaxed) != 0) restore_bos(recs);
  // Coalesce records of one page into one service with the strongest access
  // (recs are sorted by address): page k covers recs [ends[k-1], ends[k]).
  std::vector<va_t> pages;
  std::vector<access> accs;
  std::vector<std::uint32_t> ends;
  // The forward-progress rule: a page may migrate for this batch unless
  // every record of it is a retried access (fault_record::retries), one
  // whose earlier service something undid before the access ran (another
  // fault's migration evicted it, say). Those map where the memory lies,
  // so a working set larger than VRAM cannot make faults undo each other
  // forever: each access faults for the first time once, and only first
  // faults move memory (docs/migration.md).
  std::vector<std::uint8_t> may_migrate;
  pages.reserve(recs.size());
  accs.reserve(recs.size());
  ends.reserve(recs.size());
  may_migrate.reserve(recs.size());
  std::uint64_t coalesced = 0;
  for (std::size_t i = 0; i < recs.size();) {
    const va_t page = recs[i].page();
    access acc = recs[i].acc;
    bool first = recs[i].retries == 0;
    std::size_t j = i + 1;
    for (; j < recs.size() && recs[j].page() == page; ++j) {
      acc = std::max(acc, recs[j].acc);
      first = first || recs[j].retries == 0;
    }
    coalesced += j - i - 1;
    pages.push_back(page);
    accs.push_back(acc);
    may_migrate.push_back(first ? 1 : 0);
    ends.push_back(static_cast<std::uint32_t>(j));
    i = j;
  }
  // Service per 2M block: the pages of one block go to the mirror together.
  std::vector<errc> res(pages.size(), errc::ok);
  std::uint64_t groups = 0;
  for (std::size_t k = 0; k < pages.size();) {
    const va_t blk = align_down(pages[k], huge_size);
    std::size_t l = k + 1;
    while (l < pages.size() && align_down(pages[l], huge_size) == blk) ++l;
    ++groups;
    if (l - k == 1)
      res[k] = mirror_->service_page(pages[k], accs[k], may_migrate[k] != 0);
    else
      mirror_->service_block(std::span<const va_t>(pages).subspan(k, l - k),
                             std::span<const access>(accs).subspan(k, l - k),
                             std::span<const std::uint8_t>(may_migrate).subspan(k, l - k),
                             std::span(res).subspan(k, l - k));
    k = l;
  }
  bump(ctr_->groups, groups);
  std::vector<dev::fault_record> ok;
  std::vector<std::pair<errc, dev::fault_record>> bad;
  ok.reserve(recs.size());
  for (std::size_t k = 0, i = 0; k < pages.size(); ++k) {
    for (; i < ends[k]; ++i) {
      if (res[k] == errc::ok) ok.push_back(recs[i]);
      else bad.emplace_back(res[k], recs[i]);
    }
  }
  const std::uint64_t t = now_ns();
  for (const auto& r : ok) {
    const std::uint64_t lat = t > r.time_ns ? t - r.time_ns : 1;
    const unsigned b = std::min<unsigned>(latency_histogram::buckets - 1, static_cast<unsigned>(std::bit_width(lat)) - 1);
    bump(ctr_->latency[b]);
  }
  if (!ok.empty()) {
    bump(ctr_->faults_serviced, ok.size());
    dev_.hw().replay(ok);
  }
  if (!bad.empty()) {
    bump(ctr_->faults_cancelled, bad.size());
    std::sort(bad.begin(), bad.end(), [](auto& a, auto& b) { return a.first < b.first; });
    std::vector<dev::fault_record> group;
    for (std::size_t i = 0; i < bad.size();) {
      group.clear();
      std::size_t j = i;
      for (; j < bad.size() && bad[j].first == bad[i].first; ++j) group.push_back(bad[j].second);
      dev_.hw().cancel(group, bad[i].first);
      i = j;
    }
  }
  return coalesced;
}

errc gpu_vm::service_page_locked(va_t gva, access acc, bool may_migrate) {
  if (const gpuva* m = tree_.find(gva)) return service_bo_locked(*m, gva, acc, may_migrate);
  if (cfg_.mode == vm_mode::long_running) return errc::fault;
  if (released_) return errc::fault;  // the mm is gone: nothing to mirror
  va_t cpu;
  va_range allowed;
  if (!to_cpu_locked(gva, cpu, allowed)) return errc::fault;
  // The valid-fault short cut: another fault already mapped it.
  const pt::translation tr = pt_.translate(gva);
  if (dev_pte::is_valid(tr.entry) && !(tr.entry & bo_pte_bit) && dev_pte::permits(tr.entry, acc)) {
    bump(ctr_->valid_faults);
    return errc::ok;
  }
  // The window must avoid every BO mapping.
  return service_svm_locked(gva, cpu, acc, bo_hole_locked(gva, allowed), may_migrate);
}

va_range gpu_vm::bo_hole_locked(va_t gva, va_range allowed) const {
  if (const gpuva* next = tree_.first_overlap({gva, allowed.end})) allowed.end = std::min(allowed.end, next->start());
  for (const gpuva* m = tree_.first_overlap({allowed.start, gva}); m && m->start() < gva; m = tree_.next(*m))
    allowed.start = std::max(allowed.start, m->end());
  return allowed;
}

void gpu_vm::service_block_locked(std::span<const va_t> pages, std::span<const access> accs,
                                  std::span<const std::uint8_t> may_migrate, std::span<errc> out) {
  // One window for the block: every page SVM, mirrored by the same window,
  // and no BO mapping among them. Otherwise page by page.
  bool done = false;
  va_t cpu;
  va_range allowed;
  if (cfg_.mode != vm_mode::long_running && !released_ && to_cpu_locked(pages.front(), cpu, allowed)) {
    const va_range span_gpu{pages.front(), pages.back() + page_size};
    if (span_gpu.end <= allowed.end && tree_.is_free(span_gpu))
      done = service_svm_block_locked(pages, accs, cpu, bo_hole_locked(pages.front(), allowed), out);
  }
  if (done) return;
  for (std::size_t i = 0; i < pages.size(); ++i) out[i] = service_page_locked(pages[i], accs[i], may_migrate[i] != 0);
}

namespace {

// Do the hmm entries of a 2M window describe one CPU huge page that a 2M
// device leaf can map? (order 9 everywhere, one pool, consecutive frames
// starting 2M aligned, one write permission.)
bool huge_mappable(std::span<const hmm_pfn> p) {
  if (p.size() != huge_size / page_size) return false;
  const hmm_pfn first = p[0];
  // (A device-private page is reported with order 0: VRAM is mapped with
  // 4K entries.)
  if (!(first & hmm_pfn_valid) || hmm_pfn_to_map_order(first) != order_2m) return false;
  if (hmm_pfn_to_pfn(first) % (huge_size / page_size) != 0) return false;
  for (std::size_t i = 1; i < p.size(); ++i) {
    if ((p[i] & (hmm_pfn_valid | hmm_pfn_write | hmm_pfn_pool_mask | hmm_pfn_order_mask)) !=
            (first & (hmm_pfn_valid | hmm_pfn_write | hmm_pfn_pool_mask | hmm_pfn_order_mask)) ||
        hmm_pfn_to_pfn(p[i]) != hmm_pfn_to_pfn(first) + i)
      return false;
  }
  return true;
}

// The device PTE of an hmm entry: this device's VRAM pool (`vram_pool`,
// its index in the mm; 0: none) through the VRAM aperture, any other pool
// through the system aperture. `no_atomic`: a system-memory entry gets
// dev_pte::no_atomic_bit (its range wants device atomics), so an atomic
// there faults and migrates first; VRAM entries always allow atomics.
std::uint64_t pte_of(hmm_pfn e, unsigned vram_pool, bool no_atomic = false) {
  if (vram_pool != 0 && hmm_pfn_to_pool(e) == vram_pool)
    return dev_pte::make(aperture::vram, hmm_pfn_to_pfn(e), (e & hmm_pfn_write) != 0);
  return dev_pte::make(aperture::system, mm_device_pfn(hmm_pfn_to_pool(e), hmm_pfn_to_pfn(e)),
                       (e & hmm_pfn_write) != 0, !no_atomic);
}

}  // namespace

errc gpu_vm::service_svm_locked(va_t gva, va_t cpu, access acc, va_range allowed, bool may_migrate) {
  const std::int64_t delta = static_cast<std::int64_t>(cpu - gva);  // cpu = gva + delta
  chunk* c = get_chunk(cpu);
  if (!c) return errc::fault;
  struct chunk_ref {
    gpu_vm* vm;
    chunk* c;
    ~chunk_ref() { vm->put_chunk(c); }
  } ref{this, c};
  // A window never leaves the chunk whose notifier guards it.
  const va_range chunk_gpu{c->cpu.start - static_cast<va_t>(delta), c->cpu.end - static_cast<va_t>(delta)};
  allowed = intersect(allowed, chunk_gpu);
  // Memory whose attributes want VRAM moves there first (migrate.cpp). A
  // retried access that stayed put maps its own page only: a wider window
  // would keep the rest of the chunk in system memory until something
  // invalidates it, where its next first fault can still migrate it.
  if (migrate_for_fault_locked(gva, cpu, acc, allowed, may_migrate))
    allowed = intersect(allowed, {align_down(gva, page_size), align_down(gva, page_size) + page_size});

  // The retry bound (vm_config::fault_timeout): give up only when the
  // clock has passed the deadline AND the window itself was invalidated
  // often enough, so a fault that was merely descheduled completes however
  // much the rest of its chunk churned, while a genuine retry storm on the
  // window still ends. Retries no invalidation of the window explains
  // count toward unexplained_retry_limit only (the no-hang net). The other
  // retries (shrink to one page, fall back to 4K entries) happen at most
  // once each and need no bound.
  const auto deadline = clock_type::now() + cfg_.fault_timeout;
  unsigned window_retries = 0, unexplained_retries = 0;
  auto exhausted = [&](overlap o) {
    if (o == overlap::no) bump(ctr_->false_retries);
    if (o == overlap::yes) {
      ++window_retries;
    } else {
      ++unexplained_retries;
    }
    if (window_retries < cfg_.fault_retry_floor && unexplained_retries < unexplained_retry_limit) return false;
    if (clock_type::now() <= deadline) return false;
    bump(ctr_->fault_timeouts);
    return true;
  };
  bool allow_huge = cfg_.huge_leaves && (delta % static_cast<std::int64_t>(huge_size)) == 0;
  bool shrink = false;
  std::array<hmm_pfn, huge_size / page_size> pfns;
  std::uint64_t since = inval_stamp_.load(std::memory_order_acquire);

  for (;;) {
    // Choose the window inside the CPU VMA, and whether to aim for a 2M
    // leaf: only where the CPU maps (or, on first touch, will map) a 2M
    // huge page, since a 2M fault pins the 1G-level node and takes its
    // sequence, which invalidations of other 2M blocks there also advance.
    va_range win;
    bool aim_huge = false;
    bool vma_writable = false;
    {
      mm::read_guard rd(mm_);
      auto vma = mm_.find_vma(cpu);
      if (!vma || cpu < vma->start) return errc::fault;
      const va_range vma_gpu{vma->start - static_cast<va_t>(delta), vma->end - static_cast<va_t>(delta)};
      const va_range ok = intersect(allowed, vma_gpu);
      vma_writable = (vma->protection & prot::write) == prot::write;
      const va_range page{align_down(gva, page_size), align_down(gva, page_size) + page_size};
      win = shrink ? page : policy_->choose(gva, ok);
      // A policy that breaks its contract (a window that is not a power of
      // two from 4K to 2M, aligned to its size, holding the fault, inside
      // `allowed`) gets the fault's page alone: one window must fit one
      // leaf node and the pfn array.
      const std::uint64_t wsize = win.size();
      if (wsize < page_size || wsize > huge_size || (wsize & (wsize - 1)) != 0 || win.start % wsize != 0 ||
          gva < win.start || gva >= win.end || win.start < ok.start || win.end > ok.end)
        win = page;
      if (allow_huge && win.size() == huge_size) {
        const cpu_translation ct = mm_.cpu_translate(win.start + static_cast<va_t>(delta));
        aim_huge = ct.present ? ct.order == order_2m : vma->advice == huge_advice::hugepage;
      }
    }
    const unsigned level = aim_huge ? 1u : 0u;
    auto pinned = pt_.pin(win.start, level, &dev::dev_page_table::split_entry);
    if (!pinned) return pinned.error();
    pt::node* n = *pinned;
    struct pin_ref {
      dev::dev_page_table& pt;
      pt::node* n;
      ~pin_ref() { pt.unpin(n); }
    } pin{pt_, n};

    const va_range cwin{win.start + static_cast<va_t>(delta), win.end + static_cast<va_t>(delta)};
    const std::uint64_t snap = mirror_->read_begin(*c, *n, cwin);
    if (hooks_.after_snapshot) hooks_.after_snapshot(win);

    const std::size_t npages = win.size() / page_size;
    auto span = std::span(pfns).first(npages);
    // A write fault asks for write access to its own page. Its neighbours
    // in the window are asked for read access, except those the CPU has not
    // populated at all (where the VMA allows writing): asked for read, each
    // would get the zero page, and the device's next write to it would break
    // that, invalidate the window and retry, once per page of a first-touch
    // storm. Present read-only neighbours (COW after fork, the zero page)
    // stay read-only: asking for them writable would break every COW of the
    // window on each fault, and a CPU that forks often would then keep the
    // window busy until the fault times out. A snapshot pass of
    // hmm_range_fault (no fault flags) tells absent pages from present ones.
    const bool write = needs_write(acc);
    const std::size_t self = static_cast<std::size_t>((align_down(gva, page_size) - win.start) / page_size);
    std::fill(span.begin(), span.end(), hmm_pfn{0});
    if (write) span[self] = hmm_req::write;
    bool probe_busy = false;  // the pass saw the sequence move: retry without a second call on it
    // The pass runs only when the faulting page itself is absent (a first
    // touch): a write to a present read-only page (a COW break) asks for
    // that page alone, without paying a walk of the whole window.
    if (write && vma_writable && npages > 1 && acc != access::prefetch &&
        !mm_.cpu_translate(align_down(gva, page_size) + static_cast<va_t>(delta)).present) {
      std::array<hmm_pfn, huge_size / page_size> seen_pfns;
      auto seen = std::span(seen_pfns).first(npages);
      std::fill(seen.begin(), seen.end(), hmm_pfn{0});
      hmm_range probe = window_range(c->sub, snap, cwin, seen, 0, 0, owner());
      mirror_->guard_walk(probe, *n, snap, pt::entry_index(win.start, level), pt::entry_index(win.end - 1, level));
      errc pe;
      {
        mm::read_guard rd(mm_);
        pe = hmm_range_fault(probe);
      }
      if (pe == errc::ok) {
        for (std::size_t i = 0; i < npages; ++i)
          if (!(seen[i] & hmm_pfn_valid)) span[i] = hmm_req::write;
      } else if (pe == errc::busy) {
        probe_busy = true;  // calling again on the same stale sequence would be the bug the checker reports
      }  // else: read access for the neighbours, as without the pass
    }
    hmm_range range =
        window_range(c->sub, snap, cwin, span, acc == access::prefetch ? 0 : hmm_req::fault, hmm_req::write, owner());
    // The window's entries in its node: an advance of the node's sequence
    // for other entries of the node (a disjoint invalidation in the same 2M
    // block) does not make this fault retry.
    const unsigned first = pt::entry_index(win.start, level), last = pt::entry_index(win.end - 1, level);
    mirror_->guard_walk(range, *n, snap, first, last);
    errc err = errc::busy;
    if (!probe_busy) {
      mm::read_guard rd(mm_);
      bump(ctr_->hmm_calls);
      span_scope sp(dev_.trace(), "hmm_range_fault", npages);
      err = hmm_range_fault(range);
    }
    if (err == errc::busy) {
      bump(ctr_->retries_busy);
      const overlap o = overlapped_since(win, since);
      since = inval_stamp_.load(std::memory_order_acquire);
      if (exhausted(o)) return errc::busy;
      continue;
    }
    if (err == errc::fault && npages > 1) {
      shrink = true;  // another page of the window went away: retry on the faulting page alone
      bump(ctr_->retries_shrink);
      continue;
    }
    if (err != errc::ok) return err;
    // The device reaches the frames through the VM's aperture, which holds
    // their pools: make each pool named here reachable before its PTEs.
    for (unsigned i = 0, last_pool = ~0u; i < npages; ++i) {
      if (!(span[i] & hmm_pfn_valid) || hmm_pfn_to_pool(span[i]) == last_pool) continue;
      last_pool = static_cast<unsigned>(hmm_pfn_to_pool(span[i]));
      ensure_pool(last_pool);
    }
    if (hooks_.before_commit) hooks_.before_commit(win);

    const bool huge = level == 1 && huge_mappable(span);
    if (level == 1 && !huge) {
      allow_huge = false;  // not one CPU huge page: map it with 4K entries
      bump(ctr_->retries_huge);
      continue;
    }
    // Which system-memory pages may not take atomics (their range wants
    // device atomics, and this fault is not the atomic that has to go
    // through after a migration fell back). A 2M leaf needs one answer for
    // all its pages: mixed answers map 4K entries.
    std::array<bool, huge_size / page_size> no_atomic;  // filled (and read) only when gated
    const bool gated = atomics_gated();
    if (gated && !atomic_gate(win, acc == access::atomic ? self : npages, std::span(no_atomic).first(npages))) {
      if (huge) {
        allow_huge = false;
        bump(ctr_->retries_huge);
        continue;
      }
    }
    bool relink = false;
    std::uint64_t written = 0;
    auto write_ptes = [&] {
      n->lock.assert_held();  // commit() holds it around this call
      if (huge) {
        const unsigned idx = pt::entry_index(win.start, 1);
        if (pt::is_link(n->entries[idx].load(std::memory_order_relaxed))) {
          relink = true;  // a 4K table appeared there: map with 4K entries
        } else {
          pt_.set_leaf_locked(*n, idx, pte_of(span[0], vram_pool_, gated && no_atomic[0]));
          written = npages;
        }
      } else {
        for (std::size_t i = 0; i < npages; ++i) {
          if (!(span[i] & hmm_pfn_valid)) continue;
          const unsigned idx = pt::entry_index(win.start + i * page_size, 0);
          const std::uint64_t e = pte_of(span[i], vram_pool_, gated && no_atomic[i]);
          if (n->entries[idx].load(std::memory_order_relaxed) != e) {
            pt_.set_leaf_locked(*n, idx, e);
            ++written;
          }
        }
      }
    };
    // The commit's locks and staleness check are the mirror's: the node
    // lock alone (per-node sequence), the chunk's mirror lock shared
    // (notifier sequence), or the VM-wide lock (baseline).
    const bool stale = !mirror_->commit(*c, *n, snap, first, last, win, span, write_ptes);
    if (relink) {
      allow_huge = false;
      bump(ctr_->retries_huge);
      continue;
    }
    if (stale) {
      bump(ctr_->retries_seq);
      const overlap o = overlapped_since(win, since);
      since = inval_stamp_.load(std::memory_order_acquire);
      if (exhausted(o)) return errc::busy;
      continue;
    }
    bump(ctr_->ptes_written, written);
    if (huge) bump(ctr_->huge_leaves);
    return errc::ok;
  }
}

bool gpu_vm::service_svm_block_locked(std::span<const va_t> pages, std::span<const access> accs, va_t cpu,
                                      va_range allowed, std::span<errc> out) {
  const va_t front = pages.front();
  const std::int64_t delta = static_cast<std::int64_t>(cpu - front);
  chunk* c = get_chunk(cpu);
  if (!c) return false;
  struct chunk_ref {
    gpu_vm* vm;
    chunk* c;
    ~chunk_ref() { vm->put_chunk(c); }
  } ref{this, c};
  const va_range chunk_gpu{c->cpu.start - static_cast<va_t>(delta), c->cpu.end - static_cast<va_t>(delta)};
  allowed = intersect(allowed, chunk_gpu);
  const va_range win{front, pages.back() + page_size};  // inside one 2M block: one leaf node
  if (win.start < allowed.start || win.end > allowed.end) return false;
  const va_range cwin{win.start + static_cast<va_t>(delta), win.end + static_cast<va_t>(delta)};

  // Pages another fault already mapped well enough take the valid-fault
  // short cut (as in service_page_locked); the rest are requested.
  std::array<std::uint16_t, huge_size / page_size> need;  // window page index of each requested fault
  std::array<std::uint16_t, huge_size / page_size> need_at;  // ... and its index in `pages`
  std::size_t nneed = 0;
  std::uint64_t valid = 0;  // counted only once the block is done here (a fallback counts its own)
  for (std::size_t i = 0; i < pages.size(); ++i) {
    const pt::translation tr = pt_.translate(pages[i]);
    if (dev_pte::is_valid(tr.entry) && !(tr.entry & bo_pte_bit) && dev_pte::permits(tr.entry, accs[i])) {
      ++valid;
      out[i] = errc::ok;
      continue;
    }
    need[nneed] = static_cast<std::uint16_t>((pages[i] - win.start) / page_size);
    need_at[nneed++] = static_cast<std::uint16_t>(i);
  }
  if (nneed == 0) {
    bump(ctr_->valid_faults, valid);
    return true;
  }
  // A page that needs migrating to VRAM (or that is ours read-only in VRAM
  // and written) goes through per-page service, which migrates first; so
  // does every block while some range asks for device atomics (per-page
  // service sets the PTEs' atomic permission).
  if (atomics_gated()) return false;
  for (std::size_t k = 0; k < nneed; ++k) {
    const va_t gva = win.start + need[k] * page_size;
    const va_t cva = gva + static_cast<va_t>(delta);
    if (wants_vram(gva, cva, accs[need_at[k]])) return false;
    if (needs_write(accs[need_at[k]]) && in_vram(cva) && !cpu_pte::is_writable(mm_.raw_pte(cva).entry)) return false;
  }

  unsigned seq_retries = 0;
  std::uint64_t since = inval_stamp_.load(std::memory_order_acquire);
  std::array<hmm_pfn, huge_size / page_size> pfns;
  const std::size_t npages = win.size() / page_size;
  auto span = std::span(pfns).first(npages);
  const unsigned first = pt::entry_index(win.start, 0), last = pt::entry_index(win.end - 1, 0);
  for (;;) {
    {
      // The block takes one window only where the policy gives each of its
      // faults its own 4K window: then it maps exactly what per-page
      // service would.
      mm::read_guard rd(mm_);
      auto vma = mm_.find_vma(cwin.start);
      if (!vma || cwin.start < vma->start || cwin.end > vma->end) return false;
      const va_range ok = intersect(allowed, {vma->start - static_cast<va_t>(delta), vma->end - static_cast<va_t>(delta)});
      for (std::size_t k = 0; k < nneed; ++k) {
        const va_t gva = win.start + need[k] * page_size;
        if (policy_->choose(gva, ok) != va_range{gva, gva + page_size}) return false;
      }
    }
    auto pinned = pt_.pin(win.start, 0, &dev::dev_page_table::split_entry);
    if (!pinned) return false;  // per-page service reports the error
    pt::node* n = *pinned;
    struct pin_ref {
      dev::dev_page_table& pt;
      pt::node* n;
      ~pin_ref() { pt.unpin(n); }
    } pin{pt_, n};
    const std::uint64_t snap = mirror_->read_begin(*c, *n, cwin);
    if (hooks_.after_snapshot) hooks_.after_snapshot(win);
    std::fill(span.begin(), span.end(), hmm_pfn{0});
    for (std::size_t k = 0; k < nneed; ++k) {
      const access acc = accs[need_at[k]];
      span[need[k]] = (acc == access::prefetch ? 0 : hmm_req::fault) | (needs_write(acc) ? hmm_req::write : 0);
    }
    hmm_range range = window_range(c->sub, snap, cwin, span, 0, hmm_req::fault | hmm_req::write, owner());
    mirror_->guard_walk(range, *n, snap, first, last);
    errc err;
    {
      mm::read_guard rd(mm_);
      bump(ctr_->hmm_calls);
      span_scope sp(dev_.trace(), "hmm_range_fault", npages);
      err = hmm_range_fault(range);
    }
    bool stale = false;
    if (err == errc::busy) {
      bump(ctr_->retries_busy);
      stale = true;
    } else if (err != errc::ok) {
      return false;  // a page the CPU refuses: per-page service gives each page its own outcome
    } else {
      for (unsigned i = 0, last_pool = ~0u; i < npages; ++i) {
        if (!(span[i] & hmm_pfn_valid) || hmm_pfn_to_pool(span[i]) == last_pool) continue;
        last_pool = static_cast<unsigned>(hmm_pfn_to_pool(span[i]));
        ensure_pool(last_pool);
      }
      if (hooks_.before_commit) hooks_.before_commit(win);
      std::uint64_t written = 0;
      auto write_ptes = [&] {
        n->lock.assert_held();  // commit() holds it around this call
        for (std::size_t k = 0; k < nneed; ++k) {
          const hmm_pfn p = span[need[k]];
          if (!(p & hmm_pfn_valid)) continue;  // a prefetch of an absent page
          const unsigned idx = pt::entry_index(win.start + need[k] * page_size, 0);
          const std::uint64_t e = pte_of(p, vram_pool_);
          if (n->entries[idx].load(std::memory_order_relaxed) != e) {
            pt_.set_leaf_locked(*n, idx, e);
            ++written;
          }
        }
      };
      if (mirror_->commit(*c, *n, snap, first, last, win, span, write_ptes)) {
        bump(ctr_->ptes_written, written);
        bump(ctr_->grouped_pages, nneed);
        bump(ctr_->valid_faults, valid);
        for (std::size_t k = 0; k < nneed; ++k) out[need_at[k]] = errc::ok;
        return true;
      }
      bump(ctr_->retries_seq);
      stale = true;
    }
    if (stale) {
      if (overlapped_since(win, since) == overlap::no) bump(ctr_->false_retries);
      since = inval_stamp_.load(std::memory_order_acquire);
      // A block's window spans up to 2M, so a CPU storm over any of it
      // moves its sequence far more often than it moves a 4K page's. After
      // group_retry_limit stale tries the block gives up as a group and each
      // page is serviced on its own, under its own retry bound: grouping
      // never makes a fault time out that per-page service would complete.
      if (++seq_retries >= group_retry_limit) {
        bump(ctr_->group_fallbacks);
        return false;
      }
    }
  }
}

errc gpu_vm::service_bo_locked(const gpuva& m, va_t gva, access, bool may_migrate) {
  bump(ctr_->bo_faults);
  auto it = bos_.find(m.bo());
  if (it == bos_.end()) return errc::fault;
  const bo& b = *it->second;
  // Map the 2M block around the fault that this mapping covers. A retried
  // access to an evicted VRAM BO (restore_bos left it in system memory for
  // that access) maps its own page only, so that the BO's next first fault
  // still brings it back.
  va_range blk = intersect({align_down(gva, huge_size), align_down(gva, huge_size) + huge_size}, m.range());
  if (!may_migrate && b.where == placement::system && b.home == placement::vram)
    blk = intersect(blk, {align_down(gva, page_size), align_down(gva, page_size) + page_size});
  const aperture ap = b.where == placement::vram ? aperture::vram : aperture::system;
  const errc e = pt_.populate(blk.start, blk.end, 0, [&](va_t va) {
    const pfn_t f = b.frames[m.bo_offset_at(va) / page_size];
    return dev_pte::make(ap, ap == aperture::system ? mm_device_pfn(0, f) : f, true) | bo_pte_bit;
  });
  if (e == errc::ok) bump(ctr_->ptes_written, blk.size() / page_size);
  return e;
}

}  // namespace svm
