#include "options.h"

#include <cctype>
#include <map>
#include <vector>

#include <CLI/CLI.hpp>

#include "context.h"
#include "scenario.h"
#include "sweep.h"

namespace svm::storm {

namespace {

const char* footer_text() {
  return R"(SCENARIOS (--scenario):
  first-touch          the device touches memory the CPU never touched
  cpu-populated        the CPU stores every page; the device reads and writes each
  random               device reads + atomic adds at random pages of CPU-populated memory
  stride               device reads every --stride bytes (default 4K: a new page per access)
  thp                  as cpu-populated on 2M CPU huge pages, mirrored with 2M device leaves
  invalidate-disjoint  faults while the CPU unmaps/remaps nonstop another 2M block of the
                       same notifier (P4)
  invalidate-overlap   the CPU swaps out (reclaim) the very pages being faulted (P5)
  dontneed-churn       the CPU drops pages (MADV_DONTNEED) around the pages being faulted
  fork-cow             the CPU forks every round; device writes break copy-on-write
  bo-mixed             BOs (VRAM and system) and SVM interleaved in one VM
  evict-pressure       eight BOs overcommit VRAM 2x; the CPU evicts while kernels run
  migrate-ping-pong    the CPU and the device write the same VRAM-preferred pages in
                       turn: each round migrates every chunk to VRAM and back
  vram-overcommit      a VRAM-preferred working set 2x the VRAM beside two VRAM BOs
  prefetch             a VRAM-preferred region prefetched to VRAM in each timed round
  vram-fault           the same, migrated by the kernel's own faults (prefetch's baseline)
  host-minor-fault     this machine's kernel: mmap fresh anonymous memory (MADV_NOHUGEPAGE)
                       and touch it page by page, in this process (ns per page)

COMPARISONS (--compare), both sides in this process, interleaved --reps times; the
ratio is the median of the per-repetition ratios:
  seq     --seq pgtable against --seq notifier   ratio = pages/s pgtable / pages/s notifier
          (scenario default: invalidate-disjoint)
  mirror  --mirror page against --mirror range   ratio = pages/s page / pages/s range
          (scenario default: invalidate-overlap)
  host    svm against host-minor-fault           ratio = svm ns/page / host ns/page (P1)
          (scenario default: cpu-populated, with 1 engine and 4K windows unless given)
  waves   --waves N (default 1024) against 1     ratio = pages/s N waves / pages/s 1 wave
          (scenario default: first-touch, with 1 engine, 4K windows and --size 64M
          unless given: 16K items a round, so the ramp at each round's start and
          end, when fewer than N faults can be in flight, stays small)
  prefetch  prefetch against vram-fault          ratio = pages/s prefetched / pages/s faulted
          (the region starts each round in system memory; --window picks the
          migration granularity: 4k, 64k, else 2M)

NO ARGUMENTS: the default storm set: every scenario, then the P1-P7 measurements of
docs/performance.md (--compare host, seq and mirror, thread scaling), a table and the
targets. About 35-45 s on 2 cores; --seconds sets each run's budget (default 1;
each side of a comparison gets twice that).

OUTPUT: a table on stdout (stderr when --json -). --json writes every figure:
  a run:        {"runs": [run]}
  a comparison: {"runs": [run, run], "ratio": R, ...}
  the default set: {"runs": [...], "comparisons": [...], "targets": {...}}
  a --sweep:    {"sweep": {"axes": {...}}, "points": [{"params": {...}, ...}], "runs": [...]}
Every JSON carries "context": svm_version, git_commit, build_type, compiler,
cpu_model, hardware_threads, load_avg, date (docs/performance.md). --csv writes one
row per run, the run's JSON fields flattened (config.engines, fault_latency_ns.p99).
Each run has "config" and wall_s (timed phase: kernels), device_accesses,
faults_raised, faults_serviced, valid_faults, batches, mean_batch, hmm_calls,
retries_busy, retries_seq, false_retries, invalidations, ptes_written, ptes_zapped,
tlb_invalidations, pages_mapped (4K PTEs written; a 2M leaf counts 512), ns_per_page
and pages_per_s (over wall_s), fault_latency_ns {p50, p90, p99, max, histogram},
pt_bytes (device page table, largest after a round), stale_accesses (access oracle),
data_errors (data oracle: every value written is checked where it is read back).
What each figure means, the targets and how to measure: docs/performance.md and
bench/README.md; bench/plot draws a JSON, bench/compare compares two.

EXIT STATUS: 0 ok; 1 the oracle (on) found a stale access or a data error;
3 a kernel or a storm operation failed; 4 a kernel hung (diagnosed on stderr);
5 a --json, --trace or --csv file could not be written; 2 and other values: bad
command line (including an output path that cannot be written, found before the run).
)";
}

// The options for studies (--version, --progress, --csv, --sweep), kept apart
// from the run knobs above.
void add_research_options(CLI::App& app, options& o) {
  app.set_version_flag("-V,--version", version_text(), "Print the version, commit and build, then exit");
  app.add_option("--progress", o.progress,
                 "The progress line on stderr: auto (only when stderr is a terminal), on or off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app.add_option("--csv", o.csv_path, "Write one CSV row per run to FILE ('-': stdout), columns as the JSON fields");
  app.add_option("--sweep", o.sweep_specs,
                 "KNOB=V1,V2,...: run every combination of the values of every --sweep (repeatable) into one "
                 "JSON; knobs: " + sweep_knobs() + "; needs --scenario or --compare")
      ->type_name("KNOB=LIST");
}

// Checks that need the whole command line; the message, or nullopt.
std::optional<std::string> check_research_options(options& o) {
  for (const std::string& spec : o.sweep_specs) {
    options::sweep_axis a;
    if (auto e = parse_sweep(spec, a)) return "--sweep " + spec + ": " + *e;
    for (const options::sweep_axis& b : o.sweeps)
      if (b.knob == a.knob) return "--sweep " + a.knob + " given twice";
    o.sweeps.push_back(std::move(a));
  }
  if (!o.sweeps.empty() && !o.scenario && !o.compare)
    return "--sweep needs --scenario or --compare (sweeping the whole default set would take hours)";
  for (const options::sweep_axis& a : o.sweeps)
    for (const std::string& v : a.values) {
      options probe = o;
      if (auto e = apply_knob(probe, a.knob, v)) return "--sweep " + a.knob + "=" + v + ": " + *e;
    }
  std::string err;
  for (const auto& [path, what] : {std::pair{&o.json_path, "--json"}, {&o.trace_path, "--trace"}, {&o.csv_path, "--csv"}})
    if (!path->empty() && !check_output_path(*path, what, err)) return err;
  int to_stdout = (o.json_path == "-") + (o.csv_path == "-");
  if (to_stdout > 1) return "--json - and --csv - cannot both write to stdout";
  return std::nullopt;
}

}  // namespace

std::optional<int> parse_options(int argc, char** argv, options& o) {
  CLI::App app{
      "svm-storm: fault storms on the modelled HMM-style shared virtual memory.\n"
      "Runs GPU kernels on a simulated faulting device over a simulated process address\n"
      "space, measures the fault path, checks every access with the access oracle and\n"
      "every value with the data oracle, and compares sequence modes, mirrors and the\n"
      "host kernel side by side.",
      "svm-storm"};
  app.footer(footer_text());
  app.get_formatter()->column_width(34);

  std::vector<std::string> names;
  for (const scenario_info& s : scenarios()) names.push_back(s.name);
  std::string scenario;
  app.add_option("-s,--scenario", scenario, "Run one scenario (see SCENARIOS); default: the default storm set")
      ->check(CLI::IsMember(names));
  std::string compare;
  app.add_option("-c,--compare", compare, "Compare side by side: seq, mirror, host, waves or prefetch (see COMPARISONS)")
      ->check(CLI::IsMember({"seq", "mirror", "host", "waves", "prefetch"}));

  run_config& b = o.base;
  auto* eng = app.add_option("-e,--engines", b.engines, "Device engines (threads running work items), 1..256")
                  ->capture_default_str()
                  ->check(CLI::Range(1u, 256u));
  auto* thr = app.add_option("-t,--handler-threads", b.handler_threads, "Fault handler threads, 1..64")
                  ->capture_default_str()
                  ->check(CLI::Range(1u, 64u));
  auto* size_opt = app.add_option("--size", b.size,
                 "Bytes of memory the storm touches per round (K/M/G suffixes, powers of 1024), 64K..1G; "
                 "thp and invalidate-disjoint round it up to 2M")
      ->default_str("16M")
      ->transform(CLI::AsSizeValue(false));
  auto* sec = app.add_option("--seconds", b.seconds, "Time budget of a run, set-up included (at least one round runs); "
                                                     "a comparison splits it over --reps")
                  ->capture_default_str()
                  ->check(CLI::Range(0.001, 3600.0));
  app.add_option("--accesses", b.accesses, "Stop after this many device accesses instead (0: use --seconds)")
      ->capture_default_str();
  app.add_option("--batch", b.batch, "Fault records the handler fetches per batch, 1..256")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  const std::map<std::string, window_choice> windows{{"auto", window_choice::automatic},
                                                     {"largest", window_choice::largest},
                                                     {"4k", window_choice::w4k},
                                                     {"64k", window_choice::w64k},
                                                     {"2m", window_choice::w2m}};
  std::string window = "auto", seq = "pgtable", mirror = "page";
  auto* win = app.add_option("--window", window,
                             "Fault window policy: largest (2M/64K/4K that fits), 4k, 64k, 2m, or auto "
                             "(4k for the invalidate-*/dontneed storms, largest otherwise)")
                  ->check(CLI::IsMember({"auto", "largest", "4k", "64k", "2m"}, CLI::ignore_case))
                  ->capture_default_str();
  app.add_option("--seq", seq, "Sequence mode: pgtable (per device page-table page) or notifier (notifier-wide)")
      ->check(CLI::IsMember({"pgtable", "notifier"}, CLI::ignore_case))
      ->capture_default_str();
  app.add_option("--mirror", mirror, "Mirror: page (page-centric) or range (the range-based, VM-locked baseline, which always uses the notifier-wide sequence)")
      ->check(CLI::IsMember({"page", "range"}, CLI::ignore_case))
      ->capture_default_str();
  app.add_option("--seed", b.seed, "Seed of the data values and the random patterns")->capture_default_str();
  std::string oracle = "on";
  app.add_option("--oracle", oracle, "Access oracle on or off (off: stale_accesses is null and errors do not "
                                     "change the exit status)")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  std::string storm = "on";
  app.add_option("--cpu-storm", storm,
                 "The scenario's concurrent CPU storm: on, off (a quiet baseline), or burn (no storm; a thread that "
                 "only spins in its place: the same CPU taken, nothing invalidated)")
      ->check(CLI::IsMember({"on", "off", "burn"}))
      ->capture_default_str();
  std::string huge = "on";
  app.add_option("--huge-leaves", huge, "Map 2M device leaves over CPU huge pages: on or off")
      ->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  std::string wait_spin = "auto";
  app.add_option("--wait-spin", wait_spin,
                 "ns a faulted wave and an idle fault handler spin for their reply before they sleep on a futex; "
                 "auto: 20000 when engines + handler threads fit in the hardware threads, else 0")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto"}) | CLI::Range(0u, 10'000'000u));
  std::string disjoint_op = "unmap";
  app.add_option("--disjoint-op", disjoint_op,
                 "invalidate-disjoint's CPU operation on the neighbouring 2M block: unmap (munmap + mmap, the "
                 "mmap_lock for write) or dontneed (MADV_DONTNEED + a store, the read lock)")
      ->check(CLI::IsMember({"unmap", "dontneed"}))
      ->capture_default_str();
  app.add_option("--stride", b.stride, "Bytes between accesses in the stride scenario (multiple of 8)")
      ->capture_default_str()
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--reps", o.reps, "Interleaved repetitions of each side of a comparison, 1..100")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  app.add_option("--json", o.json_path, "Write every figure as JSON to FILE ('-': stdout; the table then goes to stderr)");
  app.add_option("--trace", o.trace_path,
                 "Write a Chrome trace-event JSON file (loads in Perfetto): fault batches, hmm_range_fault, "
                 "invalidations, TLB invalidations and the storm's own phases, one track per thread");
  app.add_flag("-q,--quiet", o.quiet, "No progress lines on stderr");
  // ---- waves ----
  app.add_option("-w,--waves", b.waves,
                 "Waves per engine: work items in flight on each engine thread, 1..4096 (1: one at a time, the "
                 "engine stalls on each fault); default: the device's (256)")
      ->check(CLI::Range(1u, 4096u));
  add_research_options(app, o);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!scenario.empty()) o.scenario = scenario;
  if (!compare.empty()) o.compare = compare;
  for (std::string* v : {&window, &seq, &mirror})
    for (char& ch : *v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  b.window = windows.at(window);
  b.seq = seq == "notifier" ? seq_mode::notifier : seq_mode::pgtable;
  b.mirror = mirror == "range" ? mirror_impl::range : mirror_impl::page;
  b.oracle = oracle == "on";
  b.cpu_storm = storm == "on";
  b.cpu_burn = storm == "burn";
  b.huge_leaves = huge == "on";
  b.disjoint_dontneed = disjoint_op == "dontneed";
  if (wait_spin != "auto") b.wait_spin_ns = static_cast<std::uint32_t>(std::stoul(wait_spin));
  o.engines_given = eng->count() > 0;
  o.threads_given = thr->count() > 0;
  o.seconds_given = sec->count() > 0;
  o.window_given = win->count() > 0;
  o.size_given = size_opt->count() > 0;

  auto fail = [&](const std::string& msg) {
    std::fprintf(stderr, "svm-storm: %s\nRun with --help for more information.\n", msg.c_str());
    return 2;
  };
  if (b.size < (std::uint64_t{64} << 10) || b.size > (std::uint64_t{1} << 30))
    return fail("--size must be between 64K and 1G");
  if (b.size % page_size) return fail("--size must be a multiple of 4K");
  if (b.stride < 8 || b.stride % 8 || b.stride > b.size) return fail("--stride must be a multiple of 8, at least 8 and at most --size");
  if (o.compare == "host" && o.scenario == "host-minor-fault")
    return fail("--compare host compares a device scenario against host-minor-fault; pick a device scenario");
  if (o.compare && o.compare != "host" && o.scenario == "host-minor-fault")
    return fail("host-minor-fault has no sequence mode, mirror or waves to compare");
  if (auto e = check_research_options(o)) return fail(*e);
  return std::nullopt;
}

}  // namespace svm::storm
