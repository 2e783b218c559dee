// End-to-end: CPU operations between and during kernels, fork, shared
// memory, huge pages, many engines and submitters.
#include <atomic>
#include <thread>
#include <vector>

#include "common/e2e_fixture.h"

namespace svm::test {
namespace {

/// A few frames of plain memory for a page table the driver does not know.
class test_frames final : public phys_mem {
 public:
  std::byte* frame_data(pfn_t pfn) noexcept override { return pfn < 4 ? bytes_.data() + pfn * page_size : nullptr; }
  std::uint64_t frame_generation(pfn_t) const noexcept override { return 0; }
  pfn_t frame_count() const noexcept override { return 4; }

 private:
  std::vector<std::byte> bytes_ = std::vector<std::byte>(4 * page_size);
};

using clock_type = std::chrono::steady_clock;

TEST_P(E2E, MprotectReadOnlyThenWriteIsCancelledAndReadStillWorks) {
  const va_t buf = map_anon(2 * page_size);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 5); }).ok());
  ASSERT_EQ(m->mprotect(buf, 2 * page_size, prot::read), errc::ok);
  auto w = run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 6); });
  EXPECT_EQ(w.error, errc::canceled);
  EXPECT_EQ(w.reason, errc::perm);
  std::atomic<int> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<int>(buf); }).ok());
  EXPECT_EQ(seen.load(), 5);
}

TEST_P(E2E, DontneedBetweenKernelsMakesPrivateMemoryReadZero) {
  const va_t buf = map_anon(8 * page_size);
  ASSERT_TRUE(run(8, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, 0xabcd); }).ok());
  ASSERT_EQ(m->madvise(buf, 8 * page_size, madvice::dontneed), errc::ok);
  std::atomic<std::uint64_t> sum{0};
  ASSERT_TRUE(run(8, [&, buf](dev::work_item& wi) { sum += wi.load<std::uint64_t>(buf + wi.id() * page_size); }).ok());
  EXPECT_EQ(sum.load(), 0u);
  EXPECT_EQ(*m->load<std::uint64_t>(buf), 0u);
}

TEST_P(E2E, MremapMovesDataAndTheOldAddressFaults) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_TRUE(run(4, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, wi.id() + 1); }).ok());
  auto moved = m->mremap(buf, 4 * page_size, 8 * page_size, mremap_flags::maymove);
  ASSERT_TRUE(moved.ok());
  const va_t nb = *moved;
  std::atomic<std::uint64_t> sum{0};
  ASSERT_TRUE(run(4, [&, nb](dev::work_item& wi) { sum += wi.load<std::uint64_t>(nb + wi.id() * page_size); }).ok());
  EXPECT_EQ(sum.load(), 1u + 2 + 3 + 4);
  if (nb != buf) {
    auto old = run(1, [=](dev::work_item& wi) { (void)wi.load<int>(buf); });
    EXPECT_EQ(old.error, errc::canceled);
  }
}

TEST_P(E2E, CopyOnWriteAfterForkKeepsTheParentsDeviceOnParentData) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 11), errc::ok);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf); }).ok());  // mirrored
  auto child = m->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ((*child)->store<std::uint64_t>(buf, 22), errc::ok);  // the child breaks the share
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 11u);
  // The parent's device writes: the parent sees it, the child does not.
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf, 33); }).ok());
  EXPECT_EQ(*m->load<std::uint64_t>(buf), 33u);
  EXPECT_EQ(*(*child)->load<std::uint64_t>(buf), 22u);
}

TEST_P(E2E, SharedMappingIsSeenByCpuAndDevice) {
  auto va = m->mmap(0, 4 * page_size, prot::read | prot::write, map::shared | map::anonymous);
  ASSERT_TRUE(va.ok());
  const va_t buf = *va;
  ASSERT_TRUE(run(4, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, 7 * wi.id()); }).ok());
  auto child = m->fork();
  ASSERT_TRUE(child.ok());
  for (std::uint64_t i = 0; i < 4; ++i) EXPECT_EQ(*(*child)->load<std::uint64_t>(buf + i * page_size), 7 * i);
  ASSERT_EQ((*child)->store<std::uint64_t>(buf, 99), errc::ok);
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 99u);
}

TEST_P(E2E, SwappedOutPageComesBackThroughTheDevice) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf + page_size, 0x5eed), errc::ok);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf + page_size); }).ok());
  auto n = m->reclaim(buf, 4 * page_size);
  ASSERT_TRUE(n.ok());
  EXPECT_GE(*n, 1u);
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf + page_size); }).ok());
  EXPECT_EQ(seen.load(), 0x5eedu);
}

TEST_P(E2E, HugePageIsMirroredWithOneTwoMegLeaf) {
  auto va = m->mmap(0, 4 * huge_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  const va_t buf = align_up(*va, huge_size);
  ASSERT_EQ(m->madvise(*va, 4 * huge_size, madvice::hugepage), errc::ok);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 1), errc::ok);  // a THP fault on the CPU
  std::atomic<std::uint64_t> sum{0};
  ASSERT_TRUE(run(512, [&, buf](dev::work_item& wi) { sum += wi.load<std::uint64_t>(buf + wi.id() * page_size); }).ok());
  EXPECT_EQ(sum.load(), 1u);
  ASSERT_EQ(m->cpu_translate(buf).order, order_2m);  // the CPU side is one THP
  // Every mirror maps it with one 2M device leaf.
  EXPECT_EQ(vm->stats().huge_leaves, 1u);
  EXPECT_EQ(vm->page_table().translate(buf + 5 * page_size).level, 1u);
  EXPECT_EQ(vm->stats().ptes_written, 512u);
}

TEST_P(E2E, ManyEnginesOnOneBuffer) {
  make({}, dev::device_config{.engines = 8});
  constexpr std::uint64_t n = 1 << 14;
  const va_t buf = map_anon(8 * page_size);
  auto st = run(n, [=](dev::work_item& wi) { wi.atomic_add<std::uint64_t>(buf + (wi.id() % 8) * page_size, 1); });
  ASSERT_TRUE(st.ok());
  std::uint64_t total = 0;
  for (int i = 0; i < 8; ++i) total += *m->load<std::uint64_t>(buf + i * page_size);
  EXPECT_EQ(total, n);
}

TEST_P(E2E, SeveralThreadsSubmitToOneVm) {
  const va_t buf = map_anon(16 * page_size);
  {
    std::vector<std::jthread> ts;
    for (int t = 0; t < 4; ++t)
      ts.emplace_back([&, t] {
        for (int k = 0; k < 5; ++k) {
          auto c = dev->submit(*vm, 64, [=](dev::work_item& wi) {
            wi.atomic_add<std::uint64_t>(buf + (static_cast<std::uint64_t>(t) * 4 + wi.id() % 4) * page_size, 1);
          });
          ASSERT_TRUE(c.ok());
          ASSERT_TRUE(c->wait(std::chrono::seconds(60)).ok());
        }
      });
  }
  std::uint64_t total = 0;
  for (int i = 0; i < 16; ++i) total += *m->load<std::uint64_t>(buf + i * page_size);
  EXPECT_EQ(total, 4u * 5 * 64);
}

// CPU operations while a kernel runs: the kernel either sees the data or
// fails with a fault error naming an address in the buffer; it never
// crashes, hangs or reads another buffer's bytes.
TEST_P(E2E, MunmapAndDontneedDuringKernels) {
  const va_t buf = map_anon(64 * page_size);
  for (std::uint64_t i = 0; i < 64; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 42), errc::ok);
  std::atomic<bool> stop{false};
  std::jthread cpu([&] {
    int k = 0;
    while (!stop) {
      const va_t p = buf + (k++ % 64) * page_size;
      ASSERT_EQ(m->madvise(p, page_size, madvice::dontneed), errc::ok);
      ASSERT_EQ(m->store<std::uint64_t>(p, 42), errc::ok);
    }
  });
  for (int rep = 0; rep < 20; ++rep) {
    std::atomic<int> bad{0};
    auto st = run(256, [&, buf](dev::work_item& wi) {
      const auto v = wi.load<std::uint64_t>(buf + (wi.id() % 64) * page_size);
      if (v != 42 && v != 0) ++bad;
    });
    ASSERT_TRUE(st.ok()) << errc_name(st.error);
    EXPECT_EQ(bad.load(), 0);
  }
  stop = true;
  cpu.join();
  ASSERT_EQ(m->munmap(buf + 32 * page_size, 32 * page_size), errc::ok);
  auto st = run(64, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf + wi.id() * page_size); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_GE(st.address, buf + 32 * page_size);
  EXPECT_LT(st.address, buf + 64 * page_size);
}



}  // namespace
}  // namespace svm::test

namespace svm::test {
namespace {

TEST_P(E2E, ReadThenWriteUpgradesTheDevicePte) {
  const va_t buf = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 3), errc::ok);
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 3u);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf, 4); }).ok());
  EXPECT_EQ(*m->load<std::uint64_t>(buf), 4u);
  EXPECT_TRUE(dev::dev_pte::is_writable(vm->page_table().translate(buf).entry));
}

TEST_P(E2E, ZeroPageReadThenDeviceWriteGetsItsOwnFrame) {
  const va_t buf = map_anon(2 * page_size);
  std::atomic<std::uint64_t> seen{1};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 0u);  // the shared zero page, read-only
  EXPECT_FALSE(dev::dev_pte::is_writable(vm->page_table().translate(buf).entry));
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf, 8); }).ok());
  EXPECT_EQ(*m->load<std::uint64_t>(buf), 8u);
  EXPECT_EQ(*m->load<std::uint64_t>(buf + page_size), 0u);  // the neighbour still reads zero
}

// mprotect and mremap while kernels run: every kernel either completes with
// the right data or fails with a fault error at an address of the buffer.
TEST_P(E2E, MprotectAndMremapDuringKernels) {
  const va_t buf = map_anon(16 * page_size);
  for (std::uint64_t i = 0; i < 16; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 9), errc::ok);
  std::atomic<bool> stop{false};
  std::jthread cpu([&] {
    bool ro = false;
    while (!stop) {
      ro = !ro;
      ASSERT_EQ(m->mprotect(buf, 8 * page_size, ro ? prot::read : prot::read | prot::write), errc::ok);
      // Move the second half away and back (MAYMOVE|FIXED to a scratch place).
      auto there = m->mremap(buf + 8 * page_size, 8 * page_size, 8 * page_size,
                             mremap_flags::maymove | mremap_flags::fixed, buf + 64 * page_size);
      ASSERT_TRUE(there.ok());
      auto back = m->mremap(*there, 8 * page_size, 8 * page_size, mremap_flags::maymove | mremap_flags::fixed,
                            buf + 8 * page_size);
      ASSERT_TRUE(back.ok());
    }
  });
  int ok = 0, failed = 0;
  for (int rep = 0; rep < 30; ++rep) {
    std::atomic<int> bad{0};
    auto st = run(64, [&, buf](dev::work_item& wi) {
      if (wi.load<std::uint64_t>(buf + (wi.id() % 16) * page_size) != 9) ++bad;
    });
    EXPECT_EQ(bad.load(), 0);
    if (st.ok()) {
      ++ok;
    } else {
      ++failed;
      EXPECT_EQ(st.error, errc::canceled);
      EXPECT_EQ(st.reason, errc::fault);
      EXPECT_GE(st.address, buf + 8 * page_size);  // only the moving half can be missing
      EXPECT_LT(st.address, buf + 16 * page_size);
    }
  }
  stop = true;
  cpu.join();
  EXPECT_EQ(ok + failed, 30);
  // Quiet again: everything reads back.
  std::atomic<std::uint64_t> sum{0};
  ASSERT_TRUE(run(16, [&, buf](dev::work_item& wi) { sum += wi.load<std::uint64_t>(buf + wi.id() * page_size); }).ok());
  EXPECT_EQ(sum.load(), 16u * 9);
}

TEST_P(E2E, NonBlockableInvalidationIsRefusedWhileMirrored) {
  const va_t buf = map_anon(4 * page_size);
  for (int i = 0; i < 4; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 1), errc::ok);
  ASSERT_TRUE(run(1, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf); }).ok());
  // A non-blockable reclaim meets mirrored pages: the driver may not wait
  // for its TLB shootdown, so it refuses and nothing is reclaimed.
  auto r = m->reclaim(buf, 4 * page_size, /*blockable=*/false);
  EXPECT_EQ(r.error(), errc::again);
  EXPECT_TRUE(vm->page_table().any_leaf(buf, buf + page_size));
  // Blockable, it goes through.
  auto r2 = m->reclaim(buf, 4 * page_size, true);
  ASSERT_TRUE(r2.ok());
  EXPECT_GE(*r2, 1u);
  std::atomic<std::uint64_t> seen{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { seen = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(seen.load(), 1u);
}

TEST_P(E2E, TwoMmsAndTwoVmsOnOneDeviceStayApart) {
  mm other(mm_options{.frames = 2048});
  vm_config c;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  auto vm2_owner = gpu_vm::create(*dev, other, c).value();
  gpu_vm& vm2 = *vm2_owner;
  EXPECT_NE(vm2.id(), vm->id());
  // The oracle checks each VM's accesses against its own mm: a frame of the
  // other mm would be a frame mismatch.
  ASSERT_EQ(oracle->watch(vm2, other), errc::ok);
  auto va2 = other.mmap(0, page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va2.ok());
  ASSERT_EQ(other.store<std::uint64_t>(*va2, 222), errc::ok);
  const va_t buf = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 111), errc::ok);
  std::atomic<std::uint64_t> a{0}, b{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { a = wi.load<std::uint64_t>(buf); }).ok());
  const va_t v2 = *va2;
  auto k = dev->submit(vm2, 1, [&, v2](dev::work_item& wi) { b = wi.load<std::uint64_t>(v2); });
  ASSERT_TRUE(k.ok());
  ASSERT_TRUE(k->wait(std::chrono::seconds(30)).ok());
  EXPECT_EQ(a.load(), 111u);
  EXPECT_EQ(b.load(), 222u);
  // The other VM's address means nothing in this one (unless both mms
  // happen to map it, which they do here at the same chosen address: then
  // each VM still sees its own mm's bytes).
  if (v2 == buf) {
    ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { a = wi.load<std::uint64_t>(buf); }).ok());
    EXPECT_EQ(a.load(), 111u);
  }
  EXPECT_GE(oracle->svm_checked(), 2u);
  EXPECT_EQ(oracle->stale(), 0u);
  ASSERT_EQ(oracle->unwatch(vm2.id()), errc::ok);
}

// A fault tagged with a VM id the driver does not know (a page table the
// hardware was given behind the driver's back) is cancelled, and only that
// kernel fails.
TEST_P(E2E, FaultOfAnUnknownVmIsCancelled) {
  constexpr dev::vm_id stranger = 0x4321;
  dev::dev_page_table pt;
  test_frames mem;
  ASSERT_EQ(dev->hw().attach_vm(stranger, pt, mem), errc::ok);
  auto q = dev->hw().create_queue(stranger);
  ASSERT_TRUE(q.ok());
  const va_t addr = 0x10'0000'0000;
  auto k = dev->hw().submit(*q, 1, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(addr); });
  ASSERT_TRUE(k.ok());
  const dev::kernel_status st = k->wait(std::chrono::seconds(30));
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::fault);
  EXPECT_EQ(st.address, addr);
  EXPECT_GE(dev->stats().unknown_vm, 1u);
  EXPECT_EQ(dev->hw().destroy_queue(*q), errc::ok);
  EXPECT_EQ(dev->hw().detach_vm(stranger), errc::ok);
  // The driver's own VM still works.
  const va_t buf = map_anon(page_size);
  ASSERT_EQ(m->store<std::uint64_t>(buf, 5), errc::ok);
  std::atomic<std::uint64_t> v{0};
  ASSERT_TRUE(run(1, [&, buf](dev::work_item& wi) { v = wi.load<std::uint64_t>(buf); }).ok());
  EXPECT_EQ(v.load(), 5u);
}

TEST_P(E2E, MigrationByAnotherOwnerIsFollowedThroughTheDevice) {
  auto node1 = std::make_shared<frame_pool>(2048);
  auto pool = m->attach_pool(node1, pool_kind::numa);
  ASSERT_TRUE(pool.ok());
  const va_t buf = map_anon(4 * page_size);
  for (int i = 0; i < 4; ++i) ASSERT_EQ(m->store<std::uint64_t>(buf + i * page_size, 50 + i), errc::ok);
  ASSERT_TRUE(run(4, [=](dev::work_item& wi) { (void)wi.load<std::uint64_t>(buf + wi.id() * page_size); }).ok());
  static const int other_owner = 0;
  auto moved = m->migrate(buf, 4 * page_size, *pool, &other_owner);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 4u);
  std::atomic<std::uint64_t> sum{0};
  ASSERT_TRUE(run(4, [&, buf](dev::work_item& wi) { sum += wi.load<std::uint64_t>(buf + wi.id() * page_size); }).ok());
  EXPECT_EQ(sum.load(), 50u + 51 + 52 + 53);
  // The device now reaches the frames of pool 1.
  const auto e = vm->page_table().translate(buf).entry;
  EXPECT_EQ(dev::dev_pte::pfn(e) >> 32, *pool);
}

}  // namespace
}  // namespace svm::test
