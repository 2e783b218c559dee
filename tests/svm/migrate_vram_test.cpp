// SVM migration to and from VRAM (docs/migration.md): attributes, the fault
// path, the CPU fault back (timeslice), prefetch, VRAM pressure and
// eviction, MIGRATE zapping every VM of the device, bad input, and
// deterministic interleavings through the test hooks. The access oracle
// watches every VM and each test ends with zero stale accesses.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include "svm/svm/gpu_vm.h"
#include "svm/svm/oracle.h"
#include "handler_hold.h"

namespace svm::test {
namespace {

constexpr std::uint64_t K4 = page_size;
constexpr std::uint64_t K64 = std::uint64_t{64} << 10;
constexpr std::uint64_t M2 = huge_size;
constexpr va_t base = va_t{0x10'0000'0000};  // 2M aligned, far from chosen addresses
constexpr va_t out_va = va_t{0x20'0000'0000};

vm_config with_timeslice(std::chrono::nanoseconds t) {
  vm_config c;
  c.migrate_timeslice = t;
  return c;
}

std::uint64_t word_of(std::uint64_t page, std::uint64_t seed) { return 0xC0DE'0000'0000'0000ull + seed * 0x10000 + page; }

class MigrateVram : public ::testing::Test {
 protected:
  void SetUp() override { make(); }
  void TearDown() override {
    if (oracle) {
      EXPECT_EQ(oracle->stale(), 0u) << stale_text();
    }
    oracle.reset();
    vm2.reset();
    vm.reset();
    m2.reset();
    dev.reset();
    m.reset();
  }
  void make(vm_config cfg = {}, std::uint64_t vram_bytes = 64ull << 20) {
    oracle.reset();
    vm2.reset();
    vm.reset();
    dev.reset();
    m = std::make_unique<mm>(mm_options{.frames = 8192});
    dev::device_config hw{};
    hw.engines = 2;
    hw.vram_bytes = vram_bytes;
    dev = driver::create(driver_config{.hw = hw}).value();
    vm = gpu_vm::create(*dev, *m, cfg).value();
    oracle = std::make_unique<access_oracle>(*dev);
    EXPECT_EQ(oracle->watch(*vm, *m), errc::ok);
  }
  std::string stale_text() const {
    std::string s;
    for (const auto& r : oracle->reports()) s += describe(r) + "\n";
    return s;
  }
  static va_t map_at(mm& mm_, va_t va, std::uint64_t bytes, map extra = map::private_) {
    auto r = mm_.mmap(va, bytes, prot::read | prot::write, extra | map::anonymous | map::fixed);
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : 0;
  }
  // The CPU writes word_of(p, seed) at the start of each page.
  static void fill(mm& mm_, va_t va, std::uint64_t pages, std::uint64_t seed) {
    for (std::uint64_t p = 0; p < pages; ++p) ASSERT_EQ(mm_.store<std::uint64_t>(va + p * K4, word_of(p, seed)), errc::ok);
  }
  static ::testing::AssertionResult cpu_check(mm& mm_, va_t va, std::uint64_t pages, std::uint64_t seed) {
    for (std::uint64_t p = 0; p < pages; ++p) {
      auto v = mm_.load<std::uint64_t>(va + p * K4);
      if (!v.ok()) return ::testing::AssertionFailure() << "CPU read of page " << p << ": " << errc_name(v.error());
      if (*v != word_of(p, seed)) return ::testing::AssertionFailure() << "CPU page " << p << ": wrong word";
    }
    return ::testing::AssertionSuccess();
  }
  dev::kernel_status run(gpu_vm& v, std::uint64_t n, dev::kernel_fn fn) {
    auto c = dev->submit(v, n, std::move(fn));
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {c.error()};
    return c->wait(std::chrono::seconds(60));
  }
  // The device copies the first word of each of `pages` pages at `src` to
  // out_va (mapped here, system memory) and returns what it read.
  std::vector<std::uint64_t> device_read(gpu_vm& v, mm& mm_, va_t src, std::uint64_t pages) {
    bool mapped = false;
    for (const vma_info& v2 : mm_.vmas()) mapped = mapped || (v2.start <= out_va && out_va < v2.end);
    if (!mapped) (void)map_at(mm_, out_va, M2);
    auto st = run(v, pages, [=](dev::work_item& wi) {
      wi.store<std::uint64_t>(out_va + 8 * wi.id(), wi.load<std::uint64_t>(src + wi.id() * K4));
    });
    EXPECT_TRUE(st.ok()) << errc_name(st.error);
    std::vector<std::uint64_t> got(pages);
    EXPECT_EQ(mm_.read(out_va, std::as_writable_bytes(std::span(got))), errc::ok);
    return got;
  }
  ::testing::AssertionResult device_check(gpu_vm& v, mm& mm_, va_t src, std::uint64_t pages, std::uint64_t seed) {
    auto got = device_read(v, mm_, src, pages);
    for (std::uint64_t p = 0; p < pages; ++p)
      if (got[p] != word_of(p, seed)) return ::testing::AssertionFailure() << "device read of page " << p << ": wrong word";
    return ::testing::AssertionSuccess();
  }
  static std::uint64_t vram_pages(gpu_vm& v, va_t va, std::uint64_t size) {
    auto q = v.query_attrs(va, size);
    EXPECT_TRUE(q.ok());
    std::uint64_t n = 0;
    if (q.ok())
      for (const auto& r : *q) n += r.vram_pages;
    return n;
  }
  static std::uint64_t system_pages(gpu_vm& v, va_t va, std::uint64_t size) {
    auto q = v.query_attrs(va, size);
    EXPECT_TRUE(q.ok());
    std::uint64_t n = 0;
    if (q.ok())
      for (const auto& r : *q) n += r.system_pages;
    return n;
  }
  // A 32-page VRAM filled by 32 pages of m at base (word_of(p, seed)),
  // migrated in chunks of `gran`, and a second VM (vm2) on an mm of its own.
  void vram_full_of_m(std::uint64_t seed, std::uint64_t gran) {
    make({}, 32 * K4);
    m2 = std::make_unique<mm>(mm_options{.frames = 4096});
    vm2 = gpu_vm::create(*dev, *m2, {}).value();
    map_at(*m, base, M2);
    fill(*m, base, 32, seed);
    ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = gran}), errc::ok);
    ASSERT_EQ(vm->prefetch(base, 32 * K4, mem_location::vram), errc::ok);
    ASSERT_EQ(vram_pages(*vm, base, M2), 32u);
  }
  static bool device_pte_in_vram(gpu_vm& v, va_t gva) {
    const pt::translation t = v.page_table().translate(gva);
    return dev::dev_pte::is_valid(t.entry) && dev::dev_pte::aperture_of(t.entry) == aperture::vram;
  }

  std::unique_ptr<mm> m, m2;
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm, vm2;
  std::unique_ptr<access_oracle> oracle;
};


// preferred = vram: the first device fault migrates the 2M chunk (the CPU's
// bytes go with it), the device maps VRAM; a CPU read brings it back with
// the bytes intact.
TEST_F(MigrateVram, PreferredVramFaultMigratesChunkAndDataRoundTrips) {
  map_at(*m, base, M2);
  fill(*m, base, 512, 1);
  ASSERT_EQ(vm->set_attrs(base, M2, {.preferred = mem_location::vram}), errc::ok);
  EXPECT_TRUE(device_check(*vm, *m, base, 512, 1));
  vm_stats s = vm->stats();
  EXPECT_EQ(s.migrations_to_vram, 1u);
  EXPECT_EQ(s.pages_to_vram, 512u);
  EXPECT_EQ(s.migrate_fallbacks, 0u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 512u);
  EXPECT_TRUE(device_pte_in_vram(*vm, base));
  EXPECT_EQ(dev->vram().stats().used_frames, 512u);
  // The device writes in VRAM; the CPU reads them back through migrate_to_ram.
  ASSERT_TRUE(run(*vm, 512, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base + wi.id() * K4, 0x100); }).ok());
  for (std::uint64_t p = 0; p < 512; ++p) ASSERT_EQ(*m->load<std::uint64_t>(base + p * K4), word_of(p, 1) + 0x100);
  s = vm->stats();
  EXPECT_GE(s.migrations_to_ram, 1u);
  EXPECT_EQ(s.pages_to_ram, 512u);  // the whole chunk came back on the first CPU fault
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  EXPECT_EQ(system_pages(*vm, base, M2), 512u);
  EXPECT_FALSE(device_pte_in_vram(*vm, base));  // the MIGRATE back zapped it
  EXPECT_EQ(dev->vram().stats().used_frames, 0u);
}

// Device atomics: atomics = device migrates on an atomic fault; any does not.
TEST_F(MigrateVram, AtomicDeviceMigratesAtomicAnyDoesNot) {
  vm_config cfg;
  cfg.window = std::make_shared<fixed_window_policy>(K4);  // each fault maps its own page
  make(cfg);
  map_at(*m, base, 2 * M2);
  fill(*m, base, 1024, 2);
  ASSERT_EQ(vm->set_attrs(base, M2, {.atomics = atomic_mode::device, .granularity = K64}), errc::ok);
  ASSERT_EQ(vm->set_attrs(base + M2, M2, {.atomics = atomic_mode::any, .granularity = K64}), errc::ok);
  // A read of a device-atomics page does not migrate.
  (void)device_read(*vm, *m, base + M2 - K4, 1);
  EXPECT_EQ(vram_pages(*vm, base, 2 * M2), 0u);
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base, 5); }).ok());
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base + M2, 5); }).ok());
  EXPECT_EQ(vram_pages(*vm, base, M2), 16u);
  EXPECT_EQ(vram_pages(*vm, base + M2, M2), 0u);
  EXPECT_EQ(vm->stats().migrations_to_vram, 1u);
  EXPECT_EQ(*m->load<std::uint64_t>(base), word_of(0, 2) + 5);
  EXPECT_EQ(*m->load<std::uint64_t>(base + M2), word_of(512, 2) + 5);
}

// An atomic on a page the device already maps from system memory: once its
// range asks for device atomics, the mapping carries no atomic permission,
// so the atomic faults and migrates first (the read before it did not).
// Plain stores keep going through system memory.
TEST_F(MigrateVram, AtomicOnMappedSystemPageFaultsAndMigrates) {
  vm_config cfg;
  cfg.window = std::make_shared<fixed_window_policy>(K64);
  make(cfg);
  map_at(*m, base, M2);
  fill(*m, base, 32, 7);
  // Mapped from system memory, writable, atomics allowed: no fault, no move.
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base, 1); }).ok());
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  const std::uint64_t faults0 = vm->stats().faults_raised;
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base, 1); }).ok());
  EXPECT_EQ(vm->stats().faults_raised, faults0) << "an atomic through an atomic-capable PTE faulted";

  // Device atomics from now on: set_attrs zaps the range, a read maps it
  // again from system memory, without atomic permission.
  ASSERT_EQ(vm->set_attrs(base, M2, {.atomics = atomic_mode::device, .granularity = K64}), errc::ok);
  EXPECT_FALSE(dev::dev_pte::is_valid(vm->page_table().translate(base).entry));
  EXPECT_GT(vm->stats().ptes_zapped, 0u);
  std::vector<std::uint64_t> got = device_read(*vm, *m, base + K4, 2);
  EXPECT_EQ(got[0], word_of(1, 7));
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  const std::uint64_t e = vm->page_table().translate(base + K4).entry;
  EXPECT_TRUE(dev::dev_pte::is_valid(e));
  EXPECT_FALSE(dev::dev_pte::allows_atomics(e));
  // A plain store through that mapping needs no migration.
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.store<std::uint64_t>(base + 2 * K4, 99); }).ok());
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  // The atomic faults and moves the 64K chunk to VRAM before it runs.
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base + K4, 5); }).ok());
  EXPECT_EQ(vram_pages(*vm, base, K64), 16u);
  EXPECT_EQ(vram_pages(*vm, base + K64, M2 - K64), 0u);
  EXPECT_TRUE(device_pte_in_vram(*vm, base + K4));
  EXPECT_EQ(*m->load<std::uint64_t>(base), word_of(0, 7) + 2);
  EXPECT_EQ(*m->load<std::uint64_t>(base + K4), word_of(1, 7) + 5);
  EXPECT_EQ(*m->load<std::uint64_t>(base + 2 * K4), 99u);

  // Back to any: the zap lets the next fault map system memory with atomics
  // again (the CPU reads above brought the chunk back).
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base + K64, 1); }).ok());
  EXPECT_EQ(vram_pages(*vm, base + K64, K64), 0u);
  // The same attributes again change nothing and zap nothing.
  const std::uint64_t zapped = vm->stats().ptes_zapped;
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  EXPECT_EQ(vm->stats().ptes_zapped, zapped);
}

// Device atomics where migration cannot happen (shared memory): the atomic
// still completes through system memory (counted as a fallback), with no
// fault loop.
TEST_F(MigrateVram, DeviceAtomicsOnSharedMemoryFallBackAndComplete) {
  map_at(*m, base, M2, map::shared);
  ASSERT_EQ(vm->set_attrs(base, M2, {.atomics = atomic_mode::device, .granularity = K64}), errc::ok);
  (void)device_read(*vm, *m, base, 1);  // mapped without atomic permission
  auto st = run(*vm, 64, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base + 8 * (wi.id() % 4), 1); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(*m->load<std::uint64_t>(base + 8 * i), 16u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  EXPECT_GE(vm->stats().migrate_fallbacks, 1u);
}

// The granularity decides how much one fault moves: exactly that many pages
// (holes included: never-touched pages become zero VRAM pages).
TEST_F(MigrateVram, GranularityMigratesExactlyThatManyPages) {
  map_at(*m, base, 3 * M2);
  const std::uint64_t grans[] = {K4, K64, M2};
  for (int i = 0; i < 3; ++i) {
    const va_t at = base + i * M2;
    fill(*m, at, 8, 10 + i);  // the rest of the chunk: holes
    ASSERT_EQ(vm->set_attrs(at, M2, {.preferred = mem_location::vram, .granularity = grans[i]}), errc::ok);
    vm->reset_stats();
    EXPECT_TRUE(device_check(*vm, *m, at, 1, 10 + i));
    EXPECT_EQ(vm->stats().pages_to_vram, grans[i] / K4) << "granularity " << grans[i];
    EXPECT_EQ(vram_pages(*vm, at, M2), grans[i] / K4);
  }
  // Holes came over as zeros.
  EXPECT_EQ(*m->load<std::uint64_t>(base + 2 * M2 + 100 * K4), 0u);
}

// The timeslice: a CPU fault before the chunk's timeslice is over waits it
// out (counted), one after it does not, and one with a zero timeslice never
// does. The timeslice clock is the test's, so no step depends on how fast
// the machine runs.
TEST_F(MigrateVram, CpuFaultWaitsOutTheTimeslice) {
  auto fake = std::make_shared<std::atomic<std::uint64_t>>(1'000'000'000);
  const auto use_fake_clock = [&] {
    gpu_vm::test_hooks h;
    h.clock = [fake] { return fake->load(); };
    vm->set_test_hooks(std::move(h));
  };
  make(with_timeslice(std::chrono::milliseconds(20)));
  use_fake_clock();
  map_at(*m, base, M2);
  fill(*m, base, 16, 3);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 3));
  EXPECT_EQ(vram_pages(*vm, base, K64), 16u);
  EXPECT_EQ(vm->stats().timeslice_waits, 0u);
  // The clock has not moved: the fault sleeps the whole 20 ms.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(cpu_check(*m, base, 16, 3));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(20));
  EXPECT_EQ(vm->stats().timeslice_waits, 1u);
  EXPECT_EQ(vram_pages(*vm, base, K64), 0u);

  // Back in VRAM; the clock moves past the timeslice: no wait.
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 3));
  EXPECT_EQ(vram_pages(*vm, base, K64), 16u);
  fake->fetch_add(20'000'000);
  EXPECT_TRUE(cpu_check(*m, base, 16, 3));
  EXPECT_EQ(vm->stats().timeslice_waits, 1u);
  EXPECT_EQ(vram_pages(*vm, base, K64), 0u);

  make(with_timeslice(std::chrono::nanoseconds(0)));
  use_fake_clock();
  map_at(*m, base, M2);
  fill(*m, base, 16, 4);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 4));
  EXPECT_TRUE(cpu_check(*m, base, 16, 4));
  EXPECT_EQ(vm->stats().timeslice_waits, 0u);
  EXPECT_EQ(vm->stats().pages_to_ram, 16u);
}

// Prefetch moves the range now, maps nothing, and moves it back on request.
TEST_F(MigrateVram, PrefetchToVramThenBack) {
  map_at(*m, base, M2);
  fill(*m, base, 64, 5);
  ASSERT_EQ(vm->prefetch(base, 64 * K4, mem_location::vram), errc::ok);
  EXPECT_EQ(vram_pages(*vm, base, M2), 64u);
  EXPECT_FALSE(dev::dev_pte::is_valid(vm->page_table().translate(base).entry));  // not mapped by prefetch
  EXPECT_TRUE(device_check(*vm, *m, base, 64, 5));
  EXPECT_TRUE(device_pte_in_vram(*vm, base));
  ASSERT_EQ(vm->prefetch(base, 64 * K4, mem_location::system), errc::ok);
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  EXPECT_EQ(system_pages(*vm, base, 64 * K4), 64u);
  EXPECT_EQ(vm->stats().pages_to_ram, 64u);
  EXPECT_TRUE(device_check(*vm, *m, base, 64, 5));
  EXPECT_TRUE(cpu_check(*m, base, 64, 5));
  EXPECT_EQ(dev->vram().stats().used_frames, 0u);
}

// query_attrs: split and merged ranges, and residency per range.
TEST_F(MigrateVram, QueryAttrsReportsRangesAndResidency) {
  map_at(*m, base, M2);
  fill(*m, base, 512, 6);
  ASSERT_EQ(vm->set_attrs(base + 16 * K4, 16 * K4, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  ASSERT_EQ(vm->prefetch(base + 16 * K4, 16 * K4, mem_location::vram), errc::ok);
  auto q = vm->query_attrs(base, 64 * K4);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->size(), 3u);
  EXPECT_EQ((*q)[0].range, (va_range{base, base + 16 * K4}));
  EXPECT_EQ((*q)[0].attrs, svm_attrs{});
  EXPECT_EQ((*q)[0].system_pages, 16u);
  EXPECT_EQ((*q)[1].attrs.preferred, mem_location::vram);
  EXPECT_EQ((*q)[1].attrs.granularity, K64);
  EXPECT_EQ((*q)[1].vram_pages, 16u);
  EXPECT_EQ((*q)[1].system_pages, 0u);
  EXPECT_EQ((*q)[2].range, (va_range{base + 32 * K4, base + 64 * K4}));
  // Same attributes next to it merge; back to the defaults is one range.
  ASSERT_EQ(vm->set_attrs(base + 32 * K4, 16 * K4, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  q = vm->query_attrs(base, 64 * K4);
  ASSERT_EQ(q->size(), 3u);
  EXPECT_EQ((*q)[1].range, (va_range{base + 16 * K4, base + 48 * K4}));
  ASSERT_EQ(vm->set_attrs(base + 8 * K4, 48 * K4, {}), errc::ok);
  q = vm->query_attrs(base, 64 * K4);
  ASSERT_EQ(q->size(), 1u);
  EXPECT_EQ((*q)[0].vram_pages, 16u);  // residency does not follow the attributes
}

// VRAM held by what cannot be evicted (the VM's own BO, whose vm.lock the
// fault holds): the fault maps system memory, prefetch is ENOMEM and
// changes nothing.
TEST_F(MigrateVram, VramExhaustedFaultFallsBackPrefetchEnomem) {
  make({}, 32 * K4);
  auto bo = vm->create_bo(32 * K4, placement::vram);
  ASSERT_TRUE(bo.ok());
  map_at(*m, base, M2);
  fill(*m, base, 32, 7);
  ASSERT_EQ(vm->set_attrs(base, M2, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  EXPECT_TRUE(device_check(*vm, *m, base, 32, 7));
  EXPECT_GE(vm->stats().migrate_fallbacks, 1u);
  EXPECT_EQ(vm->stats().migrations_to_vram, 0u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  const auto before = *vm->query_attrs(base, M2);
  EXPECT_EQ(vm->prefetch(base, 16 * K4, mem_location::vram), errc::nomem);
  const auto after = *vm->query_attrs(base, M2);
  ASSERT_EQ(before.size(), after.size());
  for (std::size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(before[i].vram_pages, after[i].vram_pages);
    EXPECT_EQ(before[i].system_pages, after[i].system_pages);
  }
  EXPECT_EQ(*vm->bo_placement(*bo), placement::vram);
  EXPECT_TRUE(cpu_check(*m, base, 32, 7));
}

// VRAM pressure from another VM evicts this VM's least recently used SVM
// chunk; its data survives in system memory.
TEST_F(MigrateVram, PressureEvictsLruSvmChunkOfAnotherVm) {
  make({}, 32 * K4);
  m2 = std::make_unique<mm>(mm_options{.frames = 4096});
  vm2 = gpu_vm::create(*dev, *m2, {}).value();
  ASSERT_EQ(oracle->watch(*vm2, *m2), errc::ok);
  map_at(*m, base, M2);
  fill(*m, base, 32, 8);
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  ASSERT_EQ(vm->prefetch(base, 16 * K4, mem_location::vram), errc::ok);           // chunk 1 (older)
  ASSERT_EQ(vm->prefetch(base + 16 * K4, 16 * K4, mem_location::vram), errc::ok);  // chunk 2
  EXPECT_EQ(vram_pages(*vm, base, M2), 32u);
  map_at(*m2, base, M2);
  fill(*m2, base, 16, 9);
  ASSERT_EQ(vm2->set_attrs(base, M2, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  EXPECT_TRUE(device_check(*vm2, *m2, base, 16, 9));
  EXPECT_EQ(vram_pages(*vm2, base, 16 * K4), 16u);
  EXPECT_EQ(vram_pages(*vm, base, 16 * K4), 0u);          // the LRU chunk went
  EXPECT_EQ(vram_pages(*vm, base + 16 * K4, 16 * K4), 16u);  // the newer one stayed
  EXPECT_EQ(vm->stats().svm_evictions, 1u);
  EXPECT_TRUE(cpu_check(*m, base, 32, 8));
  EXPECT_TRUE(device_check(*vm, *m, base, 32, 8));
}

// VRAM pressure evicts an SVM chunk without its mm's mmap_lock, as
// drm_pagemap's evict_to_ram does: a thread holding that mmap_lock
// exclusive across the whole allocation does not stop the eviction (the
// mm's rmap lock, which only VMA-changing writers take, keeps the VMAs
// still instead). Under a try-lock of the mmap_lock this create_bo failed
// with ENOMEM.
TEST_F(MigrateVram, EvictionNeedsNoMmapLock) {
  vram_full_of_m(12, K64);
  if (HasFatalFailure()) return;
  std::atomic<int> phase{0};
  std::thread writer([&] {
    m->mmap_lock().lock();
    phase = 1;
    phase.notify_all();
    while (phase.load() != 2) phase.wait(1);
    m->mmap_lock().unlock();
  });
  while (phase.load() != 1) phase.wait(0);
  auto bo = vm2->create_bo(16 * K4, placement::vram);
  const std::uint64_t evictions = vm->stats().svm_evictions;
  phase = 2;
  phase.notify_all();
  writer.join();
  ASSERT_TRUE(bo.ok()) << errc_name(bo.error());
  EXPECT_EQ(evictions, 1u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 16u);
  EXPECT_TRUE(cpu_check(*m, base, 32, 12));
  EXPECT_TRUE(device_check(*vm, *m, base, 32, 12));
}

// The interleaving the rmap lock is for: an munmap of the victim's range
// while its eviction is between MIGRATE and finalize (paused in a notifier
// callback, which runs inside migrate_vma_setup) waits for the eviction,
// then unmaps what came back: nothing is lost or leaked, and the VRAM the
// chunk held is free again.
TEST_F(MigrateVram, MunmapWaitsForAnEvictionInProgress) {
  vram_full_of_m(13, M2);
  if (HasFatalFailure()) return;
  const std::size_t used = dev->vram().stats().used_frames;

  struct pausing_ops final : interval_notifier_ops {
    std::atomic<int> phase{0};  // 0 idle, 1 paused in the eviction's MIGRATE, 2 released
    bool invalidate(interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur) override {
      sub.set_seq(cur);
      if (r.event == mmu_notifier_event::migrate && phase.load() == 0) {
        phase = 1;
        phase.notify_all();
        while (phase.load() != 2) phase.wait(1);
      }
      return true;
    }
  } ops;
  interval_notifier sub;
  ASSERT_EQ(sub.insert(*m, base, M2, ops), errc::ok);

  std::thread evictor([&] {
    auto bo = vm2->create_bo(16 * K4, placement::vram);
    EXPECT_TRUE(bo.ok());
  });
  while (ops.phase.load() != 1) ops.phase.wait(0);
  // Paused inside the eviction, with the rmap lock held shared.
  std::atomic<bool> unmapped{false};
  std::thread unmapper([&] {
    EXPECT_EQ(m->munmap(base, M2), errc::ok);
    unmapped = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // room to go wrong
  EXPECT_FALSE(unmapped.load()) << "munmap ran while an eviction held the range";
  ops.phase = 2;
  ops.phase.notify_all();
  evictor.join();
  unmapper.join();
  EXPECT_TRUE(unmapped.load());
  EXPECT_EQ(vm->stats().svm_evictions, 1u);
  EXPECT_EQ(vm->stats().pages_to_ram, 32u);
  EXPECT_EQ(dev->vram().stats().used_frames, used - 32 + 16);  // the chunk's frames went, the BO's came
  EXPECT_EQ(m->mmap(base, M2, prot::read | prot::write, map::private_ | map::anonymous | map::fixed).ok(), true);
  EXPECT_EQ(*m->load<std::uint64_t>(base), 0u);  // a fresh mapping: nothing of the old range is left
  sub.remove();
}

// Creating a VRAM BO evicts SVM chunks to make room.
TEST_F(MigrateVram, BoCreationEvictsSvmChunks) {
  make({}, 32 * K4);
  map_at(*m, base, M2);
  fill(*m, base, 32, 11);
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  ASSERT_EQ(vm->prefetch(base, 32 * K4, mem_location::vram), errc::ok);
  auto bo = vm->create_bo(16 * K4, placement::vram);
  ASSERT_TRUE(bo.ok());
  EXPECT_EQ(vm->stats().svm_evictions, 1u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 16u);
  EXPECT_TRUE(device_check(*vm, *m, base, 32, 11));
  EXPECT_TRUE(cpu_check(*m, base, 32, 11));
}

// Two VMs of one device mirror one mm: a migration by one zaps the other's
// system-memory PTEs (MIGRATE is not skipped), which then maps VRAM.
TEST_F(MigrateVram, MigrateZapsEveryVmOfTheDevice) {
  vm2 = gpu_vm::create(*dev, *m, {}).value();
  ASSERT_EQ(oracle->watch(*vm2, *m), errc::ok);
  EXPECT_EQ(vm2->vram_pool(), vm->vram_pool());  // one attach per mm
  map_at(*m, base, M2);
  fill(*m, base, 16, 12);
  EXPECT_TRUE(device_check(*vm2, *m, base, 16, 12));
  EXPECT_TRUE(dev::dev_pte::is_valid(vm2->page_table().translate(base).entry));
  ASSERT_EQ(vm->prefetch(base, 16 * K4, mem_location::vram), errc::ok);
  EXPECT_FALSE(dev::dev_pte::is_valid(vm2->page_table().translate(base).entry));
  EXPECT_TRUE(device_check(*vm2, *m, base, 16, 12));
  EXPECT_TRUE(device_pte_in_vram(*vm2, base));
  // Destroying the VM that migrated brings the pages back (the mm lives).
  vm.reset();
  EXPECT_EQ(vram_pages(*vm2, base, 16 * K4), 0u);
  EXPECT_TRUE(cpu_check(*m, base, 16, 12));
  EXPECT_TRUE(device_check(*vm2, *m, base, 16, 12));
}

// Bad input: the documented error, and nothing changes.
TEST_F(MigrateVram, BadInputIsRejectedAndChangesNothing) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 13);
  ASSERT_EQ(vm->set_attrs(base, 16 * K4, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  const auto before = *vm->query_attrs(base, M2);
  const svm_attrs ok{.preferred = mem_location::vram};
  EXPECT_EQ(vm->set_attrs(base + 1, K4, ok), errc::inval);
  EXPECT_EQ(vm->set_attrs(base, K4 + 1, ok), errc::inval);
  EXPECT_EQ(vm->set_attrs(base, 0, ok), errc::inval);
  EXPECT_EQ(vm->set_attrs(~va_t{0} & ~(K4 - 1), 2 * K4, ok), errc::overflow);
  EXPECT_EQ(vm->set_attrs(va_t{1} << 50, K4, ok), errc::inval);  // past the VA width
  EXPECT_EQ(vm->set_attrs(base, K4, {.preferred = static_cast<mem_location>(7)}), errc::inval);
  EXPECT_EQ(vm->set_attrs(base, K4, {.atomics = static_cast<atomic_mode>(9)}), errc::inval);
  EXPECT_EQ(vm->set_attrs(base, K4, {.granularity = 8 * K4}), errc::inval);
  EXPECT_EQ(vm->query_attrs(base, 0).error(), errc::inval);
  EXPECT_EQ(vm->query_attrs(~va_t{0} & ~(K4 - 1), 2 * K4).error(), errc::overflow);
  EXPECT_EQ(vm->prefetch(base + 1, K4, mem_location::vram), errc::inval);
  EXPECT_EQ(vm->prefetch(base, K4, static_cast<mem_location>(3)), errc::inval);
  EXPECT_EQ(vm->prefetch(~va_t{0} & ~(K4 - 1), 2 * K4, mem_location::vram), errc::overflow);
  EXPECT_EQ(vm->prefetch(va_t{1} << 50, K4, mem_location::vram), errc::inval);
  // Unmapped memory, shared memory.
  EXPECT_EQ(vm->prefetch(base + M2, K4, mem_location::vram), errc::fault);
  EXPECT_EQ(vm->prefetch(base + M2 - K4, 2 * K4, mem_location::vram), errc::fault);
  const va_t shm = map_at(*m, base + 4 * M2, 16 * K4, map::shared);
  fill(*m, shm, 16, 14);
  EXPECT_EQ(vm->prefetch(shm, 16 * K4, mem_location::vram), errc::perm);
  EXPECT_EQ(vm->prefetch(base + 4 * M2 - K4, 2 * K4, mem_location::vram), errc::fault);
  const auto after = *vm->query_attrs(base, M2);
  ASSERT_EQ(before.size(), after.size());
  for (std::size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(before[i].range, after[i].range);
    EXPECT_EQ(before[i].attrs, after[i].attrs);
    EXPECT_EQ(before[i].vram_pages, after[i].vram_pages);
  }
  EXPECT_EQ(vm->stats().migrations_to_vram, 0u);
  EXPECT_EQ(dev->vram().stats().used_frames, 0u);
  // A shared mapping that prefers VRAM stays in system memory on a fault.
  ASSERT_EQ(vm->set_attrs(shm, 16 * K4, ok), errc::ok);
  EXPECT_TRUE(device_check(*vm, *m, shm, 16, 14));
  EXPECT_GE(vm->stats().migrate_fallbacks, 1u);
  // A bad timeslice is a bad configuration.
  EXPECT_EQ(gpu_vm::validate(with_timeslice(std::chrono::nanoseconds(-1))), errc::inval);
}

// A CPU access racing a device-side migration waits on the migration entry,
// then sees the data (brought back through migrate_to_ram).
TEST_F(MigrateVram, CpuFaultRacingMigrationWaitsThenSeesTheData) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 15);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  std::future<result<std::uint64_t>> reader;
  std::atomic<bool> started{false};
  gpu_vm::test_hooks h;
  h.during_migrate_copy = [&](va_range) {
    reader = std::async(std::launch::async, [&] {
      started = true;
      return m->load<std::uint64_t>(base + 3 * K4);
    });
    while (!started) std::this_thread::yield();
    // The reader cannot finish while the pages are migration entries.
    EXPECT_EQ(reader.wait_for(std::chrono::milliseconds(20)), std::future_status::timeout);
  };
  vm->set_test_hooks(std::move(h));
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 15));
  auto v = reader.get();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, word_of(3, 15));
  EXPECT_TRUE(cpu_check(*m, base, 16, 15));
}

// MADV_DONTNEED during the copy: the zapped pages are not installed (their
// VRAM frames are freed), the device then reads zeros, nothing is stale.
TEST_F(MigrateVram, DontneedDuringCopyLosesNothingAndFreesFrames) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 16);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  bool once = false;
  gpu_vm::test_hooks h;
  h.during_migrate_copy = [&](va_range r) {
    if (once) return;
    once = true;
    // DONTNEED takes the mmap_lock shared, as the migration holds it.
    auto f = std::async(std::launch::async, [&, r] { return m->madvise(r.start, 8 * K4, madvice::dontneed); });
    EXPECT_EQ(f.get(), errc::ok);
  };
  vm->set_test_hooks(std::move(h));
  auto got = device_read(*vm, *m, base, 16);
  for (std::uint64_t p = 0; p < 8; ++p) EXPECT_EQ(got[p], 0u) << p;
  for (std::uint64_t p = 8; p < 16; ++p) EXPECT_EQ(got[p], word_of(p, 16)) << p;
  for (std::uint64_t p = 8; p < 16; ++p) EXPECT_EQ(*m->load<std::uint64_t>(base + p * K4), word_of(p, 16));
  EXPECT_EQ(*m->load<std::uint64_t>(base), 0u);
  ASSERT_EQ(vm->prefetch(base, K64, mem_location::system), errc::ok);
  EXPECT_EQ(dev->vram().stats().used_frames, 0u);
}

// munmap requested during the copy waits for the migration (it needs the
// mmap_lock exclusive), then frees the VRAM frames.
TEST_F(MigrateVram, MunmapDuringCopyFreesTheFrames) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 17);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  std::future<errc> unmap;
  gpu_vm::test_hooks h;
  h.during_migrate_copy = [&](va_range r) {
    if (!unmap.valid()) unmap = std::async(std::launch::async, [&, r] { return m->munmap(r.start, r.size()); });
  };
  vm->set_test_hooks(std::move(h));
  auto st = run(*vm, 16, [](dev::work_item& wi) { (void)wi.load<std::uint64_t>(base + wi.id() * K4); });
  EXPECT_EQ(unmap.get(), errc::ok);
  (void)st;  // served from VRAM, or cancelled once unmapped: either is fine; no stale access
  EXPECT_EQ(dev->vram().stats().used_frames, 0u);
  EXPECT_FALSE(dev::dev_pte::is_valid(vm->page_table().translate(base).entry));
}

// An eviction (another VM's BO creation) running while a fault of this VM
// is about to walk the chunk: the fault retries and maps system memory.
TEST_F(MigrateVram, EvictionRacingFaultOnTheChunk) {
  make({}, 16 * K4);
  m2 = std::make_unique<mm>(mm_options{.frames = 1024});
  vm2 = gpu_vm::create(*dev, *m2, {}).value();
  map_at(*m, base, M2);
  fill(*m, base, 16, 18);
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  ASSERT_EQ(vm->prefetch(base, 16 * K4, mem_location::vram), errc::ok);
  bool once = false;
  gpu_vm::test_hooks h;
  h.after_snapshot = [&](va_range) {
    if (once) return;
    once = true;
    std::thread t([&] { EXPECT_TRUE(vm2->create_bo(16 * K4, placement::vram).ok()); });
    t.join();
  };
  vm->set_test_hooks(std::move(h));
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 18));
  EXPECT_TRUE(once);
  EXPECT_EQ(vm->stats().svm_evictions, 1u);
  EXPECT_EQ(vram_pages(*vm, base, M2), 0u);
  EXPECT_TRUE(cpu_check(*m, base, 16, 18));
}

// The forward-progress rule (docs/migration.md). VRAM holds one 64K chunk;
// two work items fault on chunks A and B in one batch (the only handler
// thread is held in a fault of another VM until both records are in the
// buffer). A migrates, then B's migration evicts A, and both items are
// replayed: the item on A finds no translation and faults again. That
// retried access is mapped where A now lies, in system memory; migrating
// A again would evict B under its item, and so on for as long as the two
// items keep faulting (the livelock the fuzzer found).
TEST_F(MigrateVram, ARetriedAccessIsMappedWhereItsMemoryLies) {
  oracle.reset();
  vm.reset();
  dev.reset();
  m = std::make_unique<mm>(mm_options{.frames = 4096});
  m2 = std::make_unique<mm>(mm_options{.frames = 1024});
  handler_hold hold;
  dev::device_config hw{};
  hw.engines = 2;
  hw.vram_bytes = K64;
  hw.test_hook = hold.device_hook();
  dev = driver::create(driver_config{.hw = hw}).value();
  vm = gpu_vm::create(*dev, *m, with_timeslice(std::chrono::nanoseconds(0))).value();
  vm2 = gpu_vm::create(*dev, *m2, {}).value();
  oracle = std::make_unique<access_oracle>(*dev);
  ASSERT_EQ(oracle->watch(*vm, *m), errc::ok);
  ASSERT_EQ(oracle->watch(*vm2, *m2), errc::ok);
  map_at(*m, base, 2 * K64);
  fill(*m, base, 32, 21);
  ASSERT_EQ(vm->set_attrs(base, 2 * K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  map_at(*m2, base, K4);

  // VM2's fault holds the handler until three faults are in the buffer:
  // its own and the two of VM1's kernel.
  hold.arm(*vm2, 3);
  auto k2 = dev->submit(*vm2, 1, [](dev::work_item& wi) { wi.store<std::uint64_t>(base, 5); });
  ASSERT_TRUE(k2.ok());
  hold.wait_held();
  std::uint64_t got[2] = {0, 0};
  auto k1 = dev->submit(*vm, 2, [&](dev::work_item& wi) {
    got[wi.id()] = wi.load<std::uint64_t>(base + wi.id() * K64);  // item 0: chunk A, item 1: chunk B
  });
  ASSERT_TRUE(k1.ok());
  EXPECT_TRUE(k2->wait(std::chrono::seconds(60)).ok());
  ASSERT_TRUE(k1->wait(std::chrono::seconds(60)).ok());
  EXPECT_EQ(got[0], word_of(0, 21));
  EXPECT_EQ(got[1], word_of(16, 21));

  const vm_stats s = vm->stats();
  EXPECT_EQ(s.migrations_to_vram, 2u);  // A, then B (which evicted A); never A again
  EXPECT_EQ(s.svm_evictions, 1u);
  EXPECT_EQ(s.retries_in_place, 1u);    // the item on A, mapped in system memory
  EXPECT_EQ(vram_pages(*vm, base, K64), 0u);
  EXPECT_EQ(vram_pages(*vm, base + K64, K64), 16u);

  // The retried access mapped its own page only: the next first fault on
  // another page of A migrates the chunk after all (a wider window would
  // have kept A in system memory for good).
  EXPECT_EQ(device_read(*vm, *m, base + K4, 1)[0], word_of(1, 21));
  EXPECT_EQ(vm->stats().migrations_to_vram, 3u);
  EXPECT_EQ(vram_pages(*vm, base, K64), 16u);
  EXPECT_TRUE(cpu_check(*m, base, 32, 21));
}

// fork while a migration runs (it waits for the mmap_lock): both sides
// share the VRAM pages read-only; each side's CPU reads them back, even
// after the VM and the driver are gone (the pgmap ops outlive the driver).
TEST_F(MigrateVram, ForkDuringMigrationAndChildOutlivesDriver) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 19);
  ASSERT_EQ(vm->set_attrs(base, K64, {.preferred = mem_location::vram, .granularity = K64}), errc::ok);
  std::future<result<std::unique_ptr<mm>>> child;
  gpu_vm::test_hooks h;
  h.during_migrate_copy = [&](va_range) {
    if (!child.valid()) child = std::async(std::launch::async, [&] { return m->fork(); });
  };
  vm->set_test_hooks(std::move(h));
  EXPECT_TRUE(device_check(*vm, *m, base, 16, 19));
  auto c = child.get();
  ASSERT_TRUE(c.ok());
  std::unique_ptr<mm> kid = std::move(*c);
  // The device writes: it gets its own copy in the parent (the shared VRAM
  // page is read-only), the child keeps the old bytes.
  ASSERT_TRUE(run(*vm, 1, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(base, 1); }).ok());
  EXPECT_EQ(*m->load<std::uint64_t>(base), word_of(0, 19) + 1);
  oracle.reset();
  vm.reset();
  dev.reset();  // the child may still hold pages of the VRAM pool
  for (std::uint64_t p = 0; p < 16; ++p) EXPECT_EQ(*kid->load<std::uint64_t>(base + p * K4), word_of(p, 19)) << p;
  for (std::uint64_t p = 1; p < 16; ++p) EXPECT_EQ(*m->load<std::uint64_t>(base + p * K4), word_of(p, 19)) << p;
  kid.reset();
}

// The oracle checks SVM accesses through VRAM PTEs: fine while the CPU
// entry is our device-private entry of that frame, stale once the chunk
// went back to system memory.
TEST_F(MigrateVram, OracleChecksVramAccessesAgainstTheCpuEntry) {
  map_at(*m, base, M2);
  fill(*m, base, 16, 20);
  ASSERT_EQ(vm->set_attrs(base, M2, {.granularity = K64}), errc::ok);
  ASSERT_EQ(vm->prefetch(base, 16 * K4, mem_location::vram), errc::ok);
  const std::uint64_t e = m->raw_pte(base).entry;
  ASSERT_TRUE(cpu_pte::is_devpriv(e));
  ASSERT_EQ(cpu_pte::pool(e), vm->vram_pool());
  dev::access_check c;
  c.vm = vm->id();
  c.gva = base;
  c.acc = access::read;
  c.ap = aperture::vram;
  c.pfn = cpu_pte::pfn(e);
  c.pte = dev::dev_pte::make(aperture::vram, c.pfn, true);
  c.mem = &dev->hw().vram_memory();
  oracle->check(c);
  EXPECT_EQ(oracle->stale(), 0u);
  c.pfn += 1;  // another VRAM frame
  c.pte = dev::dev_pte::make(aperture::vram, c.pfn, true);
  oracle->check(c);
  EXPECT_EQ(oracle->stale(), 1u);
  c.pfn -= 1;
  ASSERT_EQ(vm->prefetch(base, 16 * K4, mem_location::system), errc::ok);
  c.pte = dev::dev_pte::make(aperture::vram, c.pfn, true);
  oracle->check(c);  // the page is back in system memory
  EXPECT_EQ(oracle->stale(), 2u);
  ASSERT_EQ(oracle->reports().size(), 2u);
  EXPECT_EQ(oracle->reports()[1].reason, stale_reason::frame_mismatch);
  EXPECT_EQ(oracle->counts().svm_checked, 3u);
  oracle->reset();
}

}  // namespace
}  // namespace svm::test
