// The simulated faulting device: engines that run kernels on GPU virtual
// addresses, per-engine TLBs over the device page tables, a replayable fault
// buffer, ranged TLB invalidation, VRAM and a copy engine.
//
// The device knows nothing of the driver. For each GPU VM the driver attaches
// a device page table (dev_page_table, written by the driver, walked here
// lock-free) and the physical memory its system-aperture PTEs name. Kernels
// are submitted through queues bound to a VM. Faulting accesses push a
// fault_record into faults() and stall; the driver fetches records, services
// them, then calls replay() or cancel().
//
// Driver loop, in short:
//
//   std::array<fault_record, 256> batch;
//   while (running) {
//     auto n = dev.faults().fetch_wait(batch, 10ms);
//     for (auto& r : std::span(batch).first(n)) service(r);   // write PTEs
//     dev.replay(serviced);   dev.cancel(bad, errc::fault);
//   }
//   // invalidation (e.g. from a notifier callback): clear PTEs, then
//   dev.invalidate_tlb(vm, range);   // returns once no engine can use them
//
// ## Engines and waves
// Each engine is a std::jthread the device owns, with `waves_per_engine`
// waves: a wave is one work item in progress on its own guarded stack (a
// Boost.Context fiber). The engine thread is the waves' scheduler:
//
//   engine thread (scheduler context)         wave (fiber)
//   ---------------------------------         ------------
//   loop:                                      loop: take the next item of
//     woken = exchange(wake bits)                    the engine's claim, run it
//     resume a ready wave           ------->         fault: push record,
//     or retry waves parked on a full                  park (switch back)
//        buffer once space appeared <-------         no item left: go free
//     or claim items, start a free wave                (switch back)
//     or sleep: spin, then futex on wake_word
//
// A faulting access publishes the wave's fault word (pending), pushes its
// record and parks the wave; replay() or cancel() CASes the word, sets the
// wave's wake bit on its engine and bumps the engine's futex word, so the
// engine resumes it. A wave parks only in a loop that re-checks its word,
// so a wake that races the park is never lost and a spurious one is
// harmless. With a full fault buffer the wave parks too (nothing is
// dropped) and the buffer's space callback, after the next fetch, makes
// the engine retry those pushes in order. The engine thread sleeps only
// when no wave is ready and no work is left to start.
// waves_per_engine = 1 runs one work item at a time per engine: the engine
// stalls on every fault, the old behaviour and the baseline.
// Kernels stay plain callables; every exception of a work item (the
// kernel_abort of a failed access included) is caught on the wave's own
// stack, so none crosses a fiber switch. A wave stack overflow hits a
// guard page and stops the process with a message naming the engine and
// device_config::wave_stack_bytes. Every switch is annotated for ASan
// (__sanitizer_start/finish_switch_fiber) and TSan (one TSan fiber per
// wave), so both keep working; see device_sim/src/fiber.cpp.
//
// ## TLB invalidation (the shootdown protocol)
//   invalidator                              engine (at every access boundary)
//   -----------                              ---------------------------------
//   lock inval_lock_; S = ++seq;             if inval_seq_ != seen:      (acquire)
//   log[S % 64] = {vm, range};                  lock inval_lock_; read S', log;
//   inval_seq_ = S (seq_cst); unlock            flush matching TLB entries;
//   for each engine e:                          unlock; status = ack S' (seq_cst)
//     wait until e.ack >= S                  ... translate, access ...
//        or e.mode != running (seq_cst)
// The TLB, its micro-TLB and the acknowledgement are per engine, shared by
// its waves. An engine acknowledges at the start of its next access (the
// boundary, or an explicit work_item::boundary()), whichever wave makes
// it, so an access that translated before the invalidation has finished
// its memory operation before invalidate_tlb() returns. This holds with
// many waves because a wave switches only between accesses: a parked wave
// holds no translation (after its replay it walks the page table again),
// so when any wave of the engine acknowledges, no other wave of it is in
// the middle of an access. An engine whose waves are all parked or free
// sleeps as stalled or idle and counts as acknowledged; when it runs again
// it stores its mode (seq_cst) and then re-reads inval_seq_ (seq_cst)
// before touching its TLB — a store-buffering pair with the invalidator's
// seq_cst store and status load, so at least one side sees the other. An
// engine more than 64 invalidations behind flushes its whole TLB. The
// invalidator's cost is one status read (and maybe a wait) per engine,
// whatever the waves and accesses in flight.
//
// ## Epochs
// A running engine stays inside an epoch read-side section
// (svm/base/epoch.h) and announces quiescent points at work-item
// boundaries, at every wave switch, before each page-table walk and when
// it acknowledges an invalidation; it leaves the section whenever it
// sleeps, so an engine whose waves are all parked never holds up
// reclamation or epoch::synchronize(). A wave parks only where it holds no
// page-table node pointer, so a switch is a quiescent point.
//
// ## Cancel and shutdown
// cancel_queue(), cancel_vm() and completion::cancel() mark the kernel
// aborted (seq_cst), resolve the fault of every wave of it parked on any
// engine (its word, then its kernel: see cancel_running_locked), and bump
// the invalidation sequence with an empty entry. The bump sends every
// running wave down its slow path at its next access — including one the
// micro-TLB would have served — where it sees the abort and unwinds; the
// hit path pays nothing. A wave about to fault re-reads the abort flag
// after publishing its word (a store-buffering pair with the canceller),
// so no wave parks after a cancel missed it. Waves in the ready queue or
// parked on a full buffer find the abort when they resume. The destructor
// cancels every kernel this way, closes the fault buffer (waves parked on
// it retry and find it closed), sweeps every wave's word, lets each engine
// finish (its waves unwind and return from their fibers on the engine
// thread) and joins it.
#pragma once

#include <atomic>
#include <bit>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "svm/base/errc.h"
#include "svm/base/fence.h"
#include "svm/base/mutex.h"
#include "svm/base/phys_mem.h"
#include "svm/base/types.h"
#include "svm/device_sim/copy_engine.h"
#include "svm/device_sim/dev_pte.h"
#include "svm/device_sim/fault_buffer.h"
#include "svm/device_sim/tlb.h"
#include "svm/device_sim/vram.h"

namespace svm::dev {

/// A queue handle, bound to one VM.
using queue_id = std::uint32_t;

/// The device's shape. Check it with validate(); device::create() refuses
/// (EINVAL) what validate() refuses.
struct device_config {
  /// Limits validate() enforces.
  static constexpr unsigned max_engines = 256;
  static constexpr unsigned max_waves_per_engine = 4096;     ///< per engine
  static constexpr std::uint64_t max_waves = 16384;          ///< engines x waves_per_engine
  static constexpr std::size_t min_wave_stack_bytes = 16 << 10;       ///< smallest wave_stack_bytes (16 KiB)
  static constexpr std::size_t max_wave_stack_bytes = 64 << 20;       ///< largest wave_stack_bytes (64 MiB)
  static constexpr std::size_t max_fault_buffer_entries = 1 << 20;    ///< largest fault_buffer_entries
  static constexpr std::uint64_t max_vram_bytes = 1ull << 40;         ///< largest vram_bytes (1 TiB)
  static constexpr std::size_t max_tlb_entries = 1 << 20;    ///< sets x ways

  unsigned engines = 4;                      ///< 1..max_engines
  /// Waves per engine: work items in progress at once, each a fiber with
  /// its own stack. A faulting wave parks and the engine runs another, so
  /// engines x waves faults can be outstanding. 1: one work item at a time
  /// per engine (the engine stalls on each fault). 1..max_waves_per_engine.
  unsigned waves_per_engine = 256;
  /// Usable stack of each wave (rounded up to pages), with a guard page
  /// below it: an overflow stops the process with a message naming the
  /// engine and this size. min_wave_stack_bytes..max_wave_stack_bytes.
  std::size_t wave_stack_bytes = 128 << 10;
  tlb_config tlb{};                          ///< geometry of each engine's TLB
  /// Optional TLB policy factory (called once per engine); null: set_assoc_tlb(tlb).
  std::function<std::unique_ptr<tlb_model>(unsigned engine)> make_tlb{};
  std::size_t fault_buffer_entries = 256;    ///< 1..max_fault_buffer_entries
  std::uint64_t vram_bytes = 64ull << 20;    ///< VRAM capacity (<= max_vram_bytes)
  /// Pause iterations before a stalled wave sleeps on its futex (0: sleep
  /// at once). A pause is 10-140 cycles depending on the CPU, so 64 is a
  /// few microseconds at most: long spins only burn the core the replaying
  /// driver needs when threads outnumber cores.
  unsigned fault_spin = 64;
  /// After those pauses, how long a stalled wave (and a handler waiting
  /// in fault_buffer::fetch_wait) keeps spinning on its word, by the clock,
  /// before it sleeps on its futex. A reply within it costs no futex wake
  /// on either side (several µs each on a VM); the price is a core kept
  /// busy meanwhile, which hurts when threads outnumber cores. 0: sleep
  /// right after the pauses.
  std::uint32_t wait_spin_ns = 0;

  /// Test hook (deterministic interleaving tests): called on the engine
  /// thread at named points of the fault path with the engine and wave:
  /// "before_park" (a wave saw its fault pending and is about to park);
  /// "before_resume" (the scheduler is about to resume a woken wave: a
  /// replayed or cancelled one; the engine counts as stalled meanwhile, so
  /// TLB shootdowns do not wait for it). It may block (the engine then
  /// runs nothing else). Null: off.
  std::function<void(const char* point, unsigned engine, unsigned wave)> test_hook{};

  /// ok, or EINVAL when a field is outside its range (see each field; the
  /// TLB needs sets a power of two, ways >= 1, sets x ways <= max_tlb_entries).
  [[nodiscard]] errc validate() const;
};

/// How a kernel ended. `error` is ok, or:
///  - canceled: a fault of the kernel was cancelled; `reason` is the reason
///    the driver gave (EFAULT, EPERM, ...), `address`/`acc` the access;
///  - inval:    an access was unaligned or of a size other than 1, 2, 4, 8;
///  - range:    an access was outside the VM's VA width;
///  - io:       a PTE named a frame outside its memory, or the kernel threw;
///  - timedout: wait() gave up (the kernel is still running);
/// and ECANCELED with reason ECANCELED when the device shut down under it.
struct kernel_status {
  errc error = errc::ok;      ///< how the kernel ended: ok or one of the codes above
  va_t address = 0;           ///< the failed access's address; 0 for ok and for queue/VM/shutdown cancels
  errc reason = errc::ok;     ///< for canceled, the reason given to the cancel; otherwise the same as `error`
  access acc = access::read;  ///< what the failed access needed (read when there was no access)
  /// True if the kernel completed successfully.
  [[nodiscard]] bool ok() const noexcept { return error == errc::ok; }
};

/// What the oracle hook sees for every translated access, just before the
/// memory operation.
struct access_check {
  vm_id vm = 0;                 ///< the VM of the kernel making the access
  va_t gva = 0;                 ///< the GPU virtual address accessed (not page aligned)
  access acc = access::read;    ///< the kind of access (read, write, atomic)
  unsigned engine = 0;          ///< the engine making the access
  std::uint64_t pte = 0;        ///< the leaf entry the translation came from
  unsigned level = 0;           ///< its level (0: 4K, 1: 2M, 2: 1G)
  bool tlb_hit = false;         ///< served from the TLB (else from a fresh walk)
  aperture ap = aperture::system;  ///< where the frame lives: system memory or VRAM
  pfn_t pfn = 0;                ///< the 4K frame accessed
  const phys_mem* mem = nullptr;  ///< the memory pfn belongs to
};
/// The oracle: runs on the engine thread, inside its access and its epoch
/// section. It must not block for long, submit work, wait for faults or
/// invalidate TLBs (the invalidation would wait for this very access).
using access_validator = std::function<void(const access_check&)>;

/// Device-wide counters since construction, summed over the engines (see
/// device::stats()).
struct device_stats {
  std::uint64_t accesses = 0;           ///< translated accesses and prefetches (each counted once, however many retries)
  std::uint64_t tlb_hits = 0;           ///< accesses served by the micro-TLB or the TLB without a walk
  std::uint64_t tlb_misses = 0;         ///< walks of the device page table
  std::uint64_t faults = 0;             ///< records pushed to the fault buffer
  std::uint64_t replays = 0;            ///< stalled accesses woken by replay
  std::uint64_t cancels = 0;            ///< stalled accesses woken by cancel
  std::uint64_t tlb_invalidations = 0;  ///< invalidate_tlb() calls completed
  std::uint64_t tlb_acks = 0;           ///< engine acknowledgements that flushed entries
  std::uint64_t kernels_completed = 0;  ///< with status ok
  std::uint64_t kernels_failed = 0;     ///< with any other status (cancelled included)
  std::uint64_t fault_buffer_full_stalls = 0;  ///< pushes that found the buffer full
  std::uint64_t fault_buffer_full_parks = 0;   ///< waves parked on a full buffer (one per failed push)
  std::uint64_t wave_switches = 0;             ///< waves resumed by their engines
  std::uint64_t waves_parked = 0;              ///< waves parked now (faults or space; snapshot)
  std::uint64_t outstanding_faults = 0;        ///< faults raised, not yet replayed or cancelled (snapshot)
  std::uint64_t outstanding_high_water = 0;    ///< the most outstanding faults at once
};

class device;
namespace detail {
struct engine;
/// Thrown through a kernel when its access failed (the kernel is aborted).
/// Kernels must let it propagate.
struct kernel_abort {};
std::byte* translate(engine& e, va_t va, unsigned size, access acc);

/// An engine's micro-TLB: the last 4K translation it used, checked inline by
/// work_item before the out-of-line path (hardware keeps such an L0 in front
/// of its TLB). Owned by the engine's thread: only that thread reads or
/// writes the plain fields, so they need no synchronisation. Its waves share
/// it (one runs at a time); it carries no VM tag, so the engine empties it
/// whenever it resumes a wave of another VM and at every new claim of work.
///
/// Protocol. An entry is usable only while the device's invalidation
/// sequence (*inval_seq, the same acquire load the full path makes at every
/// access boundary) still equals the engine's processed sequence recorded
/// in seen_inval; the engine empties the entry whenever it processes
/// invalidations, changes kernel, or the entry's page is not a plain
/// 4K system/VRAM leaf. It is filled only while no oracle is installed, and
/// the inline path re-checks *oracle (relaxed: installing an oracle only
/// has to be seen eventually, never to order memory), so an installed oracle
/// sees every access. Only the default TLB model uses it (a custom model
/// must see every lookup).
struct micro_tlb {
  std::uint64_t vpn = ~std::uint64_t{0};  ///< va >> page_shift of the page; ~0: empty
  std::byte* host = nullptr;              ///< its frame's bytes
  /// The strongest access the entry lets through (access's order: prefetch
  /// < read < write < atomic): read, write (writable) or atomic (writable,
  /// atomics allowed).
  access allowed = access::read;
  std::uint64_t seen_inval = 0;           ///< the engine's processed sequence at fill time
  const std::atomic<std::uint64_t>* inval_seq = nullptr;  ///< the device's (immutable)
  const std::atomic<const access_validator*>* oracle = nullptr;  ///< the device's oracle pointer (immutable)
  std::atomic<std::uint64_t>* hits = nullptr;             ///< the engine's hit counter (owner-written)

  /// The frame bytes for an access of `size` bytes at `va`, or nullptr to
  /// take the full path.
  [[nodiscard]] std::byte* lookup(va_t va, unsigned size, access acc) const noexcept {
    if ((va >> page_shift) != vpn || (va & (size - 1)) != 0 || acc > allowed) return nullptr;
    if (inval_seq->load(std::memory_order_acquire) != seen_inval) return nullptr;
    if (oracle->load(std::memory_order_relaxed) != nullptr) return nullptr;
    hits->store(hits->load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return host + (va & (page_size - 1));
  }
};
bool prefetch(engine& e, va_t va);
void boundary(engine& e);
void yield(engine& e);
std::uint64_t item_engine(const engine& e) noexcept;

template <std::size_t N> struct uint_of;
template <> struct uint_of<1> { using type = std::uint8_t; };
template <> struct uint_of<2> { using type = std::uint16_t; };
template <> struct uint_of<4> { using type = std::uint32_t; };
template <> struct uint_of<8> { using type = std::uint64_t; };
}  // namespace detail

/// A value a kernel may load or store: trivially copyable, 1/2/4/8 bytes.
template <class T>
concept device_value = std::is_trivially_copyable_v<T> &&
                       (sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);

/// The context of one work item: its id and its memory operations on GPU
/// virtual addresses of the kernel's VM. A failing access (cancelled fault,
/// bad address) aborts the kernel by throwing detail::kernel_abort. Plain
/// loads and stores are relaxed; the atomics are sequentially consistent.
/// Only valid on the engine thread, during the call it was passed to.
class work_item {
 public:
  /// This item's index within its kernel, in [0, items) as given to submit().
  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  /// The engine running this item.
  [[nodiscard]] unsigned engine() const noexcept { return static_cast<unsigned>(detail::item_engine(*e_)); }

  /// Load a `T` from `va` (relaxed); `va` must be aligned to sizeof(T).
  template <device_value T>
  [[nodiscard]] T load(va_t va) {
    return std::bit_cast<T>(ref<T>(va, access::read).load(std::memory_order_relaxed));
  }
  /// Store `v` at `va` (relaxed); `va` must be aligned to sizeof(T).
  template <device_value T>
  void store(va_t va, T v) {
    ref<T>(va, access::write).store(std::bit_cast<U<T>>(v), std::memory_order_relaxed);
  }
  /// Fetch-add (two's complement wrap); returns the old value.
  template <device_value T>
    requires std::integral<T>
  T atomic_add(va_t va, T v) {
    return static_cast<T>(ref<T>(va, access::atomic).fetch_add(static_cast<U<T>>(v)));
  }
  /// Compare-exchange; returns the old value (== expected on success).
  template <device_value T>
  T atomic_cmpxchg(va_t va, T expected, T desired) {
    U<T> e = std::bit_cast<U<T>>(expected);
    ref<T>(va, access::atomic).compare_exchange_strong(e, std::bit_cast<U<T>>(desired));
    return std::bit_cast<T>(e);
  }
  /// Exchange; returns the old value.
  template <device_value T>
  T atomic_exchange(va_t va, T v) {
    return std::bit_cast<T>(ref<T>(va, access::atomic).exchange(std::bit_cast<U<T>>(v)));
  }

  /// Accesses of a size known only at run time (1, 2, 4 or 8; anything
  /// else aborts the kernel with EINVAL). The value is zero-extended.
  std::uint64_t load_bytes(va_t va, unsigned size);
  /// Store the low `size` bytes of `v` at `va`; sizes as for load_bytes().
  void store_bytes(va_t va, unsigned size, std::uint64_t v);

  /// A prefetch: translates `va`, raising a prefetch fault if it is not
  /// mapped, and waits for the reply. Never aborts the kernel: returns
  /// whether `va` was mapped afterwards (one retry after a replay; a cancel
  /// returns false).
  bool prefetch(va_t va) { return detail::prefetch(*e_, va); }

  /// Let the engine's other ready waves run, then continue (an access
  /// boundary too). A work item that polls host state can call it so the
  /// waves it waits for get the engine. With one wave it returns at once.
  void yield() { detail::yield(*e_); }

  /// An explicit access boundary without an access: acknowledges pending
  /// TLB invalidations and announces an epoch quiescent point. A work item
  /// that waits on something other than device memory (host state, say)
  /// must call it in its loop: invalidate_tlb() waits for running engines to
  /// reach a boundary.
  void boundary() { detail::boundary(*e_); }

 private:
  friend struct detail::engine;
  work_item(detail::engine& e, const detail::micro_tlb* l0, std::uint64_t id) noexcept : e_(&e), l0_(l0), id_(id) {}
  template <class T> using U = typename detail::uint_of<sizeof(T)>::type;
  template <class T>
  std::atomic_ref<U<T>> ref(va_t va, access acc) {
    std::byte* p = l0_ ? l0_->lookup(va, sizeof(T), acc) : nullptr;
    if (!p) [[unlikely]]
      p = detail::translate(*e_, va, sizeof(T), acc);
    return std::atomic_ref<U<T>>(*reinterpret_cast<U<T>*>(p));
  }

  detail::engine* e_;
  const detail::micro_tlb* l0_;  ///< the engine's micro-TLB, or null (custom TLB model)
  std::uint64_t id_;
};

/// A kernel: called once per work item, on engine threads, concurrently.
using kernel_fn = std::function<void(work_item&)>;

namespace detail {
/// The link from completions back to their device, so that a completion
/// can cancel its kernel or describe the device while the device lives, and
/// does nothing once it is gone. `dev` is set at construction and cleared
/// (under `lock`) at the start of the device's destruction; a caller holds
/// `lock` (rank leaf, key 0: before the scheduler lock, key 1) while it uses
/// `dev`, so the device cannot go away under it.
inline constexpr lock_class anchor_lock_class{"device.anchor", lockdep::rank::leaf};
struct device_anchor {
  mutex lock{anchor_lock_class, 0};  ///< see above
  device* dev SVM_GUARDED_BY(lock) = nullptr;  ///< the device, or null once it is being destroyed
};
}  // namespace detail

/// How long completion::wait() waits by default before it gives up with
/// ETIMEDOUT (a stuck kernel is diagnosed, never waited for for a day).
inline constexpr std::chrono::seconds default_wait_timeout{120};

/// Completion handle of a submitted kernel. Copyable; all copies see the
/// same completion.
class completion {
 public:
  completion() = default;
  /// Wait at most `timeout` for the kernel to finish. Returns its status,
  /// or {errc::timedout} if it is still running (describe() then says what
  /// the device is doing). An empty handle returns {errc::inval}.
  /// Locking: may block; must not be called from a kernel or inside a
  /// notifier callback.
  [[nodiscard]] kernel_status wait(std::chrono::nanoseconds timeout = default_wait_timeout) const;
  /// True once the kernel finished (successfully or not).
  [[nodiscard]] bool done() const noexcept { return state_ && state_->done->is_signaled(); }
  /// The fence signalled at completion (with the status's error).
  [[nodiscard]] fence_ptr fence() const noexcept { return state_ ? state_->done : nullptr; }
  /// Cancel this kernel: it ends with {ECANCELED, reason}; if it has not
  /// started it never starts, and its running work items abort at their
  /// next device access or work_item::boundary() (see device::cancel_queue).
  /// Returns ok, also when the kernel had already finished (its status
  /// stays) or the device is gone; EINVAL for an empty handle or
  /// reason == ok. Locking: takes the device's anchor and scheduler locks
  /// (leaf); never blocks; must not be called from a kernel of the same
  /// device that then waits for it.
  errc cancel(errc reason = errc::canceled) const;
  /// One line per engine and queue saying what the device is doing (see
  /// device::describe), prefixed by this kernel's queue and progress; for
  /// a diagnosis after wait() timed out.
  [[nodiscard]] std::string describe() const;

  /// Shared by all copies of a completion.
  struct state {
    fence_ptr done;        ///< signalled once, when the kernel finished
    kernel_status status;  ///< written once before done is signalled (release)
    queue_id queue = 0;    ///< the queue it was submitted on (immutable)
    std::uint64_t serial = 0;  ///< the device-wide kernel number (immutable)
    std::shared_ptr<detail::device_anchor> anchor;  ///< its device (immutable pointer)
  };
  /// Used by the device at submit().
  explicit completion(std::shared_ptr<state> s) noexcept : state_(std::move(s)) {}

 private:
  std::shared_ptr<state> state_;
};

/// The simulated faulting device: engines, TLBs, fault buffer, VRAM and copy
/// engine (see the file comment). Made only by create().
class device {
  struct private_tag {};

 public:
  /// A device of shape `cfg`, its engine threads started. EINVAL when
  /// cfg.validate() refuses it; ENOMEM when the wave stacks cannot be
  /// mapped. The only way to make a device: a bad configuration is an
  /// error, never an abort.
  [[nodiscard]] static result<std::unique_ptr<device>> create(device_config cfg = {});
  /// The same, with VRAM whose frames and allocator belong to the caller:
  /// the engines and TLBs translate aperture::vram PTEs through
  /// `vram_memory` (a driver that shares one VRAM between BOs and migrated
  /// SVM pages, svm::vram_manager), and the device's own vram_pool is empty
  /// (cfg.vram_bytes is then ignored). Null: as create(cfg). The device
  /// keeps a reference until it is destroyed.
  [[nodiscard]] static result<std::unique_ptr<device>> create(device_config cfg,
                                                             std::shared_ptr<phys_mem> vram_memory);
  /// Used by create() only (the tag is private).
  device(device_config cfg, std::shared_ptr<phys_mem> vram_memory, private_tag);
  /// Stops the engines and the copy engine: every kernel queued or running
  /// is cancelled as by cancel_queue(q, ECANCELED) (running work items
  /// abort at their next access or boundary, accesses stalled on faults
  /// are cancelled), and every thread is joined. It returns once every
  /// running work item has reached such a point (a work item that never
  /// touches device memory nor calls boundary() keeps it waiting). The attached page tables and memories must
  /// outlive the device.
  ~device();
  device(const device&) = delete;
  device& operator=(const device&) = delete;

  // ---- VMs and queues -------------------------------------------------
  /// Attach VM `id` with its device page table and the system memory its
  /// system-aperture PTEs name. Both must outlive the attachment.
  /// Errors: EINVAL (id > max_vm_id), EEXIST (id attached).
  /// Locking: takes the scheduler lock (leaf); never blocks.
  errc attach_vm(vm_id id, dev_page_table& table, phys_mem& sysmem);
  /// Errors: ENOENT (unknown), EBUSY (a queue is still bound to it).
  errc detach_vm(vm_id id);
  /// A queue bound to `vm`. Errors: ENOENT (unknown vm).
  [[nodiscard]] result<queue_id> create_queue(vm_id vm);
  /// Errors: ENOENT (unknown queue), EBUSY (kernels still queued or running:
  /// cancel_queue() and wait for them first).
  errc destroy_queue(queue_id q);

  /// Cancel every kernel queued or running on `q`: each ends with status
  /// {ECANCELED, address 0, reason}; kernels not started never start; work
  /// items in progress abort at their next device access (also one served
  /// by the micro-TLB) or work_item::boundary(), and accesses stalled on a
  /// fault are cancelled. Returns at once: wait for the completions, then
  /// destroy_queue() succeeds. Kernels submitted later run normally.
  /// A work item that neither touches device memory nor calls boundary()
  /// cannot be stopped (there is no preemption): it runs until it returns.
  /// Errors: ENOENT (unknown queue), EINVAL (reason == ok).
  /// Locking: takes the scheduler lock, then inval_lock_ (leaf) briefly;
  /// never blocks; lock-free on the engines' words.
  errc cancel_queue(queue_id q, errc reason);
  /// cancel_queue() for every queue bound to `vm`.
  /// Errors: ENOENT (unknown vm), EINVAL (reason == ok).
  errc cancel_vm(vm_id vm, errc reason);

  /// What the device is doing, one line per item: each engine's mode,
  /// current kernel and queue, outstanding fault (address and token); each
  /// queue's kernels with their progress; the fault buffer's fill and the
  /// invalidation sequence. Racy snapshot for diagnosis (after a wait()
  /// timed out). Locking: takes the scheduler lock (leaf) briefly.
  [[nodiscard]] std::string describe() const;

  /// Submit `items` work items of `fn` on queue `q`. Kernels of one queue run
  /// one after another in submission order; kernels of different queues run
  /// concurrently, their work items spread over all engines.
  /// Errors: ENOENT (unknown queue), EINVAL (empty fn), ECANCELED (shutting down).
  /// Locking: takes the scheduler lock (leaf); never blocks; may be called from
  /// any thread except inside a kernel that waits for the result.
  [[nodiscard]] result<completion> submit(queue_id q, std::uint64_t items, kernel_fn fn);

  // ---- driver side ----------------------------------------------------
  /// The fault buffer: the driver fetches records from it.
  [[nodiscard]] fault_buffer& faults() noexcept;
  /// Wake the stalled accesses of `records` to retranslate (an access that
  /// still misses faults again). Records that are not the engine's
  /// outstanding fault (already replayed or cancelled, stale) are ignored.
  /// Returns the number woken. Locking: lock-free; never blocks.
  std::size_t replay(std::span<const fault_record> records) noexcept;
  /// Abort the kernels of the stalled accesses of `records` with `reason`
  /// (the kernel's status: ECANCELED, the address, `reason`). Other engines
  /// of that kernel stop taking its work items; the queue's next kernel runs
  /// normally. Returns the number cancelled. Locking: lock-free; never blocks.
  std::size_t cancel(std::span<const fault_record> records, errc reason) noexcept;

  /// Invalidate the TLB entries of `vm` overlapping `r` on every engine and
  /// return once no engine can still use one: every access that began before
  /// the call has completed, and every later access retranslates. Clear the
  /// PTEs first. An empty range is a no-op.
  /// Errors: EINVAL if called on an engine thread (from a kernel or the
  /// oracle: it would wait for itself).
  /// Locking: takes inval_lock_ (leaf) briefly; holds nothing while it waits
  /// (spin, then futex) for the engines. May run inside a notifier callback:
  /// it never waits for the fault handler, only for accesses in flight.
  errc invalidate_tlb(vm_id vm, va_range r);

  /// The oracle hook: `v` is called for every translated access (see
  /// access_check). Pass nullptr to turn it off. Validators set earlier stay
  /// alive until the device is destroyed, so a racing access never calls a
  /// freed one. Off, it costs one predictable branch per access.
  void set_oracle(access_validator v);

  // ---- memory -----------------------------------------------------------
  /// The device's own VRAM allocator, sized by device_config::vram_bytes
  /// (empty when create() was given external VRAM memory).
  [[nodiscard]] vram_pool& vram() noexcept;
  /// The memory aperture::vram PTEs reach: the external VRAM given to
  /// create(), else vram().
  [[nodiscard]] phys_mem& vram_memory() noexcept;
  /// The device's copy engine, for moving frames between system memory and VRAM.
  [[nodiscard]] copy_engine& copier() noexcept;

  /// Number of engines (device_config::engines).
  [[nodiscard]] unsigned engine_count() const noexcept;
  /// Counters so far: a racy snapshot (relaxed loads), not mutually consistent.
  [[nodiscard]] device_stats stats() const;

  class impl;

 private:
  friend class completion;
  std::unique_ptr<impl> impl_;
};

}  // namespace svm::dev
