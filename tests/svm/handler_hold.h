// Deterministic batching for fault-path tests: hold the driver's only
// handler thread inside one VM's fault until a given number of waves have
// pushed a fault (the holder's own among them), so that the faults pushed
// meanwhile reach the handler together, in the next batch.
//
// Use: put device_hook() into the device_config before the driver is
// created, arm() the holder VM, submit the holder's kernel (one faulting
// access), wait_held(), then submit the kernels whose faults must share a
// batch. The hooks share the state by shared_ptr, so they stay valid for
// as long as the driver or the VM keeps them, whatever the order of
// destruction.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <utility>

#include "svm/svm/gpu_vm.h"

namespace svm::test {

class handler_hold {
 public:
  using device_hook_fn = std::function<void(const char* point, unsigned engine, unsigned wave)>;

  /// A dev::device_config::test_hook that counts the distinct waves that
  /// pushed a fault ("before_park") and then hands every point to `next`.
  [[nodiscard]] device_hook_fn device_hook(device_hook_fn next = {}) const {
    return [st = st_, next = std::move(next)](const char* point, unsigned engine, unsigned wave) {
      if (std::strcmp(point, "before_park") == 0) {
        std::lock_guard g(st->lock);
        st->parked.insert({engine, wave});
        st->cv.notify_all();
      }
      if (next) next(point, engine, wave);
    };
  }

  /// Install the hold on `holder`: its first fault, after the sequence
  /// snapshot, waits until `waves` distinct waves have pushed a fault.
  /// Replaces the holder's test hooks.
  void arm(gpu_vm& holder, std::size_t waves) const {
    gpu_vm::test_hooks h;
    h.after_snapshot = [st = st_, waves](va_range) {
      std::unique_lock g(st->lock);
      if (st->held) return;
      st->held = true;
      st->held_signal.set_value();
      st->cv.wait(g, [&] { return st->parked.size() >= waves; });
    };
    holder.set_test_hooks(std::move(h));
  }

  /// Wait until the holder's fault is being held.
  void wait_held() const { st_->held_future.wait(); }

 private:
  struct state {
    std::mutex lock;
    std::condition_variable cv;
    std::set<std::pair<unsigned, unsigned>> parked;  // (engine, wave) that pushed a fault
    bool held = false;
    std::promise<void> held_signal;
    std::shared_future<void> held_future = held_signal.get_future().share();
  };
  std::shared_ptr<state> st_ = std::make_shared<state>();
};

}  // namespace svm::test
