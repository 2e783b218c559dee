// svm-storm: the project's main program. See --help, docs/performance.md and
// bench/README.md.
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <deque>
#include <memory>
#include <thread>

#include "context.h"
#include "options.h"
#include "report.h"
#include "runner.h"
#include "suite.h"
#include "sweep.h"
#include "trace.h"

using namespace svm::storm;

namespace {

nlohmann::json machine() {
  nlohmann::json m = {{"hardware_threads", std::thread::hardware_concurrency()}};
  utsname u{};
  if (::uname(&u) == 0) m["kernel"] = std::string(u.sysname) + " " + u.release + " " + u.machine;
  return m;
}

/// Exit status from the runs (see --help, EXIT STATUS).
int status_of(const std::vector<const run_result*>& runs) {
  int st = 0;
  for (const run_result* r : runs) {
    if (r->kernel_errors) return 3;
    const bool stale = r->stale_accesses && *r->stale_accesses != 0;
    if (r->config.oracle && (stale || r->data_errors)) st = 1;
  }
  return st;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (auto rc = parse_options(argc, argv, o)) return *rc;
  // thp and invalidate-disjoint need whole 2M blocks.
  if (o.scenario == "thp" || o.scenario == "invalidate-disjoint") o.base.size = svm::align_up(o.base.size, svm::huge_size);

  std::unique_ptr<chrome_trace> trace;
  if (!o.trace_path.empty()) trace = std::make_unique<chrome_trace>();
  runner_options ro{.quiet = o.quiet, .trace = trace.get()};
  // The progress line rewrites itself with carriage returns: a terminal only,
  // unless asked for.
  ro.progress = o.progress == "on" || (o.progress == "auto" && ::isatty(STDERR_FILENO) == 1);
  ro.progress_final = o.progress == "on";
  std::FILE* out = o.json_path == "-" || o.csv_path == "-" ? stderr : stdout;

  nlohmann::json j;
  std::vector<const run_result*> all;
  suite_result suite;
  comparison cmp;
  run_result single;
  std::deque<run_result> swept;
  if (!o.sweeps.empty()) {
    j = run_sweep(o, ro, out, swept, all);
  } else if (o.compare) {
    cmp = run_comparison(o, *o.compare, ro);
    for (const run_result& r : cmp.runs) all.push_back(&r);
    print_table(out, all);
    print_comparison(out, cmp);
    j = to_json(cmp);
  } else if (o.scenario) {
    o.base.scenario = *o.scenario;
    single = run_one(o.base, ro);
    all.push_back(&single);
    print_table(out, all);
    j = {{"runs", nlohmann::json::array({to_json(single)})}};
  } else {
    suite = run_suite(o, ro);
    std::fprintf(out, "\nsvm-storm default set (%u hardware threads; each run's wall_s is its timed phase)\n\n",
                 std::thread::hardware_concurrency());
    std::vector<const run_result*> table;
    for (const run_result& r : suite.table) table.push_back(&r);
    print_table(out, table);
    std::fprintf(out, "\ncomparison runs (each side merged over its interleaved repetitions)\n\n");
    std::vector<const run_result*> crs;
    for (const comparison& c : suite.comps)
      for (const run_result& r : c.runs) crs.push_back(&r);
    print_table(out, crs);
    std::fprintf(out, "\ncomparisons\n");
    for (const comparison& c : suite.comps) print_comparison(out, c);
    std::fprintf(out, "\ntargets (docs/performance.md; a figure counts only with stale = 0 and data errors = 0)\n");
    print_targets(out, suite.targets);
    all = table;
    all.insert(all.end(), crs.begin(), crs.end());
    nlohmann::json runs = nlohmann::json::array(), comps = nlohmann::json::array(), targets = nlohmann::json::object();
    for (const run_result& r : suite.table) runs.push_back(to_json(r));
    for (const comparison& c : suite.comps) comps.push_back(to_json(c));
    for (const target_figure& t : suite.targets) targets[t.id] = to_json(t);
    j = {{"runs", runs}, {"comparisons", comps}, {"targets", targets}};
  }
  print_problems(out, all);
  j["machine"] = machine();
  j["context"] = context_block(argc, argv);
  std::fflush(out);

  int rc = status_of(all);
  std::string err;
  if (!o.csv_path.empty() && !write_csv(o.csv_path, all, err)) {
    std::fprintf(stderr, "svm-storm: %s\n", err.c_str());
    rc = rc ? rc : 5;
  }
  if (!o.json_path.empty() && !write_json(o.json_path, j, err)) {
    std::fprintf(stderr, "svm-storm: %s\n", err.c_str());
    rc = rc ? rc : 5;
  }
  if (trace) {
    if (!trace->write(o.trace_path, err)) {
      std::fprintf(stderr, "svm-storm: %s\n", err.c_str());
      rc = rc ? rc : 5;
    } else if (!o.quiet) {
      std::fprintf(stderr, "svm-storm: trace written to %s%s\n", o.trace_path.c_str(),
                   trace->dropped() ? (" (" + std::to_string(trace->dropped()) + " spans dropped past the cap)").c_str() : "");
    }
  }
  return rc;
}
