// Chrome trace-event output (--trace FILE): a trace_sink that keeps spans in
// per-thread buffers and writes them as {"traceEvents": [...]} JSON, which
// loads in Perfetto and chrome://tracing. One track per thread, one per
// device engine (its fault stalls), and a flow arrow from each fault's raise
// on its engine to the handler batch that replayed or cancelled it.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "svm/svm/gpu_vm.h"

namespace svm::storm {

/// The sink. span() may be called from any thread at any time (handler
/// threads, notifier callbacks, the storm's own threads); it takes a lock
/// only the first time a thread records. write() must run when no thread is
/// recording (between runs, or at the end).
class chrome_trace final : public trace_sink {
 public:
  /// Keep at most `max_events` spans (the rest are counted as dropped).
  explicit chrome_trace(std::size_t max_events = std::size_t{1} << 20);
  ~chrome_trace() override;

  /// Record a span. `name` must stay valid until write() (the library passes
  /// string literals; use intern() for others). Locking: the registry mutex
  /// on a thread's first span only; never blocks otherwise.
  void span(const char* name, std::uint64_t start_ns, std::uint64_t dur_ns, std::uint64_t arg) noexcept override;
  /// Record a finished fault (an engine track span, raise to done, and a
  /// flow to the handler's batch). Same locking and cap as span().
  void fault(std::uint32_t engine, va_t gva, std::uint64_t raise_ns, std::uint64_t done_ns) noexcept override;
  /// Name the calling thread's track.
  void name_thread(const std::string& name);
  /// A stable copy of `s` for span names. Locking: the registry mutex.
  [[nodiscard]] const char* intern(const std::string& s);
  /// Write the trace; returns false (with `err`) if the file cannot be written.
  bool write(const std::string& path, std::string& err) const;
  [[nodiscard]] std::uint64_t dropped() const noexcept { return dropped_.load(std::memory_order_relaxed); }

 private:
  struct event {
    const char* name;
    std::uint64_t start_ns, dur_ns, arg;
  };
  struct fault_event {
    std::uint32_t engine;
    va_t gva;
    std::uint64_t raise_ns, done_ns;
  };
  struct thread_buf {
    unsigned tid = 0;
    std::string name;  // guarded by mu_
    std::vector<event> events;  // appended by its own thread only
    std::vector<fault_event> faults;  // appended by its own thread only
  };
  thread_buf* mine();
  template <class Emit>
  void write_engine_tracks(Emit& emit) const;  // requires mu_ held

  const std::size_t max_events_;
  const std::uint64_t id_;   // tells this sink's thread-local slots from an earlier sink's
  const std::uint64_t t0_;   // trace_now_ns() at construction: ts 0
  mutable std::mutex mu_;    // guards bufs_ (membership) and names_
  std::vector<std::unique_ptr<thread_buf>> bufs_;
  std::deque<std::string> names_;
  std::atomic<std::uint64_t> recorded_{0}, dropped_{0};  // relaxed: a cap and a count
};

/// A span recorded from the storm's own code (no-op when `t` is null).
class trace_scope {
 public:
  trace_scope(trace_sink* t, const char* name, std::uint64_t arg = 0) noexcept
      : t_(t), name_(name), arg_(arg), start_(t ? trace_now_ns() : 0) {}
  ~trace_scope() {
    if (t_) t_->span(name_, start_, trace_now_ns() - start_, arg_);
  }
  trace_scope(const trace_scope&) = delete;
  trace_scope& operator=(const trace_scope&) = delete;

 private:
  trace_sink* t_;
  const char* name_;
  std::uint64_t arg_;
  std::uint64_t start_;
};

}  // namespace svm::storm
