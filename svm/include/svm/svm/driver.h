// The driver side of a device: the simulated hardware (svm::dev::device)
// plus the fault handler threads that fetch its replayable fault buffer and
// service each record in the gpu_vm whose id it carries.
//
// ## Registry protocol
// The driver keeps the live VMs by id. A handler thread holds the registry
// lock shared while it services one batch; a gpu_vm registers and
// unregisters under it exclusive, so once unregistration returns no handler
// thread is inside that VM. Records of an id no VM holds are cancelled
// (EFAULT) and counted in handler_stats::unknown_vm.
//
// ## Lifetime
// A driver outlives every gpu_vm created on it: its destructor stops the
// handler threads, then the hardware, and refuses loudly (naming the VM id
// still registered) if a VM is left.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"
#include "svm/device_sim/device.h"
#include "svm/svm/vram.h"

namespace svm {

class gpu_vm;
class svm_pagemap;

/// The fault handler's own counters (driver::stats()).
struct handler_stats {
  std::uint64_t batches = 0;     ///< batches fetched from the fault buffer and serviced
  std::uint64_t records = 0;     ///< fault records in those batches
  std::uint64_t coalesced = 0;   ///< records merged into another of the same page
  std::uint64_t unknown_vm = 0;  ///< records cancelled because no VM had their id
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
  /// One finished span: `name` (static storage), start and duration in the
  /// time base of trace_now_ns(), and a span-specific argument (pages,
  /// records).
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

/// Configuration of a driver.
struct driver_config {
  dev::device_config hw{};  ///< hw.wait_spin_ns is overridden by wait_spin_ns below
  unsigned handler_threads = 1;  ///< fault handler threads (>= 1)
  std::size_t batch = 256;  ///< records fetched per batch (1..256)
  /// Live VMs at most (VM ids 1..max_vms); 0: the device's whole id space
  /// (dev::max_vm_id). The next gpu_vm::create() past it is ENOSPC.
  dev::vm_id max_vms = 0;
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
///
/// Made only by create(): the constructor takes a passkey that nobody else
/// can make, so no configuration reaches it unvalidated and a bad one is an
/// error value, never an abort.
class driver {
  /// The passkey of the constructor: private, so only create() makes one.
  struct key {
    explicit key() = default;
  };

 public:
  /// Start the handler threads over `hw`, the hardware create() started.
  /// Callable only by create() (the key is private), which has validated
  /// `c` and created `hw` first; use create().
  driver(key, driver_config c, std::unique_ptr<dev::device> hw, std::unique_ptr<vram_manager> vram);
  /// Check a configuration: EINVAL for batch outside 1..256, no handler
  /// thread, or a hardware configuration hw.validate() refuses.
  [[nodiscard]] static errc validate(const driver_config& c) noexcept;
  /// The only way to make a driver: the error of validate() (EINVAL), or
  /// the device's (dev::device::create), or the started driver. Never
  /// aborts on its input.
  [[nodiscard]] static result<std::unique_ptr<driver>> create(driver_config c = {});
  /// Stops the handler threads, then the hardware. Every gpu_vm must be
  /// destroyed first: a VM still registered is reported by id on stderr and
  /// the process aborts (it would otherwise be left pointing at a dead
  /// driver).
  ~driver();
  driver(const driver&) = delete;
  driver& operator=(const driver&) = delete;

  /// The hardware: engines, queues, fault buffer, TLBs. Its VRAM frames are
  /// vram()'s pool (dev::device::vram_memory()).
  [[nodiscard]] dev::device& hw() noexcept { return *hw_; }
  /// The device's VRAM: one frame pool and one eviction policy for the BOs
  /// of every VM and the migrated SVM chunks (svm/svm/vram.h).
  [[nodiscard]] vram_manager& vram() noexcept { return *vram_; }
  /// Submit `items` work items of `fn` on the VM's queue (see
  /// dev::device::submit).
  [[nodiscard]] result<dev::completion> submit(gpu_vm& vm, std::uint64_t items, dev::kernel_fn fn);
  /// A snapshot of the handler counters.
  [[nodiscard]] handler_stats stats() const noexcept;
  /// Install a trace sink (nullptr: off). Set before concurrent use; it must
  /// outlive its installation.
  void set_trace(trace_sink* t) noexcept { trace_.store(t, std::memory_order_release); }
  /// The installed trace sink, or null.
  [[nodiscard]] trace_sink* trace() const noexcept { return trace_.load(std::memory_order_acquire); }

  /// The key that only gpu_vm can make: the registry below is its interface
  /// to the driver and nobody else's.
  class vm_key {
    friend class gpu_vm;
    vm_key() = default;
  };
  /// Register `vm` under a fresh id (gpu_vm's construction). ENOSPC when
  /// every id of the device is in use. Locking: takes the registry lock
  /// exclusive.
  [[nodiscard]] result<dev::vm_id> register_vm(vm_key, gpu_vm* vm) SVM_EXCLUDES(reg_lock_);
  /// Drop `id` from the registry; once it returns no handler thread is
  /// inside that VM. Locking: takes the registry lock exclusive.
  void unregister_vm(vm_key, dev::vm_id id) SVM_EXCLUDES(reg_lock_);
  /// The pgmap ops of the VRAM pool that each VM attaches to its mm
  /// (docs/migration.md); gpu_vm's only. Immutable.
  [[nodiscard]] const std::shared_ptr<svm_pagemap>& pagemap(vm_key) const noexcept { return pagemap_; }

 private:
  /// The trace sink; release store in set_trace pairs with the acquire load
  /// in trace().
  std::atomic<trace_sink*> trace_{nullptr};
  static constexpr lock_class reg_class{"svm.driver.registry", lockdep::rank::driver};

  void handler_loop(std::stop_token st);
  void gc_all() SVM_REQUIRES_SHARED(reg_lock_);
  void process(std::span<dev::fault_record> recs) SVM_REQUIRES_SHARED(reg_lock_);

  driver_config cfg_;  // immutable
  std::unique_ptr<vram_manager> vram_;  // immutable; outlives hw_ (declared first)
  /// The VRAM pool's pgmap ops, shared with the mms that attached the
  /// pool (they keep it alive past the driver; it never uses the driver).
  std::shared_ptr<svm_pagemap> pagemap_;  // immutable
  std::unique_ptr<dev::device> hw_;  // immutable after construction
  /// The registry lock (see the file comment): handler threads hold it
  /// shared across a batch; register/unregister take it exclusive.
  mutable shared_mutex reg_lock_{reg_class};
  std::unordered_map<dev::vm_id, gpu_vm*> vms_ SVM_GUARDED_BY(reg_lock_);
  dev::vm_id next_id_ SVM_GUARDED_BY(reg_lock_) = 1;
  // Counters; relaxed, statistics only, written by the handler threads.
  std::atomic<std::uint64_t> batches_{0}, records_{0}, coalesced_{0}, unknown_{0}, busy_ns_{0};
  std::vector<std::jthread> handlers_;  // started last, joined first
};

}  // namespace svm
