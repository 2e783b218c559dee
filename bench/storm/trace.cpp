#include "trace.h"

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

namespace svm::storm {
namespace {

std::atomic<std::uint64_t> next_sink_id{1};

// The calling thread's buffer in the sink whose id is tl_sink (a thread may
// outlive one sink and record into the next: ids tell them apart).
thread_local std::uint64_t tl_sink = 0;
thread_local void* tl_buf = nullptr;

}  // namespace

chrome_trace::chrome_trace(std::size_t max_events)
    : max_events_(max_events), id_(next_sink_id.fetch_add(1)), t0_(trace_now_ns()) {}

chrome_trace::~chrome_trace() = default;

chrome_trace::thread_buf* chrome_trace::mine() {
  if (tl_sink == id_) return static_cast<thread_buf*>(tl_buf);
  std::lock_guard g(mu_);
  auto b = std::make_unique<thread_buf>();
  b->tid = static_cast<unsigned>(bufs_.size() + 1);
  b->events.reserve(1024);
  thread_buf* p = b.get();
  bufs_.push_back(std::move(b));
  tl_sink = id_;
  tl_buf = p;
  return p;
}

void chrome_trace::span(const char* name, std::uint64_t start_ns, std::uint64_t dur_ns, std::uint64_t arg) noexcept {
  if (recorded_.fetch_add(1, std::memory_order_relaxed) >= max_events_) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  try {
    mine()->events.push_back({name, start_ns, dur_ns, arg});
  } catch (...) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
  }
}

void chrome_trace::fault(std::uint32_t engine, va_t gva, std::uint64_t raise_ns, std::uint64_t done_ns) noexcept {
  if (recorded_.fetch_add(1, std::memory_order_relaxed) >= max_events_) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  try {
    mine()->faults.push_back({engine, gva, raise_ns, done_ns});
  } catch (...) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
  }
}

void chrome_trace::name_thread(const std::string& name) {
  thread_buf* b = mine();
  std::lock_guard g(mu_);
  b->name = name;
}

const char* chrome_trace::intern(const std::string& s) {
  std::lock_guard g(mu_);
  for (const std::string& n : names_)
    if (n == s) return n.c_str();
  return names_.emplace_back(s).c_str();
}

// Engine tracks live in their own process ("device", pid 2), one thread per
// engine; each fault is a "fault_stall" span from its raise to the handler
// finishing it, and a flow ("s" on the engine, "f" on the handler track,
// bound to the enclosing "fault_batch" span) links the two.
template <class Emit>
void chrome_trace::write_engine_tracks(Emit& emit) const {
  std::vector<bool> named;
  std::uint64_t flow = 0;
  auto us = [&](std::uint64_t ns) { return static_cast<double>(ns - std::min(ns, t0_)) / 1000.0; };
  bool any = false;
  for (const auto& b : bufs_) any |= !b->faults.empty();
  if (!any) return;
  emit({{"ph", "M"}, {"pid", 2}, {"tid", 0}, {"name", "process_name"}, {"args", {{"name", "device engines"}}}});
  for (const auto& b : bufs_) {
    for (const fault_event& f : b->faults) {
      if (f.engine >= named.size()) named.resize(f.engine + 1, false);
      if (!named[f.engine]) {
        named[f.engine] = true;
        emit({{"ph", "M"}, {"pid", 2}, {"tid", f.engine + 1}, {"name", "thread_name"},
              {"args", {{"name", "engine " + std::to_string(f.engine)}}}});
      }
      const std::uint64_t done = std::max(f.done_ns, f.raise_ns);
      emit({{"ph", "X"}, {"pid", 2}, {"tid", f.engine + 1}, {"name", "fault_stall"}, {"cat", "fault"},
            {"ts", us(f.raise_ns)}, {"dur", static_cast<double>(done - f.raise_ns) / 1000.0},
            {"args", {{"gva", f.gva}}}});
      ++flow;
      emit({{"ph", "s"}, {"pid", 2}, {"tid", f.engine + 1}, {"name", "fault"}, {"cat", "fault"}, {"id", flow},
            {"ts", us(f.raise_ns)}});
      emit({{"ph", "f"}, {"bp", "e"}, {"pid", 1}, {"tid", b->tid}, {"name", "fault"}, {"cat", "fault"}, {"id", flow},
            {"ts", us(done)}});
    }
  }
}

bool chrome_trace::write(const std::string& path, std::string& err) const {
  std::ofstream out(path, std::ios::trunc);
  if (!out) {
    err = "cannot open " + path + " for writing";
    return false;
  }
  std::lock_guard g(mu_);
  out << "{\"displayTimeUnit\":\"ns\",\"otherData\":{\"producer\":\"svm-storm\",\"dropped_events\":"
      << dropped() << "},\"traceEvents\":[\n";
  bool first = true;
  auto emit = [&](const nlohmann::json& j) {
    out << (first ? "" : ",\n") << j.dump();
    first = false;
  };
  emit({{"ph", "M"}, {"pid", 1}, {"tid", 0}, {"name", "process_name"}, {"args", {{"name", "svm-storm"}}}});
  for (const auto& b : bufs_) {
    std::string name = b->name;
    if (name.empty()) {
      // Unnamed threads are the library's: tell them by what they record.
      bool handler = false, inval = false;
      for (const event& e : b->events) {
        handler |= std::string_view(e.name) == "fault_batch";
        inval |= std::string_view(e.name) == "invalidate";
      }
      name = handler ? "fault handler " : inval ? "invalidating thread " : "thread ";
      name += std::to_string(b->tid);
    }
    emit({{"ph", "M"}, {"pid", 1}, {"tid", b->tid}, {"name", "thread_name"}, {"args", {{"name", name}}}});
    emit({{"ph", "M"}, {"pid", 1}, {"tid", b->tid}, {"name", "thread_sort_index"}, {"args", {{"sort_index", b->tid}}}});
    for (const event& e : b->events) {
      const double ts = static_cast<double>(e.start_ns - std::min(e.start_ns, t0_)) / 1000.0;
      emit({{"ph", "X"}, {"pid", 1}, {"tid", b->tid}, {"name", e.name}, {"cat", "svm"},
            {"ts", ts}, {"dur", static_cast<double>(e.dur_ns) / 1000.0}, {"args", {{"n", e.arg}}}});
    }
  }
  write_engine_tracks(emit);
  out << "\n]}\n";
  out.flush();
  if (!out) {
    err = "write error on " + path;
    return false;
  }
  return true;
}

}  // namespace svm::storm
