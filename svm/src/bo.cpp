// Buffer objects in a gpu_vm: creation, VM_BIND map/unmap over the mirror,
// CPU access to BO bytes, and eviction under VRAM pressure.
#include <algorithm>
#include <cstring>

#include "check.h"
#include "svm/notifier/frame_pool.h"
#include "vm_internal.h"

namespace svm {

using dev::dev_pte;

namespace {

// Copy frame src[i] of `from` to dst[i] of `to` on the copy engine, as one
// scattered request (one round trip for the whole BO).
void copy_frames(dev::copy_engine& ce, phys_mem& from, std::span<const pfn_t> src, phys_mem& to,
                 std::span<const pfn_t> dst) {
  if (src.empty()) return;
  std::vector<dev::frame_span> s, d;
  s.reserve(src.size());
  d.reserve(dst.size());
  for (std::size_t i = 0; i < src.size(); ++i) {
    s.push_back({&from, src[i]});
    d.push_back({&to, dst[i]});
  }
  auto done = ce.copy_list(s, d);
  SVM_CHECK(done.ok(), "copy engine refused a BO copy");
  (void)(*done)->wait();
}

}  // namespace

void gpu_vm::free_bo_frames(bo& b) {
  if (b.where == placement::vram) {
    dev_.vram().remove(b);
    dev_.vram().put(b.frames);
    b.vram_frames.store(0, std::memory_order_relaxed);
  } else {
    for (pfn_t p : b.frames) pool0().put(p);
    if (b.home == placement::vram && cfg_.mode == vm_mode::fault) evicted_bos_.fetch_sub(1, std::memory_order_relaxed);
  }
  b.frames.clear();
}

errc gpu_vm::bo::evict(const evict_context& cx) {
  if (cx.vm_exclusive == &owner) {
    owner.lock_.assert_held();  // the allocating thread holds it exclusive
    return owner.evict_locked(*this, std::chrono::nanoseconds{0}) == errc::ok ? errc::ok : errc::busy;
  }
  if (cx.vm_shared == &owner || !owner.lock_.try_lock()) return errc::busy;
  const errc e = owner.evict_locked(*this, std::chrono::nanoseconds{0});
  owner.lock_.unlock();
  return e == errc::ok ? errc::ok : errc::busy;
}

result<bo_id> gpu_vm::create_bo(std::uint64_t size, placement where) {
  if (size == 0 || !is_aligned(size, page_size)) return errc::inval;
  if (where != placement::vram && where != placement::system) return errc::inval;
  const std::uint64_t pages = size / page_size;
  // Larger than the memory itself: ENOMEM before anything is allocated.
  if (pages > (where == placement::vram ? dev_.vram().pool()->capacity() : pool0().frame_count())) return errc::nomem;
  auto b = std::make_unique<bo>(*this);
  b->size = size;
  b->home = where;
  b->where = where;
  b->frames.reserve(pages);
  lock_guard g(lock_);
  if (where == placement::vram) {
    // The manager checks "free + evictable" before evicting anything, and
    // gives every frame back when it fails: nothing has changed then but
    // what it evicted on the way (which keeps its data in system memory).
    evict_context cx;
    cx.vm_exclusive = this;
    if (const errc e = dev_.vram().alloc(pages, b->frames, nullptr, cx); e != errc::ok) return e;
    b->vram_frames.store(pages, std::memory_order_relaxed);
  } else {
    if (pages > pool0().free_frames()) return errc::nomem;
    for (std::size_t i = 0; i < pages; ++i) {
      result<pfn_t> f = pool0().alloc();
      if (!f) {
        free_bo_frames(*b);
        return f.error();
      }
      b->frames.push_back(*f);
    }
  }
  b->id = next_bo_++;
  const bo_id id = b->id;
  bo& ref = *b;
  bos_.emplace(id, std::move(b));
  if (where == placement::vram) dev_.vram().insert(ref);
  return id;
}

errc gpu_vm::destroy_bo(bo_id id) {
  std::vector<va_range> ranges;
  {
    shared_lock_guard g(lock_);
    if (!bos_.contains(id)) return errc::noent;
    tree_.for_each_bo_mapping(id, [&](const gpuva& m) { ranges.push_back(m.range()); });
  }
  for (const va_range& r : ranges) (void)unbind(r.start, r.size());
  lock_guard g(lock_);
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  // Mappings bound again in between still name it: unbind them too.
  bool mapped = false;
  tree_.for_each_bo_mapping(id, [&](const gpuva&) { mapped = true; });
  if (mapped) return errc::busy;
  free_bo_frames(*it->second);
  bos_.erase(it);
  return errc::ok;
}

resv* gpu_vm::bo_resv(bo_id id) {
  shared_lock_guard g(lock_);
  auto it = bos_.find(id);
  return it == bos_.end() ? nullptr : &it->second->reservation;
}

result<placement> gpu_vm::bo_placement(bo_id id) {
  shared_lock_guard g(lock_);
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  return it->second->where;
}

result<std::uint64_t> gpu_vm::bo_size_locked(bo_id id) const {
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  return it->second->size;
}

void gpu_vm::write_bo_ptes_locked(const gpuva& m, va_range r) {
  auto it = bos_.find(m.bo());
  if (it == bos_.end()) return;
  const bo& b = *it->second;
  const aperture ap = b.where == placement::vram ? aperture::vram : aperture::system;
  // Nodes were pinned at plan time, so this cannot fail for lack of memory.
  const errc e = pt_.populate(r.start, r.end, 0, [&](va_t va) {
    const pfn_t f = b.frames[m.bo_offset_at(va) / page_size];
    return dev_pte::make(ap, ap == aperture::system ? mm_device_pfn(0, f) : f, true) | bo_pte_bit;
  });
  SVM_CHECK(e == errc::ok, "BO PTE write failed after its nodes were pinned");
  ctr_add_ptes_written(r.size() / page_size);
}

errc gpu_vm::bind(bo_id id, va_t gpu_va, std::uint64_t offset, std::uint64_t size) {
  lock_guard g(lock_);
  if (size == 0 || !is_aligned(gpu_va | offset | size, page_size)) return errc::inval;
  if (gpu_va + size < gpu_va) return errc::overflow;
  if (gpu_va + size > pt_.va_limit()) return errc::inval;
  auto sz = bo_size_locked(id);
  if (!sz) return sz.error();
  auto plan = tree_.plan_map(gpuva_map_req{gpu_va, size, id, offset, *sz, 0});
  if (!plan) return plan.error();
  // Everything that can fail happens before the commit: pin the leaf nodes
  // the new PTEs go to.
  std::vector<pt::node*> pins;
  auto unpin_all = [&] {
    for (pt::node* n : pins) pt_.unpin(n);
  };
  for (va_t va = align_down(gpu_va, huge_size); va < gpu_va + size; va += huge_size) {
    auto n = pt_.pin(std::max(va, gpu_va), 0, &dev::dev_page_table::split_entry);
    if (!n) {
      unpin_all();
      return n.error();
    }
    pins.push_back(*n);
  }
  std::vector<va_range> flush;
  // The SVM PTEs under the new mapping go: BO mappings take precedence.
  // Whole huge leaves are cleared (no allocation; the mirror refaults).
  {
    pt::zap_options o;
    o.bump_seq = cfg_.seq == seq_mode::pgtable;
    o.split_huge = false;
    o.match_mask = bo_pte_bit;
    o.match_value = 0;
    (void)pt_.zap(gpu_va, gpu_va + size, flush, o);
  }
  tree_.commit(*plan, [&](const gpuva_op& op) noexcept {
    const va_range clr = op.clear_range();
    if (!clr.empty()) {
      pt::zap_options o;
      o.match_mask = bo_pte_bit;
      o.match_value = bo_pte_bit;
      (void)pt_.zap(clr.start, clr.end, flush, o);
    }
    const va_range wr = op.write_range();
    lock_.assert_held();  // commit runs the step under our exclusive hold
    if (!wr.empty() && cfg_.mode == vm_mode::long_running) write_bo_ptes_locked(*op.map, wr);
  });
  unpin_all();
  flush_tlb(flush);
  return errc::ok;
}

errc gpu_vm::unbind(va_t gpu_va, std::uint64_t size) {
  lock_guard g(lock_);
  auto plan = tree_.plan_unmap(gpu_va, size);
  if (!plan) return plan.error();
  std::vector<va_range> flush;
  tree_.commit(*plan, [&](const gpuva_op& op) noexcept {
    const va_range clr = op.clear_range();
    if (clr.empty()) return;
    pt::zap_options o;
    o.match_mask = bo_pte_bit;
    o.match_value = bo_pte_bit;
    (void)pt_.zap(clr.start, clr.end, flush, o);
  });
  flush_tlb(flush);
  return errc::ok;
}

errc gpu_vm::bo_write(bo_id id, std::uint64_t offset, std::span<const std::byte> in) {
  shared_lock_guard g(lock_);
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  bo& b = *it->second;
  if (offset + in.size() < offset || offset + in.size() > b.size) return errc::inval;
  phys_mem& mem = b.where == placement::vram ? static_cast<phys_mem&>(*dev_.vram().pool()) : pool0();
  std::size_t done = 0;
  while (done < in.size()) {
    const std::uint64_t off = offset + done;
    const std::size_t n = std::min<std::size_t>(in.size() - done, page_size - off % page_size);
    frame_pool::store_bytes(mem.frame_data(b.frames[off / page_size]) + off % page_size, in.data() + done, n);
    done += n;
  }
  return errc::ok;
}

errc gpu_vm::bo_read(bo_id id, std::uint64_t offset, std::span<std::byte> out) {
  shared_lock_guard g(lock_);
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  bo& b = *it->second;
  if (offset + out.size() < offset || offset + out.size() > b.size) return errc::inval;
  phys_mem& mem = b.where == placement::vram ? static_cast<phys_mem&>(*dev_.vram().pool()) : pool0();
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t off = offset + done;
    const std::size_t n = std::min<std::size_t>(out.size() - done, page_size - off % page_size);
    frame_pool::load_bytes(mem.frame_data(b.frames[off / page_size]) + off % page_size, out.data() + done, n);
    done += n;
  }
  return errc::ok;
}

errc gpu_vm::evict(bo_id id) {
  lock_guard g(lock_);
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  bo& b = *it->second;
  if (b.where != placement::vram) return errc::inval;
  // Out of the manager's list first: a concurrent allocation can no longer
  // pick it (one that already did fails its try-lock: we hold vm.lock).
  dev_.vram().remove(b);
  const errc e = evict_locked(b, cfg_.fault_timeout);
  if (e != errc::ok) dev_.vram().insert(b);
  return e;
}

errc gpu_vm::evict_locked(bo& b, std::chrono::nanoseconds fence_wait) {
  if (b.where != placement::vram) return errc::inval;
  // Eviction moves the memory: every job using the BO (all usages up to
  // BOOKKEEP) must be done first. Checked before the preempt fence is
  // signalled, so a timeout leaves the VM as it was.
  if (b.reservation.wait(resv_usage::bookkeep, fence_wait) != errc::ok) return errc::timedout;
  if (cfg_.mode == vm_mode::long_running && preempt_) {
    // Suspend the VM's queues: signal the preempt fence (its waiters learn
    // the VM is off the hardware until the new fence is armed below).
    preempt_->signal();
    ctr_add_preemptions();
  }
  // Destination frames first: on ENOMEM nothing has changed.
  std::vector<pfn_t> sys;
  sys.reserve(b.frames.size());
  for (std::size_t i = 0; i < b.frames.size(); ++i) {
    auto f = pool0().alloc();
    if (!f) {
      for (pfn_t p : sys) pool0().put(p);
      return f.error();
    }
    sys.push_back(*f);
  }
  // Clear the BO's PTEs and shoot down the TLBs before the copy, so no
  // device write lands in VRAM after it was copied.
  std::vector<va_range> flush;
  tree_.for_each_bo_mapping(b.id, [&](const gpuva& m) {
    pt::zap_options o;
    o.match_mask = bo_pte_bit;
    o.match_value = bo_pte_bit;
    (void)pt_.zap(m.start(), m.end(), flush, o);
  });
  flush_tlb(flush);
  copy_frames(dev_.hw().copier(), *dev_.vram().pool(), b.frames, pool0(), sys);
  dev_.vram().put(b.frames);
  b.vram_frames.store(0, std::memory_order_relaxed);
  b.frames = std::move(sys);
  b.where = placement::system;
  if (b.home == placement::vram && cfg_.mode == vm_mode::fault) evicted_bos_.fetch_add(1, std::memory_order_relaxed);
  ctr_add_evictions();
  if (cfg_.mode == vm_mode::long_running) {
    // No faults here: rebind at once, then resume with a new preempt fence
    // (see preempt_fence()).
    tree_.for_each_bo_mapping(b.id, [&](const gpuva& m) {
      lock_.assert_held();  // evict_locked's caller holds it exclusive
      write_bo_ptes_locked(m, m.range());
    });
    preempt_ = fence::create("preempt");
  }
  return errc::ok;
}

}  // namespace svm

namespace svm {

errc gpu_vm::restore_bo_locked(bo& b) {
  if (b.where != placement::system || b.home != placement::vram) return errc::inval;
  std::vector<pfn_t> vram;
  evict_context cx;
  cx.vm_exclusive = this;
  // The BO itself is not registered while in system memory, so it is never
  // its own victim.
  if (const errc e = dev_.vram().alloc(b.frames.size(), vram, &b, cx); e != errc::ok) return e;
  // Clear its system PTEs and shoot down the TLBs before the copy, so no
  // device write lands in the old frames after they were copied.
  std::vector<va_range> flush;
  tree_.for_each_bo_mapping(b.id, [&](const gpuva& m) {
    pt::zap_options o;
    o.match_mask = bo_pte_bit;
    o.match_value = bo_pte_bit;
    (void)pt_.zap(m.start(), m.end(), flush, o);
  });
  flush_tlb(flush);
  copy_frames(dev_.hw().copier(), pool0(), b.frames, *dev_.vram().pool(), vram);
  for (pfn_t p : b.frames) pool0().put(p);
  b.frames = std::move(vram);
  b.where = placement::vram;
  b.vram_frames.store(b.frames.size(), std::memory_order_relaxed);
  evicted_bos_.fetch_sub(1, std::memory_order_relaxed);
  dev_.vram().insert(b);
  detail::bump(ctr_->bo_restores);
  return errc::ok;
}

void gpu_vm::restore_bos(std::span<const dev::fault_record> recs) {
  lock_guard g(lock_);
  for (const dev::fault_record& r : recs) {
    const gpuva* m = tree_.find(r.page());
    if (!m) continue;
    auto it = bos_.find(m->bo());
    if (it == bos_.end()) continue;
    bo& b = *it->second;
    if (b.where == placement::system && b.home == placement::vram) {
      // The forward-progress rule (service): a retried access maps the BO
      // where it lies. Restoring it again could evict another VM's BO under
      // that VM's own retried access, and so on without end.
      if (r.retries != 0) {
        detail::bump(ctr_->retries_in_place);
        continue;
      }
      (void)restore_bo_locked(b);
    }
    if (evicted_bos_.load(std::memory_order_relaxed) == 0) return;
  }
}

}  // namespace svm
