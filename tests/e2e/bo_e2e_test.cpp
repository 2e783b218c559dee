// End-to-end: BOs and SVM in one VM.
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "common/e2e_fixture.h"

namespace svm::test {
namespace {

constexpr va_t bo_va = va_t{0x7000'0000'0000};

std::vector<std::byte> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<std::uint8_t>(seed + i * 7));
  return v;
}

TEST_P(E2E, BoAndSvmInOneVm) {
  auto bo = vm->create_bo(4 * page_size, placement::vram);
  ASSERT_TRUE(bo.ok());
  auto data = pattern(4 * page_size, 3);
  ASSERT_EQ(vm->bo_write(*bo, 0, data), errc::ok);
  ASSERT_EQ(vm->bind(*bo, bo_va, 0, 4 * page_size), errc::ok);
  const va_t out = map_anon(4 * page_size);
  // Copy the BO into SVM memory, one 8-byte word per work item.
  auto st = run(4 * page_size / 8, [=](dev::work_item& wi) {
    wi.store<std::uint64_t>(out + 8 * wi.id(), wi.load<std::uint64_t>(bo_va + 8 * wi.id()));
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error) << " " << std::hex << st.address;
  std::vector<std::byte> got(4 * page_size);
  ASSERT_EQ(m->read(out, got), errc::ok);
  EXPECT_EQ(got, data);
  EXPECT_GT(vm->stats().bo_faults, 0u);
}

TEST_P(E2E, BoBoundOverMirroredVaTakesPrecedenceThenUnbindReturnsIt) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 1111), errc::ok);
  std::atomic<std::uint64_t> seen{0};
  auto read0 = [&](va_t va) {
    auto st = run(1, [&, va](dev::work_item& wi) { seen = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(st.ok()) << errc_name(st.error);
    return seen.load();
  };
  EXPECT_EQ(read0(buf), 1111u);  // mirrored
  auto bo = vm->create_bo(2 * page_size, placement::system);
  ASSERT_TRUE(bo.ok());
  std::uint64_t v = 2222;
  ASSERT_EQ(vm->bo_write(*bo, 0, std::as_bytes(std::span{&v, 1})), errc::ok);
  ASSERT_EQ(vm->bind(*bo, buf, 0, 2 * page_size), errc::ok);
  EXPECT_EQ(read0(buf), 2222u);  // the BO wins over the mirror
  // A CPU munmap of the mirrored VA does not touch the BO's PTEs.
  ASSERT_EQ(m->munmap(buf, page_size), errc::ok);
  EXPECT_EQ(read0(buf), 2222u);
  ASSERT_EQ(m->store<std::uint64_t>(buf + page_size, 3333), errc::ok);
  ASSERT_EQ(vm->unbind(buf, 2 * page_size), errc::ok);
  EXPECT_EQ(read0(buf + page_size), 3333u);  // back to the mirror
  auto gone = run(1, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf); });
  EXPECT_EQ(gone.error, errc::canceled);  // unmapped on the CPU, no BO any more
}

TEST_P(E2E, EvictionUnderVramPressureWhileSvmFaultsRun) {
  make({}, dev::device_config{.vram_bytes = 16 * page_size});
  auto a = vm->create_bo(8 * page_size, placement::vram);
  ASSERT_TRUE(a.ok());
  auto da = pattern(8 * page_size, 9);
  ASSERT_EQ(vm->bo_write(*a, 0, da), errc::ok);
  ASSERT_EQ(vm->bind(*a, bo_va, 0, 8 * page_size), errc::ok);
  const va_t buf = map_anon(256 * page_size);
  std::atomic<bool> stop{false};
  std::jthread svm_load([&] {
    while (!stop) {
      auto st = run(256, [=](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(buf + wi.id() * page_size, 1); });
      ASSERT_TRUE(st.ok());
    }
  });
  // A second BO does not fit: creating it evicts the first.
  auto b = vm->create_bo(12 * page_size, placement::vram);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*vm->bo_placement(*a), placement::system);
  EXPECT_GE(vm->stats().evictions, 1u);
  // The evicted BO faults back in with its data intact.
  const va_t out = map_anon(8 * page_size);
  auto st = run(8 * page_size / 8, [=](dev::work_item& wi) {
    wi.store<std::uint64_t>(out + 8 * wi.id(), wi.load<std::uint64_t>(bo_va + 8 * wi.id()));
  });
  stop = true;
  svm_load.join();
  ASSERT_TRUE(st.ok());
  std::vector<std::byte> got(8 * page_size);
  ASSERT_EQ(m->read(out, got), errc::ok);
  EXPECT_EQ(got, da);
  // Nothing else can be evicted: VRAM exhaustion is an error.
  auto c = vm->create_bo(32 * page_size, placement::vram);
  EXPECT_EQ(c.error(), errc::nomem);
}

TEST_P(E2E, BadBindsAreRejectedAndChangeNothing) {
  auto bo = vm->create_bo(2 * page_size, placement::vram);
  ASSERT_TRUE(bo.ok());
  EXPECT_EQ(vm->bind(*bo, bo_va + 1, 0, page_size), errc::inval);
  EXPECT_EQ(vm->bind(*bo, bo_va, 0, 0), errc::inval);
  EXPECT_EQ(vm->bind(*bo, bo_va, page_size, 2 * page_size), errc::inval);  // past the BO's end
  EXPECT_EQ(vm->bind(*bo + 100, bo_va, 0, page_size), errc::noent);
  EXPECT_EQ(vm->bind(*bo, ~va_t{0} & ~(page_size - 1), 0, 2 * page_size), errc::overflow);
  auto st = run(1, [](dev::work_item& wi) { (void)wi.load<int>(bo_va); });
  EXPECT_EQ(st.error, errc::canceled);  // still unmapped
  EXPECT_EQ(vm->create_bo(0, placement::vram).error(), errc::inval);
  EXPECT_EQ(vm->create_bo(100, placement::vram).error(), errc::inval);
  EXPECT_EQ(vm->destroy_bo(*bo + 100), errc::noent);
  EXPECT_EQ(vm->evict(*bo + 100), errc::noent);
}

INSTANTIATE_TEST_SUITE_P(Modes, E2E, SVM_E2E_MODES, param_name);

}  // namespace
}  // namespace svm::test

namespace svm::test {
namespace {

// A long-running VM (no SVM, no recoverable faults): eviction signals the
// preempt fence, moves the BO, rebinds it and arms a new fence; kernels
// running across it keep working on the same data.
TEST(LongRunningVm, EvictionPreemptsRebindsAndResumes) {
  mm m(mm_options{.frames = 4096});
  auto dev_owner = driver::create(driver_config{.hw = {.engines = 2, .vram_bytes = 64 * page_size}}).value();
  driver& dev = *dev_owner;
  vm_config c;
  c.mode = vm_mode::long_running;
  c.mirror = mirror_kind::none;
  auto vm_owner = gpu_vm::create(dev, m, c).value();
  gpu_vm& vm = *vm_owner;
  auto bo = vm.create_bo(8 * page_size, placement::vram);
  ASSERT_TRUE(bo.ok());
  ASSERT_EQ(vm.bind(*bo, bo_va, 0, 8 * page_size), errc::ok);
  // Bound PTEs are written at bind time: the first access does not fault.
  auto first = dev.submit(vm, 8, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(bo_va + wi.id() * page_size, 1); });
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(first->wait(std::chrono::seconds(30)).ok());
  EXPECT_EQ(vm.stats().bo_faults, 0u);
  fence_ptr before = vm.preempt_fence();
  ASSERT_TRUE(before);
  EXPECT_FALSE(before->is_signaled());
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> adds{0};
  std::jthread load([&] {
    while (!stop) {
      auto k = dev.submit(vm, 64, [](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(bo_va + (wi.id() % 8) * page_size, 1); });
      ASSERT_TRUE(k.ok());
      ASSERT_TRUE(k->wait(std::chrono::seconds(30)).ok());
      adds += 64;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(vm.evict(*bo), errc::ok);
  stop = true;
  load.join();
  EXPECT_TRUE(before->is_signaled());
  fence_ptr after = vm.preempt_fence();
  EXPECT_NE(after, before);
  EXPECT_FALSE(after->is_signaled());
  EXPECT_EQ(vm.stats().preemptions, 1u);
  EXPECT_EQ(*vm.bo_placement(*bo), placement::system);
  std::uint64_t total = 0;
  for (int i = 0; i < 8; ++i) {
    std::uint64_t v = 0;
    ASSERT_EQ(vm.bo_read(*bo, i * page_size, std::as_writable_bytes(std::span{&v, 1})), errc::ok);
    total += v;
  }
  EXPECT_EQ(total, 8 + adds.load());  // no increment lost across the move
  // SVM addresses are not mirrored in a long-running VM.
  auto va = m.mmap(0, page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  const va_t cpu = *va;
  auto k = dev.submit(vm, 1, [cpu](dev::work_item& wi) { (void)wi.load<int>(cpu); });
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->wait(std::chrono::seconds(30)).error, errc::canceled);
}

}  // namespace
}  // namespace svm::test
