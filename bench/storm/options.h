// svm-storm's command line (CLI11).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "storm.h"

namespace svm::storm {

struct options {
  run_config base;                      ///< the knobs, as given (or defaulted)
  std::optional<std::string> scenario;  ///< none: the default storm set
  std::optional<std::string> compare;   ///< seq, mirror or host
  unsigned reps = 3;                    ///< interleaved repetitions of a comparison
  std::string json_path;                ///< empty: no JSON; "-": stdout
  std::string trace_path;               ///< empty: no trace
  bool quiet = false;
  /// The progress line (rewritten in place with carriage returns): on, off,
  /// or auto (only when stderr is a terminal, so logs never get one).
  std::string progress = "auto";
  std::string csv_path;                 ///< empty: no CSV; "-": stdout
  /// --sweep KNOB=V1,V2,...: every combination of the axes' values runs
  /// (the last axis varies fastest), into one JSON.
  struct sweep_axis {
    std::string knob;
    std::vector<std::string> values;
  };
  std::vector<sweep_axis> sweeps;
  std::vector<std::string> sweep_specs;  ///< --sweep as given (parsed into sweeps)
  // Knobs the user set explicitly (a comparison or the default set only
  // overrides the ones left at their defaults).
  bool engines_given = false, window_given = false, seconds_given = false, threads_given = false, size_given = false;
};

/// Parse argv. Returns nullopt to go on, or the exit status to end with
/// (0 after --help, non-zero after an error, already printed).
[[nodiscard]] std::optional<int> parse_options(int argc, char** argv, options& o);

}  // namespace svm::storm
