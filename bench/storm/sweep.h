// --sweep: one knob per axis, every combination run in turn, into one JSON.
#pragma once

#include <cstdio>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "options.h"
#include "runner.h"

namespace svm::storm {

/// The knobs --sweep accepts, comma-separated, for --help.
[[nodiscard]] std::string sweep_knobs();

/// Parse "KNOB=V1,V2,...". The message, or nullopt.
[[nodiscard]] std::optional<std::string> parse_sweep(const std::string& spec, options::sweep_axis& out);

/// Set one knob as its option would (marking it given, so comparisons keep
/// it). The message for a bad value, or nullopt.
[[nodiscard]] std::optional<std::string> apply_knob(options& o, const std::string& knob, const std::string& value);

/// Run every point of o.sweeps (the runs, or the comparison, that the rest of
/// the command line asks for, at each point), printing each point's table.
/// JSON: {"sweep": {"axes": {KNOB: [values]}}, "points": [{"params": {...},
/// "runs": [...], and "ratio"... for a comparison}], "runs": [every run]}.
/// `keep` owns the results that `all` points at.
[[nodiscard]] nlohmann::json run_sweep(const options& o, const runner_options& ro, std::FILE* out,
                                       std::deque<run_result>& keep, std::vector<const run_result*>& all);

}  // namespace svm::storm
