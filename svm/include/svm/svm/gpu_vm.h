// The driver: one GPU VA space (gpu_vm) pairing an SVM mirror of a process
// address space with buffer-object mappings, on a device whose faults are
// serviced by svm::driver's fault handler (svm/svm/driver.h).
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
#include "svm/svm/driver.h"
#include "svm/svm/gpuva.h"
#include "svm/svm/resv.h"

namespace svm {

class gpu_vm;

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
/// Where a BO's frames live: device VRAM, or system memory (the mm's pool 0).
enum class placement : std::uint8_t { vram, system };

/// The sequence mode's name (for logs and benchmark output).
[[nodiscard]] const char* to_string(seq_mode m) noexcept;
/// The mirror implementation's name (for logs and benchmark output).
[[nodiscard]] const char* to_string(mirror_impl m) noexcept;

/// Window choice (a swappable policy). Contract: return a window containing
/// `fault` (page aligned), aligned to its own size, inside `allowed`; the
/// caller then trims nothing, so the policy must respect `allowed`.
class window_policy {
 public:
  virtual ~window_policy() = default;
  /// The window to fill for a fault at GPU VA `fault`, within `allowed`
  /// (see the class comment for the contract).
  [[nodiscard]] virtual va_range choose(va_t fault, va_range allowed) const noexcept = 0;
};
/// The largest of 2M, 64K, 4K aligned around the fault that fits `allowed`.
class largest_window_policy final : public window_policy {
 public:
  /// Tries 2M, then 64K, then 4K; falls back to the fault's 4K page.
  [[nodiscard]] va_range choose(va_t fault, va_range allowed) const noexcept override;
};
/// Always one size (4K, 64K or 2M), shrinking to 4K where it does not fit.
class fixed_window_policy final : public window_policy {
 public:
  /// A policy that always tries windows of `size` bytes (a power of two,
  /// normally 4K, 64K or 2M).
  explicit fixed_window_policy(std::uint64_t size) noexcept : size_(size) {}
  /// The `size`-aligned window around the fault if it fits `allowed`, else
  /// the fault's 4K page.
  [[nodiscard]] va_range choose(va_t fault, va_range allowed) const noexcept override;

 private:
  std::uint64_t size_;
};

/// The settings of a gpu_vm, fixed at creation (checked by gpu_vm::validate()).
struct vm_config {
  vm_mode mode = vm_mode::fault;              ///< fault-driven or long-running
  mirror_kind mirror = mirror_kind::full_mm;  ///< what the SVM mirror covers
  seq_mode seq = seq_mode::pgtable;           ///< sequence granularity of the mirror
  mirror_impl impl = mirror_impl::page;       ///< page-centric mirror or range baseline
  /// CPU VA covered by one lazily inserted interval notifier.
  std::uint64_t chunk_size = std::uint64_t{512} << 20;
  /// Window policy; null: largest_window_policy.
  std::shared_ptr<const window_policy> window;
  /// Bound of a fault's retry loop (the kernel's HMM_RANGE_DEFAULT_TIMEOUT
  /// is one second). Bounded by progress, not by the clock alone: a fault
  /// gives up (EBUSY) only once both fault_timeout has passed and its
  /// window was invalidated at least fault_retry_floor times (a retry the
  /// VM's invalidation log shows overlapping the window). Retries no
  /// invalidation of the window explains (the notifier-wide sequence moved
  /// for another part of the chunk) count only toward
  /// gpu_vm::unexplained_retry_limit. A fault whose threads were
  /// descheduled past the timeout while the rest of its chunk churned
  /// still completes. Must be > 0.
  std::chrono::nanoseconds fault_timeout = std::chrono::seconds(1);
  /// See fault_timeout. Must be >= 1.
  unsigned fault_retry_floor = 8;
  /// Map 2M device leaves where the CPU maps a 2M huge page over the window.
  bool huge_leaves = true;
  /// How long a chunk migrated to VRAM stays there before a CPU fault may
  /// migrate it back (thrashing guard, as xe's timeslice): the CPU fault's
  /// migrate_to_ram sleeps the rest of it first, holding the mm's
  /// mmap_lock shared, so a CPU fault waits at most this long (see
  /// docs/migration.md). 0: no wait. Must be >= 0.
  std::chrono::nanoseconds migrate_timeslice = std::chrono::milliseconds(5);
};

/// Where SVM memory should live (svm_attrs::preferred).
enum class mem_location : std::uint8_t { system, vram };
/// What a device atomic needs (svm_attrs::atomics): `any` memory, or
/// `device` memory, so an atomic fault on SVM memory migrates its chunk to
/// VRAM first (as xe does for device atomics).
enum class atomic_mode : std::uint8_t { any, device };

/// Memory attributes of a GPU VA range of the SVM mirror (madvise-like;
/// gpu_vm::set_attrs). The defaults hold wherever nothing was set.
struct svm_attrs {
  mem_location preferred = mem_location::system;  ///< vram: a device fault migrates the chunk to VRAM
  /// device: the range's system-memory PTEs carry no atomic permission, so
  /// an atomic faults and migrates the chunk to VRAM first.
  atomic_mode atomics = atomic_mode::any;
  /// The migration chunk: 4K, 64K or 2M. A fault or prefetch migrates the
  /// granularity-aligned block around the page, clipped to the CPU VMA and
  /// to the mirror's range.
  std::uint64_t granularity = huge_size;
  friend bool operator==(const svm_attrs&, const svm_attrs&) = default;
};

/// One piece of gpu_vm::query_attrs(): a GPU VA range with one set of
/// attributes, and where its pages are now.
struct attr_range {
  va_range range;                  ///< GPU VA
  svm_attrs attrs;                 ///< the attributes there
  std::uint64_t vram_pages = 0;    ///< pages whose CPU entry is a device-private entry of this device's VRAM
  std::uint64_t system_pages = 0;  ///< pages the CPU maps present (system memory)
};

/// A log2 histogram of fault latencies (raise to replay), in ns.
struct latency_histogram {
  /// Number of buckets; latencies of 2^39 ns or more land in the last one.
  static constexpr unsigned buckets = 40;
  std::array<std::uint64_t, buckets> count{};  ///< bucket i: [2^i, 2^(i+1)) ns
  /// The number of faults recorded (the sum of all buckets).
  [[nodiscard]] std::uint64_t total() const noexcept;
  /// The upper bound of the bucket holding quantile q (0..1).
  [[nodiscard]] std::uint64_t quantile(double q) const noexcept;
  /// The upper bound, in ns, of the highest non-empty bucket (0 if empty).
  [[nodiscard]] std::uint64_t max_ns() const noexcept;
};

/// Per-VM counters (the list in docs/contracts.md §3). Cheap to read.
/// Each counter is read separately, so a snapshot is not atomic as a whole.
struct vm_stats {
  std::uint64_t faults_raised = 0;    ///< fault records received for this VM
  std::uint64_t faults_serviced = 0;  ///< records replayed after servicing
  std::uint64_t faults_cancelled = 0; ///< records cancelled because servicing failed
  std::uint64_t valid_faults = 0;     ///< the PTE was already there
  std::uint64_t batches = 0;          ///< handler batches that held this VM's records
  std::uint64_t hmm_calls = 0;        ///< hmm_range_fault calls (one per fault attempt, retries included)
  std::uint64_t retries_busy = 0;     ///< hmm_range_fault returned EBUSY
  std::uint64_t retries_seq = 0;      ///< the sequence moved before the commit
  std::uint64_t false_retries = 0;    ///< retries caused by an invalidation outside the window
  std::uint64_t retries_shrink = 0;   ///< another page of the window went away: retried on the fault's page alone
  std::uint64_t retries_huge = 0;     ///< not one CPU huge page, or a 4K table appeared: retried with 4K entries
  std::uint64_t fault_timeouts = 0;   ///< faults that gave up (EBUSY) past fault_timeout and fault_retry_floor (or unexplained_retry_limit)
  std::uint64_t invalidations = 0;    ///< notifier callbacks that touched this VM
  std::uint64_t ptes_written = 0;     ///< in 4K pages (a 2M leaf counts 512)
  std::uint64_t ptes_zapped = 0;      ///< in 4K pages
  std::uint64_t tlb_invalidations = 0; ///< device TLB invalidations issued (one per flushed range)
  std::uint64_t huge_leaves = 0;      ///< 2M leaves written
  std::uint64_t groups = 0;           ///< 2M blocks among the distinct pages of the batches
  std::uint64_t grouped_pages = 0;    ///< pages serviced through one window per 2M block
  std::uint64_t group_fallbacks = 0;  ///< blocks handed back to per-page service after stale group tries
  std::uint64_t bo_faults = 0;        ///< faults serviced from a BO mapping (not the mirror)
  std::uint64_t evictions = 0;        ///< BOs moved from VRAM to system memory
  std::uint64_t preemptions = 0;      ///< preempt fences signalled (long-running VMs)
  std::uint64_t bo_restores = 0;      ///< evicted VRAM BOs a device access brought back to VRAM
  std::uint64_t migrations_to_vram = 0;  ///< SVM chunks migrated to VRAM (faults and prefetches)
  std::uint64_t migrations_to_ram = 0;   ///< SVM chunks migrated back (CPU faults, prefetch to system, eviction)
  std::uint64_t pages_to_vram = 0;    ///< pages those migrations to VRAM moved
  std::uint64_t pages_to_ram = 0;     ///< pages those migrations back moved
  std::uint64_t svm_evictions = 0;    ///< SVM chunks evicted to system memory under VRAM pressure
  std::uint64_t migrate_fallbacks = 0;  ///< chunks a fault wanted in VRAM but mapped in system memory (no room, or not migratable)
  /// Faults that wanted VRAM (an SVM chunk to migrate, an evicted VRAM BO to
  /// restore) but were retried accesses (dev::fault_record::retries): mapped
  /// where the memory lay, not moved again (the forward-progress rule).
  std::uint64_t retries_in_place = 0;
  std::uint64_t timeslice_waits = 0;  ///< CPU faults that waited for a chunk's migrate_timeslice before migrating it back
  latency_histogram latency;          ///< raise-to-replay latency of serviced faults
  /// A one-line summary of the main counters (what operator<< prints).
  [[nodiscard]] std::string to_string() const;
};
/// Prints the one-line summary of `s` (faults, retries, PTEs, latency p50/p99).
std::ostream& operator<<(std::ostream& os, const vm_stats& s);

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

  /// The reason a kernel still running when its VM is destroyed is
  /// cancelled with: its status reads {ECANCELED, reason ENOENT}.
  static constexpr errc destroy_reason = errc::noent;

  /// Stale tries after which the page mirror hands a 2M block it services
  /// through one window back to per-page service (each page then retries
  /// under fault_timeout and fault_retry_floor on its own), so a block
  /// never times out as a group where its pages would complete.
  static constexpr unsigned group_retry_limit = 2;

  /// The no-hang net of a fault's retry loop: past fault_timeout, a fault
  /// also gives up after this many retries that no invalidation of its
  /// window explains (false retries, and retries while the invalidation
  /// log wrapped). Each such retry needs a fresh invalidation elsewhere in
  /// the chunk, so only an endless storm there reaches it.
  static constexpr unsigned unexplained_retry_limit = 1u << 16;

  /// Check a configuration: EINVAL for a chunk_size that is not a power of
  /// two >= 2M, a long-running VM with an SVM mirror (it takes no faults:
  /// use mirror_kind::none), fault_timeout <= 0, or an enum value outside
  /// its enumeration.
  [[nodiscard]] static errc validate(const vm_config& c) noexcept;
  /// Register with `dev`, attach a device page table, create a queue, and
  /// subscribe to the mm's teardown. Errors (nothing is left behind):
  /// EINVAL (validate(), or an mm already torn down), ENOSPC (every VM id
  /// of the device is in use), and what the device's attach_vm and
  /// create_queue return. The driver must outlive the VM; the mm need not
  /// (see mm_released()). The only way to make a gpu_vm: the constructor
  /// is private, so no configuration reaches it unvalidated and a failure
  /// is an error value, never an abort.
  [[nodiscard]] static result<std::unique_ptr<gpu_vm>> create(driver& dev, svm::mm& m, vm_config cfg = {});
  /// Waits safely, then frees. Order: unsubscribe from the mm; if a kernel
  /// is queued or running on the VM's queue, cancel the VM's kernels
  /// (reason destroy_reason) and wait until their waves have left (the VM
  /// stays registered meanwhile, so their faults are still serviced or
  /// cancelled; a work item that never touches device memory cannot be
  /// stopped, and after 10 s the wait says so on stderr with the device's
  /// description); destroy the queue; unregister (no handler thread is
  /// inside the VM after it); remove the notifiers; detach the page table;
  /// free the BOs.
  ~gpu_vm();
  gpu_vm(const gpu_vm&) = delete;
  gpu_vm& operator=(const gpu_vm&) = delete;

  /// The VM id the device assigned at registration.
  [[nodiscard]] dev::vm_id id() const noexcept { return id_; }
  /// The configuration the VM was created with.
  [[nodiscard]] const vm_config& config() const noexcept { return cfg_; }
  /// The device queue created for this VM (where its kernels run).
  [[nodiscard]] dev::queue_id queue() const noexcept { return queue_; }
  /// The mirrored mm: valid only while it lives (see mm_released()).
  [[nodiscard]] svm::mm& mm() noexcept { return mm_; }
  /// True once the mm was torn down (mm::teardown(), or its destruction).
  /// Its release dropped what the VM held of it: the notifiers and every
  /// SVM PTE. From then on SVM faults fail (EFAULT: the kernel's access is
  /// cancelled) and add_window() returns ENOENT; BOs, including system
  /// ones (whose frames the VM keeps), bind, unbind, evict and fault as
  /// before. Locking: takes lock_ shared.
  [[nodiscard]] bool mm_released() const SVM_EXCLUDES(lock_);
  /// The VM's device page table (attached to the device at creation).
  [[nodiscard]] dev::dev_page_table& page_table() noexcept { return pt_; }

  // ---- the mirror -------------------------------------------------------
  /// Mirror CPU VA [cpu_va, cpu_va + size) at GPU VA gpu_va (mirror_kind
  /// windows). Errors: EINVAL (unaligned, zero, wrong mirror kind),
  /// EOVERFLOW, EEXIST (overlaps another window's GPU or CPU range).
  /// Locking: takes lock_ exclusive.
  errc add_window(va_t cpu_va, va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// Take GPU VA [gpu_va, gpu_va + size) out of the SVM mirror (a full_mm
  /// or windows VM), as unbinding part of a CPU-address-mirror VMA does in
  /// xe. Before it returns, the mirror's PTEs there are cleared (BO PTEs
  /// stay) and the device TLB is invalidated; from then on a device fault
  /// there is cancelled with EFAULT, as at an address the mirror never
  /// covered, unless a BO is bound there (BO mappings keep working, and a
  /// later BO unbind leaves the VA unmirrored). Idempotent: parts already
  /// out of the mirror are fine. Errors (nothing changed): EINVAL (zero or
  /// unaligned size or address, mirror_kind::none — which includes every
  /// long-running VM —, past the mirror's GPU limit, or in a windows VM a
  /// range not wholly inside its windows), EOVERFLOW (gpu_va + size
  /// wraps), ENOENT (the mm was released: the mirror is gone; BOs still
  /// work). Locking: takes lock_ exclusive.
  errc mirror_unbind(va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// Give GPU VA [gpu_va, gpu_va + size) back to the SVM mirror: later
  /// faults there fill it from the CPU's current mappings as before.
  /// Idempotent: parts that were never taken out are fine. Errors: as
  /// mirror_unbind(), nothing changed. Locking: takes lock_ exclusive.
  errc mirror_bind(va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// The GPU ranges mirror_unbind() took out of the mirror and no
  /// mirror_bind() gave back: ascending, disjoint, adjacent ones merged.
  /// Locking: takes lock_ shared.
  [[nodiscard]] std::vector<va_range> mirror_unbound() const SVM_EXCLUDES(lock_);

  // ---- buffer objects ---------------------------------------------------
  /// A BO of `size` bytes (page multiple) placed in VRAM or system memory
  /// (the mm's pool 0). A VRAM BO takes its frames from the device's
  /// vram_manager, which may evict other VRAM users of any VM on the
  /// device (BOs, migrated SVM chunks) in its policy's order to make room.
  /// Errors: EINVAL (zero, unaligned, a placement outside the enum),
  /// ENOMEM (more than the memory holds, more than its free frames plus
  /// what eviction could free — both checked before anything is allocated
  /// or evicted — or evictions that could not free enough, busy victims
  /// included, after which the frames taken are given back; objects
  /// already evicted stay in system memory with their contents).
  [[nodiscard]] result<bo_id> create_bo(std::uint64_t size, placement where) SVM_EXCLUDES(lock_);
  /// Destroy a BO; its mappings are unbound first. ENOENT if unknown.
  errc destroy_bo(bo_id bo) SVM_EXCLUDES(lock_);
  /// VM_BIND map: BO `bo` from `offset` at GPU VA [gpu_va, gpu_va + size),
  /// replacing overlapping BO mappings and clearing the SVM PTEs there.
  /// Errors (VM unchanged): EINVAL (zero, unaligned, past the BO's end,
  /// outside the VA), EOVERFLOW, ENOENT (unknown BO), ENOMEM.
  errc bind(bo_id bo, va_t gpu_va, std::uint64_t offset, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// VM_BIND unmap: remove BO mappings in the range (edges trimmed); the VA
  /// returns to the mirror (where mirror_unbind() has not taken it out).
  /// Errors: EINVAL, EOVERFLOW.
  errc unbind(va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// The BO's reservation object (fences by usage).
  [[nodiscard]] resv* bo_resv(bo_id bo) SVM_EXCLUDES(lock_);
  /// Move a VRAM BO to system memory with the copy engine, after waiting for
  /// the fences whose usage requires it (everything up to BOOKKEEP), then
  /// clear its PTEs. In a fault VM the next device access faults it back
  /// into VRAM (or maps it in system memory if VRAM is full of things that
  /// cannot be evicted); in a long-running VM the queues are suspended and
  /// the BO rebound.
  /// Errors: ENOENT, EINVAL (not in VRAM), ENOMEM (no system frames),
  /// ETIMEDOUT (a fence did not signal).
  errc evict(bo_id bo) SVM_EXCLUDES(lock_);
  /// Write BO bytes at `offset` from the CPU side (for tests and
  /// initialisation). Errors: ENOENT (unknown BO), EINVAL (past the BO's end).
  errc bo_write(bo_id bo, std::uint64_t offset, std::span<const std::byte> in) SVM_EXCLUDES(lock_);
  /// Read BO bytes at `offset` into `out` from the CPU side. Errors: ENOENT
  /// (unknown BO), EINVAL (past the BO's end). Locking: takes lock_ shared.
  errc bo_read(bo_id bo, std::uint64_t offset, std::span<std::byte> out) SVM_EXCLUDES(lock_);
  /// Where the BO's frames are now (eviction moves VRAM BOs to system);
  /// ENOENT if unknown. Locking: takes lock_ shared.
  [[nodiscard]] result<placement> bo_placement(bo_id bo) SVM_EXCLUDES(lock_);

  /// The long-running VM's current preempt fence (null in a fault VM). An
  /// eviction signals it — the VM's queues count as suspended from then
  /// until the BO is rebound — and arms a new one. The simulated device
  /// has no queue preemption: waves that touch the moving BO stall in the
  /// fault buffer until the rebind, which is what a suspended queue looks
  /// like from the kernel's side.
  [[nodiscard]] fence_ptr preempt_fence() const SVM_EXCLUDES(lock_);

  // ---- SVM memory attributes and migration (attrs.cpp, migrate.cpp) -----
  /// Set the attributes of GPU VA [gpu_va, gpu_va + size) of the mirror
  /// (the full-mm mirror, or inside one window), splitting and merging the
  /// attribute map. They apply to later faults and prefetches; memory
  /// already migrated stays where it is. Where the attributes change, the
  /// mirror's PTEs of the range are zapped (BO PTEs stay), so the next
  /// device access faults under the new ones: a page mapped in system
  /// memory migrates on its next access when it now prefers VRAM, and its
  /// atomics fault (and migrate) when it now asks for device atomics.
  /// Errors, with nothing changed:
  /// EINVAL (zero or unaligned size or address, a range past the VA width
  /// or not covered by the mirror, an enum value outside its enumeration,
  /// a granularity other than 4K, 64K or 2M), EOVERFLOW (the range wraps),
  /// ENOENT (the mm is gone). Locking: takes lock_ exclusive (no fault is
  /// in service while the attributes change), then attrs_lock_.
  errc set_attrs(va_t gpu_va, std::uint64_t size, const svm_attrs& a) SVM_EXCLUDES(lock_);
  /// The attributes over GPU VA [gpu_va, gpu_va + size), as ranges of equal
  /// attributes in address order covering it exactly, each with its
  /// residency read from the CPU page table now (lock-free: a snapshot).
  /// Errors as set_attrs (except the attribute checks).
  [[nodiscard]] result<std::vector<attr_range>> query_attrs(va_t gpu_va, std::uint64_t size) SVM_EXCLUDES(lock_);
  /// Migrate the chunks of GPU VA [gpu_va, gpu_va + size) now: to VRAM
  /// (the anonymous private pages, holes included as zero pages; pages
  /// already there stay) or back to system memory. It does not map device
  /// PTEs: the next device fault maps what is there. Errors: EINVAL and
  /// EOVERFLOW as set_attrs, and `to` outside the enum; EFAULT: part of
  /// the range has no VMA; EPERM: part of it is shared or file-backed
  /// memory, which cannot move to device memory (checked before anything
  /// moves); ENOMEM (to vram): VRAM cannot hold the pages that must move
  /// even after evicting every idle VRAM user of the device. The frames
  /// for the whole range are allocated before the first chunk moves, so
  /// that ENOMEM leaves every page where it was (objects evicted on the
  /// way stay in system memory with their data); only if the CPU faults
  /// pages in meanwhile can a later chunk find too few frames, and then
  /// the chunks before it stay in VRAM and the rest in system memory.
  /// ENOMEM (to system): no system frames; chunks moved so far stay moved.
  /// EBUSY: a chunk could not be migrated whole (pages mapped more than
  /// once, swapped, or under another migration); chunks before it stay.
  /// ENOENT: the mm is gone. Locking: takes lock_ shared across it, the
  /// mm's mmap_lock shared per chunk (not while allocating VRAM).
  errc prefetch(va_t gpu_va, std::uint64_t size, mem_location to) SVM_EXCLUDES(lock_);
  /// The index of the device's VRAM pool in the mm (attached at creation).
  [[nodiscard]] unsigned vram_pool() const noexcept { return vram_pool_; }

  // ---- statistics -------------------------------------------------------
  /// A snapshot of the VM's counters (relaxed loads; takes no lock).
  [[nodiscard]] vm_stats stats() const noexcept;
  /// Zero every counter and the latency histogram.
  void reset_stats() noexcept;
  /// Bytes of device page table.
  [[nodiscard]] std::size_t pt_bytes() const { return pt_.stats().bytes; }

  /// The owner token of this VM's device: the owner of its VRAM pool in the
  /// mm (hmm's dev_private_owner, migrate_vma's pgmap_owner). EXCLUSIVE
  /// events that carry it are ignored; MIGRATE events zap as any other.
  [[nodiscard]] const void* owner() const noexcept { return &dev_; }

  /// Test hooks (deterministic interleavings). Set before concurrent use.
  struct test_hooks {
    /// In a fault, after the sequence snapshot and before hmm_range_fault.
    std::function<void(va_range window)> after_snapshot = {};
    /// After hmm_range_fault returned, before the commit's locks.
    std::function<void(va_range window)> before_commit = {};
    /// In a migration to VRAM (fault or prefetch), after the pages were
    /// collected and their copies queued, before migrate_vma_pages: the
    /// CPU range, with the mm's mmap_lock held shared.
    std::function<void(va_range cpu)> during_migrate_copy = {};
    /// In a fault that wants VRAM, after the VRAM frames were allocated and
    /// before the mmap_lock is taken for the migration.
    std::function<void(va_range cpu)> after_vram_alloc = {};
    /// The clock of the migration timeslice, in nanoseconds: read when a
    /// chunk lands in VRAM and when a CPU fault asks for it back. Empty: the
    /// steady clock.
    std::function<std::uint64_t()> clock = {};
  };
  /// Install `h`, replacing the current hooks (not thread safe: call before
  /// any fault can run).
  void set_test_hooks(test_hooks h) { hooks_ = std::move(h); }

 private:
  /// The timeslice clock: hooks_.clock, or the steady clock (ns).
  [[nodiscard]] std::uint64_t timeslice_now() const;
  friend class driver;  // calls service()
  /// The passkey of the constructor: private, so only create() makes one.
  struct key {
    explicit key() = default;
  };
  /// The constructor, called only by create() (after validate()): `err`
  /// says whether it completed; whatever it did before a failure the
  /// destructor undoes. It never aborts.
  gpu_vm(key, driver& dev, svm::mm& m, vm_config cfg, errc& err);
  class sys_aperture;
  class release_ops;
  void on_mm_release() SVM_EXCLUDES(lock_);
  void drop_chunks();
  void ensure_pool(unsigned pool);
  [[nodiscard]] frame_pool& pool0() const noexcept;
  struct bo;
  struct chunk;
  struct window;
  struct counters;
  class chunk_ops;
  // The mirror implementation (a strategy chosen at construction by
  // vm_config::impl): mirror.h in the sources.
  class mirror;
  class page_mirror;
  class range_mirror;

  // The fault path, called by driver::process with the registry held
  // shared. Returns how many records were coalesced into another of the
  // same page (the driver counts them).
  std::uint64_t service(std::span<dev::fault_record> recs);
  // `may_migrate` false: a retried access (fault_record::retries) is
  // mapped where its memory lies, never migrated (the forward-progress
  // rule, docs/migration.md).
  errc service_page_locked(va_t gva, access acc, bool may_migrate) SVM_REQUIRES_SHARED(lock_);
  errc service_svm_locked(va_t gva, va_t cpu_va, access acc, va_range allowed, bool may_migrate)
      SVM_REQUIRES_SHARED(lock_);
  // The faults of one 2M block (distinct pages, ascending): one window,
  // one pin, one snapshot, one hmm_range_fault and one commit for them all
  // where that gives what per-page service would; otherwise page by page.
  void service_block_locked(std::span<const va_t> pages, std::span<const access> accs,
                            std::span<const std::uint8_t> may_migrate, std::span<errc> out) SVM_REQUIRES_SHARED(lock_);
  // The one-window part of service_block_locked: false when the block
  // needs per-page service (nothing was changed), true when `out` is set.
  // A block whose sequence moves group_retry_limit times is handed back to
  // per-page service (vm_stats::group_fallbacks).
  bool service_svm_block_locked(std::span<const va_t> pages, std::span<const access> accs, va_t cpu_va,
                                va_range allowed, std::span<errc> out) SVM_REQUIRES_SHARED(lock_);
  // `allowed` trimmed to the hole between the BO mappings around gva.
  va_range bo_hole_locked(va_t gva, va_range allowed) const SVM_REQUIRES_SHARED(lock_);
  // `may_migrate` false: see service_page_locked (an evicted VRAM BO then
  // gets the faulting page mapped alone).
  errc service_bo_locked(const gpuva& m, va_t gva, access acc, bool may_migrate) SVM_REQUIRES_SHARED(lock_);
  /// GPU VA -> CPU VA of the mirror, and the GPU range the mirror allows
  /// around it; false if the VA is not mirrored.
  bool to_cpu_locked(va_t gva, va_t& cpu, va_range& gpu_allowed) const SVM_REQUIRES_SHARED(lock_);
  chunk* get_chunk(va_t cpu_va);
  void put_chunk(chunk* c);
 public:
  /// Remove the notifiers of chunks that no fault is using and where
  /// nothing is mapped any more. Returns how many were removed. The fault
  /// handler calls it when idle; tests may call it directly.
  /// Locking: takes lock_ shared across it (so the mm's release waits it
  /// out), chunks_lock_ (leaf) briefly; blocks in
  /// interval_notifier::remove(); must not be called from a notifier
  /// callback or with mmap_lock held. Once the mm is released: 0.
  std::size_t gc_notifiers() SVM_EXCLUDES(lock_);

 private:
  // The invalidation callback's body.
  bool invalidate(chunk& c, interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq);
  void zap_gpu(va_range r, bool bo_entries, std::vector<va_range>& flush);
  void flush_tlb(const std::vector<va_range>& flush);
  void note_invalidation(va_range gpu);
  // BOs (bo.cpp).
  void free_bo_frames(bo& b);
  // Move `b` to system memory; waits up to `fence_wait` for its jobs
  // (ETIMEDOUT past it, nothing changed).
  errc evict_locked(bo& b, std::chrono::nanoseconds fence_wait) SVM_REQUIRES(lock_);
  // Bring an evicted VRAM BO of a fault VM back (ENOMEM: it stays in
  // system memory and faults map it there).
  errc restore_bo_locked(bo& b) SVM_REQUIRES(lock_);
  // Before servicing `recs`: restore the evicted BOs their first faults
  // touch (a retried access maps the BO where it lies, as in service()).
  void restore_bos(std::span<const dev::fault_record> recs) SVM_EXCLUDES(lock_);
  /// Evicted VRAM BOs of a fault VM waiting to return (relaxed; a hint
  /// that lets service() skip restore_bos()).
  std::atomic<std::size_t> evicted_bos_{0};
  result<std::uint64_t> bo_size_locked(bo_id id) const SVM_REQUIRES_SHARED(lock_);
  void write_bo_ptes_locked(const gpuva& m, va_range r) SVM_REQUIRES_SHARED(lock_);
  void ctr_add_ptes_written(std::uint64_t n) noexcept;
  void ctr_add_evictions() noexcept;
  void ctr_add_preemptions() noexcept;
  /// Did an invalidation overlapping `win` happen after stamp `since`?
  /// unknown: the log (64 entries) wrapped since, so it cannot tell.
  /// Locking: takes log_lock_ (leaf).
  enum class overlap : std::uint8_t { yes, no, unknown };
  overlap overlapped_since(va_range win, std::uint64_t since) const;

  driver& dev_;
  svm::mm& mm_;  // not used once released_ is set
  const va_t mm_va_limit_;
  const vm_config cfg_;
  std::shared_ptr<const window_policy> policy_;
  dev::dev_page_table pt_;
  dev::vm_id id_ = 0;
  dev::queue_id queue_ = 0;
  /// The device's system aperture (holds the mm's pools, not the mm).
  std::unique_ptr<sys_aperture> sysmem_;
  std::unique_ptr<release_ops> release_;  ///< subscribed to the mm's teardown (null: not subscribed)
  // What construction completed (the destructor undoes only that).
  bool registered_ = false, attached_ = false, has_queue_ = false;

  static constexpr lock_class vm_class{"gpu_vm.lock", lockdep::rank::vm};
  /// vm.lock: the BO VA tree, the BO table and the mirror windows. Faults
  /// hold it shared across their service (the baseline's: exclusive, which
  /// is what makes it VM-locked); bind/unbind/evict exclusive.
  mutable shared_mutex lock_{vm_class};
  gpuva_tree tree_;  // guarded by lock_ (the tree asserts it)
  std::unordered_map<bo_id, std::unique_ptr<bo>> bos_ SVM_GUARDED_BY(lock_);
  bo_id next_bo_ SVM_GUARDED_BY(lock_) = 1;
  std::vector<window> windows_ SVM_GUARDED_BY(lock_);
  /// GPU ranges out of the mirror (mirror_unbind), start -> end: disjoint,
  /// adjacent ones merged. Why no SVM PTE survives in them once
  /// mirror_unbind() returns (mirror_bind.cpp):
  ///  - Every SVM PTE write (a fault's commit) happens inside one hold of
  ///    vm.lock — shared in the page mirror, exclusive in the baseline —
  ///    taken before the fault looks the VA up (to_cpu_locked) and chooses
  ///    its window, and kept until after the commit. mirror_unbind() takes
  ///    vm.lock exclusive, so no fault is between its lookup and its commit
  ///    then: a fault ordered before it has committed, and the zap below
  ///    clears what it wrote; one ordered after it sees the range here.
  ///  - Under that same lock mirror_unbind() records the range, then
  ///    clears the untagged PTEs (advancing the node sequences, as any
  ///    invalidation does) and flushes the TLB before it unlocks.
  ///  - to_cpu_locked() refuses a VA inside a range (the fault is
  ///    cancelled, EFAULT) and trims the `allowed` range of every other
  ///    fault to the gap between ranges, so no window reaches into one.
  ///  - The invalidation callback never takes vm.lock and never reads this
  ///    set; it only clears untagged PTEs, so it can map nothing here.
  /// The sequence protocol is thus not what keeps unbind safe: the lock is;
  /// a writer of SVM PTEs outside a fault must hold vm.lock and ask
  /// to_cpu_locked() too.
  std::map<va_t, va_t> unbound_ SVM_GUARDED_BY(lock_);
  /// EINVAL/ENOENT checks of mirror_bind()/mirror_unbind() that need vm.lock.
  errc check_mirror_range_locked(va_range r) const SVM_REQUIRES_SHARED(lock_);
  /// False if gva lies in an unbound range; else trims `allowed` to the gap
  /// between the unbound ranges around gva.
  bool trim_unbound_locked(va_t gva, va_range& allowed) const SVM_REQUIRES_SHARED(lock_);
  fence_ptr preempt_ SVM_GUARDED_BY(lock_);  ///< long-running VMs only
  /// The mm was torn down: set once, under lock_ exclusive, by its release.
  bool released_ SVM_GUARDED_BY(lock_) = false;

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

  std::unique_ptr<mirror> mirror_;  // immutable after construction

  // ---- migration (migrate.cpp, attrs.cpp; docs/migration.md) ----
  friend class svm_pagemap;
  struct svm_chunk;
  struct attr_entry {
    va_t end;
    svm_attrs a;
  };
  /// The index of the driver's VRAM pool in the mm (attached at creation;
  /// 0 until then, and when the attach failed: no migration). Immutable
  /// after construction.
  unsigned vram_pool_ = 0;
  /// The driver's VRAM pgmap ops (driver::pagemap); immutable.
  std::shared_ptr<svm_pagemap> pagemap_;
  static constexpr lock_class attrs_class{"gpu_vm.attrs", lockdep::rank::leaf};
  /// Guards the attribute map. Leaf: taken under vm.lock (shared, or
  /// exclusive in set_attrs) or alone,
  /// never around another lock.
  mutable mutex attrs_lock_{attrs_class};
  /// Attribute ranges by GPU start (disjoint; adjacent equal ones merged;
  /// the default attributes are not stored).
  std::map<va_t, attr_entry> attrs_ SVM_GUARDED_BY(attrs_lock_);
  static constexpr lock_class vram_chunks_class{"gpu_vm.vram_chunks", lockdep::rank::leaf};
  /// Guards vram_chunks_ (the map only: records are shared_ptr, so a thread
  /// copies one out and uses it without the lock). Leaf, never held around
  /// another lock (vram_manager and the pagemap registry are taken outside it).
  mutable mutex vram_chunks_lock_{vram_chunks_class};
  /// The SVM chunks this VM migrated to VRAM, by CPU range.
  std::map<std::pair<va_t, va_t>, std::shared_ptr<svm_chunk>> vram_chunks_ SVM_GUARDED_BY(vram_chunks_lock_);
  /// How many attribute ranges ask for device atomics: nonzero turns on the
  /// fault path's atomic permission gate. Written under attrs_lock_ with
  /// lock_ held exclusive; read (relaxed) by faults holding lock_ shared,
  /// which orders the two.
  std::atomic<std::size_t> device_atomic_ranges_{0};
  /// True when faults must decide each system-memory PTE's atomic permission.
  [[nodiscard]] bool atomics_gated() const noexcept {
    return vram_pool_ != 0 && device_atomic_ranges_.load(std::memory_order_relaxed) != 0;
  }
  /// out[i]: page i of GPU window `win` asks for device atomics (so its
  /// system-memory PTE gets no atomic permission), except page `except` (the
  /// atomic being serviced; npages or more: none). True when all out[i] are
  /// equal.
  [[nodiscard]] bool atomic_gate(va_range win, std::size_t except, std::span<bool> out) const
      SVM_EXCLUDES(attrs_lock_);
  /// Cut [gpu_va, end) out of the map, store `a` there, merge equal
  /// neighbours; true if any page of the range held other attributes.
  bool edit_attrs_locked(va_t gpu_va, va_t end, const svm_attrs& a) SVM_REQUIRES(attrs_lock_);
  [[nodiscard]] svm_attrs attrs_at(va_t gva) const SVM_EXCLUDES(attrs_lock_);
  [[nodiscard]] errc check_attr_range(va_t gpu_va, std::uint64_t size) const SVM_REQUIRES_SHARED(lock_);
  // The fault hook: migrate the faulting page's chunk to VRAM if its
  // attributes (or an atomic under atomics == device) ask for it; with
  // `may_migrate` false (a retried access) only a write to a read-only
  // page of ours moves it back, and nothing moves to VRAM. True when the
  // page wanted VRAM and stayed put for that reason: the fault then maps
  // that one page only.
  bool migrate_for_fault_locked(va_t gva, va_t cpu, access acc, va_range allowed, bool may_migrate)
      SVM_REQUIRES_SHARED(lock_);
  // Would a fault of `acc` at gva (CPU cpu) migrate? (the group path asks)
  [[nodiscard]] bool wants_vram(va_t gva, va_t cpu, access acc) const;
  [[nodiscard]] bool in_vram(va_t cpu) const noexcept;
  // Migrate CPU range `cr` (page aligned, one VMA) to VRAM, all or nothing,
  // using `frames` first (allocating more if short; unused ones stay in it).
  errc migrate_chunk_to_vram(va_range cr, std::vector<pfn_t>& frames, bool may_alloc);
  // Move this device's pages of CPU range `cr` back to system memory.
  errc migrate_range_to_ram(va_range cr);
  void note_vram_chunk(va_range cr, std::size_t resident);
  void touch_vram_chunk(va_t cpu);
  // Unregister every record (vram manager, pagemap registry); with
  // `migrate_back`, move their pages back to system memory first.
  void drop_vram_chunks(bool migrate_back);
  void gc_vram_chunks();

 public:
  /// Range objects the baseline holds now (tests; 0 for the page mirror).
  [[nodiscard]] std::size_t baseline_ranges() const;
};

}  // namespace svm
