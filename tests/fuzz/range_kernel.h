// Range kernels for the fuzzers (op_runner.cpp, conc_runner.cpp): a list of
// device accesses, each on its own page, spread over several work items, run
// on a VM and recorded per access, so that a checker can compare every
// completed access with a model whatever order the engines ran them in.
//
// Protocol of one run (run_range_kernel):
//  - item w runs the accesses j == w (mod items) in order and, after each,
//    stores the value it got into vals[j] and the count it completed into
//    done[w]; both are plain fields owned by that item's engine thread until
//    the kernel completes; completion::wait() returns with acquire after
//    every item, so the caller reads them after wait() without a race;
//  - with a sync (kernel_sync), an item that reaches the middle of its list
//    sets `started` (release) and spins on `go` (acquire), calling
//    work_item::boundary() in the loop so that TLB shootdowns do not wait
//    for it. The caller waits for `started` (or completion), sets `go`, then
//    does what must run beside the kernel's second half.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>
#include <vector>

#include "fuzz/ref_model.h"
#include "svm/svm/gpu_vm.h"

namespace svm::fuzz {

/// One access of a range kernel.
struct range_access {
  va_t va = 0;
  unsigned size = 8;
  dev_op op = dev_op::load;
  bool prefetch = false;  ///< a prefetch (size and op unused); its value: 1 if mapped afterwards
  std::uint64_t v = 0, desired = 0;
  [[nodiscard]] bool writes() const noexcept { return !prefetch && op != dev_op::load; }
};

/// What a range kernel did.
struct range_outcome {
  dev::kernel_status st{};
  std::vector<std::uint64_t> vals;  ///< per access (valid where completed)
  std::vector<std::size_t> done;    ///< per item: accesses completed, in its order
  unsigned items = 1;
  /// Whether access j completed.
  [[nodiscard]] bool completed(std::size_t j) const noexcept { return j / items < done[j % items]; }
  /// The access item w was at when it stopped (or the list's size if it finished).
  [[nodiscard]] std::size_t next_of(unsigned w) const noexcept { return w + done[w] * items; }
};

/// The midpoint handshake (see the protocol above).
struct kernel_sync {
  std::atomic<bool> started{false};  ///< release by an item at its midpoint; acquire by the caller
  std::atomic<bool> go{false};       ///< release by the caller; acquire by the items
};

/// One access on a work item; returns its value (the old value for atomics,
/// 0 for stores, 0/1 for a prefetch). Throws (kernel_abort) on failure.
inline std::uint64_t do_access(dev::work_item& wi, const range_access& a) {
  if (a.prefetch) return wi.prefetch(a.va) ? 1 : 0;
  switch (a.op) {
    case dev_op::load: return wi.load_bytes(a.va, a.size);
    case dev_op::store: wi.store_bytes(a.va, a.size, a.v); return 0;
    default: break;
  }
  auto rmw = [&]<class T>(T) -> std::uint64_t {
    const T v = static_cast<T>(a.v), d = static_cast<T>(a.desired);
    if (a.op == dev_op::add) return wi.atomic_add<T>(a.va, v);
    if (a.op == dev_op::cmpxchg) return wi.atomic_cmpxchg<T>(a.va, v, d);
    return wi.atomic_exchange<T>(a.va, v);
  };
  switch (a.size) {
    case 1: return rmw(std::uint8_t{});
    case 2: return rmw(std::uint16_t{});
    case 4: return rmw(std::uint32_t{});
    default: return rmw(std::uint64_t{});
  }
}

/// Submit the accesses as `items` work items on `vm`, optionally run
/// `beside` (with the midpoint handshake) while the kernel runs, and wait.
/// Aborts the process if the kernel does not finish in 30 s (its items
/// still reference `acc` and the outcome: nothing safe to return to).
/// With `sync`, `at_midpoint(completion)` runs once an item reached its
/// midpoint (or the kernel ended), before the items are let go: a host
/// cancel issued there finds every running item at or before its midpoint.
template <class Beside, class AtMidpoint>
range_outcome run_range_kernel(driver& dev, gpu_vm& vm, const std::vector<range_access>& acc, unsigned items,
                               bool sync, Beside&& beside, AtMidpoint&& at_midpoint) {
  range_outcome out;
  out.items = std::max(1u, std::min<unsigned>(items, static_cast<unsigned>(std::max<std::size_t>(acc.size(), 1))));
  out.vals.assign(acc.size(), 0);
  out.done.assign(out.items, 0);
  kernel_sync ks;
  const unsigned n_items = out.items;
  auto fn = [&acc, &out, &ks, sync, n_items](dev::work_item& wi) {
    const auto w = static_cast<unsigned>(wi.id());
    const std::size_t mine = acc.size() > w ? (acc.size() - w + n_items - 1) / n_items : 0;
    for (std::size_t k = 0; k < mine; ++k) {
      if (sync && k == mine / 2) {
        ks.started.store(true, std::memory_order_release);
        while (!ks.go.load(std::memory_order_acquire)) {
          wi.boundary();
          std::this_thread::yield();
        }
      }
      const std::size_t j = w + k * n_items;
      out.vals[j] = do_access(wi, acc[j]);
      out.done[w] = k + 1;
    }
    if (sync) ks.started.store(true, std::memory_order_release);
  };
  auto c = dev.submit(vm, n_items, fn);
  if (!c.ok()) {
    out.st.error = c.error();
    out.st.reason = c.error();
    return out;
  }
  if (sync) {
    while (!ks.started.load(std::memory_order_acquire) && !c->done()) std::this_thread::yield();
    at_midpoint(*c);
    ks.go.store(true, std::memory_order_release);
    beside();
  }
  out.st = c->wait(std::chrono::seconds(30));
  if (out.st.error == errc::timedout) {
    std::fprintf(stderr, "svm_fuzz: a range kernel did not finish in 30 s\n");
    std::abort();
  }
  return out;
}

template <class Beside>
range_outcome run_range_kernel(driver& dev, gpu_vm& vm, const std::vector<range_access>& acc, unsigned items,
                               bool sync, Beside&& beside) {
  return run_range_kernel(dev, vm, acc, items, sync, std::forward<Beside>(beside), [](const dev::completion&) {});
}

}  // namespace svm::fuzz
