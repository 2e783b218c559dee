// End-to-end semantics through a minimal device mirror (test_mirror.h).
#include <gtest/gtest.h>

#include <thread>

#include "test_mirror.h"

namespace svm {
namespace {

using test::test_mirror;
constexpr std::uint64_t K4 = page_size, M2 = huge_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

TEST(Mirror, ReadsAndWritesMatchTheCpu) {
  mm m;
  const va_t va = m.mmap(0, 8 * K4, rw, anon_priv).value();
  test_mirror mir(m, va, 8 * K4);
  ASSERT_EQ(m.store<std::uint64_t>(va + 3 * K4, 0xabcdef), errc::ok);
  EXPECT_EQ(mir.load<std::uint64_t>(va + 3 * K4), 0xabcdefu);
  const std::uint64_t v = 77;
  ASSERT_EQ(mir.write(va + 5 * K4 + 16, std::as_bytes(std::span{&v, 1})), errc::ok);
  EXPECT_EQ(m.load<std::uint64_t>(va + 5 * K4 + 16).value(), 77u);
  // A CPU write after a device read: the device reads the new value (same frame).
  ASSERT_EQ(m.store<std::uint64_t>(va + 3 * K4, 1), errc::ok);
  EXPECT_EQ(mir.load<std::uint64_t>(va + 3 * K4), 1u);
  // DONTNEED drops the device entry too, and the device reads zeros again.
  ASSERT_EQ(m.madvise(va + 5 * K4, K4, madvice::dontneed), errc::ok);
  EXPECT_EQ(mir.entry(va + 5 * K4), 0u);
  EXPECT_EQ(mir.load<std::uint64_t>(va + 5 * K4 + 16), 0u);
  EXPECT_TRUE(mir.coherent());
}

TEST(Mirror, PermissionErrors) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  test_mirror mir(m, va, 8 * K4);
  ASSERT_EQ(m.mprotect(va, K4, prot::read), errc::ok);
  ASSERT_EQ(m.mprotect(va + K4, K4, prot::none), errc::ok);
  const std::uint64_t v = 1;
  EXPECT_EQ(mir.write(va, std::as_bytes(std::span{&v, 1})), errc::perm);
  std::uint64_t out = 0;
  EXPECT_EQ(mir.read(va, std::as_writable_bytes(std::span{&out, 1})), errc::ok);
  EXPECT_EQ(mir.read(va + K4, std::as_writable_bytes(std::span{&out, 1})), errc::fault);
  EXPECT_EQ(mir.read(va + 5 * K4, std::as_writable_bytes(std::span{&out, 1})), errc::fault);  // hole
  // mprotect to read-only removes the device's write entry.
  ASSERT_EQ(mir.write(va + 2 * K4, std::as_bytes(std::span{&v, 1})), errc::ok);
  EXPECT_TRUE(mir.entry(va + 2 * K4) & hmm_pfn_write);
  ASSERT_EQ(m.mprotect(va + 2 * K4, K4, prot::read), errc::ok);
  EXPECT_EQ(mir.entry(va + 2 * K4), 0u);
  EXPECT_EQ(mir.write(va + 2 * K4, std::as_bytes(std::span{&v, 1})), errc::perm);
}

TEST(Mirror, ForkKeepsCopyOnWriteApartAndSharedTogether) {
  mm parent;
  const va_t priv = parent.mmap(0, K4, rw, anon_priv).value();
  const va_t shared = parent.mmap(0, K4, rw, map::shared | map::anonymous).value();
  ASSERT_EQ(parent.store<int>(priv, 1), errc::ok);
  ASSERT_EQ(parent.store<int>(shared, 1), errc::ok);
  test_mirror pm(parent, 0, va_t{1} << 47);
  EXPECT_EQ(pm.load<int>(priv), 1);
  auto child = parent.fork().value();
  test_mirror cm(*child, 0, va_t{1} << 47);
  EXPECT_EQ(pm.entry(priv), 0u);  // PROTECTION_PAGE cleared the parent's mirror
  const int two = 2, three = 3;
  ASSERT_EQ(cm.write(priv, std::as_bytes(std::span{&two, 1})), errc::ok);  // device write breaks COW in the child
  EXPECT_EQ(pm.load<int>(priv), 1);
  EXPECT_EQ(parent.load<int>(priv).value(), 1);
  EXPECT_EQ(child->load<int>(priv).value(), 2);
  ASSERT_EQ(pm.write(priv, std::as_bytes(std::span{&three, 1})), errc::ok);
  EXPECT_EQ(cm.load<int>(priv), 2);
  EXPECT_EQ(child->load<int>(priv).value(), 2);
  // Shared: a device write in the child is seen by the parent's CPU and mirror.
  ASSERT_EQ(cm.write(shared, std::as_bytes(std::span{&three, 1})), errc::ok);
  EXPECT_EQ(parent.load<int>(shared).value(), 3);
  EXPECT_EQ(pm.load<int>(shared), 3);
  EXPECT_TRUE(pm.coherent());
  EXPECT_TRUE(cm.coherent());
}

TEST(Mirror, MunmapDuringMirrorReadsFromAnotherThread) {
  mm m;
  constexpr int pages = 64;
  const va_t va = m.mmap(0, pages * K4, rw, anon_priv).value();
  for (int i = 0; i < pages; ++i) ASSERT_EQ(m.store<int>(va + i * K4, i), errc::ok);
  test_mirror mir(m, va, pages * K4);
  std::atomic<bool> stop{false};
  std::atomic<int> ok_reads{0}, fault_reads{0};
  std::jthread reader([&] {
    while (!stop.load()) {
      for (int i = 0; i < pages; ++i) {
        int v = -1;
        errc e = mir.read(va + i * K4, std::as_writable_bytes(std::span{&v, 1}));
        if (e == errc::ok) {
          EXPECT_TRUE(v == i || v == 0) << v;  // old data, or a fresh zero page after remap
          ok_reads.fetch_add(1);
        } else {
          EXPECT_EQ(e, errc::fault);
          fault_reads.fetch_add(1);
        }
      }
    }
  });
  while (ok_reads.load() == 0) std::this_thread::yield();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (int round = 0; round < 200 || (ok_reads.load() + fault_reads.load() < 2000 &&
                                      std::chrono::steady_clock::now() < deadline);
       ++round) {
    ASSERT_EQ(m.munmap(va + (round % 4) * 16 * K4, 16 * K4), errc::ok);
    ASSERT_EQ(m.mmap(va + (round % 4) * 16 * K4, 16 * K4, rw, anon_priv | map::fixed).value(),
              va + (round % 4) * 16 * K4);
  }
  ASSERT_EQ(m.munmap(va, pages * K4), errc::ok);
  // Every read after the last munmap faults: wait for a full pass of them
  // (the remaps above leave the range unmapped only briefly, so a loaded
  // machine may not have read there in that state yet).
  const int faults_before = fault_reads.load();
  const auto pass_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (fault_reads.load() < faults_before + 2 * pages && std::chrono::steady_clock::now() < pass_deadline)
    std::this_thread::yield();
  stop = true;
  reader.join();
  EXPECT_EQ(mir.size(), 0u);  // every device entry was invalidated
  EXPECT_TRUE(mir.coherent());
  EXPECT_GE(fault_reads.load(), faults_before + 2 * pages);
  EXPECT_EQ(m.resident_pages(), 0u);
  EXPECT_EQ(m.pool().free_frames(), m.pool().frame_count() - 1);
}

TEST(Mirror, HugeMappingOrderOnEveryEntry) {
  mm m;
  const va_t va = m.mmap(0, M2, rw, anon_priv).value();
  ASSERT_EQ(m.madvise(va, M2, madvice::hugepage), errc::ok);
  test_mirror mir(m, va, M2);
  ASSERT_EQ(mir.fault(va, va + M2, true), errc::ok);
  EXPECT_EQ(mir.size(), 512u);
  for (va_t a = va; a < va + M2; a += K4) ASSERT_EQ(hmm_pfn_to_map_order(mir.entry(a)), 9u);
  // Splitting the CPU mapping (partial munmap) invalidates the mirror.
  ASSERT_EQ(m.munmap(va, K4), errc::ok);
  EXPECT_EQ(mir.entry(va), 0u);
  ASSERT_EQ(mir.fault(va + K4, va + 2 * K4, false), errc::ok);
  EXPECT_EQ(hmm_pfn_to_map_order(mir.entry(va + K4)), 0u);
}

TEST(Mirror, SnapshotFlags) {
  mm m;
  const va_t va = m.mmap(0, 5 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.load<int>(va).error(), errc::ok);      // zero page
  ASSERT_EQ(m.store<int>(va + K4, 1), errc::ok);     // writable
  ASSERT_EQ(m.store<int>(va + 2 * K4, 1), errc::ok);
  ASSERT_EQ(m.mprotect(va + 2 * K4, K4, prot::read), errc::ok);  // read-only
  ASSERT_EQ(m.mprotect(va + 3 * K4, K4, prot::none), errc::ok);  // error
  test_mirror mir(m, va, 5 * K4);
  ASSERT_EQ(mir.fault(va, va + 5 * K4, false, /*default_flags=*/0), errc::ok);
  const auto& p = mir.last_pfns;
  const hmm_pfn f = hmm_pfn_valid | hmm_pfn_write | hmm_pfn_error;
  EXPECT_EQ(p[0] & f, hmm_pfn_valid);
  EXPECT_EQ(hmm_pfn_to_pfn(p[0]), mm::zero_pfn());
  EXPECT_EQ(p[1] & f, hmm_pfn_valid | hmm_pfn_write);
  EXPECT_EQ(p[2] & f, hmm_pfn_valid);
  EXPECT_EQ(p[3], hmm_pfn_error);
  EXPECT_EQ(p[4], 0u);  // absent
}

TEST(Mirror, SwappedOutPageComesBackWithTheSameBytes) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  std::vector<std::byte> data(K4);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i ^ 0x5a);
  ASSERT_EQ(m.write(va, data), errc::ok);
  test_mirror mir(m, va, 2 * K4);
  ASSERT_EQ(mir.fault(va, va + K4, false), errc::ok);
  ASSERT_EQ(m.reclaim(va, 2 * K4).value(), 1u);
  EXPECT_EQ(mir.entry(va), 0u);
  std::vector<std::byte> back(K4);
  ASSERT_EQ(mir.read(va, back), errc::ok);
  EXPECT_EQ(back, data);
  EXPECT_EQ(m.stats().swap_ins, 1u);
}

TEST(Mirror, IgnoresItsOwnMigrations) {
  mm m;
  auto p1 = std::make_shared<frame_pool>(1024);
  const unsigned id = m.attach_pool(p1, pool_kind::numa).value();
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 4), errc::ok);
  test_mirror mir(m, va, K4);
  ASSERT_EQ(mir.fault(va, va + K4, false), errc::ok);
  ASSERT_EQ(m.migrate(va, K4, id, &mir).value(), 1u);
  EXPECT_EQ(mir.last_event, mmu_notifier_event::migrate);
  EXPECT_EQ(mir.last_owner, &mir);
  EXPECT_NE(mir.entry(va), 0u);  // kept: the owner said it was its own migration
}

}  // namespace
}  // namespace svm
