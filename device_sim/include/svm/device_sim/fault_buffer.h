// The replayable fault buffer: a bounded multi-producer ring of fault
// records, written by the engines, drained by the driver.
//
// Producers (the engines' waves) push one record per faulting access and
// then park until the driver replays or cancels it (device::replay /
// device::cancel). When the ring is full the wave parks too (try_push
// says full; the buffer calls its space callback after the next fetch that
// frees a slot), until the driver fetches: nothing is ever dropped. The
// driver fetches batches with fetch() or fetch_wait().
//
// Waiting is spin-then-futex on std::atomic counters (never a condition
// variable): `pushed_` for fetchers waiting for records, `popped_` for
// producers waiting for space.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"
#include "svm/device_sim/tlb.h"

namespace svm::dev {

/// One device fault, as the hardware reports it.
struct fault_record {
  vm_id vm = 0;                    ///< the GPU VM of the faulting access (whose page table needs fixing)
  va_t gva = 0;                    ///< the faulting address (not page aligned)
  access acc = access::read;       ///< what the access needed
  std::uint32_t engine = 0;        ///< the engine whose wave stalls on it
  std::uint64_t time_ns = 0;       ///< steady_clock time of the fault
  /// The engine's fault serial: replay/cancel of a record whose token is no
  /// longer the engine's outstanding fault is ignored (a stale duplicate).
  std::uint64_t token = 0;
  std::uint32_t wave = 0;          ///< the wave (of that engine) parked on it
  /// How often this same access already faulted, was replayed and still
  /// found no usable translation (0: its first fault). The driver maps a
  /// retried access where its memory lies instead of migrating it again,
  /// so that one fault cannot undo another's forever (docs/migration.md).
  std::uint32_t retries = 0;

  /// The faulting address rounded down to its 4K page.
  [[nodiscard]] va_t page() const noexcept { return align_down(gva, page_size); }
};

/// Counters of a fault_buffer since construction.
struct fault_buffer_stats {
  std::uint64_t pushed = 0;        ///< records written
  std::uint64_t fetched = 0;       ///< records handed to the driver
  std::uint64_t full_stalls = 0;   ///< pushes that found the ring full and waited
  std::size_t high_water = 0;      ///< most records held at once
};

/// What try_push() did.
enum class push_result : std::uint8_t {
  pushed,  ///< appended
  full,    ///< not appended: the ring is full (the space callback follows a fetch)
  closed,  ///< not appended: close() was called
};

/// Bounded multi-producer ring of fault records: engines push, the driver
/// fetches; full pushes wait rather than drop (see the file comment).
class fault_buffer {
 public:
  /// A ring of `capacity` records (>= 1; 0 is taken as 1). fetch_wait()
  /// spins a few pauses, then keeps spinning for up to `spin_ns` (see
  /// device_config::wait_spin_ns), then sleeps on the futex.
  explicit fault_buffer(std::size_t capacity, std::uint32_t spin_ns = 0);
  fault_buffer(const fault_buffer&) = delete;
  fault_buffer& operator=(const fault_buffer&) = delete;

  /// Producer side (engines). Append `r`, stalling while the ring is full.
  /// Returns false, without appending, once close() was called.
  /// Locking: takes lock_ (leaf) briefly; holds none on return. May block
  /// (spin, then futex) while full. Must not be called by the consumer.
  bool push(const fault_record& r) SVM_EXCLUDES(lock_);

  /// Producer side, never blocking: append `r` if there is room. On full,
  /// the next fetch() that removes records (or close()) calls the space
  /// callback once. Locking: takes lock_ (leaf) briefly.
  push_result try_push(const fault_record& r) SVM_EXCLUDES(lock_);

  /// The space callback: `fn(ctx)` runs on the fetching thread, after it
  /// released lock_, once per fetch that freed slots after a try_push()
  /// found the ring full, and at close(). Set once before any push
  /// (device construction); `fn` must not block.
  void set_space_callback(void (*fn)(void*) noexcept, void* ctx) noexcept {
    space_fn_ = fn;
    space_ctx_ = ctx;
  }

  /// Driver side: move up to out.size() records, oldest first, into `out`.
  /// Never blocks. Returns how many. Locking: takes lock_ (leaf).
  std::size_t fetch(std::span<fault_record> out) SVM_EXCLUDES(lock_);

  /// Like fetch(), but waits up to `timeout` for at least one record
  /// (spin, then futex). Returns 0 on timeout, after close(), or when woken by
  /// wake_fetchers(). Locking: takes lock_ (leaf); may block; must not be
  /// called inside a notifier callback.
  std::size_t fetch_wait(std::span<fault_record> out, std::chrono::nanoseconds timeout) SVM_EXCLUDES(lock_);

  /// Make fetchers blocked in fetch_wait() return now (e.g. to stop a
  /// handler thread). Never blocks.
  void wake_fetchers() noexcept;

  /// Refuse further pushes and wake every waiter (device shutdown).
  void close() noexcept;

  /// Maximum records the ring holds (at least 1); fixed at construction.
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  /// Nanoseconds fetch_wait() keeps spinning before it sleeps; fixed at construction.
  [[nodiscard]] std::uint32_t spin_ns() const noexcept { return spin_ns_; }
  /// Records held now (racy snapshot).
  [[nodiscard]] std::size_t size() const noexcept { return count_hint_.load(std::memory_order_relaxed); }
  /// A consistent copy of the counters. Locking: takes lock_ (leaf).
  [[nodiscard]] fault_buffer_stats stats() const SVM_EXCLUDES(lock_);

 private:
  static constexpr lock_class lock_class_{"device.fault_buffer", lockdep::rank::leaf};

  const std::size_t capacity_;  // immutable
  const std::uint32_t spin_ns_;  // immutable
  // Cache-line layout: the immutable fields; then lock_ and what it guards
  // (written by every push and fetch); then the futex words a waiting
  // fetcher spins on, so that its spinning does not steal the lock's line
  // from a pushing engine, and a push costs the spinner one line transfer.
  alignas(64) mutable mutex lock_{lock_class_};
  std::vector<fault_record> ring_ SVM_GUARDED_BY(lock_);  // size fixed at construction
  std::size_t head_ SVM_GUARDED_BY(lock_) = 0;            // oldest record
  std::size_t count_ SVM_GUARDED_BY(lock_) = 0;
  fault_buffer_stats stats_ SVM_GUARDED_BY(lock_);
  /// Mirrors count_ for size(); relaxed, statistics only.
  std::atomic<std::size_t> count_hint_{0};
  /// Futex words. pushed_ (raw futex, bounded waits: wake with
  /// futex_wake_all) is bumped (seq_cst) after every push and by
  /// wake_fetchers()/close(); fetch_wait() sleeps on it. popped_ is bumped
  /// (seq_cst) after every fetch that removed records and by close(); a
  /// producer facing a full ring sleeps on it. Each is read before the
  /// ring is checked under lock_, so a change after that check is never missed.
  alignas(64) std::atomic<std::uint32_t> pushed_{0};
  std::atomic<std::uint32_t> popped_{0};
  /// Sleepers on pushed_ / popped_: the bumping side calls notify_all only
  /// when nonzero. seq_cst on both sides (Dekker pair with the bump).
  std::atomic<std::uint32_t> fetch_sleepers_{0};
  std::atomic<std::uint32_t> push_sleepers_{0};
  /// Bumped (seq_cst) by wake_fetchers()/close(); a fetch_wait() that sees
  /// it change since its start returns 0.
  std::atomic<std::uint32_t> wakes_{0};
  /// Set once by close(); seq_cst, checked by push() before each attempt.
  std::atomic<bool> closed_{false};
  /// A try_push() found the ring full since the last space callback: set
  /// and cleared under lock_, so a fetch after the failed push sees it.
  bool space_wanted_ SVM_GUARDED_BY(lock_) = false;
  void (*space_fn_)(void*) noexcept = nullptr;  // immutable after set_space_callback
  void* space_ctx_ = nullptr;                   // immutable after set_space_callback
};

}  // namespace svm::dev
