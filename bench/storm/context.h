// What a result was measured on and with (the JSON "context" block, modelled
// on Google Benchmark's), output-path checks done before a run, and CSV.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "storm.h"

namespace svm::storm {

/// The context of this invocation: svm version, git commit and build type
/// (captured at configure time), compiler, CPU model, hardware threads, load
/// average, date (local time, ISO 8601), host name, kernel and command line.
[[nodiscard]] nlohmann::json context_block(int argc, char** argv);

/// "svm-storm VERSION (commit C, BUILD_TYPE, COMPILER)": the --version text.
[[nodiscard]] std::string version_text();

/// Can `path` be written ("-" always can)? Checks that its folder exists and
/// is writable, and that the path is not a folder or a read-only file,
/// without creating anything. False with `err` (naming `what`) otherwise.
[[nodiscard]] bool check_output_path(const std::string& path, const char* what, std::string& err);

/// One CSV row per run: the run's JSON flattened (config.engines,
/// fault_latency_ns.p50, ...; arrays left out), columns in the order of the
/// first run, then any others. "-": stdout. False with `err` on failure.
[[nodiscard]] bool write_csv(const std::string& path, const std::vector<const run_result*>& runs, std::string& err);

}  // namespace svm::storm
