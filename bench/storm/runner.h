// Running storms: one run (a fresh mm, device, VM and oracle per run), and
// side-by-side comparisons that interleave their sides in one process.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "storm.h"
#include "trace.h"

namespace svm::storm {

/// Process-wide run options that are not part of a run's config.
struct runner_options {
  bool quiet = false;            ///< no progress lines on stderr
  /// The in-place progress line (carriage returns) on stderr: only on a
  /// terminal by default (--progress), never when quiet.
  bool progress = true;
  /// --progress on: a run too short for the periodic line (under 2 s) still
  /// ends with one line, so the line's presence does not depend on timing.
  bool progress_final = false;
  chrome_trace* trace = nullptr; ///< null: no trace
};

/// Run one storm. Never throws for a failing storm: errors land in the
/// result (kernel_errors, data_errors, first_error). Progress goes to
/// stderr once the run has lasted 2 s, unless quiet.
[[nodiscard]] run_result run_one(const run_config& c, const runner_options& o);

/// Fold `b` into `a` (counters summed, latency histograms added, the larger
/// page-table sample kept, derived figures recomputed).
void merge_into(run_result& a, const run_result& b);

/// Run `cfgs` `reps` times, interleaved (A B C A B C ...), each repetition
/// with seconds/reps of the config's time budget; returns each config's
/// merged result and, in `per_rep`, every repetition's own result.
[[nodiscard]] std::vector<run_result> interleave(const std::vector<run_config>& cfgs, unsigned reps,
                                                 const runner_options& o,
                                                 std::vector<std::vector<run_result>>* per_rep = nullptr);

/// A two-sided comparison: runs[0] = `a`, runs[1] = `b`, ratio = the median
/// over repetitions of ratio(a_rep, b_rep).
[[nodiscard]] comparison compare(std::string name, std::string ratio_of, const run_config& a, const run_config& b,
                                 unsigned reps, const runner_options& o,
                                 const std::function<double(const run_result&, const run_result&)>& ratio);

/// The median of `v` (0 if empty).
[[nodiscard]] double median(std::vector<double> v);

}  // namespace svm::storm
