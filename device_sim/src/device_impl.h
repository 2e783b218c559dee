// Internal declarations of the device, shared by its source files:
//   engine.cpp     engines and their waves (fibers), the access path, faults
//   fiber.cpp      guarded wave stacks, the overflow report, sanitizer annotations
//   scheduler.cpp  VMs, queues, kernels, work claiming, cancel
//   shootdown.cpp  TLB invalidation (the log, the acknowledgement wait)
//   device.cpp     construction, teardown, replay/cancel of records, stats, describe
// The protocols are described in svm/device_sim/device.h; these files explain
// the why of the individual steps.
#pragma once

#include <boost/context/fiber.hpp>

#include <array>
#include <chrono>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "svm/base/epoch.h"
#include "svm/device_sim/device.h"

namespace svm::dev {

inline constexpr lock_class sched_class{"device.sched", lockdep::rank::leaf};
inline constexpr lock_class inval_class{"device.inval", lockdep::rank::leaf};
inline constexpr lock_class oracle_class{"device.oracle", lockdep::rank::leaf};

inline constexpr std::size_t inval_log_size = 64;

// Engine status word: (ack & ack_mask) << 2 | mode.
inline constexpr std::uint32_t mode_idle = 0;     // no wave busy, sleeping or about to
inline constexpr std::uint32_t mode_running = 1;  // a wave runs (inside the epoch section)
inline constexpr std::uint32_t mode_stalled = 2;  // waves busy, all parked; sleeping
inline constexpr std::uint32_t ack_mask = 0x3fffffff;

// Wave fault word: (token & ack_mask) << 2 | state.
inline constexpr std::uint32_t f_claimed = 0;  // a canceller is writing the reason
inline constexpr std::uint32_t f_pending = 1;
inline constexpr std::uint32_t f_replay = 2;
inline constexpr std::uint32_t f_cancel = 3;

constexpr std::uint32_t word(std::uint64_t serial, std::uint32_t low) noexcept {
  return (static_cast<std::uint32_t>(serial & ack_mask) << 2) | low;
}

// ack (30 bits, wrapping) >= S?
constexpr bool ack_reached(std::uint32_t status, std::uint64_t s) noexcept {
  const std::uint32_t d = ((status >> 2) - static_cast<std::uint32_t>(s & ack_mask)) & ack_mask;
  return d < (ack_mask >> 1);
}

// Owner-only counter: a plain load/add/store (no locked instruction on the
// hot path); readers from other threads see some recent value (relaxed).
inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t d = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
}

inline std::uint64_t now_ns() noexcept {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

struct vm_ctx {
  vm_id id;
  dev_page_table* table;  // immutable
  phys_mem* sysmem;       // immutable
  va_t limit;             // immutable
};

struct queue_state;

/// One submitted kernel.
/// Protection: items, fn, vm, q, chunk, done, serial are immutable after
/// submit. next, completed and status are protected by device::impl::sched_lock_
/// (a lock of another object, so not expressible to clang-tsa).
/// aborted is set under sched_lock_ together with status (seq_cst: the
/// cancel protocol pairs it with the waves' fault words, see
/// cancel_running_locked) and read by waves to stop taking this kernel's
/// work items and, after a cancel, to abort the ones in progress.
struct job {
  std::uint64_t items = 0;
  kernel_fn fn;
  vm_ctx* vm = nullptr;
  queue_state* q = nullptr;
  std::uint64_t chunk = 1;
  std::shared_ptr<completion::state> done;
  std::uint64_t next = 0;
  std::uint64_t completed = 0;
  kernel_status status;
  std::atomic<bool> aborted{false};
  std::uint64_t serial = 0;
};

/// A queue. Protected by device::impl::sched_lock_: jobs (front = the one
/// running or runnable; the others wait for it).
struct queue_state {
  queue_id id;
  vm_ctx* vm;
  std::deque<std::unique_ptr<job>> jobs;
};

/// A range of work items an engine claimed from the scheduler.
struct claim {
  job* j = nullptr;
  std::uint64_t begin = 0, end = 0;
};

using signal_list = std::vector<std::shared_ptr<completion::state>>;

inline void signal_all(signal_list& l) {
  for (auto& s : l) s->done->signal(s->status.error);
  l.clear();
}

namespace detail {

/// A claim in progress on one engine: its waves take items from it one at
/// a time (next), and report them finished (finished); the last one to
/// finish reports the claim to the scheduler. Owner (engine thread) only.
struct claim_ctx {
  claim c;
  std::uint64_t next = 0;      // next item to hand to a wave
  std::uint64_t finished = 0;  // items whose wave is done with them
};

/// The wave stacks of one engine: one mapping, `count` slots of `stride`
/// bytes, each a PROT_NONE guard page below a usable stack (fiber.cpp).
class wave_stacks {
 public:
  /// Map and protect. Returns false when the mapping or a guard failed.
  bool init(unsigned engine, unsigned count, std::size_t stack_bytes) noexcept;
  ~wave_stacks();
  /// The top (highest address) and usable size of slot i.
  [[nodiscard]] void* top(unsigned i) const noexcept { return base_ + (i + 1) * stride_; }
  [[nodiscard]] void* bottom(unsigned i) const noexcept { return base_ + i * stride_ + guard_; }
  [[nodiscard]] std::size_t usable() const noexcept { return stride_ - guard_; }

 private:
  char* base_ = nullptr;
  std::size_t stride_ = 0, guard_ = 0, bytes_ = 0;
  int slot_ = -1;  // in the overflow handler's registry
};

/// Where a wave is. Owner (engine thread) only.
enum class wave_state : std::uint8_t {
  unborn,         // no fiber yet
  free,           // suspended between work items, in wave_main
  ready,          // in the ready queue
  running,        // the one the engine thread runs now
  parked_fault,   // suspended in raise_fault until replay or cancel
  parked_full,    // suspended in raise_fault until the fault buffer has space
  yielded,        // suspended in work_item::yield(), goes to the back of ready
};

struct engine;

/// One wave: a work item in progress with its own stack (a Boost.Context
/// fiber). Fields are owner (engine thread) only, except the published
/// words fault_word, cancel_reason and job_pub.
struct wave {
  engine* e = nullptr;  // immutable
  unsigned index = 0;   // immutable: its number on the engine
  boost::context::fiber fib;    // owner: the wave's suspended context (when not running)
  boost::context::fiber sched;  // owner: the engine's scheduler context (while running)
  wave_state state = wave_state::unborn;
  bool exiting = false;         // owner: set at engine exit, wave_main returns
  // owner: the item it runs, and that item's kernel context
  claim_ctx* ctx = nullptr;
  job* cur = nullptr;
  vm_ctx* vm = nullptr;
  // Sanitizer fiber state (fiber.cpp): the TSan fiber, the ASan fake stack.
  void* tsan_fiber = nullptr;
  void* asan_fake = nullptr;

  /// (token & ack_mask) << 2 | f_state. The owner stores f_pending (seq_cst)
  /// before pushing the record; replay/cancel CAS it (release) from
  /// f_pending, then set the wave's wake bit; the wave re-reads it
  /// (acquire) each time it is resumed.
  alignas(64) std::atomic<std::uint32_t> fault_word{0};
  /// Written by the winning canceller between its CAS to f_claimed and its
  /// release store of f_cancel; read by the owner after the acquire load.
  std::atomic<int> cancel_reason{0};
  /// The kernel of the item the wave runs, or null: stored (seq_cst) by the
  /// owner before the item starts and cleared after it ends; read by
  /// cancellers under sched_lock_ (compared, never dereferenced).
  std::atomic<const job*> job_pub{nullptr};
  /// The address of its last fault (relaxed; for describe() only).
  std::atomic<va_t> fault_gva{0};
};

}  // namespace detail

class device::impl {
 public:
  impl(device_config c, std::shared_ptr<phys_mem> vram_memory);
  ~impl();
  /// Map the wave stacks and start the engine threads (ENOMEM: no stacks).
  errc start();

  errc attach_vm(vm_id id, dev_page_table& table, phys_mem& sysmem) SVM_EXCLUDES(sched_lock_);
  errc detach_vm(vm_id id) SVM_EXCLUDES(sched_lock_);
  result<queue_id> create_queue(vm_id vm) SVM_EXCLUDES(sched_lock_);
  errc destroy_queue(queue_id q) SVM_EXCLUDES(sched_lock_);
  errc cancel_queue(queue_id q, errc reason) SVM_EXCLUDES(sched_lock_, inval_lock_);
  errc cancel_vm(vm_id vm, errc reason) SVM_EXCLUDES(sched_lock_, inval_lock_);
  /// Cancel one kernel; its fence (and others finalized with it) goes to
  /// `sig`, to be signalled by the caller once it holds no lock.
  errc cancel_kernel(queue_id q, std::uint64_t serial, errc reason, signal_list& sig)
      SVM_EXCLUDES(sched_lock_, inval_lock_);
  std::string describe() const SVM_EXCLUDES(sched_lock_);
  result<completion> submit(queue_id q, std::uint64_t items, kernel_fn fn) SVM_EXCLUDES(sched_lock_);
  std::size_t replay(std::span<const fault_record> records) noexcept;
  std::size_t cancel(std::span<const fault_record> records, errc reason) noexcept;
  errc invalidate_tlb(vm_id vm, va_range r) SVM_EXCLUDES(inval_lock_);
  void set_oracle(access_validator v) SVM_EXCLUDES(oracle_lock_);
  device_stats stats() const;

  // ---- used by the engines ----
  claim claim_work(detail::engine& e, bool& stop) SVM_EXCLUDES(sched_lock_);
  void complete_chunk(const claim& c, std::uint64_t done) SVM_EXCLUDES(sched_lock_);
  void fail_job(job& j, const kernel_status& s) SVM_EXCLUDES(sched_lock_);
  /// Locking: requires inval_lock_. The log entries (seen, now] or
  /// "too old" (flush everything).
  std::uint64_t read_invalidations_locked(std::uint64_t seen, tlb_model& tlb) SVM_REQUIRES(inval_lock_);
  /// The wave whose record `r` is, or null (bad engine or wave number).
  detail::wave* wave_of(const fault_record& r) noexcept;
  /// Resolve a wave's pending fault with f_replay or f_cancel (the latter
  /// with `reason`) if its word still holds `expected`, then wake the wave.
  bool resolve(detail::wave& w, std::uint32_t expected, std::uint32_t to, errc reason) noexcept;
  /// resolve() without the wake and the outstanding count: the caller
  /// wakes the wave (a batch_waker) and counts it.
  bool resolve_word(detail::wave& w, std::uint32_t expected, std::uint32_t to, errc reason) noexcept;
  /// The records' waves resolved, then woken with one wake-bit RMW per run
  /// of waves sharing a bitmap word and one poke per engine.
  std::size_t resolve_all(std::span<const fault_record> records, std::uint32_t to, errc reason) noexcept;
  /// fault_buffer's space callback: every engine with waves parked on a
  /// full buffer retries.
  static void on_space(void* self) noexcept;
  /// Count a fault raised (outstanding until resolved) and its high-water mark.
  void fault_raised() noexcept;

  /// Faults raised and not yet replayed or cancelled, and the most at once
  /// (device-wide; relaxed RMWs on the fault path only, statistics).
  std::atomic<std::int64_t> outstanding_{0};
  std::atomic<std::int64_t> outstanding_hw_{0};

  device_config cfg_;
  std::shared_ptr<phys_mem> vram_ext_;  // immutable; external VRAM (null: vram_)
  vram_pool vram_;
  phys_mem* const vram_mem_;  // immutable; what aperture::vram reaches
  fault_buffer faults_;
  copy_engine copier_;
  std::vector<std::unique_ptr<detail::engine>> engines_;  // immutable after construction

  /// The published invalidation sequence: read (acquire) by every engine at
  /// every access boundary, so it lives alone on its cache line. Stored
  /// (seq_cst) under inval_lock_ by invalidate_tlb() and kick_engines();
  /// pairs with the seq_cst load in engine::go_running() (store-buffering
  /// pair, see device.h).
  alignas(64) std::atomic<std::uint64_t> inval_seq_{0};
  /// The oracle, or nullptr. Acquire load per access pairs with the release
  /// store in set_oracle(); pointees live until ~impl (oracles_).
  std::atomic<const access_validator*> oracle_{nullptr};

  alignas(64) mutable mutex inval_lock_{inval_class, 2};
  struct log_entry {
    std::uint64_t seq = 0;
    vm_id vm = 0;
    va_range r;  // empty: a cancel's kick, nothing to flush
  };
  std::array<log_entry, inval_log_size> inval_log_ SVM_GUARDED_BY(inval_lock_);
  std::uint64_t inval_next_ SVM_GUARDED_BY(inval_lock_) = 0;
  /// Invalidators sleeping on an engine's status word; engines notify only
  /// when nonzero. seq_cst on both sides (Dekker pair with the status store).
  std::atomic<std::uint32_t> inval_sleepers_{0};

  mutable mutex sched_lock_{sched_class, 1};
  std::unordered_map<vm_id, std::unique_ptr<vm_ctx>> vms_ SVM_GUARDED_BY(sched_lock_);
  std::unordered_map<queue_id, std::unique_ptr<queue_state>> queues_ SVM_GUARDED_BY(sched_lock_);
  std::vector<job*> runnable_ SVM_GUARDED_BY(sched_lock_);  // jobs with unclaimed items
  std::size_t rr_ SVM_GUARDED_BY(sched_lock_) = 0;
  queue_id next_queue_ SVM_GUARDED_BY(sched_lock_) = 1;
  std::uint64_t next_serial_ SVM_GUARDED_BY(sched_lock_) = 1;
  bool stopping_ SVM_GUARDED_BY(sched_lock_) = false;

  /// The completions' way back here (see detail::device_anchor).
  std::shared_ptr<detail::device_anchor> anchor_ = std::make_shared<detail::device_anchor>();

  mutable mutex oracle_lock_{oracle_class, 3};
  std::vector<std::unique_ptr<access_validator>> oracles_ SVM_GUARDED_BY(oracle_lock_);

  // Device-level statistics (relaxed; statistics only).
  std::atomic<std::uint64_t> invalidations_{0}, kernels_ok_{0}, kernels_failed_{0};

  /// Wake every engine (work became runnable, shutdown).
  void publish_work() noexcept;
  /// Make every running engine take its slow path at its next access (a
  /// no-op invalidation: waves check their kernel's abort flag when they
  /// acknowledge it).
  void kick_engines() SVM_EXCLUDES(inval_lock_);

 private:
  void finalize_locked(job& j, signal_list& sig) SVM_REQUIRES(sched_lock_);
  void activate_next_locked(queue_state& q, signal_list& sig) SVM_REQUIRES(sched_lock_);
  void drop_unclaimed_locked(job& j) SVM_REQUIRES(sched_lock_);
  /// Cancel job j (front or waiting) of q: see cancel_queue().
  void cancel_job_locked(queue_state& q, job& j, errc reason, signal_list& sig) SVM_REQUIRES(sched_lock_);
  /// Cancel the faults that waves running j are parked on.
  void cancel_running_locked(const job& j, errc reason) SVM_REQUIRES(sched_lock_);
  /// Cancel every kernel of q (the running one stays until its items end).
  void cancel_all_locked(queue_state& q, errc reason, signal_list& sig) SVM_REQUIRES(sched_lock_);
};

namespace detail {

/// The engine the calling thread runs, or null (invalidate_tlb refuses to
/// run on an engine thread).
extern thread_local engine* tl_engine;

/// One engine: a hardware thread with its TLB and its waves.
/// Protection: the fields marked "owner" are touched only by the engine's
/// thread. status, wake_bits and wake_word are published words (see their
/// comments); the counters are owner-written, read racily (relaxed).
struct engine {
  engine(device::impl& d, unsigned i, std::unique_ptr<tlb_model> t);
  ~engine();

  void run();
  std::byte* do_access(va_t va, unsigned size, svm::access acc);
  bool prefetch(va_t va);
  [[noreturn]] void bad_access(va_t va, unsigned size, svm::access acc);
  void process_invalidations();
  /// An access boundary inside a work item: acknowledge invalidations, then
  /// abort the work item if its kernel was cancelled meanwhile (a cancel
  /// bumps the invalidation sequence, so this runs only on the slow path).
  void ack_in_kernel() {
    process_invalidations();
    if (cur->aborted.load(std::memory_order_seq_cst)) throw kernel_abort{};
  }
  /// Set wave w's wake bit and wake the engine thread if it sleeps (any
  /// thread). seq_cst: pairs with the engine's check before it sleeps.
  void wake(const wave& w) noexcept;
  /// Set the wake bits `mask` of bitmap word `word` and its summary bit
  /// (any thread); the caller pokes the engine afterwards.
  void set_wake_bits(std::size_t word, std::uint64_t mask) noexcept;
  /// Wake the engine thread (any thread).
  void poke() noexcept;

  device::impl& dev;    // immutable
  const unsigned index;  // immutable
  std::unique_ptr<tlb_model> tlb;  // owner
  /// tlb as the default (final) model, or nullptr: lets the hot path call
  /// its lookup directly (inlined) instead of through the vtable.
  set_assoc_tlb* const fast_tlb;

  // owner: the running wave's kernel context, copied from it at every resume
  job* cur = nullptr;
  vm_ctx* vm = nullptr;
  vm_id vmid = 0;
  va_t limit = 0;
  wave* cur_wave = nullptr;
  std::uint64_t seen_inval = 0;   // owner: last invalidation sequence processed
  /// owner: the micro-TLB work_item checks inline (see micro_tlb in
  /// device.h); used only with fast_tlb. Emptied by process_invalidations(),
  /// at every new claim and whenever the engine resumes a wave of another VM.
  micro_tlb l0;
  std::uint64_t fault_serial = 0; // owner
  bool running = false;           // owner: mode_running published and epoch entered

  // owner: the waves and their queues
  std::vector<std::unique_ptr<wave>> waves;
  wave_stacks stacks;
  std::vector<wave*> free_waves;     // suspended in wave_main (or unborn)
  std::deque<wave*> ready;           // to resume, in order
  std::deque<wave*> full;            // parked on a full fault buffer, FIFO
  unsigned busy = 0;                 // waves with an item in progress
  claim_ctx* local = nullptr;        // the claim waves take items from, or null
  // Sanitizer state of the scheduler context (the thread's own stack).
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
  void* tsan_sched = nullptr;

  /// (ack & ack_mask) << 2 | mode. Written only by the owner (seq_cst store,
  /// then notify_all if inval_sleepers_); read by invalidators (seq_cst,
  /// wait/notify futex). A release of everything the engine accessed before.
  alignas(64) std::atomic<std::uint32_t> status{mode_idle};
  /// One bit per wave, set (fetch_or, seq_cst) by replay/cancel after they
  /// resolved the wave's fault word; taken (exchange, seq_cst) by the owner.
  std::unique_ptr<std::atomic<std::uint64_t>[]> wake_bits;
  std::size_t wake_words = 0;  // immutable
  /// Bumped (seq_cst) after a wake bit is set, when work is published, when
  /// the fault buffer frees space and at shutdown; the owner reads it before
  /// looking for something to do and sleeps on it (futex) only if unchanged.
  alignas(64) std::atomic<std::uint32_t> wake_word{0};
  /// Bit i set: wake_bits[i] may hold bits (at most 64 words: 4096 waves).
  /// Set (fetch_or, seq_cst) after the word's bits; taken (exchange) by the
  /// owner before it takes the words, so a bit set meanwhile is found on
  /// the next look (the waker pokes after setting the summary).
  std::atomic<std::uint64_t> wake_summary{0};
  std::atomic<std::uint32_t> sleeping{0};  // seq_cst; wakers notify only when nonzero
  /// Set (seq_cst) by the fault buffer's space callback; the owner then
  /// resumes its waves parked on a full buffer, FIFO.
  std::atomic<bool> space{false};

  // Statistics (owner-written).
  alignas(64) std::atomic<std::uint64_t> hits{0}, slow{0}, walks{0}, faults{0}, replays{0}, cancels{0}, acks{0},
      switches{0}, full_parks{0};
  std::atomic<std::uint64_t> parked_now{0};  // owner-written: waves parked on faults or space now

  std::jthread thread;  // started by impl once every engine exists

  // ---- waves (engine.cpp) ----
  void wave_main(wave& w);
  void resume(wave& w);
  void park(wave& w, wave_state why);
  void collect_wakes();
  bool start_wave();
  void finish_item(wave& w);
  void sleep(std::uint32_t seen);
  void exit_waves();
  void adopt(const wave& w) noexcept;

 private:
  void go_running();
  void go_idle(std::uint32_t mode);
  void set_status(std::uint32_t mode);
  std::byte* access_slow(va_t va, unsigned size, svm::access acc);
  std::byte* finish(const tlb_entry& t, va_t va, svm::access acc, bool hit);
  tlb_entry make_entry(const pt::translation& tr, va_t va);
  std::uint32_t raise_fault(va_t va, svm::access acc, std::uint32_t retries = 0);
  [[noreturn]] void abort_kernel(errc error, va_t va, errc reason, svm::access acc);
};

// ---- fiber.cpp: sanitizer annotations around a switch ----
/// Before switching from the current context to one whose stack is
/// [bottom, bottom + size): `fake` receives the ASan fake stack to restore.
/// The TSan fiber `to` becomes current. `exiting`: the current context ends.
void before_switch(void** fake, const void* bottom, std::size_t size, void* to_tsan) noexcept;
/// Right after a switch, in the context switched to: restore `fake`; the
/// stack switched from is reported in *from_bottom / *from_size (may be null).
void after_switch(void* fake, const void** from_bottom, std::size_t* from_size) noexcept;
void* tsan_current_fiber() noexcept;
void* tsan_create_fiber() noexcept;
void tsan_destroy_fiber(void* f) noexcept;

}  // namespace detail
}  // namespace svm::dev
