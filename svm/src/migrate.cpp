// SVM migration between system memory and the device's VRAM
// (docs/migration.md): the fault hook that moves a chunk to VRAM before the
// normal fill, prefetch, the SVM chunks as VRAM users (evicted by the
// device's vram_manager), and the VRAM pool's pgmap ops (svm_pagemap),
// whose migrate_to_ram a CPU fault on a device-private page calls.
#include <algorithm>
#include <chrono>
#include <thread>

#include "check.h"
#include "vm_internal.h"

namespace svm {

using detail::bump;
using detail::intersect;
using detail::now_ns;

namespace {

bool private_anon(const vma_info& v) noexcept { return v.kind == vma_kind::anonymous && !v.shared; }

// Copy `n` frames, each from src[i] to dst[i], with the copy engine when
// there is one (one scattered request, one fence), else with the CPU. A
// request the engine refuses or cancels (shutdown) is done with the CPU.
void copy_frames(dev::copy_engine* ce, std::span<const dev::frame_span> src, std::span<const dev::frame_span> dst) {
  if (src.empty()) return;
  if (ce) {
    if (result<fence_ptr> f = ce->copy_list(src, dst); f.ok() && (*f)->wait() == errc::ok) return;
  }
  for (std::size_t i = 0; i < src.size(); ++i)
    frame_pool::copy_frame(dst[i].mem->frame_data(dst[i].pfn), src[i].mem->frame_data(src[i].pfn));
}

// This device's pages (device-private entries of a pool owned by `owner`)
// left in CPU range r.
std::size_t device_pages(const mm& m, va_range r, const void* owner) {
  std::size_t n = 0;
  for (va_t p = r.start; p < r.end; p += page_size) {
    const pt::translation t = m.raw_pte(p);
    if (t.level == 0 && cpu_pte::is_devpriv(t.entry) && m.pool_owner(cpu_pte::pool(t.entry)) == owner) ++n;
  }
  return n;
}

// Move the device-private pages of `owner` in CPU range r of m back to
// system memory (pool 0), VMA by VMA, with the three migrate_vma steps.
// Returns the pages moved; `err` gets ENOMEM if system frames ran out
// (those pages stay in VRAM), else ok.
std::size_t migrate_back_locked(mm& m, va_range r, const void* owner, dev::copy_engine* ce, errc& err)
    SVM_REQUIRES_SHARED(m.mmap_lock()) {
  err = errc::ok;
  std::size_t moved = 0;
  std::vector<dev::frame_span> src, dst;
  for (va_t at = r.start; at < r.end;) {
    const std::optional<vma_info> v = m.find_vma(at);
    if (!v || v->start >= r.end) break;
    const va_range piece = intersect(r, {v->start, v->end});
    at = v->end;
    if (piece.empty() || !private_anon(*v)) continue;
    migrate_vma a{.start = piece.start, .end = piece.end, .pgmap_owner = owner, .select = migrate_select::device_private};
    if (migrate_vma_setup(m, a) != errc::ok) continue;
    if (a.cpages == 0) {
      (void)migrate_vma_finalize(m, a);
      continue;
    }
    frame_pool& sys = m.pool(0);
    src.clear();
    dst.clear();
    for (std::size_t i = 0; i < a.npages; ++i) {
      const migrate_page& s = a.src[i];
      if (!s.has(migrate_pfn::migrate) || !s.has(migrate_pfn::valid)) continue;
      result<pfn_t> f = sys.alloc();
      if (!f) {
        err = errc::nomem;  // this page stays in VRAM (finalize restores it)
        continue;
      }
      a.dst[i] = {migrate_pfn::valid, 0, *f};
      src.push_back({&m.pool(s.pool), s.pfn});
      dst.push_back({&sys, *f});
    }
    copy_frames(ce, src, dst);
    (void)migrate_vma_pages(m, a);
    for (const migrate_page& s : a.src)
      if (s.has(migrate_pfn::migrate) && s.has(migrate_pfn::valid)) ++moved;
    (void)migrate_vma_finalize(m, a);
  }
  return moved;
}

// Eviction's walk: under m's rmap lock, which stands in for mmap_lock
// shared (mm::rmap_read_guard). Clang's analysis cannot say "mmap_lock or
// the rmap lock", so it is off here; the mm's debug lock checks
// (mm::assert_stable) verify the hold instead. `left`: this device's pages
// still in r afterwards.
std::size_t migrate_back_evicting(mm& m, va_range r, const void* owner, dev::copy_engine* ce, errc& err,
                                  std::size_t& left) SVM_NO_THREAD_SAFETY_ANALYSIS {
  mm::rmap_read_guard g(m);
  const std::size_t moved = migrate_back_locked(m, r, owner, ce, err);
  left = device_pages(m, r, owner);
  return moved;
}

}  // namespace

// ---- the pgmap ops -----------------------------------------------------------

void svm_pagemap::add(gpu_vm::svm_chunk& c) {
  lock_guard g(lock_);
  chunks_.emplace(&c.owner.mm_, &c);
}

void svm_pagemap::remove(gpu_vm::svm_chunk& c) {
  lock_guard g(lock_);
  auto [b, e] = chunks_.equal_range(&c.owner.mm_);
  for (auto it = b; it != e; ++it) {
    if (it->second == &c) {
      chunks_.erase(it);
      return;
    }
  }
}

void svm_pagemap::moved_to_ram(const mm& m, va_range r, std::size_t pages, bool count, bool waited) {
  lock_guard g(lock_);
  gpu_vm* counted = nullptr;
  auto [b, e] = chunks_.equal_range(&m);
  for (auto it = b; it != e; ++it) {
    gpu_vm::svm_chunk& c = *it->second;
    const va_range o = intersect(c.cpu, r);
    if (o.empty()) continue;
    // Lower the chunk's upper bound by what can have left it.
    const std::size_t gone = std::min<std::size_t>(pages, o.size() / page_size);
    std::size_t cur = c.resident.load(std::memory_order_relaxed);
    while (!c.resident.compare_exchange_weak(cur, cur - std::min(cur, gone), std::memory_order_relaxed)) {
    }
    if (count && !counted) {
      counted = &c.owner;
      if (pages) {
        bump(counted->ctr_->migrations_to_ram);
        bump(counted->ctr_->pages_to_ram, pages);
      }
      if (waited) bump(counted->ctr_->timeslice_waits);
    }
  }
}

std::uint64_t gpu_vm::timeslice_now() const { return hooks_.clock ? hooks_.clock() : now_ns(); }

errc svm_pagemap::migrate_to_ram(mm& m, va_t addr) {
  // The chunk the page belongs to, and the end of its timeslice. A page
  // with no chunk here (a fork child's copy, or a VM that is gone) moves
  // alone.
  va_range r{align_down(addr, page_size), align_down(addr, page_size) + page_size};
  std::uint64_t deadline = 0;
  std::uint64_t now = 0;
  {
    lock_guard g(lock_);
    std::uint64_t newest = 0;
    const gpu_vm* timed = nullptr;
    auto [b, e] = chunks_.equal_range(&m);
    for (auto it = b; it != e; ++it) {
      const gpu_vm::svm_chunk& c = *it->second;
      if (addr < c.cpu.start || addr >= c.cpu.end) continue;
      const std::uint64_t at = c.migrated_ns.load(std::memory_order_relaxed);
      if (at < newest) continue;
      newest = at;
      r = c.cpu;
      const auto ts = static_cast<std::uint64_t>(c.owner.cfg_.migrate_timeslice.count());
      deadline = at + ts;
      timed = &c.owner;
    }
    // Read under lock_: the chunk's VM (and its clock) cannot go away here.
    now = timed ? timed->timeslice_now() : now_ns();
  }
  if (const std::optional<vma_info> v = m.find_vma(addr); v && v->start <= addr)
    r = intersect(r, {v->start, v->end});
  // The timeslice: memory that just moved to VRAM stays there at least
  // migrate_timeslice. Sleep out the rest of it (at most the VM's
  // timeslice, since the deadline is that far after a past instant),
  // holding the mmap_lock shared as the fault does; no other lock is held.
  bool waited = false;
  if (now < deadline) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(deadline - now));
    waited = true;
  }
  errc err;
  // The CPU copies: this runs on a CPU fault, and without the driver (which
  // may be gone while a fork child still holds pages of the pool).
  const std::size_t moved = migrate_back_locked(m, r, owner_, nullptr, err);
  moved_to_ram(m, r, moved, true, waited);
  return err == errc::nomem ? errc::nomem : errc::ok;
}

// ---- SVM chunks as VRAM users ----------------------------------------------------

errc gpu_vm::svm_chunk::evict(const evict_context&) {
  // Without mmap_lock, as drm_pagemap's evict_to_ram: the mm's rmap lock
  // keeps its VMAs still (docs/migration.md), and the record names the
  // CPU range its pages are in.
  svm::mm& m = owner.mm_;
  errc err;
  std::size_t left = 0;
  const std::size_t moved = migrate_back_evicting(m, cpu, owner.owner(), &owner.dev_.hw().copier(), err, left);
  owner.pagemap_->moved_to_ram(m, cpu, moved, false, false);
  resident.store(left, std::memory_order_relaxed);
  if (moved) {
    bump(owner.ctr_->svm_evictions);
    bump(owner.ctr_->migrations_to_ram);
    bump(owner.ctr_->pages_to_ram, moved);
  }
  // Pages left behind (under another migration, or no system frame): the
  // chunk still holds VRAM, so it must stay evictable.
  return left == 0 ? errc::ok : errc::busy;
}

void gpu_vm::note_vram_chunk(va_range cr, std::size_t resident) {
  auto rec = std::make_shared<svm_chunk>(*this, cr, resident, timeslice_now());
  pagemap_->add(*rec);
  dev_.vram().insert(*rec);
  std::shared_ptr<svm_chunk> old;
  {
    lock_guard g(vram_chunks_lock_);
    auto& slot = vram_chunks_[{cr.start, cr.end}];
    old = std::move(slot);
    slot = rec;
  }
  if (old) {
    dev_.vram().remove(*old);  // waits out an eviction in progress
    pagemap_->remove(*old);
  }
  gc_vram_chunks();
}

void gpu_vm::touch_vram_chunk(va_t cpu) {
  std::shared_ptr<svm_chunk> rec;
  {
    lock_guard g(vram_chunks_lock_);
    auto it = vram_chunks_.upper_bound({cpu, ~va_t{0}});
    while (it != vram_chunks_.begin()) {
      --it;
      if (it->first.first + huge_size <= cpu) break;  // chunks are at most 2M
      if (cpu < it->first.second) {
        rec = it->second;
        break;
      }
    }
  }
  if (rec) dev_.vram().touch(*rec);
}

void gpu_vm::gc_vram_chunks() {
  std::vector<std::shared_ptr<svm_chunk>> dead;
  {
    lock_guard g(vram_chunks_lock_);
    for (auto it = vram_chunks_.begin(); it != vram_chunks_.end();) {
      if (it->second->resident.load(std::memory_order_relaxed) == 0) {
        dead.push_back(std::move(it->second));
        it = vram_chunks_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& r : dead) {
    dev_.vram().remove(*r);
    pagemap_->remove(*r);
  }
}

void gpu_vm::drop_vram_chunks(bool migrate_back) {
  std::map<std::pair<va_t, va_t>, std::shared_ptr<svm_chunk>> all;
  {
    lock_guard g(vram_chunks_lock_);
    all.swap(vram_chunks_);
  }
  for (auto& [r, rec] : all) {
    dev_.vram().remove(*rec);  // no evictor uses it after this
    pagemap_->remove(*rec);
  }
  if (!migrate_back) return;
  // While the mm lives, none of this device's pages stays behind in it
  // (pages also mapped by a fork child stay in the child: the pgmap ops
  // bring them back on its CPU faults).
  for (auto& [r, rec] : all) {
    errc err;
    std::size_t moved;
    {
      mm::read_guard rd(mm_);
      moved = migrate_back_locked(mm_, rec->cpu, owner(), &dev_.hw().copier(), err);
    }
    if (moved) {
      bump(ctr_->migrations_to_ram);
      bump(ctr_->pages_to_ram, moved);
    }
  }
}

// ---- migration to VRAM -------------------------------------------------------------

errc gpu_vm::migrate_chunk_to_vram(va_range cr, std::vector<pfn_t>& frames, bool may_alloc) {
  // Pages that must move (a snapshot: the CPU may change it meanwhile,
  // which the all-or-nothing check below catches).
  std::size_t need = 0;
  for (va_t p = cr.start; p < cr.end; p += page_size)
    if (!in_vram(p)) ++need;
  if (need == 0) {
    touch_vram_chunk(cr.start);
    return errc::ok;
  }
  // VRAM first, before the mmap_lock: the allocation may evict (copy other
  // chunks out), and this mm's writers should not queue behind that.
  if (frames.size() < need) {
    if (!may_alloc) return errc::nomem;
    evict_context cx;
    cx.vm_shared = this;
    if (const errc e = dev_.vram().alloc(need - frames.size(), frames, nullptr, cx); e != errc::ok) return e;
  }
  if (hooks_.after_vram_alloc) hooks_.after_vram_alloc(cr);
  std::size_t moved = 0, resident = 0;
  errc result = errc::ok;
  {
    mm::read_guard rd(mm_);
    const std::optional<vma_info> v = mm_.find_vma(cr.start);
    if (!v || v->start > cr.start || v->end < cr.end) return errc::fault;
    if (!private_anon(*v)) return errc::perm;
    migrate_vma a{.start = cr.start, .end = cr.end, .pgmap_owner = owner(), .select = migrate_select::system};
    if (const errc e = migrate_vma_setup(mm_, a); e != errc::ok) return e;
    // All or nothing per chunk (as drm_pagemap): every page collected (a
    // present page mapped once, or a hole) or already ours in VRAM, and a
    // frame for each; else restore everything (finalize with no dst).
    bool whole = a.cpages <= frames.size();
    for (std::size_t i = 0; whole && i < a.npages; ++i)
      if (!a.src[i].has(migrate_pfn::migrate) && !in_vram(cr.start + i * page_size)) whole = false;
    if (!whole) {
      (void)migrate_vma_finalize(mm_, a);
      return errc::busy;
    }
    std::vector<dev::frame_span> src, dst;
    frame_pool& vram = *dev_.vram().pool();
    std::size_t k = 0;
    for (std::size_t i = 0; i < a.npages; ++i) {
      const migrate_page& s = a.src[i];
      if (!s.has(migrate_pfn::migrate)) continue;
      const pfn_t f = frames[k++];
      a.dst[i] = {migrate_pfn::valid, vram_pool_, f};
      // A hole needs no copy: the frame is zeroed.
      if (s.has(migrate_pfn::valid)) {
        src.push_back({&mm_.pool(s.pool), s.pfn});
        dst.push_back({&vram, f});
      }
    }
    // Every frame handed to dst now belongs to the migration (installed,
    // or freed by finalize).
    frames.erase(frames.begin(), frames.begin() + static_cast<std::ptrdiff_t>(k));
    if (hooks_.during_migrate_copy) hooks_.during_migrate_copy(cr);
    copy_frames(&dev_.hw().copier(), src, dst);
    (void)migrate_vma_pages(mm_, a);
    for (const migrate_page& s : a.src)
      if (s.has(migrate_pfn::migrate)) ++moved;
    if (moved != a.cpages) result = errc::busy;
    (void)migrate_vma_finalize(mm_, a);
    for (va_t p = cr.start; p < cr.end; p += page_size)
      if (in_vram(p)) ++resident;
  }
  if (moved) {
    bump(ctr_->migrations_to_vram);
    bump(ctr_->pages_to_vram, moved);
  }
  if (resident) note_vram_chunk(cr, resident);
  return result;
}

bool gpu_vm::wants_vram(va_t gva, va_t cpu, access acc) const {
  if (vram_pool_ == 0) return false;
  const svm_attrs a = attrs_at(gva);
  const bool want = a.preferred == mem_location::vram || (acc == access::atomic && a.atomics == atomic_mode::device);
  return want && !in_vram(cpu);
}

bool gpu_vm::migrate_for_fault_locked(va_t gva, va_t cpu, access acc, va_range allowed, bool may_migrate) {
  if (vram_pool_ == 0) return false;
  if (in_vram(cpu)) {
    const pt::translation t = mm_.raw_pte(align_down(cpu, page_size));
    if (needs_write(acc) && !cpu_pte::is_writable(t.entry)) {
      // Ours but read-only (shared with a fork child): hmm_range_fault
      // reports it without faulting, so the write could never be granted.
      // Bring it back; the fill then breaks the COW on the CPU side. Not
      // to VRAM again in this fault: it would come back read-only.
      (void)migrate_range_to_ram({align_down(cpu, page_size), align_down(cpu, page_size) + page_size});
      return false;
    } else {
      touch_vram_chunk(cpu);
      return false;
    }
  }
  if (!wants_vram(gva, cpu, acc)) return false;
  if (!may_migrate) {
    // A retried access: its memory stays where it is for this fault (the
    // forward-progress rule, gpu_vm::service), and the caller maps this
    // one page, so the rest of the chunk still migrates on its next fault.
    bump(ctr_->retries_in_place);
    return true;
  }
  const std::uint64_t gran = attrs_at(gva).granularity;
  const va_range g = intersect({align_down(gva, gran), align_down(gva, gran) + gran}, allowed);
  const va_t delta = cpu - gva;  // modular
  va_range cr{g.start + delta, g.end + delta};
  {
    mm::read_guard rd(mm_);
    const std::optional<vma_info> v = mm_.find_vma(cpu);
    if (!v || v->start > cpu) return false;  // the fill reports the fault
    cr = intersect(cr, {v->start, v->end});
    if (!private_anon(*v)) {
      bump(ctr_->migrate_fallbacks);  // shared or file memory stays in system memory
      return false;
    }
  }
  std::vector<pfn_t> frames;
  const errc e = migrate_chunk_to_vram(cr, frames, true);
  if (!frames.empty()) dev_.vram().put(frames);
  // No room (nothing evictable), or not migratable whole: the fault maps
  // system memory.
  if (e != errc::ok) bump(ctr_->migrate_fallbacks);
  return false;
}

// ---- migration back, prefetch -----------------------------------------------------

errc gpu_vm::migrate_range_to_ram(va_range cr) {
  errc err;
  std::size_t moved;
  {
    mm::read_guard rd(mm_);
    moved = migrate_back_locked(mm_, cr, owner(), &dev_.hw().copier(), err);
  }
  if (moved) {
    bump(ctr_->migrations_to_ram);
    bump(ctr_->pages_to_ram, moved);
    pagemap_->moved_to_ram(mm_, cr, moved, false, false);
  }
  gc_vram_chunks();
  return err;
}

errc gpu_vm::prefetch(va_t gpu_va, std::uint64_t size, mem_location to) {
  if (to != mem_location::system && to != mem_location::vram) return errc::inval;
  shared_lock_guard g(lock_);
  if (const errc e = check_attr_range(gpu_va, size); e != errc::ok) return e;
  if (vram_pool_ == 0) return to == mem_location::vram ? errc::nomem : errc::ok;
  va_t cpu;
  va_range allowed;
  SVM_CHECK(to_cpu_locked(gpu_va, cpu, allowed), "prefetch: range checked above");
  const va_t delta = cpu - gpu_va;  // modular
  const va_range all{gpu_va + delta, gpu_va + size + delta};
  // Every page must lie in private anonymous memory: checked before
  // anything moves. The chunks: each granularity-aligned block (by the
  // attributes at its start), clipped to the range and to its VMA.
  std::vector<va_range> chunks;
  {
    mm::read_guard rd(mm_);
    std::vector<vma_info> vmas;
    for (va_t at = all.start; at < all.end;) {
      const std::optional<vma_info> v = mm_.find_vma(at);
      if (!v || v->start > at) return errc::fault;
      if (!private_anon(*v)) return errc::perm;
      vmas.push_back(*v);
      at = v->end;
    }
    if (to == mem_location::vram) {
      for (const vma_info& v : vmas) {
        const va_range piece = intersect(all, {v.start, v.end});
        for (va_t at = piece.start; at < piece.end;) {
          const std::uint64_t gran = attrs_at(at - delta).granularity;
          const va_range c = intersect({align_down(at, gran), align_down(at, gran) + gran}, piece);
          chunks.push_back(c);
          at = c.end;
        }
      }
    }
  }
  if (to == mem_location::system) return migrate_range_to_ram(all);
  // Frames for the whole range first: ENOMEM here has moved nothing.
  std::size_t need = 0;
  for (va_t p = all.start; p < all.end; p += page_size)
    if (!in_vram(p)) ++need;
  std::vector<pfn_t> frames;
  if (need) {
    evict_context cx;
    cx.vm_shared = this;
    if (const errc e = dev_.vram().alloc(need, frames, nullptr, cx); e != errc::ok) return e;
  }
  errc result = errc::ok;
  for (const va_range& c : chunks) {
    result = migrate_chunk_to_vram(c, frames, true);
    if (result != errc::ok) break;
  }
  if (!frames.empty()) dev_.vram().put(frames);
  return result;
}

}  // namespace svm
