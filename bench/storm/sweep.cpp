#include "sweep.h"

#include <cctype>
#include <stdexcept>

#include "report.h"
#include "suite.h"

namespace svm::storm {
namespace {

std::optional<std::uint64_t> parse_size(std::string v) {
  if (v.empty()) return std::nullopt;
  std::uint64_t mul = 1;
  switch (std::tolower(static_cast<unsigned char>(v.back()))) {
    case 'k': mul = 1ull << 10; break;
    case 'm': mul = 1ull << 20; break;
    case 'g': mul = 1ull << 30; break;
    default: break;
  }
  if (mul != 1) v.pop_back();
  if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || v.size() > 12) return std::nullopt;
  return std::stoull(v) * mul;
}

std::optional<unsigned> parse_count(const std::string& v, unsigned lo, unsigned hi) {
  if (v.empty() || v.size() > 9 || v.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  const unsigned long n = std::stoul(v);
  if (n < lo || n > hi) return std::nullopt;
  return static_cast<unsigned>(n);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::string sweep_knobs() { return "engines, handler-threads, size, batch, window, seq, mirror, wait-spin, huge-leaves"; }

std::optional<std::string> parse_sweep(const std::string& spec, options::sweep_axis& out) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0) return std::string("expected KNOB=V1,V2,...");
  out.knob = lower(spec.substr(0, eq));
  out.values.clear();
  std::string rest = spec.substr(eq + 1);
  std::size_t pos = 0;
  while (pos <= rest.size()) {
    const auto comma = rest.find(',', pos);
    const std::string v = rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (v.empty()) return std::string("empty value");
    out.values.push_back(v);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  if (out.values.empty()) return std::string("no values");
  options probe;
  if (auto e = apply_knob(probe, out.knob, out.values.front()); e && e->rfind("unknown knob", 0) == 0) return e;
  return std::nullopt;
}

std::optional<std::string> apply_knob(options& o, const std::string& knob, const std::string& value) {
  run_config& b = o.base;
  const std::string v = lower(value);
  if (knob == "engines") {
    auto n = parse_count(v, 1, 256);
    if (!n) return std::string("engines must be 1..256");
    b.engines = *n;
    o.engines_given = true;
  } else if (knob == "handler-threads") {
    auto n = parse_count(v, 1, 64);
    if (!n) return std::string("handler-threads must be 1..64");
    b.handler_threads = *n;
    o.threads_given = true;
  } else if (knob == "size") {
    auto n = parse_size(v);
    if (!n || *n < (64ull << 10) || *n > (1ull << 30) || *n % page_size) return std::string("size must be a multiple of 4K in 64K..1G");
    b.size = *n;
  } else if (knob == "batch") {
    auto n = parse_count(v, 1, 256);
    if (!n) return std::string("batch must be 1..256");
    b.batch = *n;
  } else if (knob == "window") {
    if (v == "auto") b.window = window_choice::automatic;
    else if (v == "largest") b.window = window_choice::largest;
    else if (v == "4k") b.window = window_choice::w4k;
    else if (v == "64k") b.window = window_choice::w64k;
    else if (v == "2m") b.window = window_choice::w2m;
    else return std::string("window must be auto, largest, 4k, 64k or 2m");
    o.window_given = true;
  } else if (knob == "seq") {
    if (v != "pgtable" && v != "notifier") return std::string("seq must be pgtable or notifier");
    b.seq = v == "notifier" ? seq_mode::notifier : seq_mode::pgtable;
  } else if (knob == "mirror") {
    if (v != "page" && v != "range") return std::string("mirror must be page or range");
    b.mirror = v == "range" ? mirror_impl::range : mirror_impl::page;
  } else if (knob == "wait-spin") {
    if (v == "auto") {
      b.wait_spin_ns.reset();
    } else {
      auto n = parse_count(v, 0, 10'000'000);
      if (!n) return std::string("wait-spin must be auto or 0..10000000");
      b.wait_spin_ns = *n;
    }
  } else if (knob == "huge-leaves") {
    if (v != "on" && v != "off") return std::string("huge-leaves must be on or off");
    b.huge_leaves = v == "on";
  } else {
    return "unknown knob '" + knob + "' (knobs: " + sweep_knobs() + ")";
  }
  return std::nullopt;
}

nlohmann::json run_sweep(const options& o, const runner_options& ro, std::FILE* out, std::deque<run_result>& keep,
                         std::vector<const run_result*>& all) {
  nlohmann::json axes = nlohmann::json::object(), points = nlohmann::json::array(), runs = nlohmann::json::array();
  std::size_t total = 1;
  for (const options::sweep_axis& a : o.sweeps) {
    axes[a.knob] = a.values;
    total *= a.values.size();
  }
  std::vector<std::size_t> idx(o.sweeps.size(), 0);
  for (std::size_t n = 0; n < total; ++n) {
    // The point's indices: the last axis varies fastest.
    std::size_t rest = n;
    for (std::size_t k = o.sweeps.size(); k-- > 0;) {
      idx[k] = rest % o.sweeps[k].values.size();
      rest /= o.sweeps[k].values.size();
    }
    options p = o;
    nlohmann::json params = nlohmann::json::object();
    std::string name;
    for (std::size_t k = 0; k < o.sweeps.size(); ++k) {
      const std::string& v = o.sweeps[k].values[idx[k]];
      (void)apply_knob(p, o.sweeps[k].knob, v);  // validated when the options were parsed
      params[o.sweeps[k].knob] = v;
      name += (name.empty() ? "" : " ") + o.sweeps[k].knob + "=" + v;
    }
    const std::string sc = o.scenario.value_or("");
    if (sc == "thp" || sc == "invalidate-disjoint") p.base.size = align_up(p.base.size, huge_size);
    if (!ro.quiet) std::fprintf(stderr, "svm-storm: sweep point %zu/%zu: %s\n", n + 1, total, name.c_str());
    std::fprintf(out, "\nsweep point %s\n\n", name.c_str());
    nlohmann::json point;
    std::vector<const run_result*> mine;
    if (o.compare) {
      comparison c = run_comparison(p, *o.compare, ro);
      for (run_result& r : c.runs) {
        r.config.label = r.config.label.empty() ? name : r.config.label + ", " + name;
        keep.push_back(r);
        mine.push_back(&keep.back());
      }
      print_table(out, mine);
      print_comparison(out, c);
      point = to_json(c);
    } else {
      p.base.scenario = *o.scenario;
      run_result r = run_one(p.base, ro);
      r.config.label = r.config.label.empty() ? name : r.config.label + ", " + name;
      keep.push_back(std::move(r));
      mine.push_back(&keep.back());
      print_table(out, mine);
      point["runs"] = nlohmann::json::array({to_json(keep.back())});
    }
    point["params"] = params;
    for (const run_result* r : mine) {
      runs.push_back(to_json(*r));
      all.push_back(r);
    }
    points.push_back(std::move(point));
  }
  return {{"sweep", {{"axes", axes}, {"points_total", total}}}, {"points", points}, {"runs", runs}};
}

}  // namespace svm::storm
