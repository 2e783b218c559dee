// Scenarios: what a storm does, as a small interface (a swappable
// policy). The runner owns the mm, the device, the VM and the oracle; a
// scenario lays out memory, prepares each round, submits the round's kernel
// and checks the data afterwards, and may run a CPU storm beside it.
//
// Contract (runner.cpp calls these in this order, on one thread except
// storm()):
//   setup(env)                                   untimed, once
//   storm(env, stop)     on its own thread, from after setup until stopped
//   for each round r:
//     prepare(env, r)                            untimed: CPU stores, resets
//     kernel(env, r)                             TIMED: submit + wait
//     verify(env, r)                             untimed: CPU reads back
//   (storm stopped and joined)
//   teardown(env)                                untimed, once
// Every check failure goes to env.data_error(); kernels may call it from
// engine threads. A scenario must keep its kernels' captures alive until
// kernel() returns (it waits for the kernel).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>
#include <vector>

#include "storm.h"
#include "svm/notifier/mm.h"
#include "svm/svm/gpu_vm.h"

namespace svm::storm {

/// What a scenario works with. Counters are atomics: kernels (engine
/// threads), the storm thread and the main thread all add to them.
struct storm_env {
  storm_env(const run_config& c, svm::mm& mm_, svm::driver& d, gpu_vm& v, trace_sink* t) noexcept
      : cfg(c), m(mm_), dev(d), vm(v), trace(t) {}
  storm_env(const storm_env&) = delete;
  storm_env& operator=(const storm_env&) = delete;

  const run_config& cfg;
  svm::mm& m;
  svm::driver& dev;
  gpu_vm& vm;
  trace_sink* trace = nullptr;  ///< null: no trace
  /// Device accesses each kernel makes per work item are counted by the
  /// device itself; these are the storm's own counters (relaxed).
  std::atomic<std::uint64_t> data_errors{0};
  std::atomic<std::uint64_t> cpu_ops{0};
  /// The work item most recently started (storms aim at it).
  std::atomic<std::uint64_t> cursor{0};
  /// The round now running (the storm thread reads it).
  std::atomic<std::uint64_t> round{0};
  /// Setup or CPU-side operations that failed (an error of the storm, not
  /// of the data): counted as kernel errors.
  std::atomic<std::uint64_t> op_errors{0};

  /// Count a data error; keep the first one's description.
  void data_error(const std::string& what);
  /// Count a failed operation (mmap failed, kernel failed...).
  void op_error(const std::string& what);
  [[nodiscard]] std::string first_error() const;

  /// Submit `items` work items and wait (with a generous timeout; a hang is
  /// diagnosed on stderr and ends the process with exit status 4).
  dev::kernel_status run_kernel(std::uint64_t items, dev::kernel_fn fn);

 private:
  mutable std::mutex err_mu_;
  std::string first_error_;  // guarded by err_mu_
};

class scenario {
 public:
  virtual ~scenario() = default;
  /// The mm this scenario needs (frames, swap) for the config.
  [[nodiscard]] virtual mm_options mm_opts(const run_config& c) const;
  /// The simulated hardware (VRAM size) for the config; engines, the fault
  /// buffer and the batch come from the config afterwards.
  [[nodiscard]] virtual dev::device_config hw(const run_config& c) const;
  /// Adjust the VM's configuration (the runner has set sequence mode,
  /// mirror, window and huge leaves from the run's knobs).
  virtual void vm_opts(const run_config&, vm_config&) const {}
  virtual void setup(storm_env& env) = 0;
  virtual void prepare(storm_env& env, std::uint64_t round) = 0;
  virtual dev::kernel_status kernel(storm_env& env, std::uint64_t round) = 0;
  virtual void verify(storm_env& env, std::uint64_t round) = 0;
  [[nodiscard]] virtual bool has_storm() const { return false; }
  virtual void storm(storm_env&, std::stop_token) {}
  virtual void teardown(storm_env&) {}
};

struct scenario_info {
  const char* name;
  const char* what;
  /// The window `--window auto` picks for it.
  window_choice auto_window;
};
/// Every scenario, host-minor-fault included (it has no scenario object).
[[nodiscard]] const std::vector<scenario_info>& scenarios();
[[nodiscard]] const scenario_info* find_scenario(const std::string& name);
/// A scenario object; null for host-minor-fault or an unknown name.
[[nodiscard]] std::unique_ptr<scenario> make_scenario(const std::string& name);

}  // namespace svm::storm
