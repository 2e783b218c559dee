// Reports: JSON (every figure printed) and the
// human-readable table.
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "storm.h"

namespace svm::storm {

/// One target of docs/performance.md as measured (or not) by this invocation.
struct target_figure {
  std::string id;        ///< P1..P8
  std::string figure;    ///< what it is, in words
  std::string unit;
  std::optional<double> value;  ///< empty: not measured here
  std::string first_bar, goal;  ///< as docs/performance.md states them
  std::optional<bool> met;      ///< against the first bar; empty if not measured
  bool clean = true;            ///< every run behind it had stale = 0 and data_errors = 0
  std::string note;             ///< how it was measured, or why it was not
};

[[nodiscard]] nlohmann::json to_json(const run_config& c);
[[nodiscard]] nlohmann::json to_json(const run_result& r);
[[nodiscard]] nlohmann::json to_json(const comparison& c);
[[nodiscard]] nlohmann::json to_json(const target_figure& t);

/// The table: one line per run.
void print_table(std::FILE* out, const std::vector<const run_result*>& runs);
void print_comparison(std::FILE* out, const comparison& c);
void print_targets(std::FILE* out, const std::vector<target_figure>& t);
/// Errors of unclean runs (first error, stale count), one line each.
void print_problems(std::FILE* out, const std::vector<const run_result*>& runs);

/// Write `j` to `path` ("-": stdout). Returns false with `err` on failure.
bool write_json(const std::string& path, const nlohmann::json& j, std::string& err);

}  // namespace svm::storm
