// The copy engine: asynchronous frame copies between system memory and
// VRAM (or within either), on the device's own thread, completed by fences.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <utility>
#include <vector>
#include <thread>

#include "svm/base/errc.h"
#include "svm/base/fence.h"
#include "svm/base/mutex.h"
#include "svm/base/phys_mem.h"

namespace svm::dev {

/// One side of a copy: `pages` frames starting at `pfn` of `mem`.
struct frame_span {
  phys_mem* mem = nullptr;  ///< the memory pool the frames belong to (system or VRAM); null is invalid
  pfn_t pfn = 0;            ///< first frame of the span, a frame number within `mem`
};

/// Counters of a copy_engine since construction (a racy snapshot).
struct copy_engine_stats {
  std::uint64_t copies = 0;      ///< requests completed
  std::uint64_t pages = 0;       ///< frames copied or filled
  std::uint64_t canceled = 0;    ///< requests dropped at shutdown
};

/// Runs queued frame copies and fills on its own thread, one at a time in
/// submission order, signalling a fence as each completes.
class copy_engine {
 public:
  /// Starts the copy thread with an empty queue.
  copy_engine();
  /// Stops the thread; requests not yet run are signalled with ECANCELED.
  ~copy_engine();
  copy_engine(const copy_engine&) = delete;
  copy_engine& operator=(const copy_engine&) = delete;

  /// Queue a copy of `pages` frames from `src` to `dst`. Requests run in
  /// submission order, one at a time; the returned fence signals (ok) once
  /// every byte is written. The bytes move as 8-byte relaxed atomic units,
  /// so a racing device access is defined but may see a mix (the caller
  /// copies only frames no device translates to, see phys_mem.h).
  /// Errors: EINVAL (null memory, zero pages, a pfn range outside its pool),
  /// ECANCELED after shutdown began. Nothing is queued on error.
  /// Locking: takes lock_ (leaf); never blocks; may run in a notifier callback.
  [[nodiscard]] result<fence_ptr> copy(frame_span src, frame_span dst, std::size_t pages) SVM_EXCLUDES(lock_);

  /// Queue one scattered copy: frame src[i] to frame dst[i] for every i
  /// (a migration's pages are rarely contiguous on both sides), as one
  /// request with one fence. Same contract as copy(); EINVAL also for
  /// spans of different lengths or an empty list.
  [[nodiscard]] result<fence_ptr> copy_list(std::span<const frame_span> src, std::span<const frame_span> dst)
      SVM_EXCLUDES(lock_);

  /// Queue a fill of `pages` frames at `dst` with the 8-byte `pattern`
  /// (0 clears). Same contract as copy().
  [[nodiscard]] result<fence_ptr> fill(frame_span dst, std::size_t pages, std::uint64_t pattern = 0) SVM_EXCLUDES(lock_);

  /// Counters so far; each is read relaxed, so the set may be mutually inconsistent.
  [[nodiscard]] copy_engine_stats stats() const noexcept;

 private:
  struct request {
    frame_span src;  // src.mem == nullptr: a fill
    frame_span dst;
    std::size_t pages;
    std::uint64_t pattern;
    fence_ptr done;
    /// A scattered copy (copy_list): pairs of single frames; src/dst above
    /// are unused then.
    std::vector<std::pair<frame_span, frame_span>> list = {};
  };
  static constexpr lock_class lock_class_{"device.copy_engine", lockdep::rank::leaf};

  result<fence_ptr> enqueue(request r) SVM_EXCLUDES(lock_);
  void run(std::stop_token st) SVM_EXCLUDES(lock_);
  static void execute(const request& r) noexcept;

  mutable mutex lock_{lock_class_};
  std::deque<request> queue_ SVM_GUARDED_BY(lock_);
  bool stopping_ SVM_GUARDED_BY(lock_) = false;
  /// Futex word: bumped (seq_cst) after every enqueue and at stop; the
  /// thread sleeps on it when the queue is empty (read before the queue
  /// check, so an enqueue after the check changes it).
  std::atomic<std::uint32_t> work_seq_{0};
  // Statistics: written by the copy thread only, read racily (relaxed).
  std::atomic<std::uint64_t> copies_{0}, pages_{0}, canceled_{0};
  std::jthread thread_;  // last: started after every other member exists
};

}  // namespace svm::dev
