// Device migration in three steps (kernel: mm/migrate_device.c).
// See svm/notifier/migrate.h for the contracts and cpu_pte.h for the
// migration-entry protocol.
#include <algorithm>
#include <new>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::is_link;

namespace {

constexpr migrate_select select_bits = migrate_select::system | migrate_select::device_private;

// Key of a frame in pool_set::isolated.
std::uint64_t iso_key(unsigned pool, pfn_t pfn) noexcept { return (std::uint64_t{pool} << 52) | pfn; }

// Under the node lock of the 4K entry at `va`: if it is the migration entry
// of frame (pool, pfn), replace it by fn(entry) and return true.
template <class F>
bool replace_migration_entry(cpu_page_table& pt, va_t va, unsigned pool, pfn_t pfn, F&& fn) {
  for (;;) {
    epoch::guard g;
    pt::node* n = pt.find_node(va, 0);
    lock_guard lk(n->lock);
    if (n->dead) continue;
    const unsigned idx = entry_index(va, n->level);
    const std::uint64_t e = n->entries[idx].load(std::memory_order_relaxed);
    if (is_link(e)) continue;
    if (n->level != 0 || !cpu_pte::is_migration(e) || cpu_pte::pool(e) != pool || cpu_pte::pfn(e) != pfn)
      return false;
    pt.set_leaf_locked(*n, idx, fn(e));
    return true;
  }
}

// The flags of a new entry for a frame of pool `pool`.
std::uint64_t kind_bits(const mm& m, unsigned pool) noexcept {
  return m.kind_of_pool(pool) == pool_kind::device_private ? cpu_pte::devpriv : cpu_pte::present;
}

}  // namespace

std::uint64_t mm_impl::unmigrate(const mm& m, std::uint64_t e) noexcept {
  return (e & ~cpu_pte::migration) | kind_bits(m, cpu_pte::pool(e));
}

errc mm_impl::migrate_setup(mm& m, migrate_vma& a) {
  m.assert_stable();  // mmap_lock shared, or the rmap lock (eviction)
  if (a.owner_mm) return errc::inval;
  if (a.start == 0 || !is_aligned(a.start, page_size) || !is_aligned(a.end, page_size) || a.end <= a.start ||
      a.end > m.opts_.mmap_limit)
    return errc::inval;
  if (!any(a.select) || any(a.select & ~select_bits)) return errc::inval;
  const vma* v = find_vma(m, a.start);
  if (!v || a.end > v->end) return errc::inval;
  const std::size_t np = (a.end - a.start) / page_size;
  std::vector<migrate_page> src, dst;
  try {
    src.resize(np);
    dst.resize(np);
  } catch (const std::bad_alloc&) {
    return errc::nomem;
  }
  a.src = std::move(src);
  a.dst = std::move(dst);
  a.cpages = 0;
  a.npages = np;
  a.owner_mm = &m;
  a.pages_done = false;
  // The kernel moves only anonymous memory to device-private pools; other
  // VMAs give no page (the driver sees cpages == 0).
  if (!v->private_anon()) return errc::ok;
  const bool sys = any(a.select & migrate_select::system);
  const bool dev = any(a.select & migrate_select::device_private);
  mmu_notifier_range r;
  (void)start_fn(m, r, mmu_notifier_event::migrate, a.start, a.end, a.pgmap_owner);
  // Kernel: migrate_vma_collect splits a PMD-mapped THP before collecting.
  split_huge(m, a.start, a.end);
  (void)walk_locked(m, a.start, a.end, [&](va_t va, std::uint64_t e, unsigned level) -> std::uint64_t {
    if (level != 0) return e;  // the split failed (no memory): not collected
    const unsigned pool = cpu_pte::pool(e);
    const pfn_t pfn = cpu_pte::pfn(e);
    if (cpu_pte::is_valid(e)) {
      if (!sys || cpu_pte::is_zero(e) || m.kind_of_pool(pool) != pool_kind::numa) return e;
      if (m.pool(pool).refcount(pfn) != 1) return e;  // mapped more than once, or pinned by a fault
    } else if (cpu_pte::is_devpriv(e)) {
      if (!dev || m.pool_owner(pool) != a.pgmap_owner) return e;
    } else {
      return e;  // swap, PROT_NONE, or already under migration
    }
    {
      lock_guard iso(m.pools_->isolate_lock);
      if (!m.pools_->isolated.insert(iso_key(pool, pfn)).second) return e;  // another migration holds it
    }
    m.pool(pool).get(pfn);  // the isolation reference
    migrate_page& s = a.src[(va - a.start) / page_size];
    s.flags = migrate_pfn::valid | migrate_pfn::migrate |
              (cpu_pte::is_writable(e) ? migrate_pfn::write : migrate_pfn::none);
    s.pool = pool;
    s.pfn = pfn;
    ++a.cpages;
    return (e & ~(cpu_pte::present | cpu_pte::devpriv)) | cpu_pte::migration;
  });
  if (sys) {
    // Empty PTEs may be filled by the driver (kernel: migrate_vma_collect_hole).
    for (std::size_t i = 0; i < np; ++i) {
      if (a.src[i].flags != migrate_pfn::none) continue;
      if (m.pt_.translate(a.start + i * page_size).entry != 0) continue;
      a.src[i].flags = migrate_pfn::migrate;
      ++a.cpages;
    }
  }
  end_fn(m, r);
  return errc::ok;
}

errc mm_impl::migrate_pages(mm& m, migrate_vma& a) {
  m.assert_stable();  // mmap_lock shared, or the rmap lock (eviction)
  if (a.owner_mm != &m || a.src.size() != a.npages || a.dst.size() != a.npages) return errc::inval;
  const unsigned npools = m.pool_count();
  std::uint64_t filled = 0;
  for (std::size_t i = 0; i < a.npages; ++i) {
    migrate_page& s = a.src[i];
    migrate_page& d = a.dst[i];
    d.flags = d.flags & ~migrate_pfn::installed;
    if (!s.has(migrate_pfn::migrate)) continue;
    const bool dst_ok = d.has(migrate_pfn::valid) && d.pool < npools && d.pfn != mm::zero_pfn() &&
                        d.pfn < m.pool(d.pool).frame_count() && m.pool(d.pool).refcount(d.pfn) != 0 &&
                        !(s.has(migrate_pfn::valid) && s.pool == d.pool && s.pfn == d.pfn);
    if (!dst_ok) {
      s.flags = s.flags & ~migrate_pfn::migrate;
      d = {};
      continue;
    }
    if (s.has(migrate_pfn::valid)) continue;  // collected page: finalize swaps it
    // A hole: fill it now if it is still empty and still private anonymous
    // memory the CPU may access (kernel: migrate_vma_insert_page).
    const va_t va = a.start + i * page_size;
    const vma* v = find_vma(m, va);
    bool ok = false;
    if (v && v->private_anon() && v->accessible()) {
      anon_vma_prepare(*v);
      const std::uint64_t ne =
          cpu_pte::make(d.pfn, d.pool, kind_bits(m, d.pool) | (v->writable() ? cpu_pte::write : 0));
      auto r = install_pte(m, va, 0, ne);
      ok = r && *r;
    }
    if (ok) {
      d.flags = d.flags | migrate_pfn::installed;
      ++filled;
    } else {
      s.flags = s.flags & ~migrate_pfn::migrate;
    }
  }
  a.pages_done = true;
  m.stats_.migrations.fetch_add(filled, std::memory_order_relaxed);
  return errc::ok;
}

errc mm_impl::migrate_finalize(mm& m, migrate_vma& a) {
  if (a.owner_mm != &m || a.src.size() != a.npages || a.dst.size() != a.npages) return errc::inval;
  std::uint64_t moved = 0;
  for (std::size_t i = 0; i < a.npages; ++i) {
    const migrate_page& s = a.src[i];
    const migrate_page& d = a.dst[i];
    const bool has_dst = a.pages_done && d.has(migrate_pfn::valid);
    if (!s.has(migrate_pfn::valid)) {
      // A hole (filled by pages, or not) or a page that was not collected.
      if (has_dst && !d.has(migrate_pfn::installed)) m.pool(d.pool).put(d.pfn);
      continue;
    }
    const va_t va = a.start + i * page_size;
    frame_pool& old = m.pool(s.pool);
    bool replaced = false;
    if (has_dst && s.has(migrate_pfn::migrate)) {
      const std::uint64_t kind = kind_bits(m, d.pool);
      replaced = replace_migration_entry(m.pt_, va, s.pool, s.pfn, [&](std::uint64_t e) {
        return cpu_pte::make(d.pfn, d.pool, kind | (e & cpu_pte::write));
      });
      if (replaced) {
        old.put(s.pfn);  // the reference the PTE held
        ++moved;
      } else {
        m.pool(d.pool).put(d.pfn);  // zapped or restored meanwhile: the new frame is not used
      }
    } else {
      (void)replace_migration_entry(m.pt_, va, s.pool, s.pfn, [&](std::uint64_t e) { return unmigrate(m, e); });
      if (has_dst) m.pool(d.pool).put(d.pfn);
    }
    {
      lock_guard iso(m.pools_->isolate_lock);
      m.pools_->isolated.erase(iso_key(s.pool, s.pfn));
    }
    old.put(s.pfn);  // the isolation reference
  }
  m.stats_.migrations.fetch_add(moved, std::memory_order_relaxed);
  a.owner_mm = nullptr;
  return errc::ok;
}

errc migrate_vma_setup(mm& m, migrate_vma& args) { return mm_impl::migrate_setup(m, args); }
errc migrate_vma_pages(mm& m, migrate_vma& args) { return mm_impl::migrate_pages(m, args); }
errc migrate_vma_finalize(mm& m, migrate_vma& args) { return mm_impl::migrate_finalize(m, args); }

}  // namespace svm
