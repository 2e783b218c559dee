#include "svm/device_sim/fault_buffer.h"

#include <algorithm>
#include <thread>

#include "futex.h"

namespace svm::dev {
namespace {
constexpr int spin_iterations = 64;  // a few microseconds at most (see device_config::fault_spin)
}

fault_buffer::fault_buffer(std::size_t capacity, std::uint32_t spin_ns)
    : capacity_(std::max<std::size_t>(capacity, 1)), spin_ns_(spin_ns) {
  lock_guard g(lock_);
  ring_.resize(capacity_);
}

bool fault_buffer::push(const fault_record& r) {
  bool stalled = false;
  for (;;) {
    // Read the futex word before checking for space: a fetch that frees a
    // slot after our check bumps it, so the wait below cannot miss it.
    const std::uint32_t seen = popped_.load(std::memory_order_seq_cst);
    if (closed_.load(std::memory_order_seq_cst)) return false;
    bool pushed = false;
    {
      lock_guard g(lock_);
      if (count_ < capacity_) {
        const std::size_t slot = head_ + count_;
        ring_[slot >= capacity_ ? slot - capacity_ : slot] = r;
        ++count_;
        ++stats_.pushed;
        if (stalled) ++stats_.full_stalls;
        stats_.high_water = std::max(stats_.high_water, count_);
        count_hint_.store(count_, std::memory_order_relaxed);
        pushed = true;
      }
    }
    if (pushed) {
      pushed_.fetch_add(1, std::memory_order_seq_cst);
      if (fetch_sleepers_.load(std::memory_order_seq_cst) != 0) detail::futex_wake_all(pushed_);
      return true;
    }
    // Full: nothing is dropped; stall until a fetch frees a slot.
    stalled = true;
    for (int i = 0; i < spin_iterations && popped_.load(std::memory_order_relaxed) == seen; ++i) SVM_CPU_RELAX();
    if (popped_.load(std::memory_order_seq_cst) != seen) continue;
    push_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    popped_.wait(seen, std::memory_order_seq_cst);
    push_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

push_result fault_buffer::try_push(const fault_record& r) {
  if (closed_.load(std::memory_order_seq_cst)) return push_result::closed;
  {
    lock_guard g(lock_);
    if (count_ == capacity_) {
      space_wanted_ = true;
      ++stats_.full_stalls;
      return push_result::full;
    }
    const std::size_t slot = head_ + count_;  // < 2 * capacity_: wrap by one subtraction
    ring_[slot >= capacity_ ? slot - capacity_ : slot] = r;
    ++count_;
    ++stats_.pushed;
    stats_.high_water = std::max(stats_.high_water, count_);
    count_hint_.store(count_, std::memory_order_relaxed);
  }
  pushed_.fetch_add(1, std::memory_order_seq_cst);
  if (fetch_sleepers_.load(std::memory_order_seq_cst) != 0) detail::futex_wake_all(pushed_);
  return push_result::pushed;
}

std::size_t fault_buffer::fetch(std::span<fault_record> out) {
  std::size_t n = 0;
  bool space = false;
  {
    lock_guard g(lock_);
    n = std::min(out.size(), count_);
    const std::size_t first = std::min(n, capacity_ - head_);  // up to the ring's end, then from 0
    std::copy_n(ring_.begin() + static_cast<std::ptrdiff_t>(head_), first, out.begin());
    std::copy_n(ring_.begin(), n - first, out.begin() + static_cast<std::ptrdiff_t>(first));
    head_ = head_ + n >= capacity_ ? head_ + n - capacity_ : head_ + n;
    count_ -= n;
    stats_.fetched += n;
    count_hint_.store(count_, std::memory_order_relaxed);
    if (n != 0 && space_wanted_) {
      space_wanted_ = false;
      space = true;
    }
  }
  if (space && space_fn_) space_fn_(space_ctx_);
  if (n != 0) {
    popped_.fetch_add(1, std::memory_order_seq_cst);
    if (push_sleepers_.load(std::memory_order_seq_cst) != 0) popped_.notify_all();
  }
  return n;
}

std::size_t fault_buffer::fetch_wait(std::span<fault_record> out, std::chrono::nanoseconds timeout) {
  if (out.empty()) return 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const std::uint32_t wakes = wakes_.load(std::memory_order_seq_cst);
  for (;;) {
    // Read the futex word before looking: a push after the look bumps it.
    const std::uint32_t seen = pushed_.load(std::memory_order_seq_cst);
    if (std::size_t n = fetch(out)) return n;
    if (closed_.load(std::memory_order_seq_cst) || wakes_.load(std::memory_order_seq_cst) != wakes) return 0;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return 0;
    for (int i = 0; i < spin_iterations && pushed_.load(std::memory_order_relaxed) == seen; ++i) SVM_CPU_RELAX();
    if (pushed_.load(std::memory_order_seq_cst) != seen) continue;
    // Timed spin: a push soon after costs the pusher no futex wake.
    if (spin_ns_ != 0) {
      const auto spin_end = std::min(deadline, now + std::chrono::nanoseconds(spin_ns_));
      for (unsigned i = 1; pushed_.load(std::memory_order_relaxed) == seen; ++i) {
        SVM_CPU_RELAX();
        if (i % 32 == 0 && std::chrono::steady_clock::now() >= spin_end) break;
      }
      if (pushed_.load(std::memory_order_seq_cst) != seen) continue;
    }
    fetch_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    detail::futex_wait_for(pushed_, seen, deadline - now);
    fetch_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void fault_buffer::wake_fetchers() noexcept {
  wakes_.fetch_add(1, std::memory_order_seq_cst);
  pushed_.fetch_add(1, std::memory_order_seq_cst);
  detail::futex_wake_all(pushed_);
}

void fault_buffer::close() noexcept {
  closed_.store(true, std::memory_order_seq_cst);
  wake_fetchers();
  popped_.fetch_add(1, std::memory_order_seq_cst);
  popped_.notify_all();
  if (space_fn_) space_fn_(space_ctx_);
}

fault_buffer_stats fault_buffer::stats() const {
  lock_guard g(lock_);
  return stats_;
}

}  // namespace svm::dev
