// The simulated address space: VMAs, CPU page tables, faults and the mm
// system calls. See svm/notifier/mm.h for the contracts.
#include "svm/notifier/mm.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

// ---- file -----------------------------------------------------------------

file::file(std::shared_ptr<frame_pool> pool, std::uint64_t size) : pool_(std::move(pool)) {
  lock_guard g(lock_);
  pages_.assign(align_up(size, page_size) / page_size, 0);
}

file::~file() {
  std::vector<pfn_t> pages;
  {
    lock_guard g(lock_);
    pages.swap(pages_);
  }
  for (pfn_t p : pages)
    if (p) pool_->put(p);
}

std::uint64_t file::size() const {
  lock_guard g(lock_);
  return pages_.size() * page_size;
}

void file::grow(std::uint64_t size) {
  lock_guard g(lock_);
  const std::size_t n = align_up(size, page_size) / page_size;
  if (n > pages_.size()) pages_.resize(n, 0);
}

result<pfn_t> file::get_page(std::uint64_t pgoff) {
  {
    lock_guard g(lock_);
    if (pgoff >= pages_.size()) return errc::fault;
    if (pages_[pgoff]) {
      pool_->get(pages_[pgoff]);  // lock-free; nests under the file lock
      return pages_[pgoff];
    }
  }
  // Allocate outside the file lock (the pool lock has the same rank).
  auto p = pool_->alloc();
  if (!p) return p.error();
  pfn_t spare = 0, out;
  {
    lock_guard g(lock_);
    if (pgoff >= pages_.size()) {
      spare = *p;
      out = 0;
    } else {
      if (!pages_[pgoff]) pages_[pgoff] = *p;
      else spare = *p;
      out = pages_[pgoff];
      pool_->get(out);
    }
  }
  if (spare) pool_->put(spare);
  if (!out) return errc::fault;
  return out;
}

errc file::pwrite(std::uint64_t off, std::span<const std::byte> data) {
  std::size_t done = 0;
  while (done < data.size()) {
    const std::uint64_t o = off + done;
    auto p = get_page(o / page_size);
    if (!p) return p.error();
    const std::size_t in_page = o % page_size;
    const std::size_t n = std::min<std::size_t>(page_size - in_page, data.size() - done);
    frame_pool::store_bytes(pool_->frame_data(*p) + in_page, data.data() + done, n);
    pool_->put(*p);
    done += n;
  }
  return errc::ok;
}

errc file::pread(std::uint64_t off, std::span<std::byte> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t o = off + done;
    auto p = get_page(o / page_size);
    if (!p) return p.error();
    const std::size_t in_page = o % page_size;
    const std::size_t n = std::min<std::size_t>(page_size - in_page, out.size() - done);
    frame_pool::load_bytes(pool_->frame_data(*p) + in_page, out.data() + done, n);
    pool_->put(*p);
    done += n;
  }
  return errc::ok;
}

// ---- swap -------------------------------------------------------------------

result<std::uint64_t> swap_space::store(const std::byte* frame) {
  lock_guard g(lock_);
  if (used_ >= capacity_) return errc::nomem;
  std::uint64_t idx;
  if (!free_.empty()) {
    idx = free_.back();
    free_.pop_back();
  } else {
    idx = slots_.size();
    slots_.emplace_back();
  }
  slot& s = slots_[idx];
  s.refs = 1;
  if (!s.data) s.data = std::make_unique<std::byte[]>(page_size);
  frame_pool::load_bytes(frame, s.data.get(), page_size);
  ++used_;
  return idx;
}

void swap_space::load(std::uint64_t idx, std::byte* frame) {
  lock_guard g(lock_);
  assert(idx < slots_.size() && slots_[idx].refs > 0);
  frame_pool::store_bytes(frame, slots_[idx].data.get(), page_size);
}

void swap_space::get(std::uint64_t idx) {
  lock_guard g(lock_);
  assert(slots_[idx].refs > 0);
  ++slots_[idx].refs;
}

void swap_space::put(std::uint64_t idx) {
  lock_guard g(lock_);
  assert(slots_[idx].refs > 0);
  if (--slots_[idx].refs == 0) {
    free_.push_back(idx);
    --used_;
  }
}

std::uint32_t swap_space::refs(std::uint64_t idx) const {
  lock_guard g(lock_);
  return idx < slots_.size() ? slots_[idx].refs : 0;
}

std::size_t swap_space::used() const {
  lock_guard g(lock_);
  return used_;
}

// ---- mm: construction ---------------------------------------------------

mm::mm(mm_options o) : mm(o, nullptr) {}

namespace {
// mmap_lock keys: a fork child's lock orders after its parent's (fork holds
// the parent's while it fills the child).
std::atomic<std::uint64_t> next_mm_key{1};
}  // namespace

mm::mm(mm_options o, std::shared_ptr<pool_set> pools)
    : opts_(o),
      pools_(std::move(pools)),
      mmap_lock_(mmap_class_, next_mm_key.fetch_add(1, std::memory_order_relaxed)),
      vmas_(std::make_unique<vma_tree>()) {
  if (!pools_) {
    pools_ = std::make_shared<pool_set>();
    pools_->pools[0] = {std::make_shared<frame_pool>(o.frames), pool_kind::numa, nullptr};
    pools_->swap = std::make_shared<swap_space>(o.swap_slots);
    pools_->count.store(1, std::memory_order_release);
  }
  if (opts_.mmap_limit > pt_.va_limit()) opts_.mmap_limit = pt_.va_limit();
}

mm::~mm() {
  teardown();
  subs_.detach_all();
}

unsigned mm::pool_count() const noexcept { return pools_->count.load(std::memory_order_acquire); }

result<unsigned> mm::attach_pool(std::shared_ptr<frame_pool> p, pool_kind kind, const void* owner) {
  if (!p) return errc::inval;
  lock_guard g(mmap_lock_);
  lock_guard a(pools_->attach_lock);
  const unsigned n = pools_->count.load(std::memory_order_relaxed);
  if (n >= cpu_pte::max_pools) return errc::nospc;
  pools_->pools[n] = {std::move(p), kind, owner};
  // release: publishes the slot; pairs with the acquire load in pool_count().
  pools_->count.store(n + 1, std::memory_order_release);
  return n;
}

mm_stats mm::stats() const noexcept {
  auto l = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  return {l(stats_.faults), l(stats_.cow_breaks), l(stats_.thp_faults), l(stats_.swap_outs),
          l(stats_.swap_ins), l(stats_.migrations), l(stats_.invalidations)};
}

std::size_t mm::swap_used() const noexcept { return pools_->swap->used(); }

std::size_t mm::resident_pages() const {
  std::size_t n = 0;
  epoch::guard g;
  auto visit = [&](auto& self, const pt::node* nd) -> void {
    for (const auto& ent : nd->entries) {
      const std::uint64_t e = ent.load(std::memory_order_seq_cst);  // epoch protocol
      if (e == 0) continue;
      if (is_link(e)) {
        self(self, pt::link_target(e));
      } else if (cpu_pte::is_valid(e) || cpu_pte::is_protnone(e)) {
        n += std::size_t{1} << (9 * nd->level);
      }
    }
  };
  visit(visit, pt_.root());
  return n;
}

// ---- VMAs -------------------------------------------------------------------

const mm::vma* mm_impl::find_vma(const mm& m, va_t va) {
  auto& set = m.vmas_->set;
  mm::vma key;
  key.start = va;
  auto it = set.upper_bound(key);
  if (it == set.begin()) return nullptr;
  --it;
  return va < it->end ? &*it : nullptr;
}

mm::vma* mm_impl::find_vma_mut(mm& m, va_t va) { return const_cast<vma*>(find_vma(m, va)); }

mm::vma* mm_impl::first_ending_after(const mm& m, va_t start) {
  auto& set = m.vmas_->set;
  mm::vma key;
  key.start = start;
  auto it = set.upper_bound(key);
  if (it != set.begin()) {
    auto prev = std::prev(it);
    if (prev->end > start) return const_cast<vma*>(&*prev);
  }
  return it == set.end() ? nullptr : const_cast<vma*>(&*it);
}

mm::vma* mm_impl::next_vma(const mm& m, vma* v) {
  auto& set = m.vmas_->set;
  auto it = std::next(set.iterator_to(*v));
  return it == set.end() ? nullptr : &*it;
}

void mm_impl::split_at(mm& m, va_t va) {
  vma* v = find_vma_mut(m, va);
  if (!v || v->start == va) return;
  auto* tail = new vma;
  tail->start = va;
  tail->end = v->end;
  tail->protection = v->protection;
  tail->kind = v->kind;
  tail->shared = v->shared;
  tail->advice = v->advice;
  tail->backing = v->backing;
  tail->pgoff = v->pgoff + (va - v->start) / page_size;
  v->end = va;
  insert_vma(m, tail);
}

bool mm_impl::range_free(const mm& m, va_t start, va_t end) {
  const vma* v = first_ending_after(m, start);
  return !v || v->start >= end;
}

result<va_t> mm_impl::get_unmapped_area(const mm& m, std::uint64_t len) {
  // Bottom-up first fit from mmap_base; 2M alignment for lengths of 2M or
  // more (as Linux does for anonymous THP-capable mappings).
  const std::uint64_t align = len >= huge_size ? huge_size : page_size;
  va_t cand = align_up(m.opts_.mmap_base, align);
  for (const vma& v : m.vmas_->set) {
    if (v.end <= cand) continue;
    if (v.start >= cand + len) break;
    cand = align_up(v.end, align);
  }
  if (cand + len > m.opts_.mmap_limit || cand + len < cand) return errc::nomem;
  return cand;
}

void mm_impl::insert_vma(mm& m, vma* v) { m.vmas_->set.insert(*v); }

void mm_impl::erase_vma(mm& m, vma* v) {
  m.vmas_->set.erase(m.vmas_->set.iterator_to(*v));
  delete v;
}

std::optional<vma_info> mm::find_vma(va_t va) const {
  mmap_lock_.assert_held_shared();
  const vma* v = mm_impl::find_vma(*this, va);
  if (!v) return std::nullopt;
  return v->info();
}

std::vector<vma_info> mm::vmas() {
  shared_lock_guard g(mmap_lock_);
  std::vector<vma_info> out;
  for (const vma& v : vmas_->set) out.push_back(v.info());
  return out;
}

// ---- invalidation helpers -------------------------------------------------

errc mm::invalidate_range_start(mmu_notifier_range& r) {
  r.mm = this;
  stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
  return subs_.invalidate_range_start(r);
}

void mm::invalidate_range_end(mmu_notifier_range& r) { subs_.invalidate_range_end(r); }

errc mm_impl::start_fn(mm& m, mmu_notifier_range& r, mmu_notifier_event ev, va_t s, va_t e, const void* owner,
                    bool blockable) {
  r.start = s;
  r.end = e;
  r.event = ev;
  r.owner = owner;
  r.blockable = blockable;
  if (errc err = m.invalidate_range_start(r); err != errc::ok) return err;
  if (m.hooks_.after_invalidate_start) m.hooks_.after_invalidate_start(r);
  return errc::ok;
}

void mm_impl::end_fn(mm& m, mmu_notifier_range& r) {
  if (m.hooks_.before_invalidate_end) m.hooks_.before_invalidate_end(r);
  m.invalidate_range_end(r);
}

void mm_impl::collect(const mm& m, pending_free& f, std::uint64_t e, unsigned level) {
  (void)m;
  if (cpu_pte::is_swap(e)) {
    f.swap_slots.push_back(cpu_pte::pfn(e));
    return;
  }
  if (!cpu_pte::holds_frame(e)) return;
  const pfn_t n = pfn_t{1} << (9 * level);
  for (pfn_t i = 0; i < n; ++i) f.frames.emplace_back(cpu_pte::pool(e), cpu_pte::pfn(e) + i);
}

void mm_impl::release(const mm& m, pending_free& f) {
  for (auto [pool, pfn] : f.frames) m.pool(pool).put(pfn);
  for (std::uint64_t s : f.swap_slots) m.pools_->swap->put(s);
  f.frames.clear();
  f.swap_slots.clear();
}

void mm_impl::zap_range(mm& m, va_t start, va_t end, pending_free& f) {
  std::vector<va_range> flush;
  [[maybe_unused]] errc r = m.pt_.zap(start, end, flush,
                                      [&](va_t, std::uint64_t e, unsigned level) { collect(m, f, e, level); });
  // ENOMEM (a partial huge split) cannot happen here: callers split first
  // only at VMA boundaries, which zap handles by splitting; if the node
  // allocation fails the huge leaf stays whole and mapped.
  assert(r == errc::ok);
}

void mm_impl::split_huge(mm& m, va_t start, va_t end) {
  for (va_t slot = align_down(start, huge_size); slot < end; slot += huge_size) {
    const pt::translation t = m.pt_.translate(slot);
    if (t.entry != 0 && t.level == 1) {
      auto n = m.pt_.pin(slot, 0, &cpu_page_table::split_entry);
      if (n) m.pt_.unpin(*n);
    }
  }
}

template <class F>
errc mm_impl::walk_locked(mm& m, va_t start, va_t end, F&& fn) {
  va_t va = start;
  while (va < end) {
    epoch::guard g;
    pt::node* n = m.pt_.find_node(va, 0);
    const unsigned l = n->level;
    const unsigned idx = entry_index(va, l);
    const std::uint64_t span = entry_span(l);
    const std::uint64_t e = n->entries[idx].load(std::memory_order_acquire);
    if (is_link(e)) continue;  // a child appeared: look again
    if (e == 0 && l > 0) {
      va = align_down(va, span) + span;
      continue;
    }
    if (l >= 2) {  // the model never maps 1G leaves
      va = align_down(va, span) + span;
      continue;
    }
    if (l == 1) {
      const va_t slot = align_down(va, huge_size);
      if (slot < start || slot + huge_size > end) {
        auto p = m.pt_.pin(va, 0, &cpu_page_table::split_entry);
        if (!p) return p.error();
        m.pt_.unpin(*p);
        continue;
      }
      bool retry = false;
      {
        lock_guard lk(n->lock);
        if (n->dead || n->entries[idx].load(std::memory_order_relaxed) != e) {
          retry = true;
        } else {
          const std::uint64_t ne = fn(slot, e, 1u);
          if (ne != e) m.pt_.set_leaf_locked(*n, idx, ne);
        }
      }
      if (!retry) va = slot + huge_size;
      continue;
    }
    const va_t node_end = std::min(end, n->base + n->span());
    bool dead = false;
    {
      lock_guard lk(n->lock);
      if (n->dead) {
        dead = true;
      } else {
        for (va_t a = va; a < node_end; a += page_size) {
          const unsigned i = entry_index(a, 0);
          const std::uint64_t old = n->entries[i].load(std::memory_order_relaxed);
          if (old == 0) continue;
          const std::uint64_t ne = fn(a, old, 0u);
          if (ne != old) m.pt_.set_leaf_locked(*n, i, ne);
        }
      }
    }
    if (dead) continue;
    if (n->valid_count() == 0) m.pt_.free_if_empty(n);
    va = node_end;
  }
  return errc::ok;
}

result<bool> mm_impl::install_pte(mm& m, va_t va, std::uint64_t expect, std::uint64_t ne) {
  auto pn = m.pt_.pin(va, 0, &cpu_page_table::split_entry);
  if (!pn) return pn.error();
  pt::node* n = *pn;
  bool ok = false;
  {
    lock_guard lk(n->lock);
    const unsigned idx = entry_index(va, 0);
    if (n->entries[idx].load(std::memory_order_relaxed) == expect) {
      m.pt_.set_leaf_locked(*n, idx, ne);
      ok = true;
    }
  }
  m.pt_.unpin(n);
  return ok;
}

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

  if (cpu_pte::is_devpriv(e)) {
    // Device-private page: migrate it back to system memory (kernel:
    // migrate_to_ram through the page's pgmap owner).
    const unsigned pool = cpu_pte::pool(e);
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
      t.level >= 1) {
    // No 4K table under this 2M slot and the slot is empty: a THP (on read
    // too; the model has no huge zero page).
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
  if (!write) {
    auto r = install_pte(m, va, 0, cpu_pte::make(mm::zero_pfn(), 0, cpu_pte::present | cpu_pte::zero));
    if (!r) return r.error();
    if (*r) m.stats_.faults.fetch_add(1, std::memory_order_relaxed);
    return *r ? errc::ok : errc::again;
  }
  auto nf = sys.alloc();
  if (!nf) return nf.error();
  auto r = install_pte(m, va, 0, cpu_pte::make(*nf, 0, cpu_pte::present | cpu_pte::write));
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
  for (;;) {
    const vma* v = mm_impl::find_vma(*this, va);
    if (!v || v->kind == vma_kind::io) return errc::fault;
    if (write && !v->writable()) return v->accessible() ? errc::perm : errc::fault;
    if (!write && !v->accessible()) return errc::fault;  // PROT_WRITE implies read (x86)
    errc r = mm_impl::fault_once(*this, *v, va, write);
    if (r != errc::again) return r;
  }
}

// ---- CPU access -------------------------------------------------------------

template <class Op>
errc mm_impl::access(mm& m, va_t va, bool write, Op&& op) {
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
          const pfn_t pfn = cpu_pte::pfn(e) + (n->level == 1 ? (va & (huge_size - 1)) / page_size : 0);
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
  const pt::translation t = pt_.translate(va);
  if (!cpu_pte::is_valid(t.entry)) return out;
  out.present = true;
  out.writable = cpu_pte::is_writable(t.entry);
  out.zero_page = cpu_pte::is_zero(t.entry);
  out.pool = cpu_pte::pool(t.entry);
  out.order = t.level * 9;
  out.pfn = cpu_pte::pfn(t.entry) + (t.level == 1 ? (va & (huge_size - 1)) / page_size : 0);
  if (out.pool < pool_count()) out.generation = pool(out.pool).frame_generation(out.pfn);
  return out;
}

// ---- system calls -------------------------------------------------------------

namespace {
constexpr std::uint32_t prot_bits = 7;
constexpr std::uint32_t map_bits = 63;
}  // namespace

result<va_t> mm::mmap(va_t addr, std::uint64_t length, prot p, map flags, std::shared_ptr<svm::file> backing,
                      std::uint64_t offset) {
  const auto f = static_cast<std::uint32_t>(flags);
  if (length == 0) return errc::inval;
  if ((static_cast<std::uint32_t>(p) & ~prot_bits) || (f & ~map_bits)) return errc::inval;
  const bool shared = any(flags & map::shared), priv = any(flags & map::private_);
  if (shared == priv) return errc::inval;
  const bool anon = any(flags & map::anonymous), io = any(flags & map::io);
  if (int(anon) + int(io) + int(bool(backing)) != 1) return errc::inval;
  if (!is_aligned(offset, page_size)) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length) return errc::nomem;
  const bool fixed = any(flags & (map::fixed | map::fixed_noreplace));
  if (fixed && !is_aligned(addr, page_size)) return errc::inval;
  if (fixed && (addr + len < addr || addr + len > opts_.mmap_limit)) return errc::nomem;
  if (backing && backing->pool().get() != &pool(0)) return errc::inval;

  lock_guard g(mmap_lock_);
  if (torn_down_) return errc::nomem;
  va_t at;
  if (fixed) {
    if (!mm_impl::range_free(*this, addr, addr + len)) {
      if (any(flags & map::fixed_noreplace)) return errc::exist;
      if (errc r = mm_impl::do_munmap(*this, addr, addr + len); r != errc::ok) return r;
    }
    at = addr;
  } else if (addr && is_aligned(addr, page_size) && addr + len > addr && addr + len <= opts_.mmap_limit &&
             mm_impl::range_free(*this, addr, addr + len)) {
    at = addr;
  } else {
    auto a = mm_impl::get_unmapped_area(*this, len);
    if (!a) return a.error();
    at = *a;
  }
  auto* v = new vma;
  v->start = at;
  v->end = at + len;
  v->protection = p;
  v->shared = shared;
  v->kind = io ? vma_kind::io : backing ? vma_kind::file : vma_kind::anonymous;
  if (backing) {
    v->backing = std::move(backing);
    v->pgoff = offset / page_size;
  } else if (anon && shared) {
    v->backing = std::make_shared<svm::file>(pools_->pools[0].pool, len);  // shmem
  }
  mm_impl::insert_vma(*this, v);
  return at;
}

errc mm_impl::do_munmap(mm& m, va_t start, va_t end) {
  vma* first = first_ending_after(m, start);
  if (!first || first->start >= end) return errc::ok;  // nothing mapped
  split_at(m, start);
  split_at(m, end);
  // The event covers the mapped span only.
  first = first_ending_after(m, start);
  va_t lo = std::max(start, first->start), hi = lo;
  for (vma* v = first; v && v->start < end; v = next_vma(m, v)) hi = std::min(end, v->end);
  mmu_notifier_range r;
  (void)start_fn(m, r, mmu_notifier_event::unmap, lo, hi);
  pending_free f;
  zap_range(m, lo, hi, f);
  for (vma* v = first_ending_after(m, start); v && v->start < end;) {
    vma* nx = next_vma(m, v);
    erase_vma(m, v);
    v = nx;
  }
  end_fn(m, r);
  release(m, f);
  return errc::ok;
}

errc mm::munmap(va_t addr, std::uint64_t length) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len < addr || addr + len > opts_.mmap_limit) return errc::inval;
  lock_guard g(mmap_lock_);
  return mm_impl::do_munmap(*this, addr, addr + len);
}

errc mm::mprotect(va_t addr, std::uint64_t length, prot p) {
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (static_cast<std::uint32_t>(p) & ~prot_bits) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::nomem;
  const va_t end = addr + len;
  lock_guard g(mmap_lock_);
  const vma* v0 = mm_impl::find_vma(*this, addr);
  if (!v0) return errc::nomem;
  // The mapped prefix of [addr, end): Linux changes it, then reports the hole.
  va_t covered = v0->end;
  for (vma* v = mm_impl::next_vma(*this, const_cast<vma*>(v0)); v && covered < end && v->start == covered;
       v = mm_impl::next_vma(*this, v))
    covered = v->end;
  covered = std::min(covered, end);
  mm_impl::split_at(*this, addr);
  mm_impl::split_at(*this, covered);
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::protection_vma, addr, covered);
  const bool accessible = any(p & (prot::read | prot::write));
  for (vma* v = mm_impl::find_vma_mut(*this, addr); v && v->start < covered; v = mm_impl::next_vma(*this, v)) {
    v->protection = p;
    const bool shared = v->shared;
    (void)mm_impl::walk_locked(*this, v->start, v->end, [&](va_t, std::uint64_t e, unsigned) -> std::uint64_t {
      if (!accessible) {
        if (cpu_pte::is_valid(e)) return (e & ~(cpu_pte::present | cpu_pte::write)) | cpu_pte::protnone;
        return e;
      }
      if (cpu_pte::is_protnone(e)) {
        e = (e & ~cpu_pte::protnone) | cpu_pte::present;
        if (shared && any(p & prot::write)) e |= cpu_pte::write;
        return e;
      }
      if (!any(p & prot::write)) return e & ~cpu_pte::write;
      return e;  // gaining write: write faults upgrade (COW stays intact)
    });
  }
  mm_impl::end_fn(*this, r);
  return covered < end ? errc::nomem : errc::ok;
}

errc mm::madvise(va_t addr, std::uint64_t length, madvice advice) {
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  const va_t end = addr + len;
  if (advice == madvice::dontneed) {
    shared_lock_guard g(mmap_lock_);
    bool hole = false;
    va_t cur = addr;
    for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
      if (v->kind == vma_kind::io) return errc::inval;
      if (v->start > cur) hole = true;
      cur = v->end;
    }
    if (cur < end) hole = true;
    for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
      const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
      mmu_notifier_range r;
      (void)mm_impl::start_fn(*this, r, mmu_notifier_event::clear, s, e);
      pending_free f;
      mm_impl::zap_range(*this, s, e, f);
      mm_impl::end_fn(*this, r);
      mm_impl::release(*this, f);
    }
    return hole ? errc::nomem : errc::ok;
  }
  lock_guard g(mmap_lock_);
  bool hole = false;
  va_t cur = addr;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (v->start > cur) hole = true;
    cur = v->end;
  }
  if (cur < end) hole = true;
  mm_impl::split_at(*this, addr);
  mm_impl::split_at(*this, end);
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v))
    v->advice = advice == madvice::hugepage ? huge_advice::hugepage : huge_advice::nohugepage;
  return hole ? errc::nomem : errc::ok;
}

result<va_t> mm::mremap(va_t old_addr, std::uint64_t old_length, std::uint64_t new_length, mremap_flags flags,
                        va_t new_addr) {
  const auto fl = static_cast<std::uint32_t>(flags);
  if (fl & ~7u) return errc::inval;
  const bool maymove = any(flags & mremap_flags::maymove), fixed = any(flags & mremap_flags::fixed),
             dontunmap = any(flags & mremap_flags::dontunmap);
  if (!is_aligned(old_addr, page_size)) return errc::inval;
  if ((fixed || dontunmap) && !maymove) return errc::inval;
  const std::uint64_t old_len = align_up(old_length, page_size), new_len = align_up(new_length, page_size);
  if (old_len == 0 || new_len == 0 || old_len < old_length || new_len < new_length) return errc::inval;
  if (dontunmap && old_len != new_len) return errc::inval;
  if (old_addr + old_len < old_addr || old_addr + old_len > opts_.mmap_limit) return errc::inval;
  if (fixed) {
    if (!is_aligned(new_addr, page_size)) return errc::inval;
    if (new_addr + new_len < new_addr || new_addr + new_len > opts_.mmap_limit) return errc::inval;
    if (new_addr < old_addr + old_len && old_addr < new_addr + new_len) return errc::inval;  // onto itself
  }
  lock_guard g(mmap_lock_);
  vma* v = mm_impl::find_vma_mut(*this, old_addr);
  if (!v || old_addr + old_len > v->end) return errc::fault;
  if (dontunmap && !v->private_anon()) return errc::inval;

  if (!fixed && !dontunmap && new_len <= old_len) {  // shrink (or same size) in place
    if (new_len < old_len) (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
    return old_addr;
  }
  if (!fixed && !dontunmap && new_len > old_len && old_addr + old_len == v->end && old_addr + new_len <= opts_.mmap_limit &&
      mm_impl::range_free(*this, v->end, old_addr + new_len)) {  // grow in place
    v->end = old_addr + new_len;
    if (v->backing && v->kind == vma_kind::anonymous) v->backing->grow((v->end - v->start) + v->pgoff * page_size);
    return old_addr;
  }
  if (!maymove) return errc::nomem;

  va_t target;
  std::uint64_t move_len = old_len;
  if (fixed) {
    (void)mm_impl::do_munmap(*this, new_addr, new_addr + new_len);
    target = new_addr;
    if (new_len < old_len) {
      (void)mm_impl::do_munmap(*this, old_addr + new_len, old_addr + old_len);
      move_len = new_len;
    }
  } else {
    auto a = mm_impl::get_unmapped_area(*this, new_len);
    if (!a) return a.error();
    target = *a;
  }
  mm_impl::split_at(*this, old_addr);
  mm_impl::split_at(*this, old_addr + move_len);
  v = mm_impl::find_vma_mut(*this, old_addr);
  assert(v && v->start == old_addr && v->end == old_addr + move_len);

  // UNMAP over the old range, then move the PTEs: frames keep their
  // references, so nothing is freed.
  struct moved {
    va_t va;
    std::uint64_t e;
    unsigned level;
  };
  std::vector<moved> ptes;
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::unmap, old_addr, old_addr + move_len);
  std::vector<va_range> flush;
  (void)pt_.zap(old_addr, old_addr + move_len, flush,
                [&](va_t va, std::uint64_t e, unsigned level) { ptes.push_back({va, e, level}); });
  for (const moved& mv : ptes) {
    const va_t nva = mv.va - old_addr + target;
    if (mv.level == 1 && is_aligned(nva, huge_size)) {
      [[maybe_unused]] errc pe = pt_.populate(nva, nva + huge_size, 1, [&](va_t) { return mv.e; });
      assert(pe == errc::ok);
    } else {
      const unsigned n = mv.level == 1 ? pt::entries_per_node : 1;
      for (unsigned i = 0; i < n; ++i) {
        const std::uint64_t e = mv.level == 1 ? cpu_pte::split(mv.e, 1, i) : mv.e;
        [[maybe_unused]] errc pe =
            pt_.populate(nva + i * page_size, nva + (i + 1) * page_size, 0, [&](va_t) { return e; });
        assert(pe == errc::ok);
      }
    }
  }
  auto* nv = new vma(*v);
  nv->start = target;
  nv->end = target + new_len;
  if (nv->backing && nv->kind == vma_kind::anonymous) nv->backing->grow(new_len + nv->pgoff * page_size);
  if (!dontunmap) mm_impl::erase_vma(*this, v);
  mm_impl::insert_vma(*this, nv);
  mm_impl::end_fn(*this, r);
  return target;
}

result<std::unique_ptr<mm>> mm::fork() {
  lock_guard g(mmap_lock_);
  if (torn_down_) return errc::inval;
  std::unique_ptr<mm> child(new mm(opts_, pools_));
  struct copied {
    va_t va;
    std::uint64_t e;
    unsigned level;
  };
  std::vector<copied> ptes;
  {
    lock_guard cg(child->mmap_lock_);
    for (const vma& v : vmas_->set) mm_impl::insert_vma(*child, new vma(v));
  }
  if (!vmas_->set.empty()) {
    const va_t lo = vmas_->set.begin()->start, hi = std::prev(vmas_->set.end())->end;
    mmu_notifier_range r;
    (void)mm_impl::start_fn(*this, r, mmu_notifier_event::protection_page, lo, hi);
    for (const vma& v : vmas_->set) {
      const bool cow = !v.shared;
      (void)mm_impl::walk_locked(*this, v.start, v.end, [&](va_t va, std::uint64_t e, unsigned level) {
        if (cpu_pte::is_swap(e)) {
          pools_->swap->get(cpu_pte::pfn(e));
        } else if (cpu_pte::holds_frame(e)) {
          const pfn_t n = pfn_t{1} << (9 * level);
          for (pfn_t i = 0; i < n; ++i) pool(cpu_pte::pool(e)).get(cpu_pte::pfn(e) + i);
        }
        if (cow) e &= ~cpu_pte::write;
        ptes.push_back({va, e, level});
        return e;
      });
    }
    mm_impl::end_fn(*this, r);
  }
  // The child is not visible to anyone yet.
  for (const copied& c : ptes) {
    errc pe = child->pt_.populate(c.va, c.va + entry_span(c.level), c.level, [&](va_t) { return c.e; });
    if (pe != errc::ok) return pe;  // the child's teardown drops what it holds
  }
  return child;
}

result<std::size_t> mm::reclaim(va_t addr, std::uint64_t length, bool blockable) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  const va_t end = addr + len;
  shared_lock_guard g(mmap_lock_);
  mmu_notifier_range r;
  if (errc e = mm_impl::start_fn(*this, r, mmu_notifier_event::clear, addr, end, nullptr, blockable); e != errc::ok)
    return e;
  pending_free f;
  std::size_t n = 0;
  errc err = errc::ok;
  swap_space& sw = *pools_->swap;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (!v->private_anon()) continue;
    const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
    mm_impl::split_huge(*this, s, e);
    (void)mm_impl::walk_locked(*this, s, e, [&](va_t, std::uint64_t pte, unsigned level) -> std::uint64_t {
      if (level != 0 || !cpu_pte::is_valid(pte) || cpu_pte::is_zero(pte) || cpu_pte::pool(pte) != 0) return pte;
      const pfn_t pfn = cpu_pte::pfn(pte);
      if (pool(0).refcount(pfn) != 1) return pte;  // shared (COW or page cache)
      auto slot = sw.store(pool(0).frame_data(pfn));
      if (!slot) {
        err = slot.error();
        return pte;
      }
      f.frames.emplace_back(0, pfn);
      ++n;
      return cpu_pte::make(*slot, 0, cpu_pte::swap);
    });
  }
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
  stats_.swap_outs.fetch_add(n, std::memory_order_relaxed);
  if (err != errc::ok) return err;
  return n;
}

result<std::size_t> mm::migrate(va_t addr, std::uint64_t length, unsigned target, const void* owner) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  if (target >= pool_count()) return errc::inval;
  const va_t end = addr + len;
  shared_lock_guard g(mmap_lock_);
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::migrate, addr, end, owner);
  pending_free f;
  std::size_t n = 0;
  errc err = errc::ok;
  frame_pool& dst = pool(target);
  const bool to_device = kind_of_pool(target) == pool_kind::device_private;
  for (vma* v = mm_impl::first_ending_after(*this, addr); v && v->start < end; v = mm_impl::next_vma(*this, v)) {
    if (!v->private_anon()) continue;
    const va_t s = std::max(addr, v->start), e = std::min(end, v->end);
    mm_impl::split_huge(*this, s, e);
    (void)mm_impl::walk_locked(*this, s, e, [&](va_t, std::uint64_t pte, unsigned level) -> std::uint64_t {
      if (level != 0 || cpu_pte::is_zero(pte) || !(cpu_pte::is_valid(pte) || cpu_pte::is_devpriv(pte))) return pte;
      const unsigned src = cpu_pte::pool(pte);
      const pfn_t pfn = cpu_pte::pfn(pte);
      if (src == target || pool(src).refcount(pfn) != 1) return pte;
      auto nf = dst.alloc();
      if (!nf) {
        err = nf.error();
        return pte;
      }
      frame_pool::copy_frame(dst.frame_data(*nf), pool(src).frame_data(pfn));
      f.frames.emplace_back(src, pfn);
      ++n;
      return cpu_pte::make(*nf, target, (to_device ? cpu_pte::devpriv : cpu_pte::present) | (pte & cpu_pte::write));
    });
  }
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
  stats_.migrations.fetch_add(n, std::memory_order_relaxed);
  if (err != errc::ok) return err;
  return n;
}

errc mm::add_release(mm_release_ops& ops) {
  lock_guard g(release_lock_);
  if (released_ || std::find(release_subs_.begin(), release_subs_.end(), &ops) != release_subs_.end())
    return errc::inval;
  release_subs_.push_back(&ops);
  return errc::ok;
}

void mm::remove_release(mm_release_ops& ops) {
  lock_guard g(release_lock_);
  std::erase(release_subs_, &ops);
}

void mm::teardown() {
  {
    // The release subscribers first, without mmap_lock (kernel: exit_mmap
    // calls the release ops before it unmaps anything).
    lock_guard rg(release_lock_);
    released_ = true;
    std::vector<mm_release_ops*> subs;
    subs.swap(release_subs_);
    for (mm_release_ops* s : subs) s->release(*this);
  }
  lock_guard g(mmap_lock_);
  if (torn_down_) return;
  torn_down_ = true;
  subs_.mark_dying();
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::release, 0, opts_.mmap_limit);
  pending_free f;
  mm_impl::zap_range(*this, 0, opts_.mmap_limit, f);
  vmas_->set.clear_and_dispose([](vma* v) { delete v; });
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
}

}  // namespace svm
