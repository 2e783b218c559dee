// svm-storm: the fault-storm benchmark program. Shared vocabulary:
// a run's configuration (every knob), and a run's figures (what the table
// prints and what --json writes, field for field).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "svm/svm/gpu_vm.h"

namespace svm::storm {

/// Window choice as the user names it. `automatic` lets the scenario pick
/// (4k for the invalidation storms, largest otherwise).
enum class window_choice : std::uint8_t { automatic, largest, w4k, w64k, w2m };
[[nodiscard]] const char* to_string(window_choice w) noexcept;

/// Every knob of one run. Immutable once the run starts.
struct run_config {
  std::string scenario = "cpu-populated";
  unsigned engines = 4;
  unsigned handler_threads = 1;
  std::uint64_t size = std::uint64_t{16} << 20;  ///< bytes of memory the device touches
  double seconds = 2.0;                          ///< time budget of the timed phase
  std::uint64_t accesses = 0;                    ///< stop after this many device accesses (0: use seconds)
  std::size_t batch = 256;                       ///< fault records per handler batch
  window_choice window = window_choice::automatic;
  seq_mode seq = seq_mode::pgtable;
  mirror_impl mirror = mirror_impl::page;
  std::uint64_t seed = 1;
  bool oracle = true;
  bool cpu_storm = true;       ///< run the scenario's concurrent CPU storm, if it has one
  /// With cpu_storm off: a thread that only spins where the storm thread
  /// would run (a control that takes the same CPU and invalidates nothing).
  bool cpu_burn = false;
  std::uint64_t stride = 4096; ///< bytes between the accesses of `stride`
  bool huge_leaves = true;
  std::optional<std::uint32_t> wait_spin_ns;  ///< nullopt: automatic (see svm::driver_config)
  /// invalidate-disjoint's CPU operation on the other 2M block: munmap + mmap
  /// (mmap_lock for write, as the issue defines it) or MADV_DONTNEED (the
  /// read lock: isolates the sequence protocol from mmap_lock contention).
  bool disjoint_dontneed = false;
  std::string label;           ///< shown in the table (e.g. "P6 1 thread")
  // ---- waves (--waves) ----
  /// Waves per engine (dev::device_config::waves_per_engine); 0: the
  /// device's default.
  unsigned waves = 0;

  /// The window the run really uses (automatic resolved for the scenario).
  [[nodiscard]] window_choice effective_window() const noexcept;
};

/// The figures of one run (everything a report writes).
struct run_result {
  run_config config;
  double wall_s = 0;  ///< time of the timed phase (device kernels, or the host's page touches)
  double total_s = 0; ///< the whole run, set-up and verification included
  std::uint64_t rounds = 0;
  std::uint64_t device_accesses = 0;
  std::uint64_t faults_raised = 0, faults_serviced = 0, faults_cancelled = 0, valid_faults = 0, batches = 0;
  double mean_batch = 0;
  std::uint64_t hmm_calls = 0, retries_busy = 0, retries_seq = 0, false_retries = 0;
  std::uint64_t invalidations = 0, ptes_written = 0, ptes_zapped = 0, tlb_invalidations = 0;
  std::uint64_t huge_leaves = 0, bo_faults = 0, evictions = 0;
  std::uint64_t pages_mapped = 0;
  double ns_per_page = 0, pages_per_s = 0;
  latency_histogram latency{};
  std::uint64_t pt_bytes = 0;        ///< device page-table bytes, largest seen at the end of a round
  std::uint64_t pt_mapped_pages = 0; ///< 4K pages the table mapped at that moment
  double pt_bytes_per_page = 0;
  std::uint64_t cpu_ops = 0;         ///< operations of the concurrent CPU storm
  /// Handler threads' time servicing batches (svm::handler_stats::busy_ns):
  /// the driver's CPU cost of the run's faults, summed over threads.
  double handler_busy_s = 0;
  double pages_per_handler_s = 0;   ///< pages_mapped / handler_busy_s (P2's "per core")
  std::uint64_t tlb_hits = 0, tlb_misses = 0;
  std::optional<std::uint64_t> stale_accesses;  ///< empty with --oracle off
  std::uint64_t oracle_checked = 0;
  std::uint64_t data_errors = 0;
  std::uint64_t kernel_errors = 0;
  std::string first_error;  ///< the first data or kernel error, described
  bool host = false;        ///< a host-minor-fault run (no device figures)
  // ---- waves: what the handler was fed ----
  unsigned waves_per_engine = 0;          ///< the device's, as run
  std::uint64_t coalesced = 0;            ///< records merged into another of the same page
  double distinct_per_batch = 0;          ///< (records - coalesced) / batches
  std::uint64_t outstanding_high_water = 0;  ///< most faults outstanding at once (device)
  double faults_per_s = 0;                ///< faults_raised / wall_s, end to end
  // ---- device memory: migration and VRAM eviction (vm_stats) ----
  std::uint64_t migrations_to_vram = 0, migrations_to_ram = 0;  ///< chunks migrated each way
  std::uint64_t pages_to_vram = 0, pages_to_ram = 0;            ///< pages those migrations moved
  std::uint64_t svm_evictions = 0;      ///< SVM chunks evicted to system memory under VRAM pressure
  std::uint64_t bo_restores = 0;        ///< evicted VRAM BOs brought back by a device access
  std::uint64_t migrate_fallbacks = 0;  ///< chunks wanted in VRAM but mapped in system memory
  std::uint64_t retries_in_place = 0;   ///< retried accesses mapped where their memory lay, not migrated again
  std::uint64_t bytes_copied = 0;       ///< (pages_to_vram + pages_to_ram) * 4K
  double migrations_per_s = 0;          ///< (migrations_to_vram + migrations_to_ram) / wall_s
  double evictions_per_s = 0;           ///< (evictions + svm_evictions) / wall_s
};

/// One side-by-side comparison: both runs and the ratio.
struct comparison {
  std::string name;   ///< seq, mirror, host, scaling...
  std::string ratio_of;  ///< what the ratio divides, in words
  std::vector<run_result> runs;
  double ratio = 0;
  std::vector<double> samples;  ///< the ratio of each interleaved repetition
};

/// True if the run is vouched for: no stale access, no data or kernel error.
[[nodiscard]] inline bool clean(const run_result& r) noexcept {
  return r.data_errors == 0 && r.kernel_errors == 0 && (!r.stale_accesses || *r.stale_accesses == 0);
}

}  // namespace svm::storm
