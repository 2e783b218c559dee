// access_oracle: kernels over mirrored memory with CPU operations between
// and during them report no stale access (all three mirror modes), and the
// oracle does catch stale accesses: device PTEs written by hand that name a
// frame other than the CPU's, a page the CPU no longer maps, or a frame the
// CPU maps read-only after fork, are reported with the right addresses,
// frames and generations.
#include "svm/svm/oracle.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "svm/svm/gpu_vm.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

struct mode {
  seq_mode seq;
  mirror_impl impl;
};
std::string mode_name(const ::testing::TestParamInfo<mode>& p) {
  return std::string(to_string(p.param.seq)) + "_" + to_string(p.param.impl);
}

/// The device pfn of an mm frame, as the driver encodes it (gpu_vm's
/// mm_device_pfn: pool in the bits from 32 up).
constexpr pfn_t device_pfn(unsigned pool, pfn_t pfn) { return mm_device_pfn(pool, pfn); }

class Oracle : public ::testing::TestWithParam<mode> {
 protected:
  void SetUp() override { make(); }
  void TearDown() override {
    oracle.reset();
    vm.reset();
    dev.reset();
    m.reset();
  }
  void make(mirror_kind mirror = mirror_kind::full_mm, oracle_options o = {}) {
    oracle.reset();
    vm.reset();
    dev.reset();
    m = std::make_unique<mm>(mm_options{.frames = 8192});
    dev = driver::create(driver_config{.hw = {.engines = 2}}).value();
    vm_config c;
    c.mirror = mirror;
    c.seq = GetParam().seq;
    c.impl = GetParam().impl;
    vm = gpu_vm::create(*dev, *m, c).value();
    oracle = std::make_unique<access_oracle>(*dev, o);
    if (mirror != mirror_kind::windows) {
      ASSERT_EQ(oracle->watch(*vm, *m), errc::ok);
    }
  }
  va_t map_anon(std::uint64_t bytes) {
    auto va = m->mmap(0, bytes, prot::read | prot::write, map::private_ | map::anonymous);
    EXPECT_TRUE(va.ok());
    if (!va.ok()) return 0;
    EXPECT_EQ(m->madvise(*va, bytes, madvice::nohugepage), errc::ok);
    return *va;
  }
  dev::kernel_status run(std::uint64_t n, dev::kernel_fn fn) {
    auto c = dev->submit(*vm, n, std::move(fn));
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {c.error()};
    return c->wait(60s);
  }
  std::uint64_t device_load(va_t va) {
    std::atomic<std::uint64_t> v{~0ull};
    auto st = run(1, [&, va](dev::work_item& wi) { v = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(st.ok()) << errc_name(st.error);
    return v.load();
  }
  /// Write the device PTE of the 4K page at `gva` by hand, bypassing the
  /// driver (what a buggy driver would do), and drop any TLB entry for it.
  void write_pte(va_t gva, unsigned pool, pfn_t pfn, bool writable) {
    const pfn_t dp = device_pfn(pool, pfn);
    ASSERT_EQ(vm->page_table().populate(gva, gva + page_size, 0,
                                        [dp, writable](va_t) {
                                          return dev::dev_pte::make(aperture::system, dp, writable);
                                        }),
              errc::ok);
    ASSERT_EQ(dev->hw().invalidate_tlb(vm->id(), {gva, gva + page_size}), errc::ok);
  }

  std::unique_ptr<mm> m;
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm;
  std::unique_ptr<access_oracle> oracle;
};

// ---- the oracle stays quiet on a correct driver -------------------------------

TEST_P(Oracle, CpuOpsBetweenKernelsReportNoStaleAccess) {
  constexpr std::uint64_t pages = 16;
  const va_t buf = map_anon(pages * page_size);
  std::uint64_t accesses = 0;
  auto each_page = [&](auto&& body) {
    auto st = run(pages, [&, buf](dev::work_item& wi) { body(wi, buf + wi.id() * page_size); });
    EXPECT_TRUE(st.ok()) << errc_name(st.error);
    accesses += pages;
  };
  each_page([](dev::work_item& wi, va_t va) { wi.store<std::uint64_t>(va, 1); });
  // DONTNEED half: those pages read zero again, through fresh frames.
  ASSERT_EQ(m->madvise(buf, pages / 2 * page_size, madvice::dontneed), errc::ok);
  each_page([](dev::work_item& wi, va_t va) { wi.atomic_add<std::uint64_t>(va, 2); });
  // munmap a quarter and map it again at the same address: new frames.
  ASSERT_EQ(m->munmap(buf + 4 * page_size, 4 * page_size), errc::ok);
  ASSERT_TRUE(m->mmap(buf + 4 * page_size, 4 * page_size, prot::read | prot::write,
                      map::private_ | map::anonymous | map::fixed)
                  .ok());
  each_page([](dev::work_item& wi, va_t va) { (void)wi.load<std::uint64_t>(va); });
  // fork: the parent's pages turn read-only, then the child and the device
  // break the copy-on-write shares.
  {
    auto child = m->fork();
    ASSERT_TRUE(child.ok());
    each_page([](dev::work_item& wi, va_t va) { (void)wi.load<std::uint64_t>(va); });
    ASSERT_EQ((*child)->store<std::uint64_t>(buf, 99), errc::ok);
    each_page([](dev::work_item& wi, va_t va) { wi.store<std::uint64_t>(va, 7); });
    EXPECT_EQ(*(*child)->load<std::uint64_t>(buf), 99u);
  }
  EXPECT_EQ(*m->load<std::uint64_t>(buf), 7u);
  // A THP-backed buffer: 2M device leaves, the oracle resolves the 4K frame.
  auto big = m->mmap(0, 2 * huge_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(big.ok());
  ASSERT_EQ(m->madvise(*big, 2 * huge_size, madvice::hugepage), errc::ok);
  const va_t huge_buf = align_up(*big, huge_size);
  ASSERT_EQ(m->store<std::uint64_t>(huge_buf, 5), errc::ok);
  auto st = run(512, [=](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(huge_buf + wi.id() * page_size, 1); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  accesses += 512;

  EXPECT_EQ(oracle->stale(), 0u);
  for (const auto& r : oracle->reports()) ADD_FAILURE() << describe(r);
  EXPECT_EQ(oracle->svm_checked(), accesses);  // every access was checked
  EXPECT_EQ(oracle->checked(), accesses);
  EXPECT_EQ(oracle->not_svm(), 0u);
  EXPECT_EQ(oracle->unwatched(), 0u);
}

// CPU threads unmap, DONTNEED, remap and fork while kernels run. Kernels may
// fail with a fault on an unmapped page; no access is ever stale.
TEST_P(Oracle, CpuOpsDuringKernelsReportNoStaleAccess) {
  constexpr std::uint64_t pages = 32;
  const va_t buf = map_anon(pages * page_size);
  for (std::uint64_t i = 0; i < pages; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 1), errc::ok);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> dontneeds{0}, remaps{0};
  std::jthread dontneed([&] {
    for (std::uint64_t k = 0; !stop; ++k) {
      const va_t p = buf + (k % (pages / 2)) * page_size;
      EXPECT_EQ(m->madvise(p, page_size, madvice::dontneed), errc::ok);
      EXPECT_EQ(m->store<std::uint64_t>(p, 1), errc::ok);
      dontneeds.fetch_add(1, std::memory_order_relaxed);
    }
  });
  std::jthread remap_fork([&] {
    for (std::uint64_t k = 0; !stop; ++k) {
      const va_t p = buf + (pages / 2 + k % (pages / 4)) * page_size;
      EXPECT_EQ(m->munmap(p, page_size), errc::ok);
      EXPECT_TRUE(m->mmap(p, page_size, prot::read | prot::write, map::private_ | map::anonymous | map::fixed).ok());
      if (k % 4 == 0) {
        auto child = m->fork();  // write-protects the parent; COW on the next write
        EXPECT_TRUE(child.ok());
      }
      remaps.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::sleep_for(50us);
    }
  });
  // Run kernels until the CPU side has done enough operations meanwhile.
  std::uint64_t ok = 0, faulted = 0;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  for (int rep = 0; rep < 30 || ((dontneeds < 500 || remaps < 100) && std::chrono::steady_clock::now() < deadline);
       ++rep) {
    auto st = run(4 * pages, [=](dev::work_item& wi) {
      const va_t va = buf + (wi.id() % pages) * page_size;
      if (wi.id() % 2) wi.atomic_add<std::uint64_t>(va, 1);
      else (void)wi.load<std::uint64_t>(va);
    });
    if (st.ok()) {
      ++ok;
    } else {
      ++faulted;  // only an access to a page unmapped at that moment may fail
      EXPECT_EQ(st.error, errc::canceled);
      EXPECT_GE(st.address, buf + pages / 2 * page_size);
      EXPECT_LT(st.address, buf + pages * page_size);
    }
  }
  stop = true;
  dontneed.join();
  remap_fork.join();
  EXPECT_GE(dontneeds.load(), 500u);
  EXPECT_GE(remaps.load(), 100u);
  EXPECT_GT(ok, 0u);
  EXPECT_GT(oracle->svm_checked(), 0u);
  EXPECT_EQ(oracle->stale(), 0u);
  for (const auto& r : oracle->reports()) ADD_FAILURE() << describe(r);
  RecordProperty("kernels_ok", std::to_string(ok));
  RecordProperty("kernels_faulted", std::to_string(faulted));
  RecordProperty("svm_checked", std::to_string(oracle->svm_checked()));
  RecordProperty("excused", std::to_string(oracle->excused()));
}

TEST_P(Oracle, BoAndVramAccessesAreCountedAsNotSvm) {
  constexpr va_t bo_va = va_t{0x7000'0000'0000};
  auto vram_bo = vm->create_bo(2 * page_size, placement::vram);
  auto sys_bo = vm->create_bo(2 * page_size, placement::system);
  ASSERT_TRUE(vram_bo.ok() && sys_bo.ok());
  ASSERT_EQ(vm->bind(*vram_bo, bo_va, 0, 2 * page_size), errc::ok);
  ASSERT_EQ(vm->bind(*sys_bo, bo_va + 2 * page_size, 0, 2 * page_size), errc::ok);
  auto st = run(4, [=](dev::work_item& wi) { wi.store<std::uint64_t>(bo_va + wi.id() * page_size, 3); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  EXPECT_EQ(oracle->not_svm(), 4u);
  EXPECT_EQ(oracle->svm_checked(), 0u);
  EXPECT_EQ(oracle->stale(), 0u);
}

// ---- the oracle catches stale accesses ------------------------------------------

TEST_P(Oracle, PteToAnotherFrameIsReported) {
  const va_t a = map_anon(2 * page_size), b = a + page_size;
  ASSERT_EQ(m->store<std::uint64_t>(a, 111), errc::ok);
  ASSERT_EQ(m->store<std::uint64_t>(b, 222), errc::ok);
  const cpu_translation ta = m->cpu_translate(a), tb = m->cpu_translate(b);
  ASSERT_TRUE(ta.present && tb.present);
  ASSERT_NE(ta.pfn, tb.pfn);
  // The bug: the device maps a to b's frame.
  write_pte(a, tb.pool, tb.pfn, false);
  EXPECT_EQ(device_load(a + 8), 0u);  // b's bytes (b+8 was never written)
  EXPECT_EQ(device_load(a), 222u);    // b's value: the access really hit b's frame
  EXPECT_EQ(oracle->stale(), 2u);
  const auto reps = oracle->reports();
  ASSERT_EQ(reps.size(), 2u);
  const stale_report& r = reps[1];
  EXPECT_EQ(r.reason, stale_reason::frame_mismatch);
  EXPECT_EQ(r.vm, vm->id());
  EXPECT_EQ(r.acc, access::read);
  EXPECT_EQ(r.gva, a);
  EXPECT_EQ(r.cpu_va, a);
  EXPECT_EQ(r.dev_pool, tb.pool);
  EXPECT_EQ(r.dev_pfn, tb.pfn);
  EXPECT_EQ(r.dev_generation, tb.generation);
  EXPECT_TRUE(r.cpu.present);
  EXPECT_EQ(r.cpu.pool, ta.pool);
  EXPECT_EQ(r.cpu.pfn, ta.pfn);
  EXPECT_EQ(r.cpu.generation, ta.generation);
  EXPECT_EQ(r.level, 0u);
  EXPECT_EQ(reps[0].gva, a + 8);
  const std::string d = describe(r);
  char hex[32];
  std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(a));
  EXPECT_NE(d.find(hex), std::string::npos) << d;
  EXPECT_NE(d.find("frame_mismatch"), std::string::npos) << d;
  EXPECT_NE(d.find("read"), std::string::npos) << d;
}

// A PTE left in place after the CPU unmapped the page: the frame was freed
// (its generation advanced) and the access reads a recycled frame.
TEST_P(Oracle, PteLeftAfterCpuUnmapIsReported) {
  const va_t a = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(a, 5), errc::ok);
  const cpu_translation ta = m->cpu_translate(a);
  ASSERT_TRUE(ta.present);
  ASSERT_EQ(m->munmap(a, page_size), errc::ok);
  ASSERT_FALSE(m->cpu_translate(a).present);
  write_pte(a, ta.pool, ta.pfn, true);  // the bug: the zap never happened
  auto st = run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(a, 6); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);  // the oracle reports, it does not abort
  ASSERT_EQ(oracle->stale(), 1u);
  const stale_report r = oracle->reports().at(0);
  EXPECT_EQ(r.reason, stale_reason::cpu_not_present);
  EXPECT_EQ(r.acc, access::write);
  EXPECT_EQ(r.gva, a);
  EXPECT_EQ(r.cpu_va, a);
  EXPECT_EQ(r.dev_pool, ta.pool);
  EXPECT_EQ(r.dev_pfn, ta.pfn);
  EXPECT_GT(r.dev_generation, ta.generation);  // freed since it was mapped
  EXPECT_FALSE(r.cpu.present);
}

// A PTE for a page the CPU never mapped (mmapped, untouched).
TEST_P(Oracle, PteForPageWithNoCpuMappingIsReported) {
  const va_t a = map_anon(2 * page_size), b = a + page_size;
  ASSERT_EQ(m->store<std::uint64_t>(b, 1), errc::ok);
  const cpu_translation tb = m->cpu_translate(b);
  ASSERT_FALSE(m->cpu_translate(a).present);
  write_pte(a, tb.pool, tb.pfn, true);
  (void)device_load(a);
  ASSERT_EQ(oracle->stale(), 1u);
  const stale_report r = oracle->reports().at(0);
  EXPECT_EQ(r.reason, stale_reason::cpu_not_present);
  EXPECT_EQ(r.gva, a);
  EXPECT_EQ(r.dev_pfn, tb.pfn);
  EXPECT_EQ(r.dev_generation, tb.generation);
}

// After fork the parent maps its private pages read-only (copy-on-write). A
// read through a writable device PTE of the same frame is fine; a write or
// an atomic through it would corrupt the child's copy, and is reported.
TEST_P(Oracle, WriteThroughWritablePteToCowPageIsReported) {
  const va_t a = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(a, 10), errc::ok);
  auto child = m->fork();
  ASSERT_TRUE(child.ok());
  const cpu_translation ta = m->cpu_translate(a);
  ASSERT_TRUE(ta.present);
  ASSERT_FALSE(ta.writable);
  write_pte(a, ta.pool, ta.pfn, true);  // the bug: a writable PTE to a COW page
  EXPECT_EQ(device_load(a), 10u);
  EXPECT_EQ(oracle->stale(), 0u) << "a read of the CPU's own frame is not stale";
  auto st = run(1, [=](dev::work_item& wi) {  // one item: the store, then the add
    wi.store<std::uint64_t>(a, 11);
    wi.atomic_add<std::uint64_t>(a, 1);
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  EXPECT_EQ(*(*child)->load<std::uint64_t>(a), 12u) << "the child's copy was corrupted, as reported";
  ASSERT_EQ(oracle->stale(), 2u);
  bool saw_write = false, saw_atomic = false;
  for (const auto& r : oracle->reports()) {
    EXPECT_EQ(r.reason, stale_reason::cpu_read_only);
    EXPECT_EQ(r.gva, a);
    EXPECT_EQ(r.dev_pfn, ta.pfn);
    EXPECT_EQ(r.cpu.pfn, ta.pfn);
    EXPECT_FALSE(r.cpu.writable);
    saw_write |= r.acc == access::write;
    saw_atomic |= r.acc == access::atomic;
  }
  EXPECT_TRUE(saw_write && saw_atomic);
}

// Rule (b) and the order of the checks: an access to the old frame while
// the invalidation that unmapped it is still active (after the CPU PTE was
// cleared, before invalidate_range_end) is excused; the same access once
// the invalidation ended (and the frame was freed) is stale.
TEST_P(Oracle, AccessDuringActiveInvalidationIsExcusedAfterItIsStale) {
  const va_t a = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(a, 42), errc::ok);
  EXPECT_EQ(device_load(a), 42u);  // mirrored by the driver
  const cpu_translation ta = m->cpu_translate(a);
  std::atomic<bool> armed{true};
  std::optional<std::uint64_t> inside_stale, inside_excused;
  m->set_test_hooks({.before_invalidate_end = [&](const mmu_notifier_range& r) {
    if (!(r.start <= a && a < r.end) || !armed.exchange(false)) return;
    // A lazy driver's device still maps the old frame here (the callback
    // already zapped the real PTE; put one back by hand).
    write_pte(a, ta.pool, ta.pfn, false);
    EXPECT_FALSE(m->cpu_translate(a).present);  // the CPU PTE is already gone
    (void)device_load(a);
    inside_stale = oracle->stale();
    inside_excused = oracle->excused();
  }});
  ASSERT_EQ(m->madvise(a, page_size, madvice::dontneed), errc::ok);
  m->set_test_hooks({});  // the hook refers to this frame; teardown runs later
  ASSERT_TRUE(inside_stale.has_value());
  EXPECT_EQ(*inside_stale, 0u);
  EXPECT_EQ(*inside_excused, 1u);
  // The invalidation ended; the PTE written by hand is still there.
  (void)device_load(a);
  EXPECT_EQ(oracle->stale(), 1u);
  ASSERT_EQ(oracle->reports().size(), 1u);
  const stale_report r = oracle->reports()[0];
  EXPECT_EQ(r.reason, stale_reason::cpu_not_present);
  EXPECT_GT(r.dev_generation, ta.generation);
}

TEST_P(Oracle, ReportsAreCappedButEveryStaleAccessIsCounted) {
  make(mirror_kind::full_mm, oracle_options{.max_reports = 4});
  const va_t a = map_anon(2 * page_size), b = a + page_size;
  ASSERT_EQ(m->store<std::uint64_t>(b, 1), errc::ok);
  const cpu_translation tb = m->cpu_translate(b);
  ASSERT_EQ(m->store<std::uint64_t>(a, 1), errc::ok);
  write_pte(a, tb.pool, tb.pfn, false);
  auto st = run(100, [=](dev::work_item& wi) { (void)wi.load<std::uint32_t>(a + 8 * (wi.id() % 512)); });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(oracle->stale(), 100u);
  EXPECT_EQ(oracle->reports().size(), 4u);
  const oracle_counts c = oracle->counts();
  EXPECT_EQ(c.stale, 100u);
  EXPECT_EQ(c.svm_checked, 100u);
  oracle->reset();
  EXPECT_EQ(oracle->stale(), 0u);
  EXPECT_EQ(oracle->checked(), 0u);
  EXPECT_TRUE(oracle->reports().empty());
}

TEST_P(Oracle, UnwatchedVmIsCountedNotChecked) {
  const va_t a = map_anon(2 * page_size), b = a + page_size;
  ASSERT_EQ(m->store<std::uint64_t>(b, 1), errc::ok);
  const cpu_translation tb = m->cpu_translate(b);
  ASSERT_EQ(oracle->unwatch(vm->id()), errc::ok);
  EXPECT_EQ(oracle->unwatch(vm->id()), errc::noent);
  write_pte(a, tb.pool, tb.pfn, false);
  (void)device_load(a);
  EXPECT_EQ(oracle->unwatched(), 1u);
  EXPECT_EQ(oracle->stale(), 0u);
  ASSERT_EQ(oracle->watch(*vm, *m), errc::ok);
  (void)device_load(a);
  EXPECT_EQ(oracle->stale(), 1u);
}

TEST_P(Oracle, WindowsMirrorMapsGpuToCpuAndFlagsUnmirroredPtes) {
  make(mirror_kind::windows);
  const va_t gpu = 0x1000'0000'0000;
  const va_t base = map_anon(4 * page_size);
  ASSERT_EQ(vm->add_window(base, gpu, 4 * page_size), errc::ok);
  EXPECT_EQ(oracle->watch(*vm, *m), errc::inval);  // needs the windows
  EXPECT_EQ(oracle->watch(*vm, *m, {{base, gpu, 4 * page_size}, {base, gpu + page_size, page_size}}), errc::inval);
  ASSERT_EQ(oracle->watch(*vm, *m, {{base, gpu, 4 * page_size}}), errc::ok);
  for (std::uint64_t i = 0; i < 4; ++i) ASSERT_EQ(m->store<std::uint64_t>(base + i * page_size, i), errc::ok);
  auto st = run(4, [=](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(gpu + wi.id() * page_size, 1); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  EXPECT_EQ(oracle->svm_checked(), 4u);
  EXPECT_EQ(oracle->stale(), 0u);
  // A window page mapped to its neighbour's frame.
  const cpu_translation t2 = m->cpu_translate(base + 2 * page_size);
  write_pte(gpu + page_size, t2.pool, t2.pfn, false);
  (void)device_load(gpu + page_size);
  // An SVM PTE outside every window.
  write_pte(gpu + 16 * page_size, t2.pool, t2.pfn, false);
  (void)device_load(gpu + 16 * page_size);
  ASSERT_EQ(oracle->stale(), 2u);
  const auto reps = oracle->reports();
  EXPECT_EQ(reps[0].reason, stale_reason::frame_mismatch);
  EXPECT_EQ(reps[0].gva, gpu + page_size);
  EXPECT_EQ(reps[0].cpu_va, base + page_size);
  EXPECT_EQ(reps[0].dev_pfn, t2.pfn);
  EXPECT_EQ(reps[1].reason, stale_reason::not_mirrored);
  EXPECT_EQ(reps[1].gva, gpu + 16 * page_size);
}

// check() driven by hand (no kernel): a VM id registered with no mirror
// has every SVM access stale (in VRAM too); BO PTEs never are; an unknown or out
// of range VM id is unwatched.
TEST_P(Oracle, HandMadeChecksFollowTheMirrorKind) {
  constexpr dev::vm_id other = 4000;
  ASSERT_EQ(oracle->watch(other, *m, mirror_kind::none), errc::ok);
  EXPECT_EQ(oracle->watch(dev::max_vm_id + 1, *m, mirror_kind::full_mm), errc::inval);
  EXPECT_EQ(oracle->watch(other, *m, mirror_kind::windows, {{0x1000, 0x2001, page_size}}), errc::inval);
  dev::access_check c;
  c.vm = other;
  c.gva = 0x5000;
  c.acc = access::atomic;
  c.pte = dev::dev_pte::make(aperture::system, 7, true);
  c.pfn = 7;
  oracle->check(c);
  c.pte |= gpu_vm::bo_pte_bit;
  oracle->check(c);
  c.pte = dev::dev_pte::make(aperture::vram, 7, true) | gpu_vm::bo_pte_bit;  // a VRAM BO
  c.ap = aperture::vram;
  oracle->check(c);
  c.pte = dev::dev_pte::make(aperture::vram, 7, true);  // SVM in VRAM: checked by the rule
  oracle->check(c);
  c.ap = aperture::system;
  c.pte = dev::dev_pte::make(aperture::system, 7, true);
  c.vm = other + 1;
  oracle->check(c);
  c.vm = dev::max_vm_id + 5;
  oracle->check(c);
  const oracle_counts n = oracle->counts();
  EXPECT_EQ(n.checked, 6u);
  EXPECT_EQ(n.svm_checked, 2u);
  EXPECT_EQ(n.not_svm, 2u);
  EXPECT_EQ(n.unwatched, 2u);
  EXPECT_EQ(n.stale, 2u);
  ASSERT_EQ(oracle->reports().size(), 2u);
  EXPECT_EQ(oracle->reports()[1].reason, stale_reason::not_mirrored);
  const stale_report r = oracle->reports()[0];
  EXPECT_EQ(r.reason, stale_reason::not_mirrored);
  EXPECT_EQ(r.vm, other);
  EXPECT_EQ(r.acc, access::atomic);
  EXPECT_EQ(r.cpu_va, 0u);
  EXPECT_NE(describe(r).find("not_mirrored"), std::string::npos);
}

// The device keeps the validator; the oracle's state outlives the oracle
// object for accesses that raced with its destruction.
TEST_P(Oracle, DestroyingTheOracleWhileKernelsRunIsSafe) {
  const va_t buf = map_anon(8 * page_size);
  std::atomic<bool> stop{false};
  std::jthread kernels([&] {
    while (!stop) {
      auto st = run(64, [=](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(buf + (wi.id() % 8) * page_size, 1); });
      EXPECT_TRUE(st.ok());
    }
  });
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(1ms);
    auto o = std::make_unique<access_oracle>(*dev);
    ASSERT_EQ(o->watch(*vm, *m), errc::ok);
    std::this_thread::sleep_for(1ms);
    EXPECT_EQ(o->stale(), 0u);
    if (i % 2) o->detach();
    EXPECT_FALSE(o->attached() && i % 2);
  }
  stop = true;
  kernels.join();
  oracle.reset();
  const std::uint64_t before = *m->load<std::uint64_t>(buf);
  (void)device_load(buf);  // no oracle installed: still runs
  EXPECT_EQ(*m->load<std::uint64_t>(buf), before);
}

// A watched mm torn down first: the oracle's release replaces its
// registrations, so a later SVM access of the VM is stale (mm_released)
// and no check reads the dead mm (ASan would see it). A second mm that is
// still alive keeps its registration; watching a torn-down mm is EINVAL.
TEST_P(Oracle, AccessAfterTheWatchedMmIsGoneIsStaleAndNeverReadsIt) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 3), errc::ok);
  EXPECT_EQ(device_load(buf), 3u);
  auto other = std::make_unique<mm>(mm_options{.frames = 256});
  constexpr dev::vm_id other_id = 4001;
  ASSERT_EQ(oracle->watch(other_id, *other, mirror_kind::full_mm), errc::ok);
  EXPECT_EQ(oracle->stale(), 0u);
  const pt::translation tr = vm->page_table().translate(buf);
  ASSERT_TRUE(dev::dev_pte::is_valid(tr.entry));

  m.reset();  // the VM's release and the oracle's both run

  EXPECT_TRUE(vm->mm_released());
  dev::access_check c;
  c.vm = vm->id();
  c.gva = buf;
  c.acc = access::read;
  c.pte = tr.entry;
  c.pfn = dev::dev_pte::pfn(tr.entry);
  oracle->check(c);
  EXPECT_EQ(oracle->stale(), 1u);
  ASSERT_EQ(oracle->reports().size(), 1u);
  EXPECT_EQ(oracle->reports()[0].reason, stale_reason::mm_released);
  EXPECT_EQ(oracle->reports()[0].cpu_va, buf);
  EXPECT_NE(describe(oracle->reports()[0]).find("mm_released"), std::string::npos);
  // The live mm's registration is untouched: nothing mapped there is
  // cpu_not_present, as before.
  c.vm = other_id;
  oracle->check(c);
  ASSERT_EQ(oracle->reports().size(), 2u);
  EXPECT_EQ(oracle->reports()[1].reason, stale_reason::cpu_not_present);
  // A torn-down mm cannot be watched.
  other->teardown();
  EXPECT_EQ(oracle->watch(other_id, *other, mirror_kind::full_mm), errc::inval);
  oracle.reset();  // unsubscribes from nothing: both mms are gone
  other.reset();
}

// The mm destroyed while kernels run over it, with the oracle watching:
// the kernels end (the VM's release zaps the mirror: ECANCELED, EFAULT)
// and every access checked before the release was legitimate. Checks in
// flight during the teardown finish before the mm is freed (ASan).
TEST_P(Oracle, MmDestroyedWhileKernelsRunUnderTheOracleIsSafe) {
  const va_t buf = map_anon(8 * page_size);
  for (unsigned i = 0; i < 8; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, i), errc::ok);
  std::atomic<std::uint64_t> loads{0};
  auto c = dev->submit(*vm, 4, [&loads, buf](dev::work_item& wi) {
    for (std::uint64_t i = 0;; ++i) {
      (void)wi.load<std::uint64_t>(buf + ((i + wi.id()) % 8) * page_size);
      loads.fetch_add(1, std::memory_order_relaxed);
    }
  });
  ASSERT_TRUE(c.ok());
  while (loads.load() < 10000) std::this_thread::yield();
  m.reset();
  const dev::kernel_status st = c->wait(60s);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::fault);
  EXPECT_GE(oracle->svm_checked(), 10000u);
  EXPECT_EQ(oracle->stale(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Modes, Oracle,
                         ::testing::Values(mode{seq_mode::pgtable, mirror_impl::page},
                                           mode{seq_mode::notifier, mirror_impl::page},
                                           mode{seq_mode::notifier, mirror_impl::range}),
                         mode_name);

}  // namespace
}  // namespace svm::test
