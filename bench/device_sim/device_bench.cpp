// device_sim micro-benchmarks: P8 (TLB hit, TLB miss walking to a present
// PTE), the fault round trip through a trivial map-on-fault driver, TLB
// invalidation latency with 1, 2 and N engines, the spin-then-futex wake
// cost on its own, and a wave switch (park + resume).
#include <benchmark/benchmark.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "svm/device_sim/device.h"

namespace {

using namespace svm;
using namespace svm::dev;
using namespace std::chrono_literals;

constexpr va_t base_va = 0x40'0000'0000;

class bench_mem final : public phys_mem {
 public:
  explicit bench_mem(std::size_t frames) : frames_(frames), bytes_(new std::uint64_t[frames * page_size / 8]()) {}
  std::byte* frame_data(pfn_t pfn) noexcept override {
    return pfn < frames_ ? reinterpret_cast<std::byte*>(bytes_.get()) + (pfn % frames_) * page_size : nullptr;
  }
  std::uint64_t frame_generation(pfn_t) const noexcept override { return 0; }
  pfn_t frame_count() const noexcept override { return frames_; }

 private:
  std::size_t frames_;
  std::unique_ptr<std::uint64_t[]> bytes_;
};

struct rig {
  explicit rig(device_config c, std::size_t frames = 4096)
      : mem(frames), devp(device::create(std::move(c)).value()), dev(*devp) {
    (void)dev.attach_vm(1, pt, mem);
    q = dev.create_queue(1).value();
  }
  void map(va_t va, std::uint64_t pages) {
    (void)pt.populate(va, va + pages * page_size, 0,
                      [&](va_t v) { return dev_pte::make(aperture::system, ((v - base_va) >> page_shift) % 4096, true); });
  }
  bench_mem mem;
  dev_page_table pt;
  std::unique_ptr<device> devp;
  device& dev;
  queue_id q;
};

void per_item(benchmark::State& st, std::uint64_t items) {
  st.SetItemsProcessed(static_cast<std::int64_t>(items));
  st.counters["ns_per_access"] =
      benchmark::Counter(static_cast<double>(items), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// P8, first half: loads that hit the TLB (one page, one engine). One kernel
// of one work item runs 1M loads per iteration; the submit is amortised.
void BM_DeviceSim_TlbHit(benchmark::State& st) {
  rig r({.engines = 1});
  r.map(base_va, 1);
  constexpr std::uint64_t n = 1 << 20;
  std::uint64_t total = 0;
  for (auto _ : st) {
    auto c = r.dev.submit(r.q, 1, [](work_item& wi) {
      std::uint64_t s = 0;
      for (std::uint64_t i = 0; i < n; ++i) s += wi.load<std::uint64_t>(base_va + ((i * 8) & (page_size - 8)));
      benchmark::DoNotOptimize(s);
    });
    (void)c->wait();
    total += n;
  }
  per_item(st, total);
}
BENCHMARK(BM_DeviceSim_TlbHit)->UseRealTime()->Unit(benchmark::kMillisecond);

// P8, second half: every access misses (a 1-entry TLB and two alternating
// pages) and walks the 4-level device page table to a present 4K PTE.
void BM_DeviceSim_TlbMissWalk(benchmark::State& st) {
  rig r({.engines = 1, .tlb = {.sets = 1, .ways = 1}});
  r.map(base_va, 2);
  constexpr std::uint64_t n = 1 << 18;
  std::uint64_t total = 0;
  for (auto _ : st) {
    auto c = r.dev.submit(r.q, 1, [](work_item& wi) {
      std::uint64_t s = 0;
      for (std::uint64_t i = 0; i < n; ++i) s += wi.load<std::uint64_t>(base_va + (i & 1) * page_size);
      benchmark::DoNotOptimize(s);
    });
    (void)c->wait();
    total += n;
  }
  per_item(st, total);
  st.counters["misses_per_access"] = static_cast<double>(r.dev.stats().tlb_misses) / static_cast<double>(total);
}
BENCHMARK(BM_DeviceSim_TlbMissWalk)->UseRealTime()->Unit(benchmark::kMillisecond);

// The fault round trip with the trivial driver: raise (push the record,
// stall), fetch, map (populate one 4K PTE), replay, retranslate. One work item
// touches 256 fresh pages in sequence, so each access is one full round trip.
void BM_DeviceSim_FaultRoundTrip(benchmark::State& st) {
  rig r({.engines = 1, .fault_spin = static_cast<unsigned>(st.range(0)),
         .wait_spin_ns = static_cast<std::uint32_t>(st.range(1))});
  std::atomic<bool> stop{false};
  std::jthread driver([&] {
    std::array<fault_record, 256> buf;
    while (!stop.load(std::memory_order_relaxed)) {
      const std::size_t n = r.dev.faults().fetch_wait(buf, 10ms);
      for (std::size_t i = 0; i < n; ++i) {
        const va_t p = buf[i].page();
        (void)r.pt.populate(p, p + page_size, 0, [](va_t) { return dev_pte::make(aperture::system, 1, true); });
      }
      r.dev.replay(std::span(buf.data(), n));
    }
  });
  constexpr std::uint64_t pages = 256;
  va_t next = base_va;
  std::uint64_t total = 0;
  for (auto _ : st) {
    const va_t start = next;
    next += pages * page_size;
    auto c = r.dev.submit(r.q, 1, [start](work_item& wi) {
      for (std::uint64_t i = 0; i < pages; ++i) wi.store<std::uint64_t>(start + i * page_size, i);
    });
    (void)c->wait();
    total += pages;
  }
  stop = true;
  r.dev.faults().wake_fetchers();
  per_item(st, total);
  st.counters["faults"] = static_cast<double>(r.dev.stats().faults);
}
// Args: pause spins before a stalled wave sleeps (64: default, 0: none), and
// the timed spin (device_config::wait_spin_ns) of the wave and the driver's
// fetch_wait (0: sleep on the futex after the pauses; 20000: what svm::driver
// chooses when the threads fit the cores).
BENCHMARK(BM_DeviceSim_FaultRoundTrip)
    ->Args({64, 0})
    ->Args({0, 0})
    ->Args({64, 20000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// TLB invalidation latency with N engines. Idle: the engines count as
// acknowledged (one status read each). Busy: each engine runs a work item
// that keeps loading (TLB hits) until told to stop, so every invalidation
// waits for each engine's next access boundary. On this 2-core machine, more
// busy engines than cores measures the OS scheduler, not the protocol.
void invalidate_bench(benchmark::State& st, bool busy) {
  const unsigned engines = static_cast<unsigned>(st.range(0));
  rig r({.engines = engines});
  r.map(base_va, 16);
  std::atomic<bool> stop{false};
  std::optional<completion> c;
  if (busy) {
    c = r.dev.submit(r.q, engines, [&](work_item& wi) {
      std::uint64_t s = 0;
      while (!stop.load(std::memory_order_relaxed)) s += wi.load<std::uint64_t>(base_va + 8 * (wi.id() % 512));
      benchmark::DoNotOptimize(s);
    }).value();
    std::this_thread::sleep_for(5ms);
  }
  const va_range range{base_va + 15 * page_size, base_va + 16 * page_size};
  for (auto _ : st) benchmark::DoNotOptimize(r.dev.invalidate_tlb(1, range));
  stop = true;
  if (c) (void)c->wait();
  st.SetItemsProcessed(st.iterations());
}
void BM_DeviceSim_TlbInvalidateIdle(benchmark::State& st) { invalidate_bench(st, false); }
void BM_DeviceSim_TlbInvalidateBusy(benchmark::State& st) { invalidate_bench(st, true); }
BENCHMARK(BM_DeviceSim_TlbInvalidateIdle)->Arg(1)->Arg(2)->Arg(8)->UseRealTime();
BENCHMARK(BM_DeviceSim_TlbInvalidateBusy)->Arg(1)->Arg(2)->Arg(8)->UseRealTime();

// The wake cost on its own: a ping-pong between two threads over the same
// primitive a stalled wave uses (a 32-bit std::atomic, spin then
// wait/notify). Reported per one-way hand-off. Arg 0: the waiter goes
// straight to the futex (the sleep/wake cost); 64: it spins first (the
// hand-off cost when the reply comes quickly). BM_DeviceSim_WakeCondvar is
// the condition-variable reference the design avoids.
void BM_DeviceSim_WakeCost(benchmark::State& st) {
  const int spins = static_cast<int>(st.range(0));
  std::atomic<std::uint32_t> ping{0}, pong{0};
  std::atomic<bool> stop{false};
  auto wait_change = [spins](std::atomic<std::uint32_t>& w, std::uint32_t old) {
    for (int i = 0; i < spins && w.load(std::memory_order_acquire) == old; ++i) SVM_CPU_RELAX();
    while (w.load(std::memory_order_acquire) == old) w.wait(old, std::memory_order_acquire);
  };
  std::jthread peer([&] {
    std::uint32_t seen = 0;
    for (;;) {
      wait_change(ping, seen);
      seen = ping.load();
      if (stop.load()) return;
      pong.store(seen, std::memory_order_release);
      pong.notify_one();
    }
  });
  std::uint32_t v = 0;
  for (auto _ : st) {
    ping.store(++v, std::memory_order_release);
    ping.notify_one();
    wait_change(pong, v - 1);
  }
  stop = true;
  ping.store(++v);
  ping.notify_one();
  st.counters["ns_per_wake"] = benchmark::Counter(static_cast<double>(st.iterations()) * 2,
                                                  benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_DeviceSim_WakeCost)->Arg(0)->Arg(64)->UseRealTime();

void BM_DeviceSim_WakeCondvar(benchmark::State& st) {
  std::mutex m;
  std::condition_variable cv;
  std::uint64_t ping = 0, pong = 0;
  bool stop = false;
  std::jthread peer([&] {
    std::unique_lock l(m);
    for (;;) {
      cv.wait(l, [&] { return ping != pong || stop; });
      if (stop) return;
      pong = ping;
      cv.notify_all();
    }
  });
  for (auto _ : st) {
    std::unique_lock l(m);
    ++ping;
    cv.notify_all();
    cv.wait(l, [&] { return pong == ping; });
  }
  {
    std::lock_guard l(m);
    stop = true;
  }
  cv.notify_all();
  st.counters["ns_per_wake"] = benchmark::Counter(static_cast<double>(st.iterations()) * 2,
                                                  benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_DeviceSim_WakeCondvar)->UseRealTime();

}  // namespace

// A wave switch: two waves on one engine hand it to each other with
// work_item::yield(). Each yield parks the running wave and resumes the
// other through the engine's scheduler: ns_per_switch is one park plus
// one resume (the fiber jumps, the sanitizer hooks when built with them,
// the ready-queue work). Goal: <= 50 ns.
void BM_DeviceSim_WaveSwitch(benchmark::State& st) {
  rig r({.engines = 1, .waves_per_engine = 2});
  constexpr std::uint64_t yields = 200'000;
  for (auto _ : st) {
    auto c = r.dev.submit(r.q, 2, [](work_item& wi) {
      for (std::uint64_t i = 0; i < yields; ++i) wi.yield();
    });
    (void)c->wait();
  }
  st.counters["ns_per_switch"] = benchmark::Counter(static_cast<double>(st.iterations() * 2 * yields),
                                                    benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  st.counters["switches"] = static_cast<double>(r.dev.stats().wave_switches);
}
BENCHMARK(BM_DeviceSim_WaveSwitch)->UseRealTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
