// A test watchdog that turns a hang into a failure naming the stuck threads.
//
// Usage: construct one at the start of a test with a deadline; each worker
// thread takes a `beat` from it, names itself and calls beat::progress(what)
// as it goes. If the deadline passes before the watchdog is destroyed, it
// prints every registered thread with its last state and how long ago it
// last made progress, then aborts the process (a gtest failure could not
// stop threads that are stuck inside the library).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace svm::test {

class watchdog {
 public:
  using clock = std::chrono::steady_clock;

  /// One registered thread's state.
  struct slot {
    std::string name;  // immutable after registration
    /// The last progress note: a string literal (static storage), so a
    /// racing reader always finds a valid pointer. Written by the owner
    /// (release), read by the watchdog (acquire).
    std::atomic<const char*> state{"started"};
    /// steady_clock ticks of the last progress (relaxed: a timestamp only).
    std::atomic<clock::rep> last{0};
    std::atomic<std::uint64_t> steps{0};  ///< progress calls (relaxed)
  };

  /// The handle a worker thread holds.
  class beat {
   public:
    explicit beat(slot& s) noexcept : s_(&s) {}
    /// Record progress; `what` must be a string literal.
    void progress(const char* what) noexcept {
      s_->state.store(what, std::memory_order_release);
      s_->last.store(clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      s_->steps.fetch_add(1, std::memory_order_relaxed);
    }

   private:
    slot* s_;
  };

  watchdog(std::string test, std::chrono::milliseconds limit) : test_(std::move(test)), limit_(limit) {
    thread_ = std::thread([this] { run(); });
  }
  ~watchdog() {
    {
      std::lock_guard g(lock_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  /// Register a thread. The slot lives as long as the watchdog (a deque
  /// never moves its elements). Locking: takes lock_ briefly.
  beat enroll(std::string name) {
    std::lock_guard g(lock_);
    slot& s = slots_.emplace_back();
    s.name = std::move(name);
    s.last.store(clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    return beat(s);
  }

 private:
  void run() {
    std::unique_lock g(lock_);
    if (cv_.wait_for(g, limit_, [this] { return done_; })) return;
    const auto now = clock::now().time_since_epoch().count();
    std::fprintf(stderr, "\nWATCHDOG: %s did not finish within %lld ms; threads:\n", test_.c_str(),
                 static_cast<long long>(limit_.count()));
    for (const slot& s : slots_) {
      const auto ago = std::chrono::duration_cast<std::chrono::milliseconds>(
          clock::duration(now - s.last.load(std::memory_order_relaxed)));
      std::fprintf(stderr, "  %-24s last state '%s', %llu steps, last progress %lld ms ago%s\n", s.name.c_str(),
                   s.state.load(std::memory_order_acquire), static_cast<unsigned long long>(s.steps.load()),
                   static_cast<long long>(ago.count()), ago > limit_ / 4 ? "  <-- stuck" : "");
    }
    std::fflush(stderr);
    std::abort();
  }

  const std::string test_;
  const std::chrono::milliseconds limit_;
  /// Guards slots_ (registration) and done_. The watchdog thread releases it
  /// while it sleeps (condition wait) and holds it while it prints. A leaf
  /// lock of the test, never held by a worker while it works.
  std::mutex lock_;
  std::condition_variable cv_;
  std::deque<slot> slots_;
  bool done_ = false;
  std::thread thread_;  // started last
};

}  // namespace svm::test
