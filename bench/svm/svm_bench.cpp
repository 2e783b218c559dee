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
// Figures are reported, never asserted; svm-storm measures whole storms.
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>

#include "svm/svm/gpu_vm.h"

namespace {

using namespace svm;
using namespace std::chrono_literals;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

benchmark::Counter per(double n) { return benchmark::Counter(n, benchmark::Counter::kIsRate | benchmark::Counter::kInvert); }

struct rig {
  rig(seq_mode seq, std::uint64_t window, std::uint32_t spin_ns)
      : m(mm_options{.frames = 16384}),
        dev_owner(driver::create(driver_config{.hw = {.engines = 1}, .handler_threads = 1, .wait_spin_ns = spin_ns})
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

}  // namespace

BENCHMARK_MAIN();
