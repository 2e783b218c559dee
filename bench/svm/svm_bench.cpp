// svm/ micro-benchmarks: the driver's pieces one at a time.
//  - BM_Svm_Fault4K: one device fault on CPU-populated memory with a 4K
//    window, end to end (raise, service, replay, the access), one engine and
//    one handler; Arg: the wait spin in ns (0: futex hand-offs).
//  - BM_Svm_Fault2MWindow: one fault that mirrors a whole 2M window of
//    CPU-populated 4K pages (512 PTEs): ns per page mirrored.
//  - BM_Svm_InvalidateMapped2M: the notifier callback's cost when the CPU
//    invalidates 2M the device maps (mprotect to the same protection: zap,
//    TLB shootdown, no CPU pages freed), per page; both sequence modes.
//  - BM_Svm_BindUnbind: VM_BIND map then unmap of a 64K BO range.
//  - BM_Svm_Migrate2M: one 2M chunk of CPU-written 4K pages migrated to VRAM
//    (Arg 1, gpu_vm::prefetch) or back to system memory (Arg 0), per page:
//    setup (collect, unmap, MIGRATE invalidation), copy, finalize.
//  - BM_Svm_Copy2M: the copy engine alone moving 512 frames system -> VRAM
//    (one scattered request, as the migration queues them): the copy part
//    of BM_Svm_Migrate2M; the rest is PTE and bookkeeping work.
//  - BM_Svm_FaultResident2M: a device fault mapping a whole 2M window that
//    lies in VRAM (Arg 1: 512 aperture::vram PTEs) or in system memory
//    (Arg 0), per page.
//  - BM_Svm_Evict2M: VRAM full of migrated 2M chunks; each iteration
//    migrates one more chunk, which evicts the least recently used one back
//    to system memory: per 2M migrated in and evicted.
// Figures are reported, never asserted; svm-storm measures whole storms.
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <vector>

#include "svm/svm/gpu_vm.h"

namespace {

using namespace svm;
using namespace std::chrono_literals;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

benchmark::Counter per(double n) { return benchmark::Counter(n, benchmark::Counter::kIsRate | benchmark::Counter::kInvert); }

struct rig {
  rig(seq_mode seq, std::uint64_t window, std::uint32_t spin_ns, std::uint64_t vram_bytes = std::uint64_t{64} << 20)
      : m(mm_options{.frames = 16384}),
        dev_owner(driver::create(driver_config{.hw = {.engines = 1, .vram_bytes = vram_bytes},
                                               .handler_threads = 1,
                                               .wait_spin_ns = spin_ns})
                      .value()),
        dev(*dev_owner) {
    vm_config c;
    c.seq = seq;
    c.window = std::make_shared<fixed_window_policy>(window);
    vm = gpu_vm::create(dev, m, c).value();
  }
  ~rig() { vm.reset(); }
  va_t populated(std::uint64_t bytes) {
    const va_t va = m.mmap(0, bytes, rw, anon_priv).value();
    (void)m.madvise(va, bytes, madvice::nohugepage);
    for (va_t a = va; a < va + bytes; a += page_size) (void)m.store<std::uint64_t>(a, a);
    return va;
  }
  /// One work item touching `pages` pages `stride` apart; returns when done.
  void touch(va_t va, std::uint64_t pages, std::uint64_t stride) {
    auto c = dev.submit(*vm, 1, [=](dev::work_item& wi) {
      for (std::uint64_t i = 0; i < pages; ++i) (void)wi.load<std::uint64_t>(va + i * stride);
    });
    (void)c->wait(60s);
  }
  /// Drop the device's mappings, keep the CPU's.
  void reset(va_t va, std::uint64_t bytes) { (void)m.mprotect(va, bytes, rw); }

  mm m;
  std::unique_ptr<driver> dev_owner;
  driver& dev;
  std::unique_ptr<gpu_vm> vm;
};

void BM_Svm_Fault4K(benchmark::State& st) {
  rig r(seq_mode::pgtable, page_size, static_cast<std::uint32_t>(st.range(0)));
  constexpr std::uint64_t pages = 512;
  const va_t va = r.populated(pages * page_size);
  std::uint64_t faults = 0;
  for (auto _ : st) {
    st.PauseTiming();
    r.reset(va, pages * page_size);
    st.ResumeTiming();
    r.touch(va, pages, page_size);
    faults += pages;
  }
  st.counters["ns_per_fault"] = per(static_cast<double>(faults));
}
BENCHMARK(BM_Svm_Fault4K)->Arg(20000)->Arg(0)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_Svm_Fault2MWindow(benchmark::State& st) {
  rig r(seq_mode::pgtable, huge_size, 20000);
  constexpr std::uint64_t windows = 8;
  const va_t raw = r.populated((windows + 1) * huge_size);
  const va_t va = align_up(raw, huge_size);
  std::uint64_t pages = 0;
  for (auto _ : st) {
    st.PauseTiming();
    r.reset(va, windows * huge_size);
    st.ResumeTiming();
    r.touch(va, windows, huge_size);  // one fault per window
    pages += windows * (huge_size / page_size);
  }
  st.counters["ns_per_page"] = per(static_cast<double>(pages));
}
BENCHMARK(BM_Svm_Fault2MWindow)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_Svm_InvalidateMapped2M(benchmark::State& st) {
  const seq_mode seq = st.range(0) ? seq_mode::pgtable : seq_mode::notifier;
  rig r(seq, huge_size, 20000);
  const va_t raw = r.populated(2 * huge_size);
  const va_t va = align_up(raw, huge_size);
  std::uint64_t pages = 0;
  for (auto _ : st) {
    st.PauseTiming();
    r.touch(va, 1, huge_size);  // map the 2M window again
    st.ResumeTiming();
    r.reset(va, huge_size);  // the callback zaps 512 PTEs and shoots the TLB down
    pages += huge_size / page_size;
  }
  st.counters["ns_per_page"] = per(static_cast<double>(pages));
  st.SetLabel(to_string(seq));
}
BENCHMARK(BM_Svm_InvalidateMapped2M)->Arg(1)->Arg(0)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_Svm_BindUnbind(benchmark::State& st) {
  rig r(seq_mode::pgtable, page_size, 0);
  constexpr std::uint64_t size = 16 * page_size;
  const bo_id bo = r.vm->create_bo(size, placement::system).value();
  const va_t at = 0x7c00'0000'0000;
  for (auto _ : st) {
    if (r.vm->bind(bo, at, 0, size) != errc::ok) st.SkipWithError("bind failed");
    if (r.vm->unbind(at, size) != errc::ok) st.SkipWithError("unbind failed");
  }
  (void)r.vm->destroy_bo(bo);
}
BENCHMARK(BM_Svm_BindUnbind)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---- device memory -----------------------------------------------------------------

struct vram_rig : rig {
  explicit vram_rig(std::uint64_t vram_bytes = std::uint64_t{64} << 20)
      : rig(seq_mode::pgtable, huge_size, 20000, vram_bytes) {}
  /// `chunks` 2M-aligned chunks of CPU-written 4K pages, preferred in VRAM
  /// at 2M granularity.
  va_t chunks(std::uint64_t n) {
    const va_t raw = populated((n + 1) * huge_size);
    const va_t va = align_up(raw, huge_size);
    svm_attrs a;
    a.preferred = mem_location::vram;
    a.granularity = huge_size;
    (void)vm->set_attrs(va, n * huge_size, a);
    return va;
  }
};

void BM_Svm_Migrate2M(benchmark::State& st) {
  const bool to_vram = st.range(0) != 0;
  vram_rig r;
  const va_t va = r.chunks(1);
  std::uint64_t pages = 0;
  for (auto _ : st) {
    st.PauseTiming();
    if (r.vm->prefetch(va, huge_size, to_vram ? mem_location::system : mem_location::vram) != errc::ok)
      st.SkipWithError("prefetch (untimed) failed");
    st.ResumeTiming();
    if (r.vm->prefetch(va, huge_size, to_vram ? mem_location::vram : mem_location::system) != errc::ok)
      st.SkipWithError("prefetch failed");
    pages += huge_size / page_size;
  }
  st.counters["ns_per_page"] = per(static_cast<double>(pages));
  st.SetLabel(to_vram ? "to VRAM" : "to system");
}
BENCHMARK(BM_Svm_Migrate2M)->Arg(1)->Arg(0)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_Svm_Copy2M(benchmark::State& st) {
  vram_rig r;
  frame_pool& sys = r.m.pool();
  frame_pool& vram = *r.dev.vram().pool();
  std::vector<pfn_t> src, dst;
  for (int i = 0; i < 512; ++i) src.push_back(sys.alloc().value());
  if (r.dev.vram().alloc(512, dst) != errc::ok) st.SkipWithError("VRAM alloc failed");
  std::vector<dev::frame_span> s, d;
  for (int i = 0; i < 512; ++i) {
    s.push_back({&sys, src[i]});
    d.push_back({&vram, dst[i]});
  }
  std::uint64_t pages = 0;
  for (auto _ : st) {
    (void)r.dev.hw().copier().copy_list(s, d).value()->wait();
    pages += 512;
  }
  st.counters["ns_per_page"] = per(static_cast<double>(pages));
  for (pfn_t p : src) sys.put(p);
  r.dev.vram().put(dst);
}
BENCHMARK(BM_Svm_Copy2M)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_Svm_FaultResident2M(benchmark::State& st) {
  const bool in_vram = st.range(0) != 0;
  vram_rig r;
  const va_t va = r.chunks(1);
  if (in_vram && r.vm->prefetch(va, huge_size, mem_location::vram) != errc::ok) st.SkipWithError("prefetch failed");
  std::uint64_t pages = 0;
  for (auto _ : st) {
    st.PauseTiming();
    (void)r.vm->mirror_unbind(va, huge_size);  // drop the device's mapping, keep the memory where it is
    (void)r.vm->mirror_bind(va, huge_size);
    st.ResumeTiming();
    r.touch(va, 1, huge_size);  // one fault maps the 2M window
    pages += huge_size / page_size;
  }
  st.counters["ns_per_page"] = per(static_cast<double>(pages));
  st.SetLabel(in_vram ? "VRAM-resident" : "system memory");
}
BENCHMARK(BM_Svm_FaultResident2M)->Arg(0)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_Svm_Evict2M(benchmark::State& st) {
  constexpr std::uint64_t resident = 4, n = 8;
  vram_rig r(resident * huge_size);
  const va_t va = r.chunks(n);
  std::uint64_t k = 0, chunks = 0;
  for (std::uint64_t i = 0; i < resident; ++i)
    (void)r.vm->prefetch(va + i * huge_size, huge_size, mem_location::vram);
  k = resident;
  for (auto _ : st) {
    // VRAM is full: this migration first evicts the least recently used chunk.
    if (r.vm->prefetch(va + (k % n) * huge_size, huge_size, mem_location::vram) != errc::ok)
      st.SkipWithError("prefetch failed");
    ++k;
    ++chunks;
  }
  st.counters["evictions"] = benchmark::Counter(static_cast<double>(r.vm->stats().svm_evictions));
  st.counters["us_per_2M_in_and_out"] = benchmark::Counter(static_cast<double>(chunks) / 1e6,
                                                           benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_Svm_Evict2M)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
