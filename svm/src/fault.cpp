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

// ---- the fault path -----------------------------------------------------------

std::uint64_t gpu_vm::service(std::span<dev::fault_record> recs) {
  bump(ctr_->batches);
  bump(ctr_->faults_raised, recs.size());
  // Coalesce records of one page into one service with the strongest access
  // (recs are sorted by address); remember each page's outcome.
  std::vector<dev::fault_record> ok;
  std::vector<std::pair<errc, dev::fault_record>> bad;
  ok.reserve(recs.size());
  std::uint64_t coalesced = 0;
  for (std::size_t i = 0; i < recs.size();) {
    const va_t page = recs[i].page();
    access acc = recs[i].acc;
    std::size_t j = i + 1;
    for (; j < recs.size() && recs[j].page() == page; ++j) acc = std::max(acc, recs[j].acc);
    coalesced += j - i - 1;
    const errc e = mirror_->service_page(page, acc);
    for (std::size_t k = i; k < j; ++k) {
      if (e == errc::ok) ok.push_back(recs[k]);
      else bad.emplace_back(e, recs[k]);
    }
    i = j;
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

errc gpu_vm::service_page_locked(va_t gva, access acc) {
  if (const gpuva* m = tree_.find(gva)) return service_bo_locked(*m, gva, acc);
  if (cfg_.mode == vm_mode::long_running) return errc::fault;
  va_t cpu;
  va_range allowed;
  if (!to_cpu_locked(gva, cpu, allowed)) return errc::fault;
  // The valid-fault short cut: another fault already mapped it.
  const pt::translation tr = pt_.translate(gva);
  if (dev_pte::is_valid(tr.entry) && !(tr.entry & bo_pte_bit) &&
      (!needs_write(acc) || dev_pte::is_writable(tr.entry))) {
    bump(ctr_->valid_faults);
    return errc::ok;
  }
  // The window must avoid every BO mapping: trim `allowed` to the hole
  // between the BO mappings around gva.
  if (const gpuva* next = tree_.first_overlap({gva, allowed.end})) allowed.end = std::min(allowed.end, next->start());
  for (const gpuva* m = tree_.first_overlap({allowed.start, gva}); m && m->start() < gva; m = tree_.next(*m))
    allowed.start = std::max(allowed.start, m->end());
  return service_svm_locked(gva, cpu, acc, allowed);
}

namespace {

// Do the hmm entries of a 2M window describe one CPU huge page that a 2M
// device leaf can map? (order 9 everywhere, one pool, consecutive frames
// starting 2M aligned, one write permission.)
bool huge_mappable(std::span<const hmm_pfn> p) {
  if (p.size() != huge_size / page_size) return false;
  const hmm_pfn first = p[0];
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

std::uint64_t pte_of(hmm_pfn e) {
  return dev_pte::make(aperture::system, mm_device_pfn(hmm_pfn_to_pool(e), hmm_pfn_to_pfn(e)),
                       (e & hmm_pfn_write) != 0);
}

}  // namespace

errc gpu_vm::service_svm_locked(va_t gva, va_t cpu, access acc, va_range allowed) {
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

  const auto deadline = clock_type::now() + cfg_.fault_timeout;
  bool allow_huge = cfg_.huge_leaves && (delta % static_cast<std::int64_t>(huge_size)) == 0;
  bool shrink = false;
  std::array<hmm_pfn, huge_size / page_size> pfns;
  std::uint64_t since = inval_stamp_.load(std::memory_order_acquire);

  for (;;) {
    if (clock_type::now() > deadline) return errc::busy;
    // Choose the window inside the CPU VMA, and whether to aim for a 2M
    // leaf: only where the CPU maps (or, on first touch, will map) a 2M
    // huge page, since a 2M fault pins the 1G-level node and takes its
    // sequence, which invalidations of other 2M blocks there also advance.
    va_range win;
    bool aim_huge = false;
    {
      mm::read_guard rd(mm_);
      auto vma = mm_.find_vma(cpu);
      if (!vma || cpu < vma->start) return errc::fault;
      const va_range vma_gpu{vma->start - static_cast<va_t>(delta), vma->end - static_cast<va_t>(delta)};
      const va_range ok = intersect(allowed, vma_gpu);
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
    const bool write = needs_write(acc);
    for (std::size_t i = 0; i < npages; ++i)
      span[i] = (write && win.start + i * page_size == align_down(gva, page_size)) ? hmm_req::write : 0;
    hmm_range range;
    range.notifier = &c->sub;
    range.notifier_seq = snap;
    range.start = cwin.start;
    range.end = cwin.end;
    range.hmm_pfns = span;
    range.default_flags = acc == access::prefetch ? 0 : hmm_req::fault;
    range.pfn_flags_mask = hmm_req::write;
    range.dev_private_owner = owner();
    // The window's entries in its node: an advance of the node's sequence
    // for other entries of the node (a disjoint invalidation in the same 2M
    // block) does not make this fault retry.
    const unsigned first = pt::entry_index(win.start, level), last = pt::entry_index(win.end - 1, level);
    mirror_->guard_walk(range, *n, snap, first, last);
    errc err;
    {
      mm::read_guard rd(mm_);
      bump(ctr_->hmm_calls);
      span_scope sp(dev_.trace(), "hmm_range_fault", npages);
      err = hmm_range_fault(range);
    }
    if (err == errc::busy) {
      bump(ctr_->retries_busy);
      if (!overlapped_since(win, since)) bump(ctr_->false_retries);
      since = inval_stamp_.load(std::memory_order_acquire);
      continue;
    }
    if (err == errc::fault && npages > 1) {
      shrink = true;  // another page of the window went away: retry on the faulting page alone
      continue;
    }
    if (err != errc::ok) return err;
    if (hooks_.before_commit) hooks_.before_commit(win);

    const bool huge = level == 1 && huge_mappable(span);
    if (level == 1 && !huge) {
      allow_huge = false;  // not one CPU huge page: map it with 4K entries
      continue;
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
          pt_.set_leaf_locked(*n, idx, pte_of(span[0]));
          written = npages;
        }
      } else {
        for (std::size_t i = 0; i < npages; ++i) {
          if (!(span[i] & hmm_pfn_valid)) continue;
          const unsigned idx = pt::entry_index(win.start + i * page_size, 0);
          const std::uint64_t e = pte_of(span[i]);
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
      continue;
    }
    if (stale) {
      bump(ctr_->retries_seq);
      if (!overlapped_since(win, since)) bump(ctr_->false_retries);
      since = inval_stamp_.load(std::memory_order_acquire);
      continue;
    }
    bump(ctr_->ptes_written, written);
    if (huge) bump(ctr_->huge_leaves);
    return errc::ok;
  }
}

errc gpu_vm::service_bo_locked(const gpuva& m, va_t gva, access) {
  bump(ctr_->bo_faults);
  auto it = bos_.find(m.bo());
  if (it == bos_.end()) return errc::fault;
  const bo& b = *it->second;
  // Map the 2M block around the fault that this mapping covers.
  const va_range blk = intersect({align_down(gva, huge_size), align_down(gva, huge_size) + huge_size}, m.range());
  const aperture ap = b.where == placement::vram ? aperture::vram : aperture::system;
  const errc e = pt_.populate(blk.start, blk.end, 0, [&](va_t va) {
    const pfn_t f = b.frames[m.bo_offset_at(va) / page_size];
    return dev_pte::make(ap, ap == aperture::system ? mm_device_pfn(0, f) : f, true) | bo_pte_bit;
  });
  if (e == errc::ok) bump(ctr_->ptes_written, blk.size() / page_size);
  return e;
}

}  // namespace svm
