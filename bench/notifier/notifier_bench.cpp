// notifier/ micro-benchmarks: hmm_range_fault on present pages (4K and 2M
// backing), the model's CPU fault beside the host kernel's minor fault
// (ratio), invalidate start+end with 0/1/1000 notifiers, munmap per page.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <memory>
#include <vector>

#include "svm/notifier/notifier.h"

namespace {

using namespace svm;
using clk = std::chrono::steady_clock;
constexpr std::uint64_t K4 = page_size, M2 = huge_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

struct nop_ops : interval_notifier_ops {
  bool invalidate(interval_notifier& s, const mmu_notifier_range&, std::uint64_t seq) override {
    s.set_seq(seq);
    return true;
  }
};

benchmark::Counter per_page(double pages) {
  return benchmark::Counter(pages, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// hmm_range_fault over 2M of present, writable pages; state.range(0): 1 for
// THP backing (one 2M leaf), 0 for 512 4K PTEs.
void BM_Notifier_HmmRangeFault(benchmark::State& st) {
  const bool huge = st.range(0) != 0;
  mm m({.frames = 4096});
  const va_t va = m.mmap(0, M2, rw, anon_priv).value();
  (void)m.madvise(va, M2, huge ? madvice::hugepage : madvice::nohugepage);
  for (va_t a = va; a < va + M2; a += K4) (void)m.store<int>(a, 1);
  nop_ops ops;
  interval_notifier sub;
  (void)sub.insert(m, va, M2, ops);
  std::vector<hmm_pfn> pfns(512);
  hmm_range r{.notifier = &sub, .start = va, .end = va + M2, .hmm_pfns = pfns,
              .default_flags = hmm_req::fault | hmm_req::write};
  for (auto _ : st) {
    r.notifier_seq = sub.read_begin();
    auto g = m.read_lock();
    benchmark::DoNotOptimize(hmm_range_fault(r));
  }
  if (hmm_pfn_to_map_order(pfns[0]) != (huge ? 9u : 0u)) st.SkipWithError("unexpected map order");
  st.SetItemsProcessed(st.iterations() * 512);
  st.counters["ns_per_page"] = per_page(static_cast<double>(st.iterations()) * 512);
  sub.remove();
}
BENCHMARK(BM_Notifier_HmmRangeFault)->Arg(0)->Arg(1)->ArgName("huge");

// The model's first-touch CPU write fault (4K, anonymous) against the host
// kernel's minor fault on fresh anonymous memory with MADV_NOHUGEPAGE, both
// measured in every iteration. Manual time is the model's; counters give both
// per page and the ratio model / host.
void BM_Notifier_CpuFaultVsHostMinorFault(benchmark::State& st) {
  constexpr std::size_t pages = 256;
  mm m({.frames = 4096});
  double model_ns = 0, host_ns = 0;
  for (auto _ : st) {
    const va_t va = m.mmap(0, pages * K4, rw, anon_priv).value();
    const auto t0 = clk::now();
    for (std::size_t i = 0; i < pages; ++i) benchmark::DoNotOptimize(m.store<int>(va + i * K4, 1));
    const auto t1 = clk::now();
    (void)m.munmap(va, pages * K4);

    void* p = ::mmap(nullptr, pages * K4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      st.SkipWithError("host mmap failed");
      break;
    }
    ::madvise(p, pages * K4, MADV_NOHUGEPAGE);
    auto* b = static_cast<volatile char*>(p);
    const auto h0 = clk::now();
    for (std::size_t i = 0; i < pages; ++i) b[i * K4] = 1;
    const auto h1 = clk::now();
    ::munmap(p, pages * K4);

    const double m_ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
    model_ns += m_ns;
    host_ns += std::chrono::duration<double, std::nano>(h1 - h0).count();
    st.SetIterationTime(m_ns * 1e-9);
  }
  const double n = static_cast<double>(st.iterations()) * pages;
  st.counters["model_ns_per_page"] = model_ns / n;
  st.counters["host_ns_per_page"] = host_ns / n;
  st.counters["model_over_host"] = host_ns > 0 ? model_ns / host_ns : 0;
  st.SetItemsProcessed(static_cast<std::int64_t>(n));
}
BENCHMARK(BM_Notifier_CpuFaultVsHostMinorFault)->UseManualTime();

// invalidate_range_start + invalidate_range_end over a range that every one
// of state.range(0) notifiers (4K each, adjacent) overlaps.
void BM_Notifier_InvalidateStartEnd(benchmark::State& st) {
  const auto n = static_cast<std::size_t>(st.range(0));
  mm m({.frames = 2048});
  const va_t base = va_t{1} << 36;
  nop_ops ops;
  std::vector<std::unique_ptr<interval_notifier>> subs;
  for (std::size_t i = 0; i < n; ++i) {
    subs.push_back(std::make_unique<interval_notifier>());
    (void)subs.back()->insert(m, base + i * K4, K4, ops);
  }
  const va_t end = base + std::max<std::size_t>(n, 1) * K4;
  for (auto _ : st) {
    mmu_notifier_range r;
    r.start = base;
    r.end = end;
    r.event = mmu_notifier_event::clear;
    benchmark::DoNotOptimize(m.invalidate_range_start(r));
    m.invalidate_range_end(r);
  }
  st.counters["notifiers"] = static_cast<double>(n);
  for (auto& s : subs) s->remove();
}
BENCHMARK(BM_Notifier_InvalidateStartEnd)->Arg(0)->Arg(1)->Arg(1000)->ArgName("notifiers");

// munmap of 512 touched 4K pages (one notifier over the range): the time of
// the munmap only, per page.
void BM_Notifier_Munmap(benchmark::State& st) {
  constexpr std::size_t pages = 512;
  mm m({.frames = 4096});
  nop_ops ops;
  interval_notifier sub;
  (void)sub.insert(m, 0, va_t{1} << 47, ops);
  for (auto _ : st) {
    const va_t va = m.mmap(0, pages * K4, rw, anon_priv).value();
    (void)m.madvise(va, pages * K4, madvice::nohugepage);
    for (std::size_t i = 0; i < pages; ++i) (void)m.store<int>(va + i * K4, 1);
    const auto t0 = clk::now();
    benchmark::DoNotOptimize(m.munmap(va, pages * K4));
    const auto t1 = clk::now();
    st.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  st.SetItemsProcessed(st.iterations() * pages);
  st.counters["ns_per_page"] = per_page(static_cast<double>(st.iterations()) * pages);
  sub.remove();
}
BENCHMARK(BM_Notifier_Munmap)->UseManualTime();

}  // namespace

BENCHMARK_MAIN();
