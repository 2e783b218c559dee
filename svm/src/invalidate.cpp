// gpu_vm's invalidation side: the lazily inserted per-chunk interval
// notifiers, their callbacks (which the mirror implementation turns into
// sequence advances and PTE clears), the invalidation log for false-retry
// accounting, and TLB flushes.
#include <algorithm>

#include "check.h"
#include "vm_internal.h"

namespace svm {

using detail::bump;
using detail::intersect;
using detail::span_scope;

// ---- per-chunk notifiers --------------------------------------------------------

gpu_vm::chunk* gpu_vm::get_chunk(va_t cpu_va) {
  const std::uint64_t idx = cpu_va / cfg_.chunk_size;
  chunk* c;
  bool creator = false;
  {
    lock_guard g(chunks_lock_);
    auto& slot = chunks_[idx];
    if (!slot) {
      slot = std::make_unique<chunk>(*this, idx, va_range{idx * cfg_.chunk_size, (idx + 1) * cfg_.chunk_size});
      creator = true;
    }
    c = slot.get();
    ++c->users;
  }
  if (creator) {
    // Outside chunks_lock_: insert takes the mm's notifier lock (outer to it).
    c->insert_error = c->sub.insert(mm_, c->cpu.start, c->cpu.size(), c->ops);
    c->state.store(c->insert_error == errc::ok ? 1 : 2, std::memory_order_release);
    c->state.notify_all();
  }
  while (c->state.load(std::memory_order_acquire) == 0) c->state.wait(0, std::memory_order_acquire);
  if (c->state.load(std::memory_order_acquire) == 2) {
    put_chunk(c);
    return nullptr;
  }
  return c;
}

void gpu_vm::put_chunk(chunk* c) {
  std::unique_ptr<chunk> dead;
  {
    lock_guard g(chunks_lock_);
    if (--c->users == 0 && c->state.load(std::memory_order_acquire) == 2) {
      auto it = chunks_.find(c->index);
      dead = std::move(it->second);
      chunks_.erase(it);
    }
  }
}

std::size_t gpu_vm::gc_notifiers() {
  // vm.lock shared across the whole collection: the mm's release (which
  // takes it exclusive) never runs beside a remove() here.
  shared_lock_guard vg(lock_);
  if (released_) return 0;
  std::vector<std::unique_ptr<chunk>> dead;
  std::vector<window> windows;
  if (cfg_.mirror == mirror_kind::windows) {
    lock_guard lg(log_lock_);  // not under chunks_lock_: both are leaves
    windows = windows_snapshot_;
  }
  {
    lock_guard g(chunks_lock_);
    for (auto it = chunks_.begin(); it != chunks_.end();) {
      chunk& c = *it->second;
      bool idle = c.users == 0 && c.state.load(std::memory_order_acquire) == 1;
      if (idle) {
        // The GPU ranges this chunk's notifier guards (no users: no fault
        // can be adding PTEs there now; a new fault creates a new chunk).
        if (cfg_.mirror == mirror_kind::full_mm) {
          idle = !pt_.any_leaf(c.cpu.start, c.cpu.end);
        } else {
          for (const window& w : windows) {
            const va_range o = intersect(c.cpu, {w.cpu, w.cpu + w.size});
            if (!o.empty() && pt_.any_leaf(w.gpu + (o.start - w.cpu), w.gpu + (o.end - w.cpu))) idle = false;
          }
        }
      }
      if (idle) {
        dead.push_back(std::move(it->second));
        it = chunks_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : dead) c->sub.remove();  // waits out a running invalidation
  return dead.size();
}

// ---- invalidation ---------------------------------------------------------------

void gpu_vm::note_invalidation(va_range gpu) {
  lock_guard g(log_lock_);
  const std::uint64_t stamp = inval_stamp_.load(std::memory_order_relaxed) + 1;
  log_[log_next_++ % log_.size()] = {gpu, stamp};
  // release: a fault that loads the new stamp (acquire) finds the entry.
  inval_stamp_.store(stamp, std::memory_order_release);
}

gpu_vm::overlap gpu_vm::overlapped_since(va_range win, std::uint64_t since) const {
  lock_guard g(log_lock_);
  const std::uint64_t now = inval_stamp_.load(std::memory_order_relaxed);
  bool wrapped = now - since > log_.size();
  for (const logged& l : log_)
    if (l.stamp > since && l.stamp <= now && l.r.overlaps(win)) return overlap::yes;
  return wrapped ? overlap::unknown : overlap::no;
}

void gpu_vm::zap_gpu(va_range r, bool bo_entries, std::vector<va_range>& flush) {
  pt::zap_options o;
  o.bump_seq = mirror_->node_seq();
  o.split_huge = true;
  o.match_mask = bo_pte_bit;
  o.match_value = bo_entries ? bo_pte_bit : 0;
  std::uint64_t pages = 0;
  auto count = [&](va_t, std::uint64_t, unsigned level) { pages += std::uint64_t{1} << (9 * level); };
  if (pt_.zap(r.start, r.end, flush, count, o) == errc::nomem) {
    o.split_huge = false;  // no memory to split: clear whole huge leaves instead
    (void)pt_.zap(r.start, r.end, flush, count, o);
  }
  bump(ctr_->ptes_zapped, pages);
}

void gpu_vm::ctr_add_ptes_written(std::uint64_t n) noexcept { bump(ctr_->ptes_written, n); }
void gpu_vm::ctr_add_evictions() noexcept { bump(ctr_->evictions); }
void gpu_vm::ctr_add_preemptions() noexcept { bump(ctr_->preemptions); }

void gpu_vm::flush_tlb(const std::vector<va_range>& flush) {
  for (const va_range& r : flush) {
    span_scope sp(dev_.trace(), "tlb_invalidate", r.size() / page_size);
    (void)dev_.hw().invalidate_tlb(id_, r);
    bump(ctr_->tlb_invalidations);
  }
}

bool gpu_vm::invalidate(chunk& c, interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq) {
  span_scope sp(dev_.trace(), "invalidate", (r.end - r.start) / page_size);
  // Our own exclusive-access conversion changes nothing we map. Our own
  // MIGRATE does: it moves pages between system memory and this device's
  // VRAM, so the frames every VM of the device maps there are about to be
  // freed or replaced. It zaps like any invalidation (docs/migration.md).
  if (r.event == mmu_notifier_event::exclusive && r.owner == owner()) {
    mirror_->own_migration(c, sub, cur_seq);
    return true;
  }
  // The GPU ranges that mirror the invalidated CPU range of this chunk.
  const va_range cr = intersect({r.start, r.end}, c.cpu);
  std::vector<va_range> gpu;
  if (cfg_.mirror == mirror_kind::full_mm) {
    gpu.push_back(cr);
  } else {
    // windows_ is guarded by vm.lock, which a callback must not take: read
    // the copy kept under the callback-side lock.
    lock_guard g(log_lock_);
    for (const window& w : windows_snapshot_) {
      const va_range o = intersect(cr, {w.cpu, w.cpu + w.size});
      if (!o.empty()) gpu.push_back({w.gpu + (o.start - w.cpu), w.gpu + (o.end - w.cpu)});
    }
  }
  if (!r.blockable) {
    // Non-blockable: no lock may be waited for and no TLB shootdown waited
    // on. Succeed only if nothing of ours is mapped there.
    if (!mirror_->try_advance(c, sub, cur_seq)) return false;
    for (const va_range& g : gpu)
      if (pt_.any_leaf(g.start, g.end)) return false;
    return true;
  }
  bump(ctr_->invalidations);
  std::vector<va_range> flush;
  mirror_->invalidate(c, sub, cur_seq, gpu, flush);
  for (const va_range& g2 : gpu) note_invalidation(g2);
  flush_tlb(flush);
  return true;
}

}  // namespace svm
