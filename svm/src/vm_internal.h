// Private pieces of gpu_vm shared by its source files:
//   gpu_vm.cpp      construction, teardown, windows, statistics
//   driver.cpp      svm::driver and its fault handler threads
//   fault.cpp       the fault path (servicing, the retry loop, BO populate)
//   invalidate.cpp  the lazily inserted notifiers and their callbacks
//   mirror_page.cpp, mirror_range.cpp  the two mirror implementations
//   bo.cpp          buffer objects, bind/unbind, eviction and return to VRAM
//   evict.cpp       the device's VRAM manager and its eviction policy
//   mirror_bind.cpp mirror_unbind/mirror_bind: GPU ranges taken out of the mirror
//   attrs.cpp       SVM memory attributes (set_attrs, query_attrs)
//   migrate.cpp     SVM migration to and from VRAM: the fault hook,
//                   prefetch, SVM chunks as VRAM users, the pgmap ops
//                   (svm_pagemap) a CPU fault calls (docs/migration.md)
#pragma once

#include <array>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "svm/svm/gpu_vm.h"
#include "svm/notifier/migrate.h"
#include "svm/svm/vram.h"

namespace svm {

/// A mirror window: CPU VA [cpu, cpu + size) at GPU VA gpu.
struct gpu_vm::window {
  va_t cpu;
  va_t gpu;
  std::uint64_t size;
};

/// A buffer object. A VRAM-resident one is registered with the device's
/// vram_manager, which may evict it to make room for any VM (evict()).
struct gpu_vm::bo final : vram_object {
  explicit bo(gpu_vm& v) noexcept : owner(v) {}
  gpu_vm& owner;
  bo_id id = 0;
  std::uint64_t size = 0;
  /// Where it was created: a VRAM BO evicted in a fault VM returns there on
  /// its next device access (gpu_vm::restore_bos). Immutable.
  placement home = placement::vram;
  /// Where the frames are. Changed by evict_locked()/restore_bo_locked()
  /// under vm.lock exclusive; read by BO faults under vm.lock shared.
  placement where = placement::vram;
  /// Backing frames, one per page: VRAM pfns, or pfns of the mm's pool 0
  /// (each owning one reference). Same protection as `where`.
  std::vector<pfn_t> frames;
  /// frames.size() while in VRAM, else 0: what vram_manager's "could
  /// eviction free enough" check reads under its own lock (relaxed).
  std::atomic<std::size_t> vram_frames{0};
  resv reservation;
  // vram_object: the manager's eviction, on an allocating thread that
  // holds no manager lock. In place when that thread holds this VM's
  // vm.lock exclusive; else only under a try-lock of it (EBUSY if taken),
  // and without waiting for fences (EBUSY if a job still uses the BO).
  errc evict(const evict_context& cx) override;
  [[nodiscard]] std::size_t resident_frames() const noexcept override { return vram_frames.load(std::memory_order_relaxed); }
  [[nodiscard]] const void* vm() const noexcept override { return &owner; }
};

/// An SVM chunk migrated to VRAM: a VRAM user the device's vram_manager may
/// evict. It does not own the frames (the CPU's device-private entries do);
/// it names a CPU range of the VM's mm where this device's pages were put.
/// Created by a migration to VRAM; registered with the vram_manager and the
/// driver's svm_pagemap until the VM drops it (gc, destruction, the mm's
/// release). Evicting it moves this device's pages of its range back to
/// system memory through the mm (no reverse map in this model): under a
/// TRY-lock of the mm's mmap_lock shared, EBUSY when that is taken. It
/// never takes vm.lock.
struct gpu_vm::svm_chunk final : vram_object {
  svm_chunk(gpu_vm& v, va_range r, std::size_t pages, std::uint64_t now) noexcept
      : owner(v), cpu(r), resident(pages), migrated_ns(now) {}
  gpu_vm& owner;
  const va_range cpu;  ///< CPU VA of the chunk (page aligned)
  /// Pages of the range this device held when last counted: an upper bound
  /// (munmap frees pages without telling us). Relaxed: read by the
  /// manager under its lock (must not lock), written by migrations.
  std::atomic<std::size_t> resident;
  /// steady-clock ns of the last migration to VRAM (the timeslice start).
  std::atomic<std::uint64_t> migrated_ns;
  errc evict(const evict_context& cx) override;
  [[nodiscard]] std::size_t resident_frames() const noexcept override {
    return resident.load(std::memory_order_relaxed);
  }
  /// Null: the skip rule of evict_context protects holders of vm.lock, and
  /// this eviction takes no vm.lock, so even the allocating VM's own
  /// chunks may go (its own faults evict its least recently used chunks).
  [[nodiscard]] const void* vm() const noexcept override { return nullptr; }
};

/// The driver's dev_pagemap_ops for its VRAM pool, attached to every mm a
/// VM of the driver mirrors. The mm family keeps it alive by shared
/// ownership (mm::attach_pool's shared_ptr overload), so it outlives the
/// driver when a fork child still holds device-private pages. It never
/// uses the driver: migrate_to_ram copies with the CPU (frame_pool's
/// copy_frame) from the VRAM pool, which it also keeps alive.
/// It keeps a registry of the live svm_chunk records by mm, under a leaf
/// lock, to find the chunk (and timeslice) of a CPU fault and to count.
class svm_pagemap final : public dev_pagemap_ops {
 public:
  svm_pagemap(std::shared_ptr<frame_pool> vram, const void* owner) : vram_(std::move(vram)), owner_(owner) {}
  errc migrate_to_ram(mm& m, va_t addr) SVM_REQUIRES_SHARED(m.mmap_lock()) override;
  void add(gpu_vm::svm_chunk& c) SVM_EXCLUDES(lock_);
  void remove(gpu_vm::svm_chunk& c) SVM_EXCLUDES(lock_);
  /// Pages of `m` in CPU range r moved back to system memory: lower the
  /// resident counts of the chunks that cover them and, with `count`,
  /// count the migration (and a timeslice wait) in the VM of the first
  /// one (under the lock: a VM removes its chunks here before it goes).
  void moved_to_ram(const mm& m, va_range r, std::size_t pages, bool count, bool waited) SVM_EXCLUDES(lock_);
  const void* owner() const noexcept { return owner_; }
  const std::shared_ptr<frame_pool>& vram() const noexcept { return vram_; }

 private:
  std::shared_ptr<frame_pool> vram_;  // immutable
  const void* const owner_;
  static constexpr lock_class lock_class_{"svm_pagemap", lockdep::rank::leaf};
  /// The registry: leaf, never held around another lock or a sleep.
  mutable mutex lock_{lock_class_};
  std::multimap<const mm*, gpu_vm::svm_chunk*> chunks_ SVM_GUARDED_BY(lock_);
};

/// The VM's counters: relaxed atomics, statistics only.
struct gpu_vm::counters {
  std::atomic<std::uint64_t> faults_raised{0}, faults_serviced{0}, faults_cancelled{0}, valid_faults{0},
      batches{0}, hmm_calls{0}, retries_busy{0}, retries_seq{0}, false_retries{0}, retries_shrink{0},
      retries_huge{0}, fault_timeouts{0}, invalidations{0}, groups{0}, grouped_pages{0}, group_fallbacks{0},
      ptes_written{0}, ptes_zapped{0}, tlb_invalidations{0}, huge_leaves{0}, bo_faults{0}, evictions{0},
      preemptions{0}, bo_restores{0}, migrations_to_vram{0}, migrations_to_ram{0}, pages_to_vram{0}, pages_to_ram{0},
      svm_evictions{0}, migrate_fallbacks{0}, retries_in_place{0}, timeslice_waits{0};
  std::array<std::atomic<std::uint64_t>, latency_histogram::buckets> latency{};
};

/// Forwards a notifier callback to its VM and chunk.
class gpu_vm::chunk_ops final : public interval_notifier_ops {
 public:
  chunk_ops(gpu_vm& vm, chunk& c) : vm_(vm), c_(c) {}
  bool invalidate(interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq) override {
    return vm_.invalidate(c_, sub, r, cur_seq);
  }

 private:
  gpu_vm& vm_;
  chunk& c_;
};

/// One lazily inserted interval notifier over an aligned CPU chunk.
struct gpu_vm::chunk {
  static constexpr lock_class mirror_class{"gpu_vm.chunk.mirror", lockdep::rank::mirror};
  chunk(gpu_vm& vm, std::uint64_t idx, va_range r) : index(idx), cpu(r), ops(vm, *this) {}
  const std::uint64_t index;
  const va_range cpu;
  interval_notifier sub;
  chunk_ops ops;
  /// The notifier-wide mode's driver lock: the callback holds it exclusive
  /// around set_seq() and the PTE clear; a fault holds it shared around
  /// read_retry() and the PTE write.
  shared_mutex mirror_lock{mirror_class};
  /// 0 inserting, 1 inserted, 2 insert failed. Written once by the
  /// inserting thread (release); others wait on it (acquire).
  std::atomic<std::uint32_t> state{0};
  errc insert_error = errc::ok;  // written before state is released
  /// Faults using this chunk; guarded by gpu_vm::chunks_lock_.
  unsigned users = 0;
};

namespace detail {

/// A non-owning reference to a callable (the callee only calls it before
/// returning; no allocation, unlike std::function).
template <class>
class fn_ref;
template <class R, class... A>
class fn_ref<R(A...)> {
 public:
  template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, fn_ref> && std::invocable<F&, A...>)
  fn_ref(F&& f) noexcept  // NOLINT(google-explicit-constructor)
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, A... a) -> R { return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<A>(a)...); }) {}
  R operator()(A... a) const { return call_(obj_, std::forward<A>(a)...); }

 private:
  void* obj_;
  R (*call_)(void*, A...);
};

inline std::uint64_t now_ns() noexcept { return trace_now_ns(); }

inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
  c.fetch_add(n, std::memory_order_relaxed);
}

inline va_range intersect(va_range a, va_range b) noexcept {
  va_range r{std::max(a.start, b.start), std::min(a.end, b.end)};
  if (r.end < r.start) r.end = r.start;
  return r;
}

/// A trace span around a scope, when a sink is installed.
class span_scope {
 public:
  span_scope(trace_sink* t, const char* name, std::uint64_t arg = 0) noexcept
      : t_(t), name_(name), arg_(arg), start_(t ? now_ns() : 0) {}
  ~span_scope() {
    if (t_) t_->span(name_, start_, now_ns() - start_, arg_);
  }
  span_scope(const span_scope&) = delete;
  span_scope& operator=(const span_scope&) = delete;

 private:
  trace_sink* t_;
  const char* name_;
  std::uint64_t arg_;
  std::uint64_t start_;
};

}  // namespace detail

/// The mirror implementation: what differs between the page-centric mirror
/// and the range-based, VM-locked baseline. gpu_vm owns one, chosen at
/// construction by vm_config::impl; the fault path's retry loop
/// (fault.cpp), the window choice and the batching are shared and call it
/// at each step that differs.
class gpu_vm::mirror {
 public:
  explicit mirror(gpu_vm& vm) noexcept : vm_(vm) {}
  virtual ~mirror() = default;
  mirror(const mirror&) = delete;
  mirror& operator=(const mirror&) = delete;

  /// One 4K page's fault, with the strongest access among its records:
  /// takes vm.lock (shared for the page mirror, exclusive for the
  /// VM-locked baseline) around gpu_vm::service_page_locked.
  /// `may_migrate` false: every record of the page is a retried access
  /// (fault_record::retries), serviced where its memory lies.
  virtual errc service_page(va_t gva, access acc, bool may_migrate) = 0;
  /// The faults of one 2M block: distinct pages in ascending order, each
  /// with its strongest access; out[i] gets page i's outcome. The default
  /// services them one by one (the VM-locked baseline keeps per-fault
  /// ranges); the page mirror services them through one window under one
  /// vm.lock shared.
  virtual void service_block(std::span<const va_t> pages, std::span<const access> accs,
                             std::span<const std::uint8_t> may_migrate, std::span<errc> out) {
    for (std::size_t i = 0; i < pages.size(); ++i) out[i] = service_page(pages[i], accs[i], may_migrate[i] != 0);
  }
  /// True when faults snapshot the device page-table node's sequence
  /// (seq_mode::pgtable), so zaps must advance node sequences.
  [[nodiscard]] virtual bool node_seq() const noexcept = 0;
  /// Open a fault's read side over CPU window `cwin` pinned in node `n`;
  /// returns the sequence snapshot that commit() checks.
  virtual std::uint64_t read_begin(chunk& c, pt::node& n, va_range cwin) = 0;
  /// Fill the parts of `range` that guard the walk (is_valid in the
  /// per-node mode), for the window's entries [first, last] of `n`.
  virtual void guard_walk(hmm_range& range, pt::node& n, std::uint64_t snap, unsigned first, unsigned last) = 0;
  /// The commit: under the mirror's commit lock and n's lock, check that
  /// the snapshot is still current and, if so, call `write` (the PTE
  /// write, with n.lock held) and record the window's pages. Returns false
  /// when stale (nothing written).
  virtual bool commit(chunk& c, pt::node& n, std::uint64_t snap, unsigned first, unsigned last, va_range win,
                      std::span<const hmm_pfn> pages, detail::fn_ref<void()> write) = 0;
  /// Our own exclusive-access conversion (MIGRATE of our own zaps like any
  /// other event): nothing of ours goes stale, but advance the
  /// notifier sequence under the mirror's lock, as the kernel's drivers do.
  virtual void own_migration(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) = 0;
  /// A non-blockable callback: advance the sequence without waiting; false
  /// if that would block.
  virtual bool try_advance(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) = 0;
  /// A blockable callback: advance the sequence and clear the mirror's
  /// PTEs (and its bookkeeping) over the GPU ranges `gpu`, collecting the
  /// ranges to flush.
  virtual void invalidate(chunk& c, interval_notifier& sub, std::uint64_t cur_seq, std::span<const va_range> gpu,
                          std::vector<va_range>& flush) = 0;
  /// Range objects the implementation holds (0 for the page mirror).
  [[nodiscard]] virtual std::size_t ranges() const = 0;

 protected:
  gpu_vm& vm_;
};

/// The page-centric mirror (mirror_page.cpp): its state is the device page
/// table itself. seq_mode::pgtable: the per-node sequence, no driver lock
/// but the node's; seq_mode::notifier: the chunk notifier's sequence under
/// the chunk's mirror lock.
class gpu_vm::page_mirror final : public gpu_vm::mirror {
 public:
  page_mirror(gpu_vm& vm, seq_mode seq) noexcept : mirror(vm), seq_(seq) {}
  errc service_page(va_t gva, access acc, bool may_migrate) override;
  void service_block(std::span<const va_t> pages, std::span<const access> accs,
                     std::span<const std::uint8_t> may_migrate, std::span<errc> out) override;
  [[nodiscard]] bool node_seq() const noexcept override { return seq_ == seq_mode::pgtable; }
  std::uint64_t read_begin(chunk& c, pt::node& n, va_range cwin) override;
  void guard_walk(hmm_range& range, pt::node& n, std::uint64_t snap, unsigned first, unsigned last) override;
  bool commit(chunk& c, pt::node& n, std::uint64_t snap, unsigned first, unsigned last, va_range win,
              std::span<const hmm_pfn> pages, detail::fn_ref<void()> write) override;
  void own_migration(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) override;
  bool try_advance(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) override;
  void invalidate(chunk& c, interval_notifier& sub, std::uint64_t cur_seq, std::span<const va_range> gpu,
                  std::vector<va_range>& flush) override;
  [[nodiscard]] std::size_t ranges() const override { return 0; }

 private:
  const seq_mode seq_;
};

/// The range-based, VM-locked baseline (mirror_range.cpp) that svm-storm
/// compares against. It keeps per-range objects with their own page arrays
/// (the hmm output of the window that created them), split when partly
/// invalidated and dropped when emptied, and one VM-wide lock taken by
/// every fault commit and every invalidation, with the notifier-wide
/// sequence. Its faults hold vm.lock exclusive across the whole service.
class gpu_vm::range_mirror final : public gpu_vm::mirror {
 public:
  explicit range_mirror(gpu_vm& vm) noexcept : mirror(vm) {}
  errc service_page(va_t gva, access acc, bool may_migrate) override;
  [[nodiscard]] bool node_seq() const noexcept override { return false; }
  std::uint64_t read_begin(chunk& c, pt::node& n, va_range cwin) override;
  void guard_walk(hmm_range& range, pt::node& n, std::uint64_t snap, unsigned first, unsigned last) override;
  bool commit(chunk& c, pt::node& n, std::uint64_t snap, unsigned first, unsigned last, va_range win,
              std::span<const hmm_pfn> pages, detail::fn_ref<void()> write) override;
  void own_migration(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) override;
  bool try_advance(chunk& c, interval_notifier& sub, std::uint64_t cur_seq) override;
  void invalidate(chunk& c, interval_notifier& sub, std::uint64_t cur_seq, std::span<const va_range> gpu,
                  std::vector<va_range>& flush) override;
  [[nodiscard]] std::size_t ranges() const override;

 private:
  struct svm_range {
    va_t end;                     ///< GPU VA, exclusive
    std::vector<hmm_pfn> pages;   ///< one per 4K page from the range's start
  };
  static constexpr lock_class baseline_class{"gpu_vm.baseline", lockdep::rank::mirror};
  /// The VM-wide mirror lock: every fault commit and every invalidation of
  /// the baseline; guards the range objects.
  mutable mutex lock_{baseline_class};
  std::map<va_t, svm_range> ranges_ SVM_GUARDED_BY(lock_);  ///< by GPU start
  /// Remove [r.start, r.end) from the range objects, splitting the ones
  /// that straddle its edges.
  void cut_locked(va_range r) SVM_REQUIRES(lock_);
};

}  // namespace svm
