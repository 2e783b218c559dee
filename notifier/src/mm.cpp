// The simulated address space: VMAs, CPU page tables, faults and the mm
// system calls. See svm/notifier/mm.h for the contracts.
#include "svm/notifier/mm.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <new>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

// ---- mm: construction ---------------------------------------------------

errc mm_options::validate() const noexcept {
  if (frames == 0) return errc::inval;
  if (thp != thp_mode::never && thp != thp_mode::madvise && thp != thp_mode::always) return errc::inval;
  if (fault_around_bytes < page_size || fault_around_bytes > huge_size ||
      (fault_around_bytes & (fault_around_bytes - 1)) != 0)
    return errc::inval;
  if (!is_aligned(mmap_min_addr, page_size) || !is_aligned(mmap_base, page_size) ||
      !is_aligned(mmap_limit, page_size))
    return errc::inval;
  if (mmap_base < mmap_min_addr || mmap_limit <= mmap_base || mmap_limit > (va_t{1} << 48)) return errc::inval;
  return errc::ok;
}

result<std::unique_ptr<mm>> mm::create(mm_options o) {
  if (errc e = o.validate(); e != errc::ok) return e;
  try {
    return std::make_unique<mm>(o);
  } catch (const std::bad_alloc&) {
    return errc::nomem;  // the frame pool's memory
  }
}

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
      rmap_lock_(rmap_class_, next_mm_key.fetch_add(1, std::memory_order_relaxed)),
      vmas_(std::make_unique<vma_tree>()) {
  if (!pools_) {
    pools_ = std::make_shared<pool_set>();
    pools_->pools[0] = {std::make_shared<frame_pool>(o.frames), pool_kind::numa, nullptr, nullptr, nullptr};
    pools_->swap = std::make_shared<swap_space>(o.swap_slots);
    pools_->count.store(1, std::memory_order_release);
  }
  if (opts_.validate() != errc::ok) {
    // Unusable options (create() would have refused them): an mm with no
    // address space at all, so nothing maps and every access is EFAULT.
    opts_.mmap_min_addr = opts_.mmap_base = opts_.mmap_limit = 0;
    opts_.thp = thp_mode::never;
    opts_.fault_around_bytes = page_size;
  }
  if (opts_.mmap_limit > pt_.va_limit()) opts_.mmap_limit = pt_.va_limit();
}

std::uint32_t mm::mapcount(pfn_t pfn, unsigned pool) const noexcept {
  if (pool >= pool_count() || pfn == zero_pfn()) return 0;
  const frame_pool& p = *pools_->pools[pool].pool;
  const std::uint32_t refs = p.refcount(pfn), cache = p.cache_refs(pfn);
  return refs > cache ? refs - cache : 0;
}

folio_info mm::folio(pfn_t pfn, unsigned pool) const noexcept {
  if (pool >= pool_count()) return {pfn, 0};
  const unsigned order = pools_->pools[pool].pool->folio_order(pfn);
  return {order ? align_down(pfn, pfn_t{1} << order) : pfn, order};
}

mm::~mm() {
  teardown();
  subs_.detach_all();
}

unsigned mm::pool_count() const noexcept { return pools_->count.load(std::memory_order_acquire); }

result<unsigned> mm::attach_pool(std::shared_ptr<frame_pool> p, pool_kind kind, const void* owner,
                                 dev_pagemap_ops* ops) {
  if (!p || (ops && kind != pool_kind::device_private)) return errc::inval;
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  lock_guard a(pools_->attach_lock);
  const unsigned n = pools_->count.load(std::memory_order_relaxed);
  if (n >= cpu_pte::max_pools) return errc::nospc;
  pools_->pools[n] = {std::move(p), kind, owner, ops, nullptr};
  // release: publishes the slot; pairs with the acquire load in pool_count().
  pools_->count.store(n + 1, std::memory_order_release);
  return n;
}

result<unsigned> mm::attach_pool(std::shared_ptr<frame_pool> p, const void* owner,
                                 std::shared_ptr<dev_pagemap_ops> ops) {
  if (!p || !ops) return errc::inval;
  lock_guard g(mmap_lock_);
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  lock_guard a(pools_->attach_lock);
  const unsigned n = pools_->count.load(std::memory_order_relaxed);
  for (unsigned i = 1; i < n; ++i) {
    const pool_entry& e = pools_->pools[i];
    if (e.pool == p && e.kind == pool_kind::device_private && e.owner == owner) return i;
  }
  if (n >= cpu_pte::max_pools) return errc::nospc;
  dev_pagemap_ops* raw = ops.get();
  pools_->pools[n] = {std::move(p), pool_kind::device_private, owner, raw, std::move(ops)};
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

void mm_impl::zap_range(mm& m, va_t start, va_t end, pending_free& f, bool reclaim_tables) {
  std::vector<va_range> flush;
  std::vector<va_t> slots;  // 2M slots whose 4K entries this zap emptied (in address order)
  [[maybe_unused]] errc r = m.pt_.zap(start, end, flush, [&](va_t va, std::uint64_t e, unsigned level) {
    collect(m, f, e, level);
    if (level == 0 && (slots.empty() || slots.back() != align_down(va, huge_size)))
      slots.push_back(align_down(va, huge_size));
  });
  // ENOMEM (a partial huge split) cannot happen here: callers split first
  // only at VMA boundaries, which zap handles by splitting; if the node
  // allocation fails the huge leaf stays whole and mapped.
  assert(r == errc::ok);
  if (!reclaim_tables) {
    keep_tables(m, slots);
    return;
  }
  // Page-table reclaim after a large DONTNEED: a table left with no entry
  // goes, one that still holds entries (a 4K node exists) stays.
  lock_guard g(m.tables_lock_);
  for (va_t slot = align_down(start, huge_size); slot < end; slot += huge_size)
    if (m.pt_.translate(slot).level >= 1) m.empty_tables_.erase(slot);
}

void mm_impl::keep_tables(mm& m, const std::vector<va_t>& slots) {
  if (slots.empty()) return;
  lock_guard g(m.tables_lock_);
  for (va_t s : slots) m.empty_tables_.insert(s);
}

void mm_impl::free_tables(mm& m, va_t start, va_t end) {
  if (start >= end) return;
  lock_guard g(m.tables_lock_);
  if (m.empty_tables_.empty()) return;
  for (va_t slot = align_down(start, huge_size); slot < end; slot += huge_size) {
    const vma* v = first_ending_after(m, slot);
    if (!v || v->start >= slot + huge_size) m.empty_tables_.erase(slot);
  }
}

bool mm_impl::empty_table(const mm& m, va_t slot) {
  lock_guard g(m.tables_lock_);
  return m.empty_tables_.contains(slot);
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
  lock_guard rmap_hold(rmap_lock_);  // with every mmap_lock writer (mm.h)
  if (torn_down_) return;
  torn_down_ = true;
  subs_.mark_dying();
  if (opts_.mmap_limit == 0) return;  // options refused at construction: nothing was ever mapped
  mmu_notifier_range r;
  (void)mm_impl::start_fn(*this, r, mmu_notifier_event::release, 0, opts_.mmap_limit);
  pending_free f;
  mm_impl::zap_range(*this, 0, opts_.mmap_limit, f);
  vmas_->set.clear_and_dispose([](vma* v) { delete v; });
  {
    lock_guard t(tables_lock_);
    empty_tables_.clear();
  }
  mm_impl::end_fn(*this, r);
  mm_impl::release(*this, f);
}

}  // namespace svm
