// Fences: one-shot completion events with an optional error, callbacks and
// bounded waits (docs/contracts.md §5), plus the debug-build checker for
// signalling critical sections.
//
// A fence is published (handed to a waiter, stored in a reservation object)
// and later signalled exactly once. The code between publication and signal
// is a *signalling critical section*: it must not wait on a fence that could
// depend on this one, take a reservation lock, or allocate memory in a way
// that could wait for reclaim, since any of those can deadlock the signal.
// Debug builds (SVM_LOCK_CHECKS) track the sections a thread is in and report
// a violation with both sites: where the section began and where it was
// broken.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/lock_order.h"
#include "svm/base/mutex.h"

namespace svm {

class fence;
/// Fences are shared: the signaller, the waiters and reservation objects hold them.
using fence_ptr = std::shared_ptr<fence>;

/// A one-shot completion signal with an optional error (kernel: dma_fence):
/// it signals once, runs its callbacks once, and its waits can time out.
class fence {
 public:
  /// Run once when the fence signals, on the signalling thread.
  using callback = std::function<void(const fence&)>;

  /// A new, unsignalled fence. `name` is for diagnostics (static storage).
  static fence_ptr create(const char* name = "fence");
  /// A fence that is already signalled (with `err`).
  static fence_ptr signaled_fence(errc err = errc::ok, const char* name = "fence");

  /// An unsignalled fence named `name` (static storage); prefer create().
  explicit fence(const char* name) : name_(name) {}
  fence(const fence&) = delete;
  fence& operator=(const fence&) = delete;

  /// Signal once with `err` (errc::ok for success). Runs the callbacks on
  /// this thread, outside any fence lock, then wakes waiters. Returns false
  /// (and does nothing) if it was already signalled.
  /// Locking: takes cb_lock_ (leaf) briefly; callers may hold anything the
  /// callbacks tolerate. Never blocks.
  bool signal(errc err = errc::ok);

  /// True once signalled. Acquire: pairs with the release store in signal(),
  /// so the error and everything the signaller wrote before are visible.
  [[nodiscard]] bool is_signaled() const noexcept { return state_.load(std::memory_order_acquire) != 0; }
  /// The error it was signalled with (errc::ok if none, or not yet signalled).
  [[nodiscard]] errc error() const noexcept;

  /// Register `cb` to run once at signal. Returns false, without
  /// registering, if the fence is already signalled (the kernel's -ENOENT).
  /// Locking: takes cb_lock_ (leaf).
  bool add_callback(callback cb);

  /// Wait for the signal, at most `timeout`. Returns errc::ok once
  /// signalled (read error() for the fence's own error) or errc::timedout.
  /// Spins briefly, then sleeps; a waiter per fence, never per fault.
  /// Locking: must not be called inside a signalling critical section
  /// (checked in debug builds); may block.
  errc wait(std::chrono::nanoseconds timeout = std::chrono::hours(24),
            lockdep::site s = {__builtin_FILE(), __builtin_LINE()}) const;

  /// The name given at creation (diagnostics).
  [[nodiscard]] const char* name() const noexcept { return name_; }

 private:
  const char* name_;  // immutable
  /// 0 pending, 1 signalled. Release store in signal(); acquire loads by
  /// is_signaled()/wait(); waiters sleep on it with atomic wait.
  std::atomic<std::uint32_t> state_{0};
  /// Written once in signal() before the release store of state_.
  std::atomic<int> err_{0};
  mutable mutex cb_lock_{cb_lock_class};
  std::vector<callback> callbacks_ SVM_GUARDED_BY(cb_lock_);
  bool signalling_ SVM_GUARDED_BY(cb_lock_) = false;

  static constexpr lock_class cb_lock_class{"fence.cb", lockdep::rank::leaf};
};

/// Signalling critical sections (docs/contracts.md §5).
namespace fence_sig {

/// RAII marker for a signalling critical section: from the publication of a
/// fence to its signal. Nestable.
class section {
 public:
  /// Enter a section described by `what` (static storage), opened at `s`.
  explicit section(const char* what, lockdep::site s = {__builtin_FILE(), __builtin_LINE()});
  ~section();
  section(const section&) = delete;
  section& operator=(const section&) = delete;
};

/// What a violation report carries: the section and the offending call.
struct violation {
  const char* section_what;    ///< the innermost open section's description
  lockdep::site section_site;  ///< where that section was opened
  const char* op;  ///< "fence wait", "reservation lock", "allocation"
  lockdep::site op_site;       ///< where the offending call was made
  /// Both call sites and the operation, in one line.
  std::string describe() const;
};
/// Called with each violation instead of the default print-and-abort.
using violation_handler = void (*)(const violation&);
/// Install a handler (tests); nullptr restores print-and-abort.
violation_handler set_violation_handler(violation_handler h) noexcept;

/// Called by operations forbidden inside a section: fence waits, reservation
/// locks, allocations that may wait for reclaim. Reports if the calling
/// thread is inside a section. No-op unless SVM_LOCK_CHECKS.
void check_forbidden(const char* op, lockdep::site s);
/// True if the calling thread is inside a signalling section.
bool in_section() noexcept;

}  // namespace fence_sig
}  // namespace svm
