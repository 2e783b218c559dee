// Page-table micro-benchmarks: populate and zap per 4K entry, 2M-leaf
// populate, lock-free translate, contended populate, and page-table bytes per
// mirrored 4K page (P7).
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "svm/pagetable/radix.h"

namespace {

using svm::va_t;
constexpr std::uint64_t K4 = svm::page_size, M2 = svm::huge_size, G1 = svm::giant_size;

struct enc {
  static bool is_valid(std::uint64_t e) { return (e & 2) != 0; }
  static std::uint64_t split(std::uint64_t e, unsigned level, unsigned i) {
    return e + ((std::uint64_t{i} << (9 * (level - 1))) << 12);
  }
};
using table = svm::pt::radix_table<enc>;
auto entry = [](va_t va) { return (va & ~(K4 - 1)) | 6; };

// Populate one 2M window with 512 4K entries (nodes already exist): the
// device fault path's write cost per PTE.
void BM_PageTable_Populate4K(benchmark::State& st) {
  table t;
  (void)t.populate(G1, G1 + M2, 0, entry);
  for (auto _ : st) benchmark::DoNotOptimize(t.populate(G1, G1 + M2, 0, entry));
  st.SetItemsProcessed(st.iterations() * 512);
  st.counters["ns_per_entry"] = benchmark::Counter(static_cast<double>(st.iterations()) * 512,
                                                   benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_PageTable_Populate4K);

// Populate then zap a 2M window of 4K entries; the zap frees the leaf node.
void BM_PageTable_PopulateZap4K(benchmark::State& st) {
  table t;
  std::vector<svm::va_range> flush;
  for (auto _ : st) {
    (void)t.populate(G1, G1 + M2, 0, entry);
    flush.clear();
    (void)t.zap(G1, G1 + M2, flush);
  }
  st.SetItemsProcessed(st.iterations() * 512);
  st.counters["ns_per_entry"] = benchmark::Counter(static_cast<double>(st.iterations()) * 512,
                                                   benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_PageTable_PopulateZap4K);

// 2M leaves over 1 GiB: 512 leaves; reports GiB of VA mapped per second.
void BM_PageTable_Populate2M(benchmark::State& st) {
  table t;
  for (auto _ : st) benchmark::DoNotOptimize(t.populate(G1, 2 * G1, 1, entry));
  st.SetItemsProcessed(st.iterations() * 512);
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * static_cast<std::int64_t>(G1));
}
BENCHMARK(BM_PageTable_Populate2M);

// Lock-free translate of random pages over 1 GiB of 4K leaves.
void BM_PageTable_Translate(benchmark::State& st) {
  static table* t = [] {
    auto* p = new table;
    (void)p->populate(G1, 2 * G1, 0, entry);
    return p;
  }();
  std::mt19937_64 rng(st.thread_index());
  std::vector<va_t> vas(4096);
  for (auto& v : vas) v = G1 + (rng() % (G1 / K4)) * K4;
  std::size_t i = 0;
  for (auto _ : st) benchmark::DoNotOptimize(t->translate(vas[i++ & 4095]));
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_PageTable_Translate)->Threads(1)->Threads(2)->UseRealTime();

// Threads populate 64-entry runs in the same 2M leaf node, or each in its own.
void contended(benchmark::State& st, bool same) {
  static table* t = new table;
  const va_t base = 3 * G1 + (same ? 0 : static_cast<va_t>(st.thread_index()) * M2);
  const va_t off = same ? static_cast<va_t>(st.thread_index() % 8) * 64 * K4 : 0;
  for (auto _ : st) benchmark::DoNotOptimize(t->populate(base + off, base + off + 64 * K4, 0, entry));
  st.SetItemsProcessed(st.iterations() * 64);
}
void BM_PageTable_ContendedPopulateSameLeaf(benchmark::State& st) { contended(st, true); }
void BM_PageTable_ContendedPopulateDifferentLeaves(benchmark::State& st) { contended(st, false); }
BENCHMARK(BM_PageTable_ContendedPopulateSameLeaf)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_PageTable_ContendedPopulateDifferentLeaves)->Threads(1)->Threads(2)->UseRealTime();

// P7: page-table bytes per mirrored 4K page, 4K leaves and 2M leaves, over 1 GiB.
void BM_PageTable_BytesPerPage(benchmark::State& st) {
  double b4 = 0, b2 = 0;
  for (auto _ : st) {
    table t4, t2;
    (void)t4.populate(G1, 2 * G1, 0, entry);
    (void)t2.populate(G1, 2 * G1, 1, entry);
    b4 = static_cast<double>(t4.stats().bytes) / (G1 / K4);
    b2 = static_cast<double>(t2.stats().bytes) / (G1 / K4);
  }
  st.counters["bytes_per_page_4k_leaves"] = b4;
  st.counters["bytes_per_page_2m_leaves"] = b2;
}
BENCHMARK(BM_PageTable_BytesPerPage)->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
