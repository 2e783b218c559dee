// The device: scheduler, engines (MMU fast and slow paths, fault stall,
// invalidation acknowledgement) and the driver-side entry points. The
// protocols are described in svm/device_sim/device.h; this file explains
// the why of the individual steps.
#include "svm/device_sim/device.h"

#include <algorithm>
#include <array>
#include <deque>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include "svm/base/epoch.h"

namespace svm::dev {
namespace {

constexpr lock_class sched_class{"device.sched", lockdep::rank::leaf};
constexpr lock_class inval_class{"device.inval", lockdep::rank::leaf};
constexpr lock_class oracle_class{"device.oracle", lockdep::rank::leaf};

constexpr std::size_t inval_log_size = 64;

// Engine status word: (ack & ack_mask) << 2 | mode.
constexpr std::uint32_t mode_idle = 0;
constexpr std::uint32_t mode_running = 1;
constexpr std::uint32_t mode_stalled = 2;
constexpr std::uint32_t ack_mask = 0x3fffffff;

// Fault word: (token & ack_mask) << 2 | state.
constexpr std::uint32_t f_claimed = 0;  // a canceller is writing the reason
constexpr std::uint32_t f_pending = 1;
constexpr std::uint32_t f_replay = 2;
constexpr std::uint32_t f_cancel = 3;

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

std::uint64_t now_ns() noexcept {
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
/// Protection: items, fn, vm, q, chunk, done are immutable after submit.
/// next, completed and status are protected by device::impl::sched_lock_
/// (a lock of another object, so not expressible to clang-tsa).
/// aborted is set under sched_lock_ together with status (seq_cst: the
/// cancel protocol pairs it with the engines' fault word, see
/// cancel_running_locked) and read by engines to stop taking this kernel's
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
  std::uint64_t serial = 0;  // immutable: completion::state::serial
};

/// A queue. Protected by device::impl::sched_lock_: jobs (front = the one
/// running or runnable; the others wait for it).
struct queue_state {
  queue_id id;
  vm_ctx* vm;
  std::deque<std::unique_ptr<job>> jobs;
};

struct claim {
  job* j = nullptr;
  std::uint64_t begin = 0, end = 0;
};

using signal_list = std::vector<std::shared_ptr<completion::state>>;

void signal_all(signal_list& l) {
  for (auto& s : l) s->done->signal(s->status.error);
  l.clear();
}

}  // namespace

class device::impl {
 public:
  explicit impl(device_config c);
  ~impl();

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
  void complete_chunk(const claim& c) SVM_EXCLUDES(sched_lock_);
  void fail_job(job& j, const kernel_status& s) SVM_EXCLUDES(sched_lock_);
  /// Locking: requires inval_lock_. The log entries (seen, now] or
  /// "too old" (flush everything).
  std::uint64_t read_invalidations_locked(std::uint64_t seen, tlb_model& tlb) SVM_REQUIRES(inval_lock_);
  void wait_for_work(std::uint32_t seen);

  device_config cfg_;
  vram_pool vram_;
  fault_buffer faults_;
  copy_engine copier_;
  std::vector<std::unique_ptr<detail::engine>> engines_;  // immutable after construction

  /// The published invalidation sequence: read (acquire) by every engine at
  /// every access boundary, so it lives alone on its cache line. Stored
  /// (seq_cst) under inval_lock_ by invalidate_tlb(); pairs with the seq_cst
  /// load in engine::go_running() (store-buffering pair, see device.h).
  alignas(64) std::atomic<std::uint64_t> inval_seq_{0};
  /// The oracle, or nullptr. Acquire load per access pairs with the release
  /// store in set_oracle(); pointees live until ~impl (oracles_).
  std::atomic<const access_validator*> oracle_{nullptr};

  alignas(64) mutable mutex inval_lock_{inval_class, 2};
  struct log_entry {
    std::uint64_t seq = 0;
    vm_id vm = 0;
    va_range r;
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
  bool stopping_ SVM_GUARDED_BY(sched_lock_) = false;
  /// Futex word of idle engines: bumped (seq_cst) whenever work becomes
  /// runnable and at shutdown. An engine reads it before looking for work
  /// under sched_lock_, so work published after the look changes it.
  std::atomic<std::uint32_t> work_seq_{0};
  std::atomic<std::uint32_t> idle_sleepers_{0};  // seq_cst; notify only when nonzero

  /// The completions' way back here (see detail::device_anchor).
  std::shared_ptr<detail::device_anchor> anchor_ = std::make_shared<detail::device_anchor>();
  std::uint64_t next_serial_ SVM_GUARDED_BY(sched_lock_) = 1;

  mutable mutex oracle_lock_{oracle_class, 3};
  std::vector<std::unique_ptr<access_validator>> oracles_ SVM_GUARDED_BY(oracle_lock_);

  // Device-level statistics (relaxed; statistics only).
  std::atomic<std::uint64_t> invalidations_{0}, kernels_ok_{0}, kernels_failed_{0};

 private:
  void finalize_locked(job& j, signal_list& sig) SVM_REQUIRES(sched_lock_);
  void activate_next_locked(queue_state& q, signal_list& sig) SVM_REQUIRES(sched_lock_);
  void drop_unclaimed_locked(job& j) SVM_REQUIRES(sched_lock_);
  void publish_work() noexcept;
  /// Cancel job j (front or waiting) of q: see cancel_queue().
  void cancel_job_locked(queue_state& q, job& j, errc reason, signal_list& sig) SVM_REQUIRES(sched_lock_);
  /// Cancel the faults that engines running j are stalled on.
  void cancel_running_locked(const job& j, errc reason) SVM_REQUIRES(sched_lock_);
  /// Cancel every kernel of q (the running one stays until its chunks end).
  void cancel_all_locked(queue_state& q, errc reason, signal_list& sig) SVM_REQUIRES(sched_lock_);
  /// Make every running engine take its slow path at its next access (a
  /// no-op invalidation: the engines check their kernel's abort flag when
  /// they acknowledge it).
  void kick_engines() SVM_EXCLUDES(inval_lock_);
};

namespace detail {

namespace {
thread_local engine* tl_engine = nullptr;
}

/// One engine: a hardware thread with its TLB.
/// Protection: the fields marked "owner" are touched only by the engine's
/// thread. status and fault_word are the engine's two published words (see
/// their comments); the counters are owner-written, read racily (relaxed).
struct engine {
  engine(device::impl& d, unsigned i, std::unique_ptr<tlb_model> t)
      : dev(d), index(i), tlb(std::move(t)), fast_tlb(dynamic_cast<set_assoc_tlb*>(tlb.get())) {
    l0.inval_seq = &d.inval_seq_;
    l0.oracle = &d.oracle_;
    l0.hits = &hits;
  }

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

  device::impl& dev;    // immutable
  const unsigned index;  // immutable
  std::unique_ptr<tlb_model> tlb;  // owner
  /// tlb as the default (final) model, or nullptr: lets the hot path call
  /// its lookup directly (inlined) instead of through the vtable.
  set_assoc_tlb* const fast_tlb;

  // owner: the kernel being run and its VM
  job* cur = nullptr;
  vm_ctx* vm = nullptr;
  vm_id vmid = 0;
  va_t limit = 0;
  std::uint64_t seen_inval = 0;   // owner: last invalidation sequence processed
  /// owner: the micro-TLB work_item checks inline (see micro_tlb in
  /// device.h); used only with fast_tlb. Emptied by process_invalidations()
  /// and at every new chunk of work.
  micro_tlb l0;
  std::uint64_t fault_serial = 0; // owner
  bool running = false;           // owner: mode_running published and epoch entered
  /// The kernel whose chunk the engine runs, or null: stored (seq_cst) by
  /// the owner before the chunk's first work item and cleared before the
  /// chunk completes; read by cancellers under sched_lock_ (compared, never
  /// dereferenced) to find the faults of a cancelled kernel.
  std::atomic<const job*> job_pub{nullptr};

  /// (ack & ack_mask) << 2 | mode. Written only by the owner (seq_cst store,
  /// then notify_all if inval_sleepers_); read by invalidators (seq_cst,
  /// wait/notify futex). A release of everything the engine accessed before.
  alignas(64) std::atomic<std::uint32_t> status{mode_idle};
  /// (token & ack_mask) << 2 | f_state. The owner stores f_pending (seq_cst)
  /// before pushing the record; replay/cancel CAS it (release) from
  /// f_pending; the owner waits on it (acquire), spin then futex.
  alignas(64) std::atomic<std::uint32_t> fault_word{0};
  /// Written by the winning canceller between its CAS to f_claimed and its
  /// release store of f_cancel; read by the owner after the acquire load.
  std::atomic<int> cancel_reason{0};

  // Statistics (owner-written).
  alignas(64) std::atomic<std::uint64_t> hits{0}, slow{0}, walks{0}, faults{0}, replays{0}, cancels{0}, acks{0};

  std::jthread thread;  // started by impl once every engine exists

 private:
  void run_chunk(const claim& c);
  void go_running();
  void go_idle(std::uint32_t mode);
  void set_status(std::uint32_t mode);
  std::byte* access_slow(va_t va, unsigned size, svm::access acc);
  std::byte* finish(const tlb_entry& t, va_t va, svm::access acc, bool hit);
  tlb_entry make_entry(const pt::translation& tr, va_t va);
  std::uint32_t raise_fault(va_t va, svm::access acc);
  [[noreturn]] void abort_kernel(errc error, va_t va, errc reason, svm::access acc);
};

std::uint64_t item_engine(const engine& e) noexcept { return e.index; }
bool prefetch(engine& e, va_t va) { return e.prefetch(va); }
void boundary(engine& e) {
  if (e.dev.inval_seq_.load(std::memory_order_acquire) != e.seen_inval) e.ack_in_kernel();
  epoch::quiescent();
}

void engine::set_status(std::uint32_t mode) {
  status.store(word(seen_inval, mode), std::memory_order_seq_cst);
  if (dev.inval_sleepers_.load(std::memory_order_seq_cst) != 0) status.notify_all();
}

void engine::go_running() {
  if (running) return;
  epoch::enter();
  running = true;
  set_status(mode_running);
  // The recheck: a stalled or idle engine was counted as acknowledged, so it
  // must look at inval_seq_ (seq_cst, after its seq_cst status store) before
  // it uses its TLB again.
  if (dev.inval_seq_.load(std::memory_order_seq_cst) != seen_inval) process_invalidations();
}

void engine::go_idle(std::uint32_t mode) {
  if (!running) return;
  running = false;
  set_status(mode);
  epoch::leave();
}

void engine::process_invalidations() {
  std::uint64_t s;
  {
    lock_guard g(dev.inval_lock_);
    s = dev.read_invalidations_locked(seen_inval, *tlb);
  }
  seen_inval = s;
  l0.vpn = ~std::uint64_t{0};
  bump(acks);
  epoch::quiescent();  // an invalidation usually follows a zap that retired nodes
  // The acknowledgement: everything this engine accessed so far happens
  // before an invalidator that reads it (seq_cst store in set_status).
  set_status(mode_running);
}

[[noreturn]] void engine::abort_kernel(errc error, va_t va, errc reason, svm::access acc) {
  dev.fail_job(*cur, {error, va, reason, acc});
  throw kernel_abort{};
}

[[noreturn]] void engine::bad_access(va_t va, unsigned size, svm::access acc) {
  if (size > 8 || !std::has_single_bit(size)) abort_kernel(errc::inval, va, errc::inval, acc);
  if (va >= limit) abort_kernel(errc::range, va, errc::range, acc);
  abort_kernel(errc::inval, va, errc::inval, acc);
}

// The hot path: a TLB hit is the two checks, one shared load, a few tag
// compares and the oracle branch.
inline std::byte* engine::do_access(va_t va, unsigned size, svm::access acc) {
  if ((va & (size - 1)) != 0 || va >= limit) [[unlikely]]
    bad_access(va, size, acc);
  // The access boundary: acknowledge pending invalidations before using the TLB.
  if (dev.inval_seq_.load(std::memory_order_acquire) != seen_inval) [[unlikely]]
    ack_in_kernel();
  const tlb_entry* t = fast_tlb ? fast_tlb->lookup(vmid, va) : tlb->lookup(vmid, va);
  if (t && (!needs_write(acc) || dev_pte::is_writable(t->pte))) [[likely]] {
    bump(hits);
    return finish(*t, va, acc, true);
  }
  return access_slow(va, size, acc);
}

inline std::byte* engine::finish(const tlb_entry& t, va_t va, svm::access acc, bool hit) {
  std::byte* frame;
  pfn_t pfn;
  if (t.level == 0) [[likely]] {
    frame = t.host;
    pfn = dev_pte::pfn(t.pte);
  } else {
    pfn = dev_pte::pfn(t.pte) + ((va - t.base) >> page_shift);
    frame = t.mem->frame_data(pfn);
    if (!frame) [[unlikely]]
      abort_kernel(errc::io, va, errc::io, acc);
  }
  if (const access_validator* o = dev.oracle_.load(std::memory_order_acquire)) [[unlikely]] {
    (*o)(access_check{vmid, va, acc, index, t.pte, t.level, hit, dev_pte::aperture_of(t.pte), pfn, t.mem});
  } else if (t.level == 0 && fast_tlb) {
    // t is valid as of seen_inval (the caller checked the sequence): so is
    // the micro-TLB copy, until the sequence moves.
    l0.vpn = va >> page_shift;
    l0.host = frame;
    l0.writable = dev_pte::is_writable(t.pte);
    l0.seen_inval = seen_inval;
  }
  return frame + (va & (page_size - 1));
}

tlb_entry engine::make_entry(const pt::translation& tr, va_t va) {
  tlb_entry e;
  e.level = static_cast<std::uint8_t>(tr.level);
  e.base = align_down(va, tr.size());
  e.tag = tlb_entry::make_tag(vmid, va, tr.level);
  e.pte = tr.entry;
  e.mem = dev_pte::aperture_of(tr.entry) == aperture::vram ? static_cast<phys_mem*>(&dev.vram_) : vm->sysmem;
  const pfn_t pfn = dev_pte::pfn(tr.entry);
  const pfn_t frames = tr.size() >> page_shift;
  if (pfn >= e.mem->frame_count() || frames > e.mem->frame_count() - pfn) [[unlikely]]
    abort_kernel(errc::io, va, errc::io, svm::access::read);
  e.host = tr.level == 0 ? e.mem->frame_data(pfn) : nullptr;
  return e;
}

std::byte* translate(engine& e, va_t va, unsigned size, svm::access acc) { return e.do_access(va, size, acc); }

std::byte* engine::access_slow(va_t va, unsigned, svm::access acc) {
  bump(slow);
  for (;;) {
    // A replay after a cancel of the kernel: stop here.
    if (cur->aborted.load(std::memory_order_seq_cst)) throw kernel_abort{};
    // No node pointer is live here: a good point to let reclamation advance.
    epoch::quiescent();
    bump(walks);
    const pt::translation tr = vm->table->translate_in_section(va);  // running: inside the epoch section
    if (dev_pte::is_valid(tr.entry) && (!needs_write(acc) || dev_pte::is_writable(tr.entry))) {
      const tlb_entry e = make_entry(tr, va);
      tlb->insert(e);  // replaces a read-only entry of the same page after an upgrade
      return finish(e, va, acc, false);
    }
    const std::uint32_t st = raise_fault(va, acc);
    if (st == f_cancel) {
      bump(cancels);
      abort_kernel(errc::canceled, va, static_cast<errc>(cancel_reason.load(std::memory_order_relaxed)), acc);
    }
    bump(replays);
    // Replayed: retranslate from the page table (the loop walks again; an
    // access that still misses faults again).
  }
}

bool engine::prefetch(va_t va) {
  if (va >= limit) return false;
  if (dev.inval_seq_.load(std::memory_order_acquire) != seen_inval) ack_in_kernel();
  if (tlb->lookup(vmid, va)) {
    bump(hits);
    return true;
  }
  bump(slow);
  for (int attempt = 0; attempt < 2; ++attempt) {
    epoch::quiescent();
    bump(walks);
    const pt::translation tr = vm->table->translate_in_section(va);  // running: inside the epoch section
    if (dev_pte::is_valid(tr.entry)) {
      tlb->insert(make_entry(tr, va));
      return true;
    }
    if (attempt == 1) break;
    if (raise_fault(va, svm::access::prefetch) == f_cancel) {
      bump(cancels);
      return false;
    }
    bump(replays);
  }
  return false;
}

std::uint32_t engine::raise_fault(va_t va, svm::access acc) {
  if (cur->aborted.load(std::memory_order_relaxed)) throw kernel_abort{};  // already failed: no point
  const std::uint64_t token = ++fault_serial;
  const std::uint32_t pending = word(token, f_pending);
  // Published before the record, so a driver that fetched the record finds
  // the word ready for its replay CAS. seq_cst: pairs with the shutdown
  // sweep, which closes the buffer and then reads this word.
  fault_word.store(pending, std::memory_order_seq_cst);
  // The cancel recheck: a canceller stores aborted (seq_cst) and then reads
  // this word (seq_cst); we store the word and then read aborted. One side
  // sees the other, so a cancel never misses a stall.
  if (cur->aborted.load(std::memory_order_seq_cst)) {
    // Take the word back; a canceller that claimed it first is writing the
    // reason: let it finish, so its store cannot land on a later fault.
    std::uint32_t exp = pending;
    if (!fault_word.compare_exchange_strong(exp, word(token, f_cancel), std::memory_order_acquire))
      while ((fault_word.load(std::memory_order_acquire) & 3) == f_claimed) SVM_CPU_RELAX();
    throw kernel_abort{};
  }
  bump(faults);
  // Stalled from here: counts as acknowledged for invalidations, and out of
  // the epoch section so reclamation does not wait for the driver.
  go_idle(mode_stalled);
  if (!dev.faults_.push(fault_record{vmid, va, acc, index, now_ns(), token})) {
    // Closed (device shutdown): nobody will answer; cancel ourselves.
    std::uint32_t exp = pending;
    if (fault_word.compare_exchange_strong(exp, word(token, f_claimed), std::memory_order_relaxed)) {
      cancel_reason.store(static_cast<int>(errc::canceled), std::memory_order_relaxed);
      fault_word.store(word(token, f_cancel), std::memory_order_release);
    }
  }
  // Spin, then futex: a wake costs the replayer one notify, never a
  // condition variable. acquire: pairs with the release CAS/store of the
  // replayer or canceller (and orders the cancel reason).
  std::uint32_t w = fault_word.load(std::memory_order_acquire);
  for (unsigned i = 0; i < dev.cfg_.fault_spin && ((w & 3) == f_pending || (w & 3) == f_claimed); ++i) {
    SVM_CPU_RELAX();
    w = fault_word.load(std::memory_order_acquire);
  }
  // Then keep spinning, by the clock (see device_config::wait_spin_ns): a
  // reply within it needs no futex wake.
  if (dev.cfg_.wait_spin_ns != 0 && ((w & 3) == f_pending || (w & 3) == f_claimed)) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(dev.cfg_.wait_spin_ns);
    for (unsigned i = 1; (w & 3) == f_pending || (w & 3) == f_claimed; ++i) {
      SVM_CPU_RELAX();
      w = fault_word.load(std::memory_order_acquire);
      if (i % 32 == 0 && std::chrono::steady_clock::now() >= end) break;
    }
  }
  while ((w & 3) == f_pending || (w & 3) == f_claimed) {
    fault_word.wait(w, std::memory_order_acquire);
    w = fault_word.load(std::memory_order_acquire);
  }
  go_running();
  return w & 3;
}

void engine::run_chunk(const claim& c) {
  cur = c.j;
  vm = c.j->vm;
  l0.vpn = ~std::uint64_t{0};  // another kernel may run on another VM
  vmid = vm->id;
  limit = vm->limit;
  job_pub.store(cur, std::memory_order_seq_cst);
  try {
    for (std::uint64_t i = c.begin; i < c.end; ++i) {
      if (cur->aborted.load(std::memory_order_relaxed)) break;
      epoch::quiescent();
      work_item wi(*this, fast_tlb ? &l0 : nullptr, i);
      cur->fn(wi);
    }
  } catch (const kernel_abort&) {
    // The failing access recorded the status (fail_job) before throwing.
  } catch (...) {
    dev.fail_job(*cur, {errc::io, 0, errc::io, svm::access::read});
  }
  job_pub.store(nullptr, std::memory_order_seq_cst);
}

void engine::run() {
  tl_engine = this;
  for (;;) {
    // Read the futex word before looking for work (see work_seq_).
    const std::uint32_t seen = dev.work_seq_.load(std::memory_order_seq_cst);
    bool stop = false;
    const claim c = dev.claim_work(*this, stop);
    if (stop) break;
    if (!c.j) {
      go_idle(mode_idle);
      dev.wait_for_work(seen);
      continue;
    }
    go_running();
    run_chunk(c);
    dev.complete_chunk(c);
  }
  go_idle(mode_idle);
  tl_engine = nullptr;
}

}  // namespace detail

std::uint64_t device::impl::read_invalidations_locked(std::uint64_t seen, tlb_model& tlb) {
  const std::uint64_t now = inval_next_;
  if (now - seen > inval_log_size) {
    tlb.flush_all();
  } else {
    for (std::uint64_t s = seen + 1; s <= now; ++s) {
      const log_entry& e = inval_log_[s % inval_log_size];
      if (!e.r.empty()) tlb.invalidate(e.vm, e.r);  // empty: a cancel's kick
    }
  }
  return now;
}


// ---------------------------------------------------------------------------
// work_item out-of-line members

std::uint64_t work_item::load_bytes(va_t va, unsigned size) {
  switch (size) {
    case 1: return load<std::uint8_t>(va);
    case 2: return load<std::uint16_t>(va);
    case 4: return load<std::uint32_t>(va);
    case 8: return load<std::uint64_t>(va);
    default: e_->bad_access(va, size, access::read);
  }
}

void work_item::store_bytes(va_t va, unsigned size, std::uint64_t v) {
  switch (size) {
    case 1: return store<std::uint8_t>(va, static_cast<std::uint8_t>(v));
    case 2: return store<std::uint16_t>(va, static_cast<std::uint16_t>(v));
    case 4: return store<std::uint32_t>(va, static_cast<std::uint32_t>(v));
    case 8: return store<std::uint64_t>(va, v);
    default: e_->bad_access(va, size, access::write);
  }
}

// ---------------------------------------------------------------------------
// completion

kernel_status completion::wait(std::chrono::nanoseconds timeout) const {
  if (!state_) return {errc::inval, 0, errc::inval, access::read};
  if (state_->done->wait(timeout) != errc::ok) return {errc::timedout, 0, errc::timedout, access::read};
  // The fence's acquire (wait/is_signaled) pairs with its release in
  // signal(), which follows the status write.
  return state_->status;
}

errc completion::cancel(errc reason) const {
  if (!state_ || reason == errc::ok) return errc::inval;
  if (done()) return errc::ok;
  signal_list sig;
  errc e = errc::ok;
  {
    lock_guard g(state_->anchor->lock);
    if (!state_->anchor->dev) return errc::ok;  // the device cancelled it on its way out
    e = state_->anchor->dev->impl_->cancel_kernel(state_->queue, state_->serial, reason, sig);
  }
  signal_all(sig);  // no lock held: fence callbacks may take theirs
  return e == errc::noent ? errc::ok : e;  // finished meanwhile
}

std::string completion::describe() const {
  if (!state_) return "empty completion";
  std::ostringstream os;
  os << "kernel #" << state_->serial << " on queue " << state_->queue << (done() ? ": done\n" : ": not done\n");
  lock_guard g(state_->anchor->lock);
  if (state_->anchor->dev) os << state_->anchor->dev->describe();
  else os << "device destroyed\n";
  return os.str();
}

// ---------------------------------------------------------------------------
// impl

device::impl::impl(device_config c)
    : cfg_(std::move(c)),
      vram_(cfg_.vram_bytes),
      faults_(cfg_.fault_buffer_entries, cfg_.wait_spin_ns) {
  const unsigned n = std::clamp(cfg_.engines, 1u, 256u);
  cfg_.engines = n;
  engines_.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    auto t = cfg_.make_tlb ? cfg_.make_tlb(i) : make_set_assoc_tlb(cfg_.tlb);
    if (!t) t = make_set_assoc_tlb(cfg_.tlb);
    engines_.push_back(std::make_unique<detail::engine>(*this, i, std::move(t)));
  }
  for (auto& e : engines_) e->thread = std::jthread([p = e.get()] { p->run(); });
}

device::impl::~impl() {
  {
    // No completion reaches this device from now on (see device_anchor).
    lock_guard a(anchor_->lock);
    anchor_->dev = nullptr;
  }
  {
    // Cancel what runs, so that every engine reaches the end of its chunk.
    signal_list sig;
    {
      lock_guard g(sched_lock_);
      stopping_ = true;
      for (auto& [id, q] : queues_) cancel_all_locked(*q, errc::canceled, sig);
    }
    kick_engines();
    signal_all(sig);
  }
  // Close the buffer first, then sweep: an engine that publishes f_pending
  // after the sweep looked sees the buffer closed in push() and cancels
  // itself (seq_cst on both sides).
  faults_.close();
  publish_work();
  for (auto& e : engines_) {
    std::uint32_t w = e->fault_word.load(std::memory_order_seq_cst);
    if ((w & 3) == f_pending &&
        e->fault_word.compare_exchange_strong(w, (w & ~3u) | f_claimed, std::memory_order_relaxed)) {
      e->cancel_reason.store(static_cast<int>(errc::canceled), std::memory_order_relaxed);
      e->fault_word.store((w & ~3u) | f_cancel, std::memory_order_release);
      e->fault_word.notify_all();
    }
  }
  for (auto& e : engines_) e->thread.join();
  // Kernels never run to the end: complete them with ECANCELED.
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    for (auto& [id, q] : queues_) {
      for (auto& j : q->jobs) {
        if (j->status.ok()) j->status = {errc::canceled, 0, errc::canceled, access::read};
        j->done->status = j->status;
        sig.push_back(j->done);
      }
      q->jobs.clear();
    }
    runnable_.clear();
  }
  kernels_failed_.fetch_add(sig.size(), std::memory_order_relaxed);
  signal_all(sig);
}

void device::impl::publish_work() noexcept {
  work_seq_.fetch_add(1, std::memory_order_seq_cst);
  if (idle_sleepers_.load(std::memory_order_seq_cst) != 0) work_seq_.notify_all();
}

void device::impl::wait_for_work(std::uint32_t seen) {
  for (int i = 0; i < 64 && work_seq_.load(std::memory_order_relaxed) == seen; ++i) SVM_CPU_RELAX();
  if (work_seq_.load(std::memory_order_seq_cst) != seen) return;
  idle_sleepers_.fetch_add(1, std::memory_order_seq_cst);
  work_seq_.wait(seen, std::memory_order_seq_cst);
  idle_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
}

errc device::impl::attach_vm(vm_id id, dev_page_table& table, phys_mem& sysmem) {
  if (id > max_vm_id) return errc::inval;
  lock_guard g(sched_lock_);
  if (vms_.count(id)) return errc::exist;
  vms_.emplace(id, std::make_unique<vm_ctx>(vm_ctx{id, &table, &sysmem, table.va_limit()}));
  return errc::ok;
}

errc device::impl::detach_vm(vm_id id) {
  lock_guard g(sched_lock_);
  auto it = vms_.find(id);
  if (it == vms_.end()) return errc::noent;
  for (auto& [qid, q] : queues_)
    if (q->vm == it->second.get()) return errc::busy;
  vms_.erase(it);
  return errc::ok;
}

result<queue_id> device::impl::create_queue(vm_id vm) {
  lock_guard g(sched_lock_);
  auto it = vms_.find(vm);
  if (it == vms_.end()) return errc::noent;
  const queue_id id = next_queue_++;
  queues_.emplace(id, std::make_unique<queue_state>(queue_state{id, it->second.get(), {}}));
  return id;
}

errc device::impl::destroy_queue(queue_id q) {
  lock_guard g(sched_lock_);
  auto it = queues_.find(q);
  if (it == queues_.end()) return errc::noent;
  if (!it->second->jobs.empty()) return errc::busy;
  queues_.erase(it);
  return errc::ok;
}

void device::impl::cancel_running_locked(const job& j, errc reason) {
  // j.aborted was stored (seq_cst) before: an engine that stores its fault
  // word after our load below sees it and cancels itself (raise_fault).
  for (auto& e : engines_) {
    if (e->job_pub.load(std::memory_order_seq_cst) != &j) continue;
    std::uint32_t w = e->fault_word.load(std::memory_order_seq_cst);
    if ((w & 3) != f_pending) continue;
    if (e->fault_word.compare_exchange_strong(w, (w & ~3u) | f_claimed, std::memory_order_relaxed)) {
      e->cancel_reason.store(static_cast<int>(reason), std::memory_order_relaxed);
      e->fault_word.store((w & ~3u) | f_cancel, std::memory_order_release);
      e->fault_word.notify_all();
    }
  }
}

void device::impl::cancel_job_locked(queue_state& q, job& j, errc reason, signal_list& sig) {
  if (j.status.ok()) j.status = {errc::canceled, 0, reason, access::read};
  if (&j != q.jobs.front().get()) {
    // Waiting behind the front kernel: never started, complete it now.
    j.done->status = j.status;
    kernels_failed_.fetch_add(1, std::memory_order_relaxed);
    sig.push_back(j.done);
    q.jobs.erase(std::find_if(q.jobs.begin(), q.jobs.end(), [&](const auto& p) { return p.get() == &j; }));
    return;
  }
  j.aborted.store(true, std::memory_order_seq_cst);
  cancel_running_locked(j, reason);
  drop_unclaimed_locked(j);
  if (j.completed == j.items) finalize_locked(j, sig);  // no chunk in flight
}

void device::impl::cancel_all_locked(queue_state& q, errc reason, signal_list& sig) {
  // The waiting ones first, so that finalizing the front activates nothing.
  while (q.jobs.size() > 1) cancel_job_locked(q, *q.jobs.back(), reason, sig);
  if (!q.jobs.empty()) cancel_job_locked(q, *q.jobs.front(), reason, sig);
}

void device::impl::kick_engines() {
  lock_guard g(inval_lock_);
  const std::uint64_t s = ++inval_next_;
  inval_log_[s % inval_log_size] = {s, 0, {}};
  inval_seq_.store(s, std::memory_order_seq_cst);
}

errc device::impl::cancel_queue(queue_id qid, errc reason) {
  if (reason == errc::ok) return errc::inval;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    cancel_all_locked(*it->second, reason, sig);
  }
  kick_engines();
  signal_all(sig);
  return errc::ok;
}

errc device::impl::cancel_vm(vm_id vm, errc reason) {
  if (reason == errc::ok) return errc::inval;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    auto v = vms_.find(vm);
    if (v == vms_.end()) return errc::noent;
    for (auto& [id, q] : queues_)
      if (q->vm == v->second.get()) cancel_all_locked(*q, reason, sig);
  }
  kick_engines();
  signal_all(sig);
  return errc::ok;
}

errc device::impl::cancel_kernel(queue_id qid, std::uint64_t serial, errc reason, signal_list& sig) {
  if (reason == errc::ok) return errc::inval;
  {
    lock_guard g(sched_lock_);
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    queue_state& q = *it->second;
    auto j = std::find_if(q.jobs.begin(), q.jobs.end(), [&](const auto& p) { return p->serial == serial; });
    if (j == q.jobs.end()) return errc::noent;
    // The front one, finalized, activates the next kernel, which runs.
    cancel_job_locked(q, **j, reason, sig);
  }
  kick_engines();
  return errc::ok;
}

namespace {
const char* mode_name(std::uint32_t m) {
  switch (m) {
    case mode_idle: return "idle";
    case mode_running: return "running";
    case mode_stalled: return "stalled";
    default: return "?";
  }
}
const char* fault_state_name(std::uint32_t f) {
  switch (f) {
    case f_claimed: return "claimed";
    case f_pending: return "pending";
    case f_replay: return "replayed";
    default: return "cancelled";
  }
}
}  // namespace

std::string device::impl::describe() const {
  std::ostringstream os;
  lock_guard g(sched_lock_);
  os << "device: " << engines_.size() << " engines, fault buffer " << faults_.size() << "/" << faults_.capacity()
     << ", invalidation seq " << inval_seq_.load(std::memory_order_relaxed) << (stopping_ ? ", stopping" : "") << "\n";
  std::unordered_map<const job*, std::pair<queue_id, std::uint64_t>> names;
  for (auto& [id, q] : queues_)
    for (auto& j : q->jobs) names[j.get()] = {id, j->serial};
  for (auto& e : engines_) {
    const std::uint32_t st = e->status.load(std::memory_order_relaxed);
    const std::uint32_t fw = e->fault_word.load(std::memory_order_relaxed);
    os << "  engine " << e->index << ": " << mode_name(st & 3) << ", ack " << (st >> 2);
    if (const job* j = e->job_pub.load(std::memory_order_relaxed)) {
      auto n = names.find(j);
      if (n != names.end()) os << ", kernel #" << n->second.second << " of queue " << n->second.first;
    }
    os << ", last fault token " << (fw >> 2) << " " << fault_state_name(fw & 3) << "\n";
  }
  for (auto& [id, q] : queues_) {
    os << "  queue " << id << " (vm " << q->vm->id << "): " << q->jobs.size() << " kernels";
    for (auto& j : q->jobs)
      os << "; #" << j->serial << " items " << j->completed << "/" << j->next << "/" << j->items
         << (j->aborted.load(std::memory_order_relaxed) ? " aborted" : "");
    os << "\n";
  }
  return os.str();
}

result<completion> device::impl::submit(queue_id qid, std::uint64_t items, kernel_fn fn) {
  if (!fn) return errc::inval;
  auto st = std::make_shared<completion::state>();
  st->done = fence::create("kernel");
  st->queue = qid;
  st->anchor = anchor_;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    if (stopping_) return errc::canceled;
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    queue_state& q = *it->second;
    auto j = std::make_unique<job>();
    j->items = items;
    j->fn = std::move(fn);
    j->vm = q.vm;
    j->q = &q;
    j->chunk = std::clamp<std::uint64_t>(items / (std::uint64_t{cfg_.engines} * 4), 1, 1024);
    j->done = st;
    j->serial = st->serial = next_serial_++;
    const bool was_idle = q.jobs.empty();
    q.jobs.push_back(std::move(j));
    if (was_idle) activate_next_locked(q, sig);
  }
  signal_all(sig);
  return completion(std::move(st));
}

void device::impl::activate_next_locked(queue_state& q, signal_list& sig) {
  while (!q.jobs.empty()) {
    job& j = *q.jobs.front();
    if (j.items == 0) {  // nothing to run: complete in queue order
      j.done->status = j.status;
      kernels_ok_.fetch_add(1, std::memory_order_relaxed);
      sig.push_back(j.done);
      q.jobs.pop_front();
      continue;
    }
    runnable_.push_back(&j);
    publish_work();
    return;
  }
}

void device::impl::drop_unclaimed_locked(job& j) {
  if (j.next == j.items) return;
  j.completed += j.items - j.next;
  j.next = j.items;
  auto it = std::find(runnable_.begin(), runnable_.end(), &j);
  if (it != runnable_.end()) {
    *it = runnable_.back();
    runnable_.pop_back();
  }
}

void device::impl::finalize_locked(job& j, signal_list& sig) {
  queue_state& q = *j.q;
  j.done->status = j.status;
  (j.status.ok() ? kernels_ok_ : kernels_failed_).fetch_add(1, std::memory_order_relaxed);
  sig.push_back(j.done);
  // Only the front job of a queue is ever runnable, so j is the front.
  q.jobs.pop_front();  // destroys j
  activate_next_locked(q, sig);
}

claim device::impl::claim_work(detail::engine&, bool& stop) {
  signal_list sig;
  claim c;
  {
    lock_guard g(sched_lock_);
    stop = stopping_;
    while (!stop && !runnable_.empty()) {
      if (rr_ >= runnable_.size()) rr_ = 0;
      job& j = *runnable_[rr_];
      if (j.aborted.load(std::memory_order_relaxed)) {
        drop_unclaimed_locked(j);
        if (j.completed == j.items) finalize_locked(j, sig);
        continue;
      }
      c = {&j, j.next, std::min(j.items, j.next + j.chunk)};
      j.next = c.end;
      if (j.next == j.items) {
        runnable_[rr_] = runnable_.back();
        runnable_.pop_back();
      } else {
        ++rr_;  // round-robin over kernels of different queues
      }
      break;
    }
  }
  signal_all(sig);
  return c;
}

void device::impl::complete_chunk(const claim& c) {
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    job& j = *c.j;
    j.completed += c.end - c.begin;
    if (j.aborted.load(std::memory_order_relaxed)) drop_unclaimed_locked(j);
    if (j.completed == j.items) finalize_locked(j, sig);
  }
  signal_all(sig);
}

void device::impl::fail_job(job& j, const kernel_status& s) {
  lock_guard g(sched_lock_);
  if (j.status.ok()) j.status = s;
  j.aborted.store(true, std::memory_order_relaxed);
}

std::size_t device::impl::replay(std::span<const fault_record> records) noexcept {
  std::size_t woken = 0;
  for (const fault_record& r : records) {
    if (r.engine >= engines_.size()) continue;
    detail::engine& e = *engines_[r.engine];
    std::uint32_t exp = word(r.token, f_pending);
    // release: pairs with the engine's acquire load; the PTEs the driver
    // wrote before the replay are visible to its retranslation.
    if (e.fault_word.compare_exchange_strong(exp, word(r.token, f_replay), std::memory_order_release,
                                             std::memory_order_relaxed)) {
      e.fault_word.notify_all();
      ++woken;
    }
  }
  return woken;
}

std::size_t device::impl::cancel(std::span<const fault_record> records, errc reason) noexcept {
  std::size_t n = 0;
  for (const fault_record& r : records) {
    if (r.engine >= engines_.size()) continue;
    detail::engine& e = *engines_[r.engine];
    std::uint32_t exp = word(r.token, f_pending);
    // Claim first, so that only the winner writes the reason.
    if (e.fault_word.compare_exchange_strong(exp, word(r.token, f_claimed), std::memory_order_relaxed)) {
      e.cancel_reason.store(static_cast<int>(reason), std::memory_order_relaxed);
      e.fault_word.store(word(r.token, f_cancel), std::memory_order_release);
      e.fault_word.notify_all();
      ++n;
    }
  }
  return n;
}

errc device::impl::invalidate_tlb(vm_id vm, va_range r) {
  if (detail::tl_engine) return errc::inval;  // would wait for its own access
  if (r.empty()) return errc::ok;
  std::uint64_t s;
  {
    lock_guard g(inval_lock_);
    s = ++inval_next_;
    inval_log_[s % inval_log_size] = {s, vm, {align_down(r.start, page_size), align_up(r.end, page_size)}};
    inval_seq_.store(s, std::memory_order_seq_cst);
  }
  // One check per engine: done once it acknowledged s, or is not running
  // (idle/stalled engines recheck before touching their TLB again).
  const auto done = [s](std::uint32_t w) { return (w & 3) != mode_running || ack_reached(w, s); };
  for (auto& e : engines_) {
    std::uint32_t w = e->status.load(std::memory_order_seq_cst);
    for (int i = 0; i < 256 && !done(w); ++i) {
      SVM_CPU_RELAX();
      w = e->status.load(std::memory_order_seq_cst);
    }
    if (done(w)) continue;
    inval_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (!done(w = e->status.load(std::memory_order_seq_cst))) e->status.wait(w, std::memory_order_seq_cst);
    inval_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
  invalidations_.fetch_add(1, std::memory_order_relaxed);
  return errc::ok;
}

void device::impl::set_oracle(access_validator v) {
  if (!v) {
    oracle_.store(nullptr, std::memory_order_release);
    return;
  }
  auto p = std::make_unique<access_validator>(std::move(v));
  const access_validator* raw = p.get();
  {
    lock_guard g(oracle_lock_);
    oracles_.push_back(std::move(p));
  }
  oracle_.store(raw, std::memory_order_release);
}

device_stats device::impl::stats() const {
  device_stats s;
  for (auto& e : engines_) {
    const auto hits = e->hits.load(std::memory_order_relaxed);
    s.tlb_hits += hits;
    s.accesses += hits + e->slow.load(std::memory_order_relaxed);
    s.tlb_misses += e->walks.load(std::memory_order_relaxed);
    s.faults += e->faults.load(std::memory_order_relaxed);
    s.replays += e->replays.load(std::memory_order_relaxed);
    s.cancels += e->cancels.load(std::memory_order_relaxed);
    s.tlb_acks += e->acks.load(std::memory_order_relaxed);
  }
  s.tlb_invalidations = invalidations_.load(std::memory_order_relaxed);
  s.kernels_completed = kernels_ok_.load(std::memory_order_relaxed);
  s.kernels_failed = kernels_failed_.load(std::memory_order_relaxed);
  s.fault_buffer_full_stalls = faults_.stats().full_stalls;
  return s;
}

// ---------------------------------------------------------------------------
// device: forwards to impl

device::device(device_config cfg) : impl_(std::make_unique<impl>(std::move(cfg))) {
  lock_guard g(impl_->anchor_->lock);
  impl_->anchor_->dev = this;
}
device::~device() = default;
errc device::cancel_queue(queue_id q, errc reason) { return impl_->cancel_queue(q, reason); }
errc device::cancel_vm(vm_id vm, errc reason) { return impl_->cancel_vm(vm, reason); }
std::string device::describe() const { return impl_->describe(); }
errc device::attach_vm(vm_id id, dev_page_table& t, phys_mem& m) { return impl_->attach_vm(id, t, m); }
errc device::detach_vm(vm_id id) { return impl_->detach_vm(id); }
result<queue_id> device::create_queue(vm_id vm) { return impl_->create_queue(vm); }
errc device::destroy_queue(queue_id q) { return impl_->destroy_queue(q); }
result<completion> device::submit(queue_id q, std::uint64_t items, kernel_fn fn) {
  return impl_->submit(q, items, std::move(fn));
}
fault_buffer& device::faults() noexcept { return impl_->faults_; }
std::size_t device::replay(std::span<const fault_record> r) noexcept { return impl_->replay(r); }
std::size_t device::cancel(std::span<const fault_record> r, errc reason) noexcept { return impl_->cancel(r, reason); }
errc device::invalidate_tlb(vm_id vm, va_range r) { return impl_->invalidate_tlb(vm, r); }
void device::set_oracle(access_validator v) { impl_->set_oracle(std::move(v)); }
vram_pool& device::vram() noexcept { return impl_->vram_; }
copy_engine& device::copier() noexcept { return impl_->copier_; }
unsigned device::engine_count() const noexcept { return static_cast<unsigned>(impl_->engines_.size()); }
device_stats device::stats() const { return impl_->stats(); }

}  // namespace svm::dev
