// The driver: one GPU VA space (gpu_vm) pairing an SVM mirror of a process
// address space with buffer-object mappings, on a device whose faults are
// serviced by svm::device's fault handler (docs/architecture.md).
//
// ## The mirror is page-centric
// Its state is the device page table itself plus the interval notifiers:
// no per-range objects. A fault fills PTEs through hmm_range_fault, guarded
// by sequence numbers; an invalidation clears PTEs. Two sequence modes:
//
//  - seq_mode::notifier (the kernel's protocol). One interval notifier per
//    chunk (default 512M of CPU VA) and one reader-writer lock per chunk
//    (rank mirror). The callback takes the lock exclusive, calls set_seq(),
//    clears PTEs; a fault takes it shared to check read_retry() and write.
//    Any invalidation inside the chunk makes every fault in flight in it
//    retry.
//  - seq_mode::pgtable (the upstream refinement). The sequence of the
//    device page-table page that will hold the window's entries:
//
//      fault                                   invalidation (callback)
//      -----                                   -----------------------
//      pin leaf node N, snap = N.seq           mm registers range R (active)
//      read_begin_range(window)                for nodes in R: lock,
//        (waits while an active R overlaps)      N.seq++, clear PTEs, unlock
//      hmm_range_fault(is_valid: W untouched)  TLB invalidate, wait
//      lock N; if W touched since snap: retry  ... CPU PTEs cleared ...
//      write PTEs; unlock N; unpin N           mm unregisters R; frees frames
//
//    An invalidation registered before read_begin_range has ended before the
//    walk, so the walk sees its cleared CPU PTEs; one registered after finds
//    N (pinned, so it exists and stays linked) and advances its seq. A 2M
//    leaf lives in the level-1 node, whose seq is also advanced when a child
//    node under it is freed (pagetable/), so no invalidation is missed.
//    Faults and invalidations in different 2M blocks never touch each
//    other's counters. Inside one block, "W touched since snap" asks N's
//    invalidation log (pt::node::unchanged_since): did an advance of N.seq
//    since snap cover an entry of the window W? A fault whose snapshot is
//    older than the log retries as if it had been touched, so an
//    invalidation of other pages of the block makes a fault retry only
//    when many of them land during it.
//
// ## BO mappings take precedence
// BO PTEs carry the software bit `bo_pte_bit`; SVM invalidations clear only
// untagged entries, and an SVM fault's window avoids every BO mapping. A bind
// clears the SVM PTEs under it; an unbind hands the VA back to the mirror.
#pragma once

#include <array>
#include <map>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/fence.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"
#include "svm/device_sim/device.h"
#include "svm/notifier/hmm.h"
#include "svm/notifier/mm.h"
#include "svm/notifier/mmu_notifier.h"
#include "svm/svm/gpuva.h"
#include "svm/svm/resv.h"

namespace svm {

class gpu_vm;
class device;

/// How the VM runs: with recoverable faults (SVM + BOs), or long-running
/// without faults (BOs only, kept safe by preempt fences).
enum class vm_mode : std::uint8_t { fault, long_running };
/// What the SVM mirror covers: nothing, the whole mm at GPU VA == CPU VA
/// (the "system allocator"), or explicit windows (add_window()).
enum class mirror_kind : std::uint8_t { none, full_mm, windows };
/// Sequence granularity (see the file comment).
enum class seq_mode : std::uint8_t { notifier, pgtable };
/// Mirror implementation: the page-centric, per-node-locked mirror, or the
/// range-based, VM-locked baseline that svm-storm compares against.
enum class mirror_impl : std::uint8_t { page, range };
enum class placement : std::uint8_t { vram, system };

[[nodiscard]] const char* to_string(seq_mode m) noexcept;
[[nodiscard]] const char* to_string(mirror_impl m) noexcept;

/// Window choice (a swappable policy). Contract: return a window containing
/// `fault` (page aligned), aligned to its own size, inside `allowed`; the
/// caller then trims nothing, so the policy must respect `allowed`.
class window_policy {
 public:
  virtual ~window_policy() = default;
  [[nodiscard]] virtual va_range choose(va_t fault, va_range allowed) const noexcept = 0;
};
/// The largest of 2M, 64K, 4K aligned around the fault that fits `allowed`.
class largest_window_policy final : public window_policy {
 public:
  [[nodiscard]] va_range choose(va_t fault, va_range allowed) const noexcept override;
};
/// Always one size (4K, 64K or 2M), shrinking to 4K where it does not fit.
class fixed_window_policy final : public window_policy {
 public:
  explicit fixed_window_policy(std::uint64_t size) noexcept : size_(size) {}
  [[nodiscard]] va_range choose(va_t fault, va_range allowed) const noexcept override;

 private:
  std::uint64_t size_;
};

struct vm_config {
  vm_mode mode = vm_mode::fault;
  mirror_kind mirror = mirror_kind::full_mm;
  seq_mode seq = seq_mode::pgtable;
  mirror_impl impl = mirror_impl::page;
  /// CPU VA covered by one lazily inserted interval notifier.
  std::uint64_t chunk_size = std::uint64_t{512} << 20;
  /// Window policy; null: largest_window_policy.
  std::shared_ptr<const window_policy> window;
  /// Bound of a fault's retry loop (the kernel's default is one second).
  std::chrono::nanoseconds fault_timeout = std::chrono::seconds(1);
  /// Map 2M device leaves where the CPU maps a 2M huge page over the window.
  bool huge_leaves = true;
};

/// A log2 histogram of fault latencies (raise to replay), in ns.
struct latency_histogram {
  static constexpr unsigned buckets = 40;
  std::array<std::uint64_t, buckets> count{};  ///< bucket i: [2^i, 2^(i+1)) ns
  [[nodiscard]] std::uint64_t total() const noexcept;
  /// The upper bound of the bucket holding quantile q (0..1).
  [[nodiscard]] std::uint64_t quantile(double q) const noexcept;
  [[nodiscard]] std::uint64_t max_ns() const noexcept;
};

/// Per-VM counters (docs/contracts.md §3, issue 5's list). Cheap to read.
struct vm_stats {
  std::uint64_t faults_raised = 0;    ///< fault records received for this VM
  std::uint64_t faults_serviced = 0;  ///< records replayed after servicing
  std::uint64_t faults_cancelled = 0;
  std::uint64_t valid_faults = 0;     ///< the PTE was already there
  std::uint64_t batches = 0;          ///< handler batches that held this VM's records
  std::uint64_t hmm_calls = 0;
  std::uint64_t retries_busy = 0;     ///< hmm_range_fault returned EBUSY
  std::uint64_t retries_seq = 0;      ///< the sequence moved before the commit
  std::uint64_t false_retries = 0;    ///< retries caused by an invalidation outside the window
  std::uint64_t invalidations = 0;    ///< notifier callbacks that touched this VM
  std::uint64_t ptes_written = 0;     ///< in 4K pages (a 2M leaf counts 512)
  std::uint64_t ptes_zapped = 0;      ///< in 4K pages
  std::uint64_t tlb_invalidations = 0;
  std::uint64_t huge_leaves = 0;      ///< 2M leaves written
  std::uint64_t bo_faults = 0;
  std::uint64_t evictions = 0;
  std::uint64_t preemptions = 0;      ///< preempt fences signalled (long-running VMs)
  latency_histogram latency;
  [[nodiscard]] std::string to_string() const;
};
std::ostream& operator<<(std::ostream& os, const vm_stats& s);

/// The fault handler's own counters.
struct handler_stats {
  std::uint64_t batches = 0;
  std::uint64_t records = 0;
  std::uint64_t coalesced = 0;        ///< records merged into another of the same page
  std::uint64_t unknown_vm = 0;       ///< records cancelled because no VM had their id
  /// Time the handler threads spent servicing batches (fetch to replay),
  /// summed over threads: the driver's CPU cost of the faults.
  std::uint64_t busy_ns = 0;
};

/// A sink for trace spans (svm-storm writes them as Chrome trace events).
/// Spans: "fault_batch" (a handler batch), "hmm_range_fault", "invalidate"
/// (one notifier callback), "tlb_invalidate". Called on the thread that did
/// the work, after it finished; must be thread-safe and must not block for
/// long (it runs inside notifier callbacks).
class trace_sink {
 public:
  virtual ~trace_sink() = default;
  /// One finished span: `name` (a string literal), its start and duration in
  /// trace_now_ns() time, and a count (records, pages) as `arg`.
  virtual void span(const char* name, std::uint64_t start_ns, std::uint64_t dur_ns, std::uint64_t arg) noexcept = 0;
  /// One fault record the handler finished (replayed or cancelled): raised by
  /// `engine` at `raise_ns` (the record's time), done at `done_ns`. Called on
  /// the handler thread, inside its "fault_batch" span, once per record
  /// (duplicates of one page included). The default ignores it.
  virtual void fault(std::uint32_t engine, va_t gva, std::uint64_t raise_ns, std::uint64_t done_ns) noexcept {
    (void)engine, (void)gva, (void)raise_ns, (void)done_ns;
  }
};

/// steady_clock now, in ns (the time base of trace spans and fault records).
[[nodiscard]] std::uint64_t trace_now_ns() noexcept;

struct device_config {
  dev::device_config hw{};  ///< hw.wait_spin_ns is overridden by wait_spin_ns below
  unsigned handler_threads = 1;
  std::size_t batch = 256;  ///< records fetched per batch (1..256)
  /// How long a faulted wave and an idle handler spin before they sleep on
  /// a futex (dev::device_config::wait_spin_ns). nullopt: automatic, 20 µs
  /// when the engines and handler threads together fit in the machine's
  /// hardware threads (spinning then costs nobody a core), else 0.
  std::optional<std::uint32_t> wait_spin_ns{};
  /// The value the automatic choice gives for this configuration.
  [[nodiscard]] std::uint32_t effective_wait_spin_ns() const noexcept;
};

/// A device with its driver: the simulated hardware plus the fault handler
/// threads that service its fault buffer for every registered gpu_vm.
class device {
 public:
  explicit device(device_config c = {});
  /// Stops the handler threads, then the hardware. Every gpu_vm must be
  /// destroyed first.
  ~device();
  device(const device&) = delete;
  device& operator=(const device&) = delete;

  [[nodiscard]] dev::device& hw() noexcept { return hw_; }
  /// Submit `items` work items of `fn` on the VM's queue (see
  /// dev::device::submit). Errors: ECANCELED while the VM's queues are
  /// suspended by a preempt fence is not an error: the kernel waits.
  [[nodiscard]] result<dev::completion> submit(gpu_vm& vm, std::uint64_t items, dev::kernel_fn fn);
  [[nodiscard]] handler_stats stats() const noexcept;
  /// Install a trace sink (nullptr: off). Set before concurrent use; it must
  /// outlive its installation.
  void set_trace(trace_sink* t) noexcept { trace_.store(t, std::memory_order_release); }
  [[nodiscard]] trace_sink* trace() const noexcept { return trace_.load(std::memory_order_acquire); }

 private:
  friend class gpu_vm;
  /// The trace sink; release store in set_trace pairs with the acquire load
  /// in trace().
  std::atomic<trace_sink*> trace_{nullptr};
  static constexpr lock_class reg_class{"svm.device.registry", lockdep::rank::driver};

  /// Registry of VMs by id. Handler threads hold reg_lock_ shared while they
  /// service a batch; a VM registers and unregisters under it exclusive, so
  /// once unregister returns no handler is inside the VM.
  result<dev::vm_id> register_vm(gpu_vm* vm) SVM_EXCLUDES(reg_lock_);
  void unregister_vm(dev::vm_id id) SVM_EXCLUDES(reg_lock_);
  void handler_loop(std::stop_token st);
  void gc_all() SVM_REQUIRES_SHARED(reg_lock_);
  void process(std::span<dev::fault_record> recs) SVM_REQUIRES_SHARED(reg_lock_);

  device_config cfg_;  // immutable
  dev::device hw_;
  mutable shared_mutex reg_lock_{reg_class};
  std::unordered_map<dev::vm_id, gpu_vm*> vms_ SVM_GUARDED_BY(reg_lock_);
  dev::vm_id next_id_ SVM_GUARDED_BY(reg_lock_) = 1;
  // Counters; relaxed, statistics only.
  std::atomic<std::uint64_t> batches_{0}, records_{0}, coalesced_{0}, unknown_{0}, busy_ns_{0};
  std::vector<std::jthread> handlers_;  // started last, joined first
};

/// The device's system aperture spans every frame pool of the mm: the
/// device pfn of frame `pfn` of the mm's pool `pool` is (pool << 32) | pfn.
inline constexpr unsigned mm_pool_shift = 32;
[[nodiscard]] constexpr pfn_t mm_device_pfn(unsigned pool, pfn_t pfn) noexcept {
  return (pfn_t{pool} << mm_pool_shift) | pfn;
}

/// A BO handle as the user sees it.
using bo_id = bo_handle;

/// One GPU VA space on one device, for one mm.
class gpu_vm {
 public:
  /// The software bit of the device PTE that marks BO mappings.
  static constexpr std::uint64_t bo_pte_bit = std::uint64_t{1} << 11;

  /// Register with `dev`, attach a device page table, create a queue.
  /// The mm and the device must outlive the VM.
  gpu_vm(device& dev, mm& m, vm_config cfg = {});
  /// Waits for nothing: destroy only with no kernel running on the VM.
  /// Removes the notifiers, unregisters, frees the BOs.
  ~gpu_vm();
  gpu_vm(const gpu_vm&) = delete;
  gpu_vm& operator=(const gpu_vm&) = delete;

  [[nodiscard]] dev::vm_id id() const noexcept { return id_; }
  [[nodiscard]] const vm_config& config() const noexcept { return cfg_; }
  [[nodiscard]] dev::queue_id queue() const noexcept { return queue_; }
  [[nodiscard]] svm::mm& mm() noexcept { return mm_; }
  [[nodiscard]] dev::dev_page_table& page_table() noexcept { return pt_; }

  // ---- the mirror -------------------------------------------------------
  /// Mirror CPU VA [cpu_va, cpu_va + size) at GPU VA gpu_va (mirror_kind
  /// windows). Errors: EINVAL (unaligned, zero, wrong mirror kind),
  /// EOVERFLOW, EEXIST (overlaps another window's GPU or CPU range).
  /// Locking: takes lock_ exclusive.
  errc add_window(va_t cpu_va, va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);

  // ---- buffer objects ---------------------------------------------------
  /// A BO of `size` bytes (page multiple) placed in VRAM or system memory.
  /// Errors: EINVAL (zero, unaligned), ENOMEM (VRAM exhausted and nothing
  /// evictable, or no system frames).
  [[nodiscard]] result<bo_id> create_bo(std::uint64_t size, placement where) SVM_EXCLUDES(lock_);
  /// Destroy a BO; its mappings are unbound first. ENOENT if unknown.
  errc destroy_bo(bo_id bo) SVM_EXCLUDES(lock_);
  /// VM_BIND map: BO `bo` from `offset` at GPU VA [gpu_va, gpu_va + size),
  /// replacing overlapping BO mappings and clearing the SVM PTEs there.
  /// Errors (VM unchanged): EINVAL (zero, unaligned, past the BO's end,
  /// outside the VA), EOVERFLOW, ENOENT (unknown BO), ENOMEM.
  errc bind(bo_id bo, va_t gpu_va, std::uint64_t offset, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// VM_BIND unmap: remove BO mappings in the range (edges trimmed); the VA
  /// returns to the mirror. Errors: EINVAL, EOVERFLOW.
  errc unbind(va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// The BO's reservation object (fences by usage).
  [[nodiscard]] resv* bo_resv(bo_id bo) SVM_EXCLUDES(lock_);
  /// Move a VRAM BO to system memory with the copy engine, after waiting for
  /// the fences whose usage requires it (everything up to BOOKKEEP), then
  /// clear its PTEs. In a fault VM the next access faults it back; in a
  /// long-running VM the queues are suspended and the BO rebound.
  /// Errors: ENOENT, EINVAL (not in VRAM), ENOMEM (no system frames),
  /// ETIMEDOUT (a fence did not signal).
  errc evict(bo_id bo) SVM_EXCLUDES(lock_);
  /// Read/write BO bytes from the CPU side (for tests and initialisation).
  errc bo_write(bo_id bo, std::uint64_t offset, std::span<const std::byte> in) SVM_EXCLUDES(lock_);
  errc bo_read(bo_id bo, std::uint64_t offset, std::span<std::byte> out) SVM_EXCLUDES(lock_);
  [[nodiscard]] result<placement> bo_placement(bo_id bo) SVM_EXCLUDES(lock_);

  /// The long-running VM's current preempt fence (null in a fault VM). An
  /// eviction signals it — the VM's queues count as suspended from then
  /// until the BO is rebound — and arms a new one. The simulated device
  /// has no queue preemption: waves that touch the moving BO stall in the
  /// fault buffer until the rebind, which is what a suspended queue looks
  /// like from the kernel's side.
  [[nodiscard]] fence_ptr preempt_fence() const SVM_EXCLUDES(lock_);

  // ---- statistics -------------------------------------------------------
  [[nodiscard]] vm_stats stats() const noexcept;
  void reset_stats() noexcept;
  /// Bytes of device page table.
  [[nodiscard]] std::size_t pt_bytes() const { return pt_.stats().bytes; }

  /// The owner token of this VM's device (MIGRATE events it starts itself
  /// carry it and are ignored).
  [[nodiscard]] const void* owner() const noexcept { return &dev_; }

  /// Test hooks (deterministic interleavings). Set before concurrent use.
  struct test_hooks {
    /// In a fault, after the sequence snapshot and before hmm_range_fault.
    std::function<void(va_range window)> after_snapshot = {};
    /// After hmm_range_fault returned, before the commit's locks.
    std::function<void(va_range window)> before_commit = {};
  };
  void set_test_hooks(test_hooks h) { hooks_ = std::move(h); }

 private:
  friend class device;
  struct bo;
  struct chunk;
  struct window;
  struct counters;
  class chunk_ops;

  // The fault path, called by device::process with the registry held shared.
  void service(std::span<dev::fault_record> recs);
  // One 4K page's fault, with the strongest access among its records.
  // Locking: takes lock_ shared (the page mirror) or exclusive (the
  // VM-locked baseline) around service_page_locked.
  errc service_page(va_t gva, access acc, std::uint64_t* ptes) SVM_EXCLUDES(lock_);
  errc service_page_locked(va_t gva, access acc) SVM_REQUIRES_SHARED(lock_);
  errc service_svm_locked(va_t gva, va_t cpu_va, access acc, va_range allowed) SVM_REQUIRES_SHARED(lock_);
  errc service_bo_locked(const gpuva& m, va_t gva, access acc) SVM_REQUIRES_SHARED(lock_);
  /// GPU VA -> CPU VA of the mirror, and the GPU range the mirror allows
  /// around it; false if the VA is not mirrored.
  bool to_cpu_locked(va_t gva, va_t& cpu, va_range& gpu_allowed) const SVM_REQUIRES_SHARED(lock_);
  chunk* get_chunk(va_t cpu_va);
  void put_chunk(chunk* c);
 public:
  /// Remove the notifiers of chunks that no fault is using and where
  /// nothing is mapped any more. Returns how many were removed. The fault
  /// handler calls it when idle; tests may call it directly.
  /// Locking: takes chunks_lock_ (leaf) briefly; blocks in
  /// interval_notifier::remove() (no lock held); must not be called from a
  /// notifier callback or with mmap_lock held.
  std::size_t gc_notifiers();

 private:
  // The invalidation callback's body.
  bool invalidate(chunk& c, interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq);
  void zap_gpu(va_range r, bool bo_entries, std::vector<va_range>& flush);
  void flush_tlb(const std::vector<va_range>& flush);
  void note_invalidation(va_range gpu);
  // BOs (bo.cpp).
  void free_bo_frames(bo& b);
  bool evict_one_locked(const bo* keep) SVM_REQUIRES(lock_);
  errc evict_locked(bo& b) SVM_REQUIRES(lock_);
  result<std::uint64_t> bo_size_locked(bo_id id) const SVM_REQUIRES_SHARED(lock_);
  void write_bo_ptes_locked(const gpuva& m, va_range r) SVM_REQUIRES_SHARED(lock_);
  void ctr_add_ptes_written(std::uint64_t n) noexcept;
  void ctr_add_evictions() noexcept;
  void ctr_add_preemptions() noexcept;
  bool overlapped_since(va_range win, std::uint64_t since) const;

  device& dev_;
  svm::mm& mm_;
  const vm_config cfg_;
  std::shared_ptr<const window_policy> policy_;
  dev::dev_page_table pt_;
  dev::vm_id id_ = 0;
  dev::queue_id queue_ = 0;
  std::unique_ptr<phys_mem> sysmem_;

  static constexpr lock_class vm_class{"gpu_vm.lock", lockdep::rank::vm};
  /// vm.lock: the BO VA tree, the BO table and the mirror windows. Faults
  /// hold it shared across their service (the baseline's: exclusive, which
  /// is what makes it VM-locked); bind/unbind/evict exclusive.
  mutable shared_mutex lock_{vm_class};
  gpuva_tree tree_;  // guarded by lock_ (the tree asserts it)
  std::unordered_map<bo_id, std::unique_ptr<bo>> bos_ SVM_GUARDED_BY(lock_);
  bo_id next_bo_ SVM_GUARDED_BY(lock_) = 1;
  std::vector<window> windows_ SVM_GUARDED_BY(lock_);
  fence_ptr preempt_ SVM_GUARDED_BY(lock_);  ///< long-running VMs only

  static constexpr lock_class chunks_class{"gpu_vm.chunks", lockdep::rank::leaf};
  /// The lazily inserted notifiers by chunk index. Insertion and removal
  /// happen without it held (they may block); it guards the map and the
  /// chunks' use counts.
  mutable mutex chunks_lock_{chunks_class};
  std::unordered_map<std::uint64_t, std::unique_ptr<chunk>> chunks_ SVM_GUARDED_BY(chunks_lock_);

  /// Callback-side state, which the invalidation callback may read (it
  /// must not take vm.lock): the log of recent invalidations (GPU ranges
  /// with a stamp) for false-retry accounting — a retry is false if none of
  /// them overlapped the window — and a copy of the mirror windows.
  static constexpr lock_class log_class{"gpu_vm.inval_log", lockdep::rank::leaf};
  mutable mutex log_lock_{log_class};
  struct logged { va_range r; std::uint64_t stamp; };
  std::array<logged, 64> log_ SVM_GUARDED_BY(log_lock_){};
  std::uint64_t log_next_ SVM_GUARDED_BY(log_lock_) = 0;
  std::vector<window> windows_snapshot_ SVM_GUARDED_BY(log_lock_);
  /// Stamp of invalidations; relaxed loads are fine: the log lock orders
  /// the entries, the stamp only names them.
  std::atomic<std::uint64_t> inval_stamp_{0};

  std::unique_ptr<counters> ctr_;
  test_hooks hooks_;

  // ---- the range-based, VM-locked baseline (mirror_impl::range) ----------
  // It keeps per-range objects with their own page arrays (the hmm output of
  // the window that created them), split when partly invalidated and
  // dropped when emptied, and one VM-wide lock taken by every fault commit
  // and every invalidation, with the notifier-wide sequence. Same batching,
  // window choice and retry loop as the page-centric mirror.
  struct svm_range {
    va_t end;                     ///< GPU VA, exclusive
    std::vector<hmm_pfn> pages;   ///< one per 4K page from the range's start
  };
  static constexpr lock_class baseline_class{"gpu_vm.baseline", lockdep::rank::mirror};
  mutable mutex baseline_lock_{baseline_class};
  std::map<va_t, svm_range> ranges_ SVM_GUARDED_BY(baseline_lock_);  ///< by GPU start
  /// Remove [r.start, r.end) from the range objects, splitting the ones
  /// that straddle its edges.
  void baseline_cut_locked(va_range r) SVM_REQUIRES(baseline_lock_);

 public:
  /// Range objects the baseline holds now (tests; 0 for the page mirror).
  [[nodiscard]] std::size_t baseline_ranges() const;
};

}  // namespace svm
