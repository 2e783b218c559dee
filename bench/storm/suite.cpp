#include "suite.h"

#include <algorithm>
#include <cstdio>
#include <thread>

#include "scenario.h"

namespace svm::storm {
namespace {

double pps_ratio(const run_result& a, const run_result& b) { return b.pages_per_s > 0 ? a.pages_per_s / b.pages_per_s : 0; }
double ns_ratio(const run_result& a, const run_result& b) { return b.ns_per_page > 0 ? a.ns_per_page / b.ns_per_page : 0; }

unsigned max_threads() { return std::clamp(std::thread::hardware_concurrency(), 1u, 64u); }

std::string fmt(const char* f, double a, double b = 0, double c = 0, double d = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

std::string spread(const comparison& c) {
  if (c.samples.empty()) return "";
  const auto [lo, hi] = std::minmax_element(c.samples.begin(), c.samples.end());
  return fmt("; %.0f reps, spread %.3f..%.3f", static_cast<double>(c.samples.size()), *lo, *hi);
}

const run_result* find_run(const std::vector<run_result>& runs, const std::string& scenario) {
  for (const run_result& r : runs)
    if (r.config.scenario == scenario) return &r;
  return nullptr;
}

target_figure make_target(std::string id, std::string figure, std::string unit, std::optional<double> value,
                          std::string first_bar, std::string goal) {
  target_figure t;
  t.id = std::move(id);
  t.figure = std::move(figure);
  t.unit = std::move(unit);
  t.value = value;
  t.first_bar = std::move(first_bar);
  t.goal = std::move(goal);
  return t;
}

}  // namespace

void comparison_sides(const options& o, const std::string& name, run_config& a, run_config& b) {
  a = o.base;
  if (name == "seq") {
    a.scenario = o.scenario.value_or("invalidate-disjoint");
    b = a;
    a.seq = seq_mode::pgtable;
    b.seq = seq_mode::notifier;
    a.label = "seq pgtable";
    b.label = "seq notifier";
  } else if (name == "mirror") {
    a.scenario = o.scenario.value_or("invalidate-overlap");
    if (!o.threads_given) a.handler_threads = max_threads();
    b = a;
    a.mirror = mirror_impl::page;
    b.mirror = mirror_impl::range;
    b.seq = seq_mode::notifier;  // the baseline always uses the notifier-wide sequence
    a.label = "mirror page";
    b.label = "mirror range";
  } else if (name == "waves") {
    // N waves per engine against 1 (the engine stalls on each fault), one
    // engine and 4K windows unless given: what many faults in flight buy.
    a.scenario = o.scenario.value_or("first-touch");
    if (!o.engines_given) a.engines = 1;
    if (!o.window_given) a.window = window_choice::w4k;
    if (a.waves == 0) a.waves = 1024;
    // Many more items than waves: at 16M (4096 items) a quarter of each
    // round would be the ramp up and down of 1024 waves.
    if (!o.size_given) a.size = 64ull << 20;
    b = a;
    b.waves = 1;
    a.label = "waves " + std::to_string(a.waves);
    b.label = "waves 1";
  } else if (name == "prefetch") {
    a.scenario = "prefetch";
    b = a;
    b.scenario = "vram-fault";
    a.label = "prefetched";
    b.label = "faulted";
  } else {  // host
    a.scenario = o.scenario.value_or("cpu-populated");
    if (!o.engines_given) a.engines = 1;
    if (!o.window_given) a.window = window_choice::w4k;
    b = a;
    b.scenario = "host-minor-fault";
    a.label = "svm";
    b.label = "host";
  }
}

comparison run_comparison(const options& o, const std::string& name, const runner_options& ro) {
  run_config a, b;
  comparison_sides(o, name, a, b);
  if (name == "host")
    return compare(name, "svm ns/page / host ns/page (P1: <= 1.0)", a, b, o.reps, ro, ns_ratio);
  if (name == "seq") return compare(name, "pages/s pgtable / pages/s notifier", a, b, o.reps, ro, pps_ratio);
  if (name == "waves") return compare(name, "pages/s N waves / pages/s 1 wave", a, b, o.reps, ro, pps_ratio);
  if (name == "prefetch")
    return compare(name, "pages/s prefetched / pages/s faulted", a, b, o.reps, ro, pps_ratio);
  return compare(name, "pages/s page / pages/s range (P5: >= 2)", a, b, o.reps, ro, pps_ratio);
}

suite_result run_suite(const options& o, const runner_options& ro) {
  suite_result s;
  run_config base = o.base;
  if (!o.seconds_given) base.seconds = 1.0;
  // Each side of a comparison gets twice a scenario run's budget, split
  // over the interleaved repetitions (the ratios are what is noisy).
  run_config cbase = base;
  cbase.seconds = 2 * base.seconds;
  const unsigned reps = o.reps;
  auto say = [&](const char* what) {
    if (!ro.quiet) std::fprintf(stderr, "svm-storm: %s\n", what);
  };

  // ---- every scenario -------------------------------------------------------
  say("the scenarios, one run each");
  for (const scenario_info& si : scenarios()) {
    run_config c = base;
    c.scenario = si.name;
    s.table.push_back(run_one(c, ro));
  }

  // ---- P1: svm's 4K fault path against the host's minor fault ---------------
  say("P1: --compare host (cpu-populated, 1 engine, 4K windows, against host-minor-fault)");
  {
    options p = o;
    p.base = cbase;
    p.scenario = "cpu-populated";
    p.engines_given = p.window_given = false;
    p.reps = reps;
    s.comps.push_back(run_comparison(p, "host", ro));
  }

  // ---- P4: seq modes with and without the disjoint invalidation storm --------
  say("P4: --compare seq on invalidate-disjoint, with the CPU storm and without (quiet)");
  comparison seq, quiet;
  run_result p4_dontneed, p4_burn;
  {
    options p = o;
    p.base = cbase;
    p.scenario = "invalidate-disjoint";
    run_config pg, nf;
    comparison_sides(p, "seq", pg, nf);
    run_config pgq = pg, nfq = nf;
    pgq.cpu_storm = nfq.cpu_storm = false;
    pgq.label = "seq pgtable, quiet";
    nfq.label = "seq notifier, quiet";
    // The same storm made of MADV_DONTNEED (the mmap_lock for read): what
    // is lost to the sequence protocol once mmap_lock writers are gone.
    run_config pgd = pg;
    pgd.disjoint_dontneed = true;
    pgd.label = "seq pgtable, dontneed storm";
    // The control: no storm, but a thread that only spins in its place. On
    // a machine with fewer cores than threads, it tells the throughput lost
    // to invalidation from that lost to the storm thread's CPU time.
    run_config pgb = pgq;
    pgb.cpu_burn = true;
    pgb.label = "seq pgtable, burn control";
    std::vector<std::vector<run_result>> per;
    auto merged = interleave({pg, nf, pgq, nfq, pgd, pgb}, reps, ro, &per);
    p4_dontneed = merged[4];
    p4_burn = merged[5];
    seq.name = "seq";
    seq.ratio_of = "pages/s pgtable / pages/s notifier, with the disjoint invalidation storm";
    seq.runs = {merged[0], merged[1]};
    quiet.name = "seq-quiet";
    quiet.ratio_of = "pages/s pgtable / pages/s notifier, no CPU storm (P4's baseline)";
    quiet.runs = {merged[2], merged[3]};
    for (std::size_t i = 0; i < per[0].size(); ++i) {
      seq.samples.push_back(pps_ratio(per[0][i], per[1][i]));
      quiet.samples.push_back(pps_ratio(per[2][i], per[3][i]));
    }
    seq.ratio = median(seq.samples);
    quiet.ratio = median(quiet.samples);
    s.comps.push_back(seq);
    s.comps.push_back(quiet);
  }

  // ---- P5: page-centric against the range-based baseline ----------------------
  say("P5: --compare mirror on invalidate-overlap, max handler threads");
  {
    options p = o;
    p.base = cbase;
    p.scenario = "invalidate-overlap";
    p.threads_given = false;
    p.reps = reps;
    s.comps.push_back(run_comparison(p, "mirror", ro));
  }

  // ---- P6: scaling of disjoint fault storms, 1 against 2 threads -------------
  say("P6: cpu-populated with 4K windows, 2 engines + 2 handler threads against 1 + 1 (no wait spin on either side)");
  {
    run_config two = cbase, one = cbase;
    two.scenario = one.scenario = "cpu-populated";
    two.window = one.window = window_choice::w4k;
    two.engines = two.handler_threads = 2;
    one.engines = one.handler_threads = 1;
    // The same wait policy on both sides (no spinning): the automatic one
    // spins for 1 + 1 on 2 cores and not for 2 + 2, which would measure the
    // policy, not the scaling.
    two.wait_spin_ns = one.wait_spin_ns = 0u;
    two.label = "2 threads";
    one.label = "1 thread";
    s.comps.push_back(compare("scaling", "pages/s with 2 engines + 2 handler threads / with 1 + 1 (P6: >= 1.7)", two,
                              one, reps, ro, pps_ratio));
  }

  // ---- P7: page-table bytes per page over 1 GiB --------------------------------
  // Bytes per page include the root and upper levels, a fixed cost that only
  // a large mapping amortises (the table's 16M runs show it at small sizes).
  say("P7: cpu-populated and thp over 1G, one round each (about 1 GiB of memory each)");
  run_result p7, p7h;
  {
    run_config c = base;
    c.scenario = "cpu-populated";
    c.size = std::uint64_t{1} << 30;
    c.seconds = 0.001;  // one round
    c.label = "P7 1G";
    p7 = run_one(c, ro);
    c.scenario = "thp";
    c.label = "P7h 1G";
    p7h = run_one(c, ro);
  }

  // ---- the targets -------------------------------------------------------------
  const comparison& host = s.comps[0];
  const comparison& mirror = s.comps[3];
  const comparison& scaling = s.comps[4];
  auto both_clean = [](const comparison& c) { return std::all_of(c.runs.begin(), c.runs.end(), [](auto& r) { return clean(r); }); };
  {
    target_figure t = make_target("P1", "svm 4K fault / host minor fault (same run)", "x", host.ratio, "<= 1.0", "<= 0.2");
    t.met = host.ratio <= 1.0;
    t.clean = both_clean(host);
    t.note = fmt("svm %.0f ns/page (cpu-populated, 1 engine, 4K windows, raise->service->replay per page) vs host %.0f ns/page",
                 host.runs[0].ns_per_page, host.runs[1].ns_per_page) + spread(host);
    s.targets.push_back(t);
  }
  if (const run_result* r = find_run(s.table, "cpu-populated")) {
    // Per core: pages mapped per second of handler time (the driver's CPU
    // cost); the end-to-end figure also pays for the simulated device's
    // accesses of every page, and stands beside it.
    const double v = r->pages_per_handler_s;
    target_figure t = make_target("P2", "batched 2M windows, 4K PTEs: pages/s per handler core", "pages/s", v, ">= 10 M", ">= 50 M");
    t.met = v >= 10e6;
    t.clean = clean(*r);
    t.note = fmt("cpu-populated, largest windows, %.0f engines, %.0f handler thread(s): %.3f s of handler time for %.0f pages; ",
                 r->config.engines, r->config.handler_threads, r->handler_busy_s, static_cast<double>(r->pages_mapped)) +
             fmt("end to end (kernel wall time, device accesses included) %.2f M pages/s, %.1f ns/page; single run",
                 r->pages_per_s / 1e6, r->ns_per_page);
    s.targets.push_back(t);
  }
  if (const run_result* r = find_run(s.table, "thp")) {
    const double bytes = static_cast<double>(r->pages_mapped) * page_size;
    const double v = r->handler_busy_s > 0 ? bytes / r->handler_busy_s / double(1 << 30) : 0;
    const double wall = r->wall_s > 0 ? bytes / r->wall_s / double(1 << 30) : 0;
    target_figure t = make_target("P3", "2M CPU huge pages as 2M device leaves: GiB of VA/s per handler core", "GiB/s", v, ">= 100", ">= 1000");
    t.met = v >= 100 && r->huge_leaves > 0;
    t.clean = clean(*r);
    t.note = fmt("thp scenario: %.0f 2M leaves written, %.0f pages, %.4f s of handler time; ", static_cast<double>(r->huge_leaves),
                 static_cast<double>(r->pages_mapped), r->handler_busy_s) +
             fmt("end to end (kernel wall time, one device access per 4K page included) %.1f GiB/s", wall) +
             (r->huge_leaves ? "" : " -- NO 2M leaves: the figure is not P3's");
    s.targets.push_back(t);
  }
  {
    const run_result &pg = seq.runs[0], &nf = seq.runs[1], &pgq = quiet.runs[0], &nfq = quiet.runs[1];
    target_figure t = make_target("P4a", "disjoint invalidation storm: false retries, pgtable mode", "retries",
                    static_cast<double>(pg.false_retries), "0", "0 at 16 threads");
    t.met = pg.false_retries == 0 && pg.cpu_ops > 0;
    t.clean = clean(pg) && clean(nf);
    t.note = fmt("notifier mode beside it: %.0f false retries (of %.0f retries); CPU unmap+remap ops: pgtable %.0f, notifier %.0f",
                 static_cast<double>(nf.false_retries), static_cast<double>(nf.retries_busy + nf.retries_seq),
                 static_cast<double>(pg.cpu_ops), static_cast<double>(nf.cpu_ops));
    s.targets.push_back(t);
    const double lost = pgq.pages_per_s > 0 ? 100.0 * (1.0 - pg.pages_per_s / pgq.pages_per_s) : 0;
    const double lost_nf = nfq.pages_per_s > 0 ? 100.0 * (1.0 - nf.pages_per_s / nfq.pages_per_s) : 0;
    target_figure l = make_target("P4b", "disjoint invalidation storm: throughput lost, pgtable mode", "%", lost, "<= 10 %", "the same at 16 threads");
    l.met = lost <= 10.0;
    l.clean = clean(pg) && clean(pgq) && clean(nf) && clean(nfq);
    l.note = fmt("pgtable %.2f M pages/s with the storm vs %.2f quiet; notifier mode loses %.1f %%", pg.pages_per_s / 1e6,
                 pgq.pages_per_s / 1e6, lost_nf) +
             fmt(" (%.2f vs %.2f M pages/s); seq ratio with storm %.3f", nf.pages_per_s / 1e6, nfq.pages_per_s / 1e6,
                 seq.ratio) + spread(seq) + "; the CPU storm also takes a core of 2";
    s.targets.push_back(l);
    const run_result& pgd = p4_dontneed;
    const double lost_d = pgq.pages_per_s > 0 ? 100.0 * (1.0 - pgd.pages_per_s / pgq.pages_per_s) : 0;
    target_figure d = make_target("P4c", "the same with a DONTNEED storm (no mmap_lock writer): throughput lost, pgtable mode",
                                  "%", lost_d, "-", "-");
    d.met = std::nullopt;
    d.clean = clean(pgd) && clean(pgq);
    d.note = fmt("pgtable %.2f M pages/s with the DONTNEED storm vs %.2f quiet; %.0f false retries; CPU ops %.0f",
                 pgd.pages_per_s / 1e6, pgq.pages_per_s / 1e6, static_cast<double>(pgd.false_retries),
                 static_cast<double>(pgd.cpu_ops)) +
             "; the storm thread still takes a core of 2";
    s.targets.push_back(d);
    const run_result& pgb = p4_burn;
    const double lost_b = pgb.pages_per_s > 0 ? 100.0 * (1.0 - pg.pages_per_s / pgb.pages_per_s) : 0;
    const double lost_bd = pgb.pages_per_s > 0 ? 100.0 * (1.0 - pgd.pages_per_s / pgb.pages_per_s) : 0;
    target_figure b = make_target("P4d", "P4b against a control that burns the storm's CPU: lost to invalidation alone",
                                  "%", lost_b, "-", "-");
    b.met = std::nullopt;
    b.clean = clean(pg) && clean(pgb) && clean(pgd);
    b.note = fmt("pgtable %.2f M pages/s with the unmap storm, %.2f with the DONTNEED storm (%.1f %% lost), ",
                 pg.pages_per_s / 1e6, pgd.pages_per_s / 1e6, lost_bd) +
             fmt("%.2f with a spinning thread and no storm (vs %.2f quiet)", pgb.pages_per_s / 1e6,
                 pgq.pages_per_s / 1e6);
    s.targets.push_back(b);
  }
  {
    target_figure t = make_target("P5", "page-centric / range baseline, overlapping storm, max threads", "x", mirror.ratio, ">= 2", ">= 5");
    t.met = mirror.ratio >= 2.0;
    t.clean = both_clean(mirror);
    t.note = fmt("invalidate-overlap, %.0f handler threads, %.0f engines: page %.2f M pages/s vs range %.2f M pages/s",
                 mirror.runs[0].config.handler_threads, mirror.runs[0].config.engines, mirror.runs[0].pages_per_s / 1e6,
                 mirror.runs[1].pages_per_s / 1e6) + spread(mirror);
    s.targets.push_back(t);
  }
  {
    target_figure t = make_target("P6", "scaling of disjoint fault storms, 2 threads / 1", "x", scaling.ratio, ">= 1.7 on 2", ">= 12 on 16");
    t.met = scaling.ratio >= 1.7;
    t.clean = both_clean(scaling);
    t.note = fmt("cpu-populated, 4K windows, no wait spin on either side: %.2f vs %.2f M pages/s", scaling.runs[0].pages_per_s / 1e6,
                 scaling.runs[1].pages_per_s / 1e6) + spread(scaling) +
             fmt("; this machine has %.0f hardware threads, so 16 is not measured", max_threads());
    s.targets.push_back(t);
  }
  {
    target_figure t = make_target("P7", "device page-table bytes per mirrored 4K page, 4K leaves", "B/page", p7.pt_bytes_per_page,
                    "<= 8.2", "-");
    t.met = p7.pt_bytes_per_page <= 8.2 && p7.pt_mapped_pages > 0;
    t.clean = clean(p7);
    t.note = fmt("cpu-populated over 1G: %.0f bytes for %.0f mapped pages (root and upper levels included)",
                 static_cast<double>(p7.pt_bytes), static_cast<double>(p7.pt_mapped_pages));
    if (const run_result* r = find_run(s.table, "cpu-populated"))
      t.note += fmt("; at the table's %.0f M: %.2f B/page", static_cast<double>(r->config.size >> 20), r->pt_bytes_per_page);
    s.targets.push_back(t);
  }
  {
    target_figure t = make_target("P7h", "device page-table bytes per mirrored 4K page, 2M leaves", "B/page", p7h.pt_bytes_per_page, "-", "<= 0.05");
    t.met = std::nullopt;
    t.clean = clean(p7h);
    t.note = fmt("thp over 1G: %.0f bytes for %.0f mapped pages, %.0f 2M leaves written",
                 static_cast<double>(p7h.pt_bytes), static_cast<double>(p7h.pt_mapped_pages), static_cast<double>(p7h.huge_leaves));
    if (const run_result* r = find_run(s.table, "thp"))
      t.note += fmt("; at the table's %.0f M: %.3f B/page (the fixed upper levels dominate)",
                    static_cast<double>(r->config.size >> 20), r->pt_bytes_per_page);
    if (p7h.huge_leaves == 0) t.note += " -- NO 2M leaves: the figure is not P7h's";
    s.targets.push_back(t);
  }
  {
    target_figure t = make_target("P8", "device access: TLB hit; TLB miss that finds a PTE", "ns", std::nullopt, "<= 5; <= 50", "<= 2; <= 20");
    t.note = "measured by the device micro-benchmark, not here: svm_device_sim_bench "
             "--benchmark_filter='BM_DeviceSim_Tlb(Hit|MissWalk)' (release preset)";
    s.targets.push_back(t);
  }
  s.table.push_back(std::move(p7));
  s.table.push_back(std::move(p7h));
  s.table.push_back(std::move(p4_dontneed));
  return s;
}

}  // namespace svm::storm
