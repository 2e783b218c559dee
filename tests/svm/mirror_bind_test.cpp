// gpu_vm::mirror_unbind / mirror_bind: GPU VA ranges taken out of the SVM
// mirror and given back (full_mm and windows VMs), BOs inside such ranges,
// bad input, and a fault racing mirror_unbind under deterministic
// interleavings.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "svm/device_sim/dev_pte.h"
#include "svm/svm/gpu_vm.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;
using dev::dev_pte;

struct mode {
  seq_mode seq;
  mirror_impl impl;
};
std::string mode_name(const ::testing::TestParamInfo<mode>& p) {
  return std::string(to_string(p.param.seq)) + "_" + to_string(p.param.impl);
}

constexpr std::uint64_t pg = page_size;

class MirrorBind : public ::testing::TestWithParam<mode> {
 protected:
  void SetUp() override {
    m = std::make_unique<mm>(mm_options{.frames = 8192});
    dev = driver::create(driver_config{.hw = {.engines = 2}}).value();
    auto va = m->mmap(0, 8 * huge_size, prot::read | prot::write, map::private_ | map::anonymous);
    ASSERT_TRUE(va.ok());
    base = align_up(*va, huge_size);
    // 4K CPU pages, so a 2M device window is 512 4K entries that a zap can
    // clear one by one.
    ASSERT_EQ(m->madvise(*va, 8 * huge_size, madvice::nohugepage), errc::ok);
    vm = make_vm(mirror_kind::full_mm);
  }
  void TearDown() override {
    vm.reset();
    dev.reset();
    m.reset();
  }
  // A VM whose faults always try a 2M window: a window next to an unbound
  // range would reach into it unless `allowed` is trimmed.
  std::unique_ptr<gpu_vm> make_vm(mirror_kind k, vm_mode md = vm_mode::fault) {
    vm_config c;
    c.mode = md;
    c.mirror = k;
    c.seq = GetParam().seq;
    c.impl = GetParam().impl;
    c.window = std::make_shared<fixed_window_policy>(huge_size);
    return gpu_vm::create(*dev, *m, c).value();
  }
  dev::kernel_status touch(gpu_vm& v, va_t va, std::uint64_t* out = nullptr) {
    std::atomic<std::uint64_t> seen{~0ull};
    auto c = dev->submit(v, 1, [&seen, va](dev::work_item& wi) { seen = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {.error = c.error()};
    auto st = c->wait(30s);
    if (out) *out = seen.load();
    return st;
  }
  std::uint64_t read(gpu_vm& v, va_t va) {
    std::uint64_t x = ~0ull;
    auto st = touch(v, va, &x);
    EXPECT_TRUE(st.ok()) << errc_name(st.error) << " reason " << errc_name(st.reason) << " at " << std::hex << va;
    return x;
  }
  void expect_cancelled(gpu_vm& v, va_t va) {
    auto st = touch(v, va);
    EXPECT_EQ(st.error, errc::canceled) << std::hex << va;
    EXPECT_EQ(st.reason, errc::fault) << std::hex << va;
    EXPECT_EQ(st.address, va);
  }
  static bool mapped(gpu_vm& v, va_t va) { return dev_pte::is_valid(v.page_table().translate(va).entry); }
  void fill(va_t va, unsigned pages, std::uint64_t tag) {
    for (unsigned i = 0; i < pages; ++i) ASSERT_EQ(m->store<std::uint64_t>(va + i * pg, tag + i), errc::ok);
  }

  std::unique_ptr<mm> m;
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm;
  va_t base = 0;
};

TEST_P(MirrorBind, UnbindClearsPtesFlushesAndCancelsFaultsThere) {
  fill(base, 16, 100);
  for (unsigned i = 0; i < 16; ++i) EXPECT_EQ(read(*vm, base + i * pg), 100u + i);
  for (unsigned i = 0; i < 16; ++i) ASSERT_TRUE(mapped(*vm, base + i * pg));
  const auto before = vm->stats();
  ASSERT_EQ(vm->mirror_unbind(base + 4 * pg, 4 * pg), errc::ok);
  const auto after = vm->stats();
  for (unsigned i = 0; i < 16; ++i)
    EXPECT_EQ(mapped(*vm, base + i * pg), i < 4 || i >= 8) << "page " << i;
  EXPECT_GE(after.ptes_zapped - before.ptes_zapped, 4u);
  EXPECT_GE(after.tlb_invalidations - before.tlb_invalidations, 1u);
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{{base + 4 * pg, base + 8 * pg}}));
  // Accesses there are cancelled like an unmirrored address's; the rest of
  // the buffer still works, and the CPU side is untouched.
  expect_cancelled(*vm, base + 5 * pg);
  expect_cancelled(*vm, base + 4 * pg);
  EXPECT_GE(vm->stats().faults_cancelled - after.faults_cancelled, 2u);
  EXPECT_EQ(read(*vm, base + 3 * pg), 103u);
  EXPECT_EQ(read(*vm, base + 8 * pg), 108u);
  EXPECT_FALSE(mapped(*vm, base + 5 * pg));
  auto cpu = m->load<std::uint64_t>(base + 5 * pg);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(*cpu, 105u);
}

TEST_P(MirrorBind, FaultWindowsNextToAnUnboundRangeStayOutOfIt) {
  fill(base, 512, 0);
  ASSERT_EQ(vm->mirror_unbind(base + 100 * pg, 2 * pg), errc::ok);
  // The 2M window does not fit beside the hole: 4K windows only.
  EXPECT_EQ(read(*vm, base + 50 * pg), 50u);
  EXPECT_EQ(vm->stats().ptes_written, 1u);
  EXPECT_EQ(read(*vm, base + 99 * pg), 99u);
  EXPECT_EQ(read(*vm, base + 102 * pg), 102u);
  // A batch of faults around the hole (one 2M block, several pages).
  std::vector<va_t> around;
  for (unsigned i = 90; i < 112; ++i)
    if (i != 100 && i != 101) around.push_back(base + i * pg);
  auto c = dev->submit(*vm, around.size(), [&](dev::work_item& wi) { (void)wi.load<std::uint64_t>(around[wi.id()]); });
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->wait(30s).ok());
  for (va_t va : around) EXPECT_TRUE(mapped(*vm, va));
  EXPECT_FALSE(mapped(*vm, base + 100 * pg));
  EXPECT_FALSE(mapped(*vm, base + 101 * pg));
  // The next 2M block, untouched by the hole, still gets a 2M window.
  vm->reset_stats();
  fill(base + huge_size, 1, 7);
  EXPECT_EQ(read(*vm, base + huge_size), 7u);
  EXPECT_EQ(vm->stats().ptes_written, 512u);
  expect_cancelled(*vm, base + 101 * pg);
}

TEST_P(MirrorBind, BindGivesTheRangeBackWithCurrentCpuData) {
  fill(base, 8, 10);
  EXPECT_EQ(read(*vm, base + 2 * pg), 12u);
  ASSERT_EQ(vm->mirror_unbind(base, 8 * pg), errc::ok);
  expect_cancelled(*vm, base + 2 * pg);
  ASSERT_EQ(m->store<std::uint64_t>(base + 2 * pg, 4242), errc::ok);  // the CPU moves on meanwhile
  ASSERT_EQ(vm->mirror_bind(base, 8 * pg), errc::ok);
  EXPECT_TRUE(vm->mirror_unbound().empty());
  EXPECT_EQ(read(*vm, base + 2 * pg), 4242u);
  EXPECT_EQ(read(*vm, base + 7 * pg), 17u);
  // The whole 2M window is back (nothing trims it any more).
  EXPECT_TRUE(mapped(*vm, base + 5 * pg));
}

TEST_P(MirrorBind, RangesMergeAndSplitAndBothCallsAreIdempotent) {
  const auto R = [&](unsigned a, unsigned b) { return va_range{base + a * pg, base + b * pg}; };
  ASSERT_EQ(vm->mirror_unbind(base + 4 * pg, 4 * pg), errc::ok);
  ASSERT_EQ(vm->mirror_unbind(base + 8 * pg, 4 * pg), errc::ok);  // adjacent: merged
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(4, 12)}));
  ASSERT_EQ(vm->mirror_unbind(base + 6 * pg, 2 * pg), errc::ok);  // already out: fine
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(4, 12)}));
  ASSERT_EQ(vm->mirror_unbind(base + 20 * pg, 2 * pg), errc::ok);
  ASSERT_EQ(vm->mirror_unbind(base + 10 * pg, 12 * pg), errc::ok);  // overlaps both: one range
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(4, 22)}));
  ASSERT_EQ(vm->mirror_bind(base + 8 * pg, 2 * pg), errc::ok);  // splits it
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(4, 8), R(10, 22)}));
  ASSERT_EQ(vm->mirror_bind(base + 30 * pg, 2 * pg), errc::ok);  // never out: fine
  ASSERT_EQ(vm->mirror_bind(base + 8 * pg, 2 * pg), errc::ok);   // twice: fine
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(4, 8), R(10, 22)}));
  ASSERT_EQ(vm->mirror_bind(base, 12 * pg), errc::ok);  // trims the second's front
  EXPECT_EQ(vm->mirror_unbound(), (std::vector<va_range>{R(12, 22)}));
  fill(base, 24, 0);
  EXPECT_EQ(read(*vm, base + 9 * pg), 9u);
  expect_cancelled(*vm, base + 12 * pg);
  expect_cancelled(*vm, base + 21 * pg);
  EXPECT_EQ(read(*vm, base + 22 * pg), 22u);
}

TEST_P(MirrorBind, BoInsideAnUnboundRangeKeepsWorking) {
  fill(base, 16, 0);
  auto bo = vm->create_bo(2 * pg, placement::system);
  ASSERT_TRUE(bo.ok());
  const std::uint64_t v = 0xb0b0;
  ASSERT_EQ(vm->bo_write(*bo, 0, std::as_bytes(std::span{&v, 1})), errc::ok);
  // A BO bound before the unbind: its PTEs survive it.
  ASSERT_EQ(vm->bind(*bo, base + 2 * pg, 0, 2 * pg), errc::ok);
  EXPECT_EQ(read(*vm, base + 2 * pg), v);
  ASSERT_EQ(vm->mirror_unbind(base, 8 * pg), errc::ok);
  const auto e = vm->page_table().translate(base + 2 * pg).entry;
  EXPECT_TRUE(dev_pte::is_valid(e) && (e & gpu_vm::bo_pte_bit));
  EXPECT_EQ(read(*vm, base + 2 * pg), v);
  expect_cancelled(*vm, base + 5 * pg);
  // A BO bound after it, elsewhere in the range.
  ASSERT_EQ(vm->bind(*bo, base + 5 * pg, 0, pg), errc::ok);
  EXPECT_EQ(read(*vm, base + 5 * pg), v);
  // A VM_BIND unmap leaves the VA out of the mirror.
  ASSERT_EQ(vm->unbind(base + 5 * pg, pg), errc::ok);
  expect_cancelled(*vm, base + 5 * pg);
  ASSERT_EQ(vm->mirror_bind(base, 8 * pg), errc::ok);
  EXPECT_EQ(read(*vm, base + 5 * pg), 5u);
  EXPECT_EQ(read(*vm, base + 2 * pg), v);  // the BO still wins over the mirror
}

TEST_P(MirrorBind, WindowsVm) {
  vm = make_vm(mirror_kind::windows);
  const va_t gpu = 0x1000'0000'0000;
  ASSERT_EQ(vm->add_window(base, gpu, 16 * pg), errc::ok);
  ASSERT_EQ(vm->add_window(base + huge_size, gpu + 16 * pg, 16 * pg), errc::ok);  // GPU-adjacent
  fill(base, 16, 0);
  fill(base + huge_size, 16, 1000);
  EXPECT_EQ(read(*vm, gpu + 5 * pg), 5u);
  EXPECT_EQ(read(*vm, gpu + 6 * pg), 6u);  // (16-page windows: 4K device windows)
  ASSERT_TRUE(mapped(*vm, gpu + 6 * pg));
  // Not wholly inside the windows: refused, nothing changed.
  EXPECT_EQ(vm->mirror_unbind(gpu + 30 * pg, 4 * pg), errc::inval);
  EXPECT_EQ(vm->mirror_unbind(gpu - pg, 2 * pg), errc::inval);
  EXPECT_EQ(vm->mirror_unbind(base, pg), errc::inval);  // the CPU VA is not a GPU VA of the mirror
  EXPECT_TRUE(vm->mirror_unbound().empty());
  EXPECT_TRUE(mapped(*vm, gpu + 6 * pg));
  // Across the two windows.
  ASSERT_EQ(vm->mirror_unbind(gpu + 6 * pg, 12 * pg), errc::ok);
  EXPECT_FALSE(mapped(*vm, gpu + 6 * pg));
  expect_cancelled(*vm, gpu + 6 * pg);
  expect_cancelled(*vm, gpu + 17 * pg);
  EXPECT_EQ(read(*vm, gpu + 5 * pg), 5u);
  EXPECT_EQ(read(*vm, gpu + 18 * pg), 1002u);
  for (unsigned i = 6; i < 18; ++i) EXPECT_FALSE(mapped(*vm, gpu + i * pg)) << i;
  ASSERT_EQ(vm->mirror_bind(gpu, 32 * pg), errc::ok);
  EXPECT_EQ(read(*vm, gpu + 6 * pg), 6u);
  EXPECT_EQ(read(*vm, gpu + 17 * pg), 1001u);
}

TEST_P(MirrorBind, BadInputIsRefusedAndChangesNothing) {
  fill(base, 8, 0);
  ASSERT_EQ(vm->mirror_unbind(base + 2 * pg, pg), errc::ok);
  const auto state = vm->mirror_unbound();
  const va_t limit = vm->page_table().va_limit();
  for (auto op : {&gpu_vm::mirror_unbind, &gpu_vm::mirror_bind}) {
    EXPECT_EQ((vm.get()->*op)(base, 0), errc::inval);
    EXPECT_EQ((vm.get()->*op)(base + 1, pg), errc::inval);
    EXPECT_EQ((vm.get()->*op)(base, pg + 8), errc::inval);
    EXPECT_EQ((vm.get()->*op)(~va_t{0} & ~(pg - 1), 2 * pg), errc::overflow);
    EXPECT_EQ((vm.get()->*op)(limit - pg, 2 * pg), errc::inval);
    EXPECT_EQ((vm.get()->*op)(limit, pg), errc::inval);
    EXPECT_EQ(vm->mirror_unbound(), state);
  }
  EXPECT_EQ(read(*vm, base + pg), 1u);
  expect_cancelled(*vm, base + 2 * pg);
  // VMs without a mirror: a fault VM with mirror_kind::none, and a
  // long-running VM (which has none).
  auto none = make_vm(mirror_kind::none);
  EXPECT_EQ(none->mirror_unbind(base, pg), errc::inval);
  EXPECT_EQ(none->mirror_bind(base, pg), errc::inval);
  auto lr = make_vm(mirror_kind::none, vm_mode::long_running);
  EXPECT_EQ(lr->mirror_unbind(base, pg), errc::inval);
  EXPECT_EQ(lr->mirror_bind(base, pg), errc::inval);
  EXPECT_TRUE(lr->mirror_unbound().empty());
  // Once the mm is released the mirror is gone: ENOENT, nothing changed;
  // BOs still work.
  m->teardown();
  ASSERT_TRUE(vm->mm_released());
  EXPECT_EQ(vm->mirror_unbind(base + 4 * pg, pg), errc::noent);
  EXPECT_EQ(vm->mirror_bind(base + 2 * pg, pg), errc::noent);
  EXPECT_EQ(vm->mirror_unbound(), state);
  auto bo = vm->create_bo(pg, placement::system);
  ASSERT_TRUE(bo.ok());
  ASSERT_EQ(vm->bind(*bo, base + 2 * pg, 0, pg), errc::ok);
  EXPECT_EQ(read(*vm, base + 2 * pg), 0u);
}

// A fault paused inside its service (after its snapshot, or just before its
// commit) while mirror_unbind() runs on another thread. The fault holds
// vm.lock shared across the service, so the unbind waits for it; once
// the fault has committed, the unbind clears what it wrote. After the
// unbind returns, no PTE is left in the range, and a new access there is
// cancelled.
enum class pause_at { after_snapshot, before_commit };
class MirrorBindRace : public MirrorBind {
 protected:
  void race(pause_at where) {
    fill(base, 512, 0);
    const va_t fault_va = base + 10 * pg;
    std::atomic<int> phase{0};
    auto pause = [&](va_range w) {
      if (!w.contains(fault_va) || phase.load() != 0) return;
      phase = 1;
      phase.notify_all();
      while (phase.load() != 2) phase.wait(1);
    };
    gpu_vm::test_hooks h;
    if (where == pause_at::after_snapshot) h.after_snapshot = pause;
    else h.before_commit = pause;
    vm->set_test_hooks(h);
    std::atomic<std::uint64_t> seen{~0ull};
    auto k = dev->submit(*vm, 1, [&](dev::work_item& wi) { seen = wi.load<std::uint64_t>(fault_va); });
    ASSERT_TRUE(k.ok());
    while (phase.load() != 1) phase.wait(0);
    // The fault is inside its service with a 2M window covering the range.
    std::atomic<bool> done{false};
    errc unbind_result = errc::busy;
    std::jthread unbinder([&] {
      unbind_result = vm->mirror_unbind(base + 8 * pg, 8 * pg);
      done = true;
    });
    std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(done.load()) << "mirror_unbind ran while a fault was between its lookup and its commit";
    phase = 2;
    phase.notify_all();
    unbinder.join();
    ASSERT_EQ(unbind_result, errc::ok);
    for (unsigned i = 8; i < 16; ++i) EXPECT_FALSE(mapped(*vm, base + i * pg)) << "page " << i << " left mapped";
    // The fault committed before the unbind: its window outside the range
    // is still there.
    EXPECT_TRUE(mapped(*vm, base + 2 * pg));
    EXPECT_TRUE(mapped(*vm, base + 16 * pg));
    // The paused kernel either read before the zap or refaulted after it
    // and was cancelled; either way it ended.
    auto st = k->wait(30s);
    EXPECT_TRUE(st.ok() || (st.error == errc::canceled && st.reason == errc::fault)) << errc_name(st.error);
    if (st.ok()) {
      EXPECT_EQ(seen.load(), 10u);
    }
    vm->set_test_hooks({});
    for (unsigned i = 8; i < 16; ++i) EXPECT_FALSE(mapped(*vm, base + i * pg)) << "page " << i << " remapped";
    expect_cancelled(*vm, fault_va);
    EXPECT_EQ(read(*vm, base + 16 * pg), 16u);
  }
};

TEST_P(MirrorBindRace, FaultPausedAfterItsSnapshot) { race(pause_at::after_snapshot); }
TEST_P(MirrorBindRace, FaultPausedBeforeItsCommit) { race(pause_at::before_commit); }

// A fault that starts after the unbind took the lock, on a neighbour whose
// 2M window would cover the range: the unbind's range trims it to one page.
TEST_P(MirrorBindRace, FaultAfterUnbindOnANeighbourTrimsItsWindow) {
  fill(base, 512, 0);
  std::atomic<int> windows{0};
  std::atomic<bool> outside{false};
  const va_range hole{base + 8 * pg, base + 16 * pg};
  vm->set_test_hooks({.after_snapshot = [&](va_range w) {
    ++windows;
    if (w.overlaps(hole)) outside = true;
  }});
  ASSERT_EQ(vm->mirror_unbind(hole.start, hole.size()), errc::ok);
  EXPECT_EQ(read(*vm, base + 16 * pg), 16u);
  EXPECT_EQ(read(*vm, base + 7 * pg), 7u);
  EXPECT_GE(windows.load(), 2);
  EXPECT_FALSE(outside.load()) << "a fault window reached into the unbound range";
  vm->set_test_hooks({});
}

#define SVM_MBIND_MODES                                                                                      \
  ::testing::Values(mode{seq_mode::pgtable, mirror_impl::page}, mode{seq_mode::notifier, mirror_impl::page}, \
                    mode{seq_mode::notifier, mirror_impl::range})
INSTANTIATE_TEST_SUITE_P(Modes, MirrorBind, SVM_MBIND_MODES, mode_name);
INSTANTIATE_TEST_SUITE_P(Modes, MirrorBindRace, SVM_MBIND_MODES, mode_name);

}  // namespace
}  // namespace svm::test
