#include "runner.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "host_fault.h"
#include "scenario.h"
#include "svm/svm/oracle.h"

namespace svm::storm {
namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

/// Progress on stderr: silent for the first 2 s, then a line every half
/// second, rewritten in place.
class progress_line {
 public:
  progress_line(const run_config& c, const runner_options& o, std::function<std::string()> what)
      : c_(c), what_(std::move(what)), start_(clock_type::now()), final_(o.progress_final) {
    if (!o.quiet && o.progress) th_ = std::jthread([this](std::stop_token st) { loop(st); });
  }
  ~progress_line() { stop(); }
  void stop() {
    if (!th_.joinable()) return;
    {
      std::lock_guard g(mu_);
      th_.request_stop();
    }
    cv_.notify_all();
    th_.join();
    if (!printed_ && final_) print();  // --progress on: at least one line
    if (printed_) std::fprintf(stderr, "\n");
  }

 private:
  void loop(std::stop_token st) {
    std::unique_lock g(mu_);
    if (cv_.wait_for(g, st, std::chrono::seconds(2), [] { return false; })) return;
    while (!st.stop_requested()) {
      print();
      cv_.wait_for(g, st, std::chrono::milliseconds(500), [] { return false; });
    }
  }
  void print() {
    std::fprintf(stderr, "\r  %s%s%s: %.1f / %.1f s, %s   ", c_.scenario.c_str(), c_.label.empty() ? "" : " ",
                 c_.label.c_str(), seconds_since(start_), c_.seconds, what_().c_str());
    std::fflush(stderr);
    printed_ = true;
  }
  const run_config& c_;
  std::function<std::string()> what_;
  clock_type::time_point start_;
  bool final_;  // immutable
  std::mutex mu_;
  std::condition_variable_any cv_;
  bool printed_ = false;  // written by the thread; read after join
  std::jthread th_;
};

std::string mpages(double pages) {
  char b[48];
  std::snprintf(b, sizeof b, "%.2f M pages", pages / 1e6);
  return b;
}

void finish(run_result& r) {
  r.mean_batch = r.batches ? static_cast<double>(r.faults_raised) / static_cast<double>(r.batches) : 0;
  r.faults_per_s = r.wall_s > 0 ? static_cast<double>(r.faults_raised) / r.wall_s : 0;
  if (r.pages_mapped && r.wall_s > 0) {
    r.ns_per_page = r.wall_s * 1e9 / static_cast<double>(r.pages_mapped);
    r.pages_per_s = static_cast<double>(r.pages_mapped) / r.wall_s;
  } else {
    r.ns_per_page = 0;
    r.pages_per_s = 0;
  }
  r.bytes_copied = (r.pages_to_vram + r.pages_to_ram) * page_size;
  r.migrations_per_s =
      r.wall_s > 0 ? static_cast<double>(r.migrations_to_vram + r.migrations_to_ram) / r.wall_s : 0;
  r.evictions_per_s = r.wall_s > 0 ? static_cast<double>(r.evictions + r.svm_evictions) / r.wall_s : 0;
  r.pages_per_handler_s = r.handler_busy_s > 0 ? static_cast<double>(r.pages_mapped) / r.handler_busy_s : 0;
  r.pt_bytes_per_page = r.pt_mapped_pages ? static_cast<double>(r.pt_bytes) / static_cast<double>(r.pt_mapped_pages) : 0;
}

std::shared_ptr<const window_policy> policy_of(window_choice w) {
  switch (w) {
    case window_choice::w4k: return std::make_shared<fixed_window_policy>(page_size);
    case window_choice::w64k: return std::make_shared<fixed_window_policy>(std::uint64_t{64} << 10);
    case window_choice::w2m: return std::make_shared<fixed_window_policy>(huge_size);
    case window_choice::automatic:
    case window_choice::largest: return nullptr;  // largest_window_policy
  }
  return nullptr;
}

run_result run_device(const run_config& c, const runner_options& o) {
  run_result r;
  r.config = c;
  // The range-based baseline always runs the notifier-wide sequence.
  if (c.mirror == mirror_impl::range) r.config.seq = seq_mode::notifier;
  const auto start = clock_type::now();
  std::unique_ptr<scenario> sc = make_scenario(c.scenario);
  if (!sc) {
    r.kernel_errors = 1;
    r.first_error = "unknown scenario " + c.scenario;
    return r;
  }
  mm m(sc->mm_opts(c));
  svm::driver_config dc;
  dc.hw = sc->hw(c);
  dc.hw.engines = c.engines;
  dc.wait_spin_ns = c.wait_spin_ns;
  dc.handler_threads = c.handler_threads;
  dc.batch = c.batch;
  if (c.waves) dc.hw.waves_per_engine = c.waves;
  auto dev_owner = svm::driver::create(dc);
  if (!dev_owner) {
    r.kernel_errors = 1;
    r.first_error = std::string("driver config: ") + errc_name(dev_owner.error());
    return r;
  }
  svm::driver& dev = **dev_owner;
  r.waves_per_engine = dc.hw.waves_per_engine;
  dev.set_trace(o.trace);
  vm_config vc;
  vc.seq = c.seq;
  vc.impl = c.mirror;
  vc.window = policy_of(c.effective_window());
  vc.huge_leaves = c.huge_leaves;
  sc->vm_opts(c, vc);
  auto vm_owner = gpu_vm::create(dev, m, vc);
  if (!vm_owner) {
    r.kernel_errors = 1;
    r.first_error = std::string("gpu_vm create: ") + errc_name(vm_owner.error());
    return r;
  }
  gpu_vm& vm = **vm_owner;
  std::optional<access_oracle> oracle;
  if (c.oracle) {
    oracle.emplace(dev);
    if (errc e = oracle->watch(vm, m); e != errc::ok) {
      r.kernel_errors = 1;
      r.first_error = std::string("oracle watch: ") + errc_name(e);
      return r;
    }
  }
  storm_env env(c, m, dev, vm, o.trace);

  sc->setup(env);
  vm.reset_stats();
  const dev::device_stats d0 = dev.hw().stats();
  const std::uint64_t busy0 = dev.stats().busy_ns;
  const std::uint64_t coalesced0 = dev.stats().coalesced, records0 = dev.stats().records;
  std::uint64_t timed_ns = 0;
  std::atomic<std::uint64_t> rounds_done{0};  // read by the progress thread
  progress_line progress(c, o, [&] {
    return mpages(static_cast<double>(vm.stats().ptes_written)) + ", " + std::to_string(rounds_done.load()) + " rounds";
  });
  {
    std::jthread storm;
    if (sc->has_storm() && c.cpu_storm && env.op_errors.load() == 0) {
      storm = std::jthread([&](std::stop_token st) {
        if (auto* t = dynamic_cast<chrome_trace*>(o.trace)) t->name_thread("cpu storm");
        sc->storm(env, st);
      });
    } else if (sc->has_storm() && c.cpu_burn) {
      storm = std::jthread([&](std::stop_token st) {
        if (auto* t = dynamic_cast<chrome_trace*>(o.trace)) t->name_thread("cpu burn (control)");
        std::uint64_t spins = 0;
        while (!st.stop_requested()) {
          for (int i = 0; i < 256; ++i) SVM_CPU_RELAX();
          ++spins;
        }
        env.cpu_ops.fetch_add(spins, std::memory_order_relaxed);
      });
    }
    if (auto* t = dynamic_cast<chrome_trace*>(o.trace)) t->name_thread("main (storm driver)");
    const auto budget = std::chrono::duration<double>(c.seconds);
    do {
      if (env.op_errors.load() != 0) break;
      env.round.store(r.rounds, std::memory_order_relaxed);
      sc->prepare(env, r.rounds);
      if (env.op_errors.load() != 0) break;
      dev::kernel_status st;
      {
        trace_scope t(o.trace, "kernel", r.rounds);
        const auto k0 = clock_type::now();
        st = sc->kernel(env, r.rounds);
        timed_ns += static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now() - k0).count());
      }
      if (!st.ok()) {
        char b[160];
        std::snprintf(b, sizeof b, "kernel failed: %s (reason %s) at 0x%llx", errc_name(st.error), errc_name(st.reason),
                      static_cast<unsigned long long>(st.address));
        env.op_error(b);
        break;
      }
      // The page table now maps what the round touched: sample its size.
      const auto ps = vm.page_table().stats();
      const std::uint64_t mapped = ps.leaves_4k + ps.leaves_2m * (huge_size / page_size);
      if (ps.bytes > r.pt_bytes) {
        r.pt_bytes = ps.bytes;
        r.pt_mapped_pages = mapped;
      }
      {
        trace_scope t(o.trace, "verify", r.rounds);
        sc->verify(env, r.rounds);
      }
      ++r.rounds;
      rounds_done.store(r.rounds);
      r.device_accesses = dev.hw().stats().accesses - d0.accesses;
    } while (c.accesses ? r.device_accesses < c.accesses : clock_type::now() - start < budget);
    storm.request_stop();
  }
  progress.stop();
  sc->teardown(env);

  const vm_stats s = vm.stats();
  const dev::device_stats d = dev.hw().stats();
  r.wall_s = static_cast<double>(timed_ns) / 1e9;
  r.device_accesses = d.accesses - d0.accesses;
  r.tlb_hits = d.tlb_hits - d0.tlb_hits;
  r.tlb_misses = d.tlb_misses - d0.tlb_misses;
  r.faults_raised = s.faults_raised;
  r.faults_serviced = s.faults_serviced;
  r.faults_cancelled = s.faults_cancelled;
  r.valid_faults = s.valid_faults;
  r.batches = s.batches;
  r.hmm_calls = s.hmm_calls;
  r.retries_busy = s.retries_busy;
  r.retries_seq = s.retries_seq;
  r.false_retries = s.false_retries;
  r.invalidations = s.invalidations;
  r.ptes_written = s.ptes_written;
  r.ptes_zapped = s.ptes_zapped;
  r.tlb_invalidations = s.tlb_invalidations;
  r.huge_leaves = s.huge_leaves;
  r.bo_faults = s.bo_faults;
  r.evictions = s.evictions;
  r.migrations_to_vram = s.migrations_to_vram;
  r.migrations_to_ram = s.migrations_to_ram;
  r.pages_to_vram = s.pages_to_vram;
  r.pages_to_ram = s.pages_to_ram;
  r.svm_evictions = s.svm_evictions;
  r.bo_restores = s.bo_restores;
  r.migrate_fallbacks = s.migrate_fallbacks;
  r.retries_in_place = s.retries_in_place;
  r.latency = s.latency;
  r.pages_mapped = s.ptes_written;
  r.cpu_ops = env.cpu_ops.load();
  r.handler_busy_s = static_cast<double>(dev.stats().busy_ns - busy0) / 1e9;
  r.coalesced = dev.stats().coalesced - coalesced0;
  const std::uint64_t records = dev.stats().records - records0;
  r.outstanding_high_water = dev.hw().stats().outstanding_high_water;
  r.distinct_per_batch = r.batches ? static_cast<double>(records - r.coalesced) / static_cast<double>(r.batches) : 0;
  r.data_errors = env.data_errors.load();
  r.kernel_errors = env.op_errors.load();
  r.first_error = env.first_error();
  if (oracle) {
    const oracle_counts oc = oracle->counts();
    r.stale_accesses = oc.stale;
    r.oracle_checked = oc.checked;
    if (oc.stale && r.first_error.empty()) {
      const auto reps = oracle->reports();
      r.first_error = reps.empty() ? "stale access" : "stale: " + describe(reps.front());
    }
  }
  dev.set_trace(nullptr);
  r.total_s = seconds_since(start);
  finish(r);
  return r;
}

}  // namespace

run_result run_one(const run_config& c, const runner_options& o) {
  // A span over the whole run on the main thread, named after it.
  const char* run_name = "run";
  if (auto* t = dynamic_cast<chrome_trace*>(o.trace))
    run_name = t->intern("run " + c.scenario + (c.label.empty() ? "" : " [" + c.label + "]"));
  trace_scope whole(o.trace, run_name);
  if (c.scenario == "host-minor-fault") {
    std::atomic<std::uint64_t> pages{0};
    run_result r;
    {
      progress_line p(c, o, [&] { return mpages(static_cast<double>(pages.load())); });
      trace_scope t(o.trace, "host_touch");
      r = run_host(c, pages);
    }
    return r;
  }
  return run_device(c, o);
}

void merge_into(run_result& a, const run_result& b) {
  // Per-batch figures: weighted by each side's batches (before they add up).
  const double distinct = a.distinct_per_batch * static_cast<double>(a.batches) +
                          b.distinct_per_batch * static_cast<double>(b.batches);
  const std::uint64_t batches = a.batches + b.batches;
  a.distinct_per_batch = batches ? distinct / static_cast<double>(batches) : 0;
  a.coalesced += b.coalesced;
  a.outstanding_high_water = std::max(a.outstanding_high_water, b.outstanding_high_water);
  a.wall_s += b.wall_s;
  a.total_s += b.total_s;
  a.rounds += b.rounds;
  a.device_accesses += b.device_accesses;
  a.faults_raised += b.faults_raised;
  a.faults_serviced += b.faults_serviced;
  a.faults_cancelled += b.faults_cancelled;
  a.valid_faults += b.valid_faults;
  a.batches += b.batches;
  a.hmm_calls += b.hmm_calls;
  a.retries_busy += b.retries_busy;
  a.retries_seq += b.retries_seq;
  a.false_retries += b.false_retries;
  a.invalidations += b.invalidations;
  a.ptes_written += b.ptes_written;
  a.ptes_zapped += b.ptes_zapped;
  a.tlb_invalidations += b.tlb_invalidations;
  a.huge_leaves += b.huge_leaves;
  a.bo_faults += b.bo_faults;
  a.evictions += b.evictions;
  a.migrations_to_vram += b.migrations_to_vram;
  a.migrations_to_ram += b.migrations_to_ram;
  a.pages_to_vram += b.pages_to_vram;
  a.pages_to_ram += b.pages_to_ram;
  a.svm_evictions += b.svm_evictions;
  a.bo_restores += b.bo_restores;
  a.migrate_fallbacks += b.migrate_fallbacks;
  a.retries_in_place += b.retries_in_place;
  a.pages_mapped += b.pages_mapped;
  for (unsigned i = 0; i < latency_histogram::buckets; ++i) a.latency.count[i] += b.latency.count[i];
  if (b.pt_bytes > a.pt_bytes) {
    a.pt_bytes = b.pt_bytes;
    a.pt_mapped_pages = b.pt_mapped_pages;
  }
  a.cpu_ops += b.cpu_ops;
  a.handler_busy_s += b.handler_busy_s;
  a.tlb_hits += b.tlb_hits;
  a.tlb_misses += b.tlb_misses;
  if (a.stale_accesses && b.stale_accesses) *a.stale_accesses += *b.stale_accesses;
  else a.stale_accesses.reset();
  a.oracle_checked += b.oracle_checked;
  a.data_errors += b.data_errors;
  a.kernel_errors += b.kernel_errors;
  if (a.first_error.empty()) a.first_error = b.first_error;
  finish(a);
}

std::vector<run_result> interleave(const std::vector<run_config>& cfgs, unsigned reps, const runner_options& o,
                                   std::vector<std::vector<run_result>>* per_rep) {
  reps = std::max(1u, reps);
  std::vector<run_result> merged(cfgs.size());
  if (per_rep) per_rep->assign(cfgs.size(), {});
  for (unsigned rep = 0; rep < reps; ++rep) {
    for (std::size_t i = 0; i < cfgs.size(); ++i) {
      run_config c = cfgs[i];
      c.seconds = cfgs[i].seconds / reps;
      if (c.accesses) c.accesses = std::max<std::uint64_t>(1, cfgs[i].accesses / reps);
      run_result r = run_one(c, o);
      if (per_rep) (*per_rep)[i].push_back(r);
      if (rep == 0) {
        merged[i] = r;
        merged[i].config.seconds = cfgs[i].seconds;
        merged[i].config.accesses = cfgs[i].accesses;
      } else {
        merge_into(merged[i], r);
      }
    }
  }
  return merged;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

comparison compare(std::string name, std::string ratio_of, const run_config& a, const run_config& b, unsigned reps,
                   const runner_options& o, const std::function<double(const run_result&, const run_result&)>& ratio) {
  comparison cmp;
  cmp.name = std::move(name);
  cmp.ratio_of = std::move(ratio_of);
  std::vector<std::vector<run_result>> per;
  cmp.runs = interleave({a, b}, reps, o, &per);
  for (std::size_t i = 0; i < per[0].size(); ++i) cmp.samples.push_back(ratio(per[0][i], per[1][i]));
  cmp.ratio = median(cmp.samples);
  return cmp;
}

}  // namespace svm::storm
