// The default storm set (svm-storm with no scenario): every scenario, then
// the side-by-side measurements behind docs/performance.md's P1-P7.
#pragma once

#include <vector>

#include "options.h"
#include "report.h"
#include "runner.h"

namespace svm::storm {

struct suite_result {
  std::vector<run_result> table;     ///< one run per scenario
  std::vector<comparison> comps;     ///< host (P1), seq (P4), seq quiet, mirror (P5), scaling (P6)
  std::vector<target_figure> targets;
};

[[nodiscard]] suite_result run_suite(const options& o, const runner_options& ro);

/// The config --compare NAME runs on each side (a, b) from the user's knobs.
void comparison_sides(const options& o, const std::string& name, run_config& a, run_config& b);
[[nodiscard]] comparison run_comparison(const options& o, const std::string& name, const runner_options& ro);

}  // namespace svm::storm
