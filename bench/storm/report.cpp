#include "report.h"

#include <fstream>
#include <iostream>

namespace svm::storm {

nlohmann::json to_json(const run_config& c) {
  return {
      {"scenario", c.scenario},
      {"label", c.label},
      {"engines", c.engines},
      {"waves", c.waves},
      {"handler_threads", c.handler_threads},
      {"size", c.size},
      {"seconds", c.seconds},
      {"accesses", c.accesses},
      {"batch", c.batch},
      {"window", to_string(c.effective_window())},
      {"seq", c.scenario == "host-minor-fault" ? "n/a" : to_string(c.seq)},
      {"mirror", c.scenario == "host-minor-fault" ? "n/a" : to_string(c.mirror)},
      {"seed", c.seed},
      {"oracle", c.oracle},
      {"cpu_storm", c.cpu_storm ? "on" : c.cpu_burn ? "burn" : "off"},
      {"stride", c.stride},
      {"huge_leaves", c.huge_leaves},
      {"disjoint_op", c.disjoint_dontneed ? "dontneed" : "unmap"},
      {"wait_spin_ns", c.wait_spin_ns ? nlohmann::json(*c.wait_spin_ns) : nlohmann::json("auto")},
  };
}

nlohmann::json to_json(const run_result& r) {
  nlohmann::json lat;
  if (r.host) {
    lat = {{"p50", nullptr}, {"p90", nullptr}, {"p99", nullptr}, {"max", nullptr}, {"histogram", nlohmann::json::array()}};
  } else {
    std::vector<std::uint64_t> h(r.latency.count.begin(), r.latency.count.end());
    lat = {{"p50", r.latency.quantile(0.50)}, {"p90", r.latency.quantile(0.90)}, {"p99", r.latency.quantile(0.99)},
           {"max", r.latency.max_ns()}, {"histogram", h},
           {"histogram_buckets", "bucket i counts faults of [2^i, 2^(i+1)) ns, raise to replay; pN is a bucket's upper bound"}};
  }
  nlohmann::json j = {
      {"config", to_json(r.config)},
      {"wall_s", r.wall_s},
      {"total_s", r.total_s},
      {"rounds", r.rounds},
      {"device_accesses", r.device_accesses},
      {"faults_raised", r.faults_raised},
      {"faults_serviced", r.faults_serviced},
      {"faults_cancelled", r.faults_cancelled},
      {"valid_faults", r.valid_faults},
      {"batches", r.batches},
      {"mean_batch", r.mean_batch},
      {"waves_per_engine", r.waves_per_engine},
      {"distinct_pages_per_batch", r.distinct_per_batch},
      {"coalesced_records", r.coalesced},
      {"outstanding_high_water", r.outstanding_high_water},
      {"faults_per_s", r.faults_per_s},
      {"hmm_calls", r.hmm_calls},
      {"retries_busy", r.retries_busy},
      {"retries_seq", r.retries_seq},
      {"false_retries", r.false_retries},
      {"invalidations", r.invalidations},
      {"ptes_written", r.ptes_written},
      {"ptes_zapped", r.ptes_zapped},
      {"tlb_invalidations", r.tlb_invalidations},
      {"huge_leaves", r.huge_leaves},
      {"bo_faults", r.bo_faults},
      {"evictions", r.evictions},
      {"migrations_to_vram", r.migrations_to_vram},
      {"migrations_to_ram", r.migrations_to_ram},
      {"pages_to_vram", r.pages_to_vram},
      {"pages_to_ram", r.pages_to_ram},
      {"svm_evictions", r.svm_evictions},
      {"bo_restores", r.bo_restores},
      {"migrate_fallbacks", r.migrate_fallbacks},
      {"retries_in_place", r.retries_in_place},
      {"bytes_copied", r.bytes_copied},
      {"migrations_per_s", r.migrations_per_s},
      {"evictions_per_s", r.evictions_per_s},
      {"pages_mapped", r.pages_mapped},
      {"ns_per_page", r.ns_per_page},
      {"pages_per_s", r.pages_per_s},
      {"fault_latency_ns", lat},
      {"pt_bytes", r.pt_bytes},
      {"pt_mapped_pages", r.pt_mapped_pages},
      {"pt_bytes_per_page", r.pt_bytes_per_page},
      {"cpu_ops", r.cpu_ops},
      {"handler_busy_s", r.handler_busy_s},
      {"pages_per_handler_s", r.pages_per_handler_s},
      {"tlb_hits", r.tlb_hits},
      {"tlb_misses", r.tlb_misses},
      {"stale_accesses", r.stale_accesses ? nlohmann::json(*r.stale_accesses) : nlohmann::json(nullptr)},
      {"oracle_checked", r.oracle_checked},
      {"data_errors", r.data_errors},
      {"kernel_errors", r.kernel_errors},
      {"first_error", r.first_error},
      {"clean", clean(r)},
  };
  return j;
}

nlohmann::json to_json(const comparison& c) {
  nlohmann::json runs = nlohmann::json::array();
  for (const run_result& r : c.runs) runs.push_back(to_json(r));
  return {{"compare", c.name}, {"ratio_of", c.ratio_of}, {"runs", runs}, {"ratio", c.ratio}, {"ratio_samples", c.samples}};
}

nlohmann::json to_json(const target_figure& t) {
  return {{"figure", t.figure},
          {"unit", t.unit},
          {"value", t.value ? nlohmann::json(*t.value) : nlohmann::json(nullptr)},
          {"first_bar", t.first_bar},
          {"goal", t.goal},
          {"met", t.met ? nlohmann::json(*t.met) : nlohmann::json(nullptr)},
          {"clean", t.clean},
          {"note", t.note}};
}

namespace {

std::string name_of(const run_result& r) {
  std::string n = r.config.scenario;
  if (!r.config.label.empty()) n += " [" + r.config.label + "]";
  return n;
}

std::string us(std::uint64_t ns) {
  char b[32];
  if (ns < 10000) std::snprintf(b, sizeof b, "%.1f", static_cast<double>(ns) / 1000.0);
  else std::snprintf(b, sizeof b, "%.0f", static_cast<double>(ns) / 1000.0);
  return b;
}

}  // namespace

void print_table(std::FILE* out, const std::vector<const run_result*>& runs) {
  std::fprintf(out, "%-36s %-8s %-5s %3s %4s %2s %-7s %6s %9s %9s %8s %8s %7s %6s %6s %6s %7s %7s %7s %6s %6s %13s %5s %4s\n",
               "scenario", "seq", "mirr", "eng", "wave", "ht", "window", "wall_s", "pages", "ns/page", "Mpage/s",
               "faults", "valid", "batch", "dist", "outHW", "coal", "Mflt/s", "retries", "false", "inval",
               "lat p50/p99us", "stale", "derr");
  for (const run_result* p : runs) {
    const run_result& r = *p;
    const bool h = r.host;
    char lat[40] = "-";
    if (!h && r.latency.total())
      std::snprintf(lat, sizeof lat, "%s/%s", us(r.latency.quantile(0.5)).c_str(), us(r.latency.quantile(0.99)).c_str());
    std::fprintf(out, "%-36.36s %-8s %-5s %3s %4s %2s %-7s %6.2f %9llu %9.1f %8.2f %8llu %7llu %6.1f %6.1f %6llu %7llu %7.3f %7llu %6llu %6llu %13s %5s %4llu%s\n",
                 name_of(r).c_str(), h ? "-" : to_string(r.config.seq), h ? "-" : to_string(r.config.mirror),
                 h ? "-" : std::to_string(r.config.engines).c_str(),
                 h ? "-" : std::to_string(r.waves_per_engine).c_str(),
                 h ? "-" : std::to_string(r.config.handler_threads).c_str(),
                 h ? "-" : to_string(r.config.effective_window()), r.wall_s,
                 static_cast<unsigned long long>(r.pages_mapped), r.ns_per_page, r.pages_per_s / 1e6,
                 static_cast<unsigned long long>(r.faults_raised), static_cast<unsigned long long>(r.valid_faults),
                 r.mean_batch, r.distinct_per_batch, static_cast<unsigned long long>(r.outstanding_high_water),
                 static_cast<unsigned long long>(r.coalesced), r.faults_per_s / 1e6,
                 static_cast<unsigned long long>(r.retries_busy + r.retries_seq),
                 static_cast<unsigned long long>(r.false_retries), static_cast<unsigned long long>(r.invalidations),
                 lat, r.stale_accesses ? std::to_string(*r.stale_accesses).c_str() : "off",
                 static_cast<unsigned long long>(r.data_errors), r.kernel_errors ? "  KERNEL ERROR" : "");
    // Device memory, for the runs that moved any: a second line.
    if (r.migrations_to_vram + r.migrations_to_ram + r.evictions + r.svm_evictions + r.bo_restores)
      std::fprintf(out,
                   "  %-34s migrations %llu to VRAM (%llu pages), %llu back (%llu pages), %.0f/s; %.1f MiB copied; "
                   "evictions %llu BO + %llu SVM, %.0f/s; BOs back %llu; fallbacks %llu; retried in place %llu\n",
                   "", static_cast<unsigned long long>(r.migrations_to_vram),
                   static_cast<unsigned long long>(r.pages_to_vram), static_cast<unsigned long long>(r.migrations_to_ram),
                   static_cast<unsigned long long>(r.pages_to_ram), r.migrations_per_s,
                   static_cast<double>(r.bytes_copied) / (1 << 20), static_cast<unsigned long long>(r.evictions),
                   static_cast<unsigned long long>(r.svm_evictions), r.evictions_per_s,
                   static_cast<unsigned long long>(r.bo_restores), static_cast<unsigned long long>(r.migrate_fallbacks),
                   static_cast<unsigned long long>(r.retries_in_place));
  }
}

void print_comparison(std::FILE* out, const comparison& c) {
  std::string s;
  for (double v : c.samples) {
    char b[32];
    std::snprintf(b, sizeof b, "%s%.3f", s.empty() ? "" : ", ", v);
    s += b;
  }
  double lo = c.samples.empty() ? 0 : *std::min_element(c.samples.begin(), c.samples.end());
  double hi = c.samples.empty() ? 0 : *std::max_element(c.samples.begin(), c.samples.end());
  std::fprintf(out, "  --compare %-8s ratio %.3f  (%s; median of %zu interleaved reps [%s], spread %.3f..%.3f)\n",
               c.name.c_str(), c.ratio, c.ratio_of.c_str(), c.samples.size(), s.c_str(), lo, hi);
}

void print_targets(std::FILE* out, const std::vector<target_figure>& ts) {
  for (const target_figure& t : ts) {
    char v[64] = "not measured";
    if (t.value) std::snprintf(v, sizeof v, "%.4g %s", *t.value, t.unit.c_str());
    const char* verdict = !t.met ? "" : *t.met ? "meets first bar" : "MISSES first bar";
    std::fprintf(out, "  %-3s %-58s %-22s %-17s (bar %s; goal %s)%s\n      %s\n", t.id.c_str(), t.figure.c_str(), v,
                 verdict, t.first_bar.c_str(), t.goal.c_str(), t.clean ? "" : "  [NOT VOUCHED: oracle errors]",
                 t.note.c_str());
  }
}

void print_problems(std::FILE* out, const std::vector<const run_result*>& runs) {
  for (const run_result* r : runs) {
    if (clean(*r)) continue;
    std::fprintf(out, "  PROBLEM in %s: stale %s, data errors %llu, kernel errors %llu: %s\n", name_of(*r).c_str(),
                 r->stale_accesses ? std::to_string(*r->stale_accesses).c_str() : "off",
                 static_cast<unsigned long long>(r->data_errors), static_cast<unsigned long long>(r->kernel_errors),
                 r->first_error.c_str());
  }
}

bool write_json(const std::string& path, const nlohmann::json& j, std::string& err) {
  const std::string text = j.dump(2) + "\n";
  if (path == "-") {
    std::cout << text << std::flush;
    return static_cast<bool>(std::cout);
  }
  std::ofstream f(path, std::ios::trunc);
  if (!f) {
    err = "cannot open " + path + " for writing";
    return false;
  }
  f << text;
  f.flush();
  if (!f) {
    err = "write error on " + path;
    return false;
  }
  return true;
}

}  // namespace svm::storm
