// End-to-end: real kernels on the simulated device over mirrored memory.
#include <atomic>
#include <thread>
#include <vector>

#include "common/e2e_fixture.h"

namespace svm::test {
namespace {

TEST_P(E2E, KernelReadsCpuDataAndCpuReadsResults) {
  constexpr std::uint64_t n = 4096;
  const va_t in = map_anon(n * 4), out = map_anon(n * 4);
  for (std::uint64_t i = 0; i < n; ++i) ASSERT_EQ(m->store<float>(in + 4 * i, float(i)), errc::ok);
  auto st = run(n, [=](dev::work_item& wi) {
    const auto i = wi.id();
    wi.store<float>(out + 4 * i, 2.0f * wi.load<float>(in + 4 * i));
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error) << " at " << std::hex << st.address;
  for (std::uint64_t i = 0; i < n; ++i) {
    auto v = m->load<float>(out + 4 * i);
    ASSERT_TRUE(v.ok());
    ASSERT_EQ(*v, 2.0f * float(i)) << i;
  }
  auto s = vm->stats();
  EXPECT_GT(s.faults_serviced, 0u);
  EXPECT_GT(s.ptes_written, 0u);
  EXPECT_EQ(s.faults_cancelled, 0u);
}

TEST_P(E2E, DeviceTouchesMemoryTheCpuNeverTouched) {
  const va_t buf = map_anon(64 * page_size);
  auto st = run(64, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, wi.id() + 100); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (std::uint64_t i = 0; i < 64; ++i) EXPECT_EQ(*m->load<std::uint64_t>(buf + i * page_size), i + 100);
}

TEST_P(E2E, InvalidAddressFailsOnlyItsKernel) {
  const va_t buf = map_anon(page_size);
  auto bad = run(1, [](dev::work_item& wi) { (void)wi.load<int>(0x1000); });
  EXPECT_EQ(bad.error, errc::canceled);
  EXPECT_EQ(bad.reason, errc::fault);
  EXPECT_EQ(bad.address, 0x1000u);
  auto good = run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 7); });
  EXPECT_TRUE(good.ok());
  EXPECT_EQ(*m->load<int>(buf), 7);
}

TEST_P(E2E, WriteToReadOnlyMemoryIsCancelledWithEperm) {
  const va_t buf = map_anon(page_size, prot::read);
  auto st = run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 1); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::perm);
  auto rd = run(1, [=](dev::work_item& wi) { (void)wi.load<int>(buf); });
  EXPECT_TRUE(rd.ok());
}

TEST_P(E2E, MunmapBetweenKernelsMakesTheNextAccessFail) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_TRUE(run(4, [=](dev::work_item& wi) { wi.store<int>(buf + wi.id() * page_size, 1); }).ok());
  ASSERT_EQ(m->munmap(buf, 4 * page_size), errc::ok);
  auto st = run(1, [=](dev::work_item& wi) { (void)wi.load<int>(buf); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::fault);
  EXPECT_GT(vm->stats().ptes_zapped, 0u);
}


// The faults of one 2M block reach the handler in one batch (the first
// fault's service waits, in its snapshot hook, until every other fault is
// outstanding): the page mirror services them through one window and one
// hmm_range_fault, and maps exactly the faulting pages, as per-page
// service would with 4K windows; the baseline services them page by page.
TEST_P(E2E, FaultsOfOneBlockAreServicedTogetherAndMapOnlyTheirPages) {
  constexpr unsigned n = 32;
  make(vm_config{.window = std::make_shared<fixed_window_policy>(page_size)},
       dev::device_config{.engines = 1, .waves_per_engine = 64});
  const va_t raw = map_anon(2 * huge_size);
  const va_t buf = align_up(raw, huge_size);  // 2n pages inside one 2M block
  std::atomic<bool> first{true};
  dev::device* hw = &dev->hw();
  vm->set_test_hooks({.after_snapshot = [&](va_range) {
    if (!first.exchange(false)) return;
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (hw->stats().outstanding_faults < n && std::chrono::steady_clock::now() < end) std::this_thread::yield();
  }});
  ASSERT_TRUE(run(n, [=](dev::work_item& wi) {
                wi.store<std::uint64_t>(buf + 2 * wi.id() * page_size, 100 + wi.id());
              }).ok());
  for (unsigned i = 0; i < 2 * n; ++i) {
    const va_t p = buf + i * page_size;
    const bool mapped = dev::dev_pte::is_valid(vm->page_table().translate(p).entry);
    if (i % 2 == 0) {
      EXPECT_TRUE(mapped) << "faulting page " << i;
      EXPECT_EQ(m->load<std::uint64_t>(p).value_or(0), 100 + i / 2) << "page " << i;
    } else {
      EXPECT_FALSE(mapped) << "page " << i << " between faults was mapped";
    }
  }
  const vm_stats st = vm->stats();
  EXPECT_EQ(st.faults_serviced, n);
  if (GetParam().impl == mirror_impl::page) {
    EXPECT_GE(st.grouped_pages, n - 1) << st.to_string();
    EXPECT_LE(st.hmm_calls, 2u + st.retries_busy + st.retries_seq) << st.to_string();
  } else {
    EXPECT_EQ(st.grouped_pages, 0u);
    EXPECT_GE(st.hmm_calls, n);
  }
}

// A block whose window keeps being invalidated (a CPU storm over a page
// between its faults) is handed back to per-page service after
// gpu_vm::group_retry_limit stale tries. The retry bound is set so low that
// a fault gives up at its first stale try: before the hand-back rule, the
// group itself timed out (EBUSY); now each page, whose 4K window the storm
// does not touch, completes.
TEST_P(E2E, AGroupWhoseWindowKeepsMovingFallsBackInsteadOfTimingOut) {
  if (GetParam().impl != mirror_impl::page) GTEST_SKIP() << "the baseline does not group";
  constexpr unsigned n = 8;
  make(vm_config{.window = std::make_shared<fixed_window_policy>(page_size),
                 .fault_timeout = std::chrono::nanoseconds(1),
                 .fault_retry_floor = 1},
       dev::device_config{.engines = 1, .waves_per_engine = 64});
  const va_t raw = map_anon(2 * huge_size);
  const va_t buf = align_up(raw, huge_size);
  std::atomic<bool> first{true};
  std::atomic<unsigned> storms{0};
  dev::device* hw = &dev->hw();
  mm* cpu = m.get();
  vm->set_test_hooks({.after_snapshot = [&, cpu](va_range w) {
    if (first.exchange(false)) {
      const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (hw->stats().outstanding_faults < n && std::chrono::steady_clock::now() < end) std::this_thread::yield();
    }
    // Only a group's window spans more than one page. It starts at its
    // first fault's (even) page, so the odd page after it lies between two
    // faults and is never faulted by the device: the storm hits there,
    // whichever faults each batch took (a first batch of 1, 2 or all 8).
    if (w.size() > page_size) {
      storms.fetch_add(1);
      EXPECT_EQ(cpu->madvise(w.start + page_size, page_size, madvice::dontneed), errc::ok);
    }
  }});
  ASSERT_TRUE(run(n, [=](dev::work_item& wi) {
                wi.store<std::uint64_t>(buf + 2 * wi.id() * page_size, 500 + wi.id());
              }).ok());
  for (unsigned i = 0; i < n; ++i) {
    EXPECT_EQ(m->load<std::uint64_t>(buf + 2 * i * page_size).value_or(0), 500 + i) << "page " << 2 * i;
  }
  for (unsigned i = 0; i < n; ++i) {
    const va_t odd = buf + (2 * i + 1) * page_size;
    EXPECT_FALSE(dev::dev_pte::is_valid(vm->page_table().translate(odd).entry)) << "page " << 2 * i + 1;
  }
  const vm_stats st = vm->stats();
  EXPECT_EQ(st.fault_timeouts, 0u) << st.to_string();
  EXPECT_EQ(st.faults_cancelled, 0u) << st.to_string();
  EXPECT_GE(st.group_fallbacks, 1u) << st.to_string();
  EXPECT_GE(storms.load(), gpu_vm::group_retry_limit);
  vm->set_test_hooks({});
}

// A block whose pages the CPU refuses in part (one read-only VMA among
// writable ones is another VMA, so the block falls back to per-page
// service): each page gets its own outcome.
TEST_P(E2E, ABlockWithARefusedPageGivesEachPageItsOwnOutcome) {
  make(vm_config{.window = std::make_shared<fixed_window_policy>(page_size)},
       dev::device_config{.engines = 1, .waves_per_engine = 64});
  const va_t raw = map_anon(2 * huge_size);
  const va_t buf = align_up(raw, huge_size);
  ASSERT_EQ(m->mprotect(buf + 3 * page_size, page_size, prot::read), errc::ok);
  auto st = run(8, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, 7); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::perm);
  for (unsigned i = 0; i < 8; ++i) {
    const bool mapped = dev::dev_pte::is_valid(vm->page_table().translate(buf + i * page_size).entry);
    if (i == 3) {
      EXPECT_FALSE(mapped);
    }
  }
}

}  // namespace
}  // namespace svm::test
