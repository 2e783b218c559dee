// The mm model: system calls, faults, COW, THP, swap, migration, CPU access,
// bad input. docs/contracts.md §0.
#include <gtest/gtest.h>

#include "test_mirror.h"

namespace svm {
namespace {

constexpr std::uint64_t K4 = page_size, M2 = huge_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

std::size_t vma_count(mm& m) { return m.vmas().size(); }

TEST(Mm, UntouchedPrivateReadMapsZeroPage) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  const auto free0 = m.pool().free_frames();
  EXPECT_EQ(m.load<std::uint64_t>(va + 8).value(), 0u);
  const auto t = m.cpu_translate(va);
  EXPECT_TRUE(t.present);
  EXPECT_TRUE(t.zero_page);
  EXPECT_FALSE(t.writable);
  EXPECT_EQ(t.pfn, mm::zero_pfn());
  EXPECT_EQ(m.pool().free_frames(), free0);  // no frame used
  // A write breaks away from the zero page.
  ASSERT_EQ(m.store<std::uint64_t>(va + 8, 5), errc::ok);
  EXPECT_FALSE(m.cpu_translate(va).zero_page);
  EXPECT_TRUE(m.cpu_translate(va).writable);
  EXPECT_EQ(m.pool().free_frames(), free0 - 1);
}

TEST(Mm, SharedAnonymousReadAllocatesARealPage) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, map::shared | map::anonymous).value();
  EXPECT_EQ(m.load<int>(va).value(), 0);
  const auto t = m.cpu_translate(va);
  EXPECT_TRUE(t.present);
  EXPECT_FALSE(t.zero_page);
  EXPECT_TRUE(t.writable);
}

TEST(Mm, WriteThenReadAcrossPages) {
  mm m;
  const va_t va = m.mmap(0, 3 * K4, rw, anon_priv).value();
  std::vector<std::byte> data(2 * K4 + 100);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 7);
  ASSERT_EQ(m.write(va + 50, data), errc::ok);
  std::vector<std::byte> back(data.size());
  ASSERT_EQ(m.read(va + 50, back), errc::ok);
  EXPECT_EQ(back, data);
}

TEST(Mm, MmapBadInputLeavesNoMapping) {
  mm m;
  EXPECT_EQ(m.mmap(0, 0, rw, anon_priv).error(), errc::inval);
  EXPECT_EQ(m.mmap(0, K4, rw, map::shared | map::private_ | map::anonymous).error(), errc::inval);
  EXPECT_EQ(m.mmap(0, K4, rw, map::anonymous).error(), errc::inval);
  EXPECT_EQ(m.mmap(0, K4, prot(64), anon_priv).error(), errc::inval);
  EXPECT_EQ(m.mmap(0x10001, K4, rw, anon_priv | map::fixed).error(), errc::inval);
  EXPECT_EQ(m.mmap(0, ~std::uint64_t{0} - 5, rw, anon_priv).error(), errc::nomem);
  EXPECT_EQ(m.mmap(va_t{1} << 47, K4, rw, anon_priv | map::fixed).error(), errc::nomem);
  EXPECT_EQ(vma_count(m), 0u);
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  EXPECT_EQ(m.mmap(va + K4, K4, rw, anon_priv | map::fixed_noreplace).error(), errc::exist);
  EXPECT_EQ(vma_count(m), 1u);
  // MAP_FIXED replaces what was there.
  ASSERT_EQ(m.store<int>(va + K4, 9), errc::ok);
  EXPECT_EQ(m.mmap(va + K4, K4, prot::read, anon_priv | map::fixed).value(), va + K4);
  EXPECT_EQ(m.load<int>(va + K4).value(), 0);
  EXPECT_EQ(vma_count(m), 2u);
}

TEST(Mm, MunmapBadInputAndHoles) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  EXPECT_EQ(m.munmap(va + 1, K4), errc::inval);
  EXPECT_EQ(m.munmap(va, 0), errc::inval);
  EXPECT_EQ(m.munmap(va, ~std::uint64_t{0} - K4), errc::inval);
  EXPECT_EQ(vma_count(m), 1u);
  EXPECT_EQ(m.munmap(va + 64 * K4, K4), errc::ok);  // nothing there: fine
  EXPECT_EQ(m.munmap(va - 8 * K4, 32 * K4), errc::ok);  // spans holes
  EXPECT_EQ(vma_count(m), 0u);
}

TEST(Mm, PartialMunmapSplitsAndFreesFrames) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  const auto free0 = m.pool().free_frames();
  for (int i = 0; i < 4; ++i) ASSERT_EQ(m.store<int>(va + i * K4, i + 1), errc::ok);
  EXPECT_EQ(m.pool().free_frames(), free0 - 4);
  ASSERT_EQ(m.munmap(va + K4, 2 * K4), errc::ok);
  EXPECT_EQ(m.pool().free_frames(), free0 - 2);
  EXPECT_EQ(vma_count(m), 2u);
  EXPECT_EQ(m.load<int>(va).value(), 1);
  EXPECT_EQ(m.load<int>(va + 3 * K4).value(), 4);
  EXPECT_EQ(m.load<int>(va + K4).error(), errc::fault);
}

TEST(Mm, MunmapSpanningSeveralVmas) {
  mm m;
  const va_t a = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.mmap(a + 2 * K4, 2 * K4, prot::read, anon_priv | map::fixed).value(), a + 2 * K4);
  ASSERT_EQ(m.mmap(a + 4 * K4, 2 * K4, rw, map::shared | map::anonymous | map::fixed).value(), a + 4 * K4);
  EXPECT_EQ(vma_count(m), 3u);
  ASSERT_EQ(m.munmap(a + K4, 4 * K4), errc::ok);
  auto v = m.vmas();
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].end, a + K4);
  EXPECT_EQ(v[1].start, a + 5 * K4);
  EXPECT_TRUE(v[1].shared);
}

TEST(Mm, MprotectReadOnlyMakesWritesFail) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 3), errc::ok);
  ASSERT_EQ(m.mprotect(va, 2 * K4, prot::read), errc::ok);
  EXPECT_FALSE(m.cpu_translate(va).writable);
  EXPECT_EQ(m.store<int>(va, 4), errc::perm);
  EXPECT_EQ(m.load<int>(va).value(), 3);
  ASSERT_EQ(m.mprotect(va, 2 * K4, rw), errc::ok);
  EXPECT_EQ(m.store<int>(va, 4), errc::ok);  // exclusive page: reused, not copied
  EXPECT_EQ(m.load<int>(va).value(), 4);
  EXPECT_EQ(m.stats().cow_breaks, 0u);
}

TEST(Mm, MprotectNoneHidesAndRestoresData) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 11), errc::ok);
  const auto pfn = m.cpu_translate(va).pfn;
  ASSERT_EQ(m.mprotect(va, K4, prot::none), errc::ok);
  EXPECT_FALSE(m.cpu_translate(va).present);
  EXPECT_EQ(m.load<int>(va).error(), errc::fault);
  EXPECT_EQ(m.pool().refcount(pfn), 1u);  // the frame is kept
  ASSERT_EQ(m.mprotect(va, K4, prot::read), errc::ok);
  EXPECT_EQ(m.load<int>(va).value(), 11);
  EXPECT_EQ(m.cpu_translate(va).pfn, pfn);
}

TEST(Mm, MprotectOverAHoleChangesThePartBeforeIt) {
  mm m;
  const va_t a = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.mmap(a + 3 * K4, K4, rw, anon_priv | map::fixed).value(), a + 3 * K4);
  EXPECT_EQ(m.mprotect(a + K4, 3 * K4, prot::read), errc::nomem);
  auto v = m.vmas();
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].protection, rw);
  EXPECT_EQ(v[1].start, a + K4);
  EXPECT_EQ(v[1].protection, prot::read);
  EXPECT_EQ(v[2].protection, rw);  // after the hole: unchanged
  // Starting in a hole changes nothing.
  EXPECT_EQ(m.mprotect(a + 2 * K4, 2 * K4, prot::none), errc::nomem);
  EXPECT_EQ(m.vmas()[2].protection, rw);
}

TEST(Mm, MprotectAndMadviseEdgeInputs) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  EXPECT_EQ(m.mprotect(va, 0, prot::none), errc::ok);
  EXPECT_EQ(m.mprotect(va + 1, K4, prot::none), errc::inval);
  EXPECT_EQ(m.mprotect(va, K4, prot(0x100)), errc::inval);
  EXPECT_EQ(m.mprotect(va, ~std::uint64_t{0} - K4, prot::read), errc::nomem);
  EXPECT_EQ(m.madvise(va, 0, madvice::dontneed), errc::ok);
  EXPECT_EQ(m.madvise(va + 1, K4, madvice::dontneed), errc::inval);
  EXPECT_EQ(m.madvise(va, 2 * K4, madvice::dontneed), errc::nomem);  // hole after
  EXPECT_EQ(m.vmas()[0].protection, rw);
}

TEST(Mm, DontneedZeroesPrivateButKeepsShared) {
  mm m;
  const va_t p = m.mmap(0, K4, rw, anon_priv).value();
  const va_t s = m.mmap(0, K4, rw, map::shared | map::anonymous).value();
  ASSERT_EQ(m.store<int>(p, 1), errc::ok);
  ASSERT_EQ(m.store<int>(s, 2), errc::ok);
  const auto free0 = m.pool().free_frames();
  ASSERT_EQ(m.madvise(p, K4, madvice::dontneed), errc::ok);
  ASSERT_EQ(m.madvise(s, K4, madvice::dontneed), errc::ok);
  EXPECT_FALSE(m.cpu_translate(p).present);
  EXPECT_FALSE(m.cpu_translate(s).present);
  EXPECT_EQ(m.pool().free_frames(), free0 + 1);  // only the private frame
  EXPECT_EQ(m.load<int>(p).value(), 0);
  EXPECT_EQ(m.load<int>(s).value(), 2);
}

TEST(Mm, HugepageAdviceMapsTwoMegabyteLeaves) {
  mm m;
  const va_t va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  ASSERT_TRUE(is_aligned(va, M2));
  ASSERT_EQ(m.madvise(va, 2 * M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(m.store<int>(va + 5 * K4, 42), errc::ok);
  const auto t = m.cpu_translate(va + 5 * K4);
  EXPECT_EQ(t.order, 9u);
  EXPECT_EQ(t.pfn, m.cpu_translate(va).pfn + 5);
  EXPECT_EQ(m.stats().thp_faults, 1u);
  // A partial munmap splits the huge leaf and keeps the rest.
  ASSERT_EQ(m.munmap(va + K4, K4), errc::ok);
  EXPECT_EQ(m.cpu_translate(va + 5 * K4).order, 0u);
  EXPECT_EQ(m.load<int>(va + 5 * K4).value(), 42);
  // NOHUGEPAGE: 4K faults only.
  ASSERT_EQ(m.madvise(va + M2, M2, madvice::nohugepage), errc::ok);
  ASSERT_EQ(m.store<int>(va + M2, 1), errc::ok);
  EXPECT_EQ(m.cpu_translate(va + M2).order, 0u);
}

TEST(Mm, MremapMayMoveKeepsFramesAndData) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.mmap(va + 2 * K4, K4, rw, anon_priv | map::fixed).value(), va + 2 * K4);  // blocks growth
  ASSERT_EQ(m.store<int>(va + K4, 77), errc::ok);
  const auto pfn = m.cpu_translate(va + K4).pfn;
  EXPECT_EQ(m.mremap(va, 2 * K4, 4 * K4, mremap_flags::none).error(), errc::nomem);
  auto nv = m.mremap(va, 2 * K4, 4 * K4, mremap_flags::maymove);
  ASSERT_TRUE(nv.ok());
  EXPECT_NE(*nv, va);
  EXPECT_EQ(m.load<int>(*nv + K4).value(), 77);
  EXPECT_EQ(m.cpu_translate(*nv + K4).pfn, pfn);
  EXPECT_EQ(m.load<int>(va + K4).error(), errc::fault);
  EXPECT_EQ(m.load<int>(*nv + 3 * K4).value(), 0);  // the grown part
}

TEST(Mm, MremapBadInputLeavesStateUnchanged) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 5), errc::ok);
  using f = mremap_flags;
  EXPECT_EQ(m.mremap(va, 4 * K4, 4 * K4, f::maymove | f::fixed, va).error(), errc::inval);  // onto itself
  EXPECT_EQ(m.mremap(va, 4 * K4, 4 * K4, f::maymove | f::fixed, va + 2 * K4).error(), errc::inval);
  EXPECT_EQ(m.mremap(va, 4 * K4, 4 * K4, f::fixed, va + 64 * K4).error(), errc::inval);  // no MAYMOVE
  EXPECT_EQ(m.mremap(va, 4 * K4, 8 * K4, f::maymove | f::dontunmap).error(), errc::inval);
  EXPECT_EQ(m.mremap(va + 1, K4, K4, f::maymove).error(), errc::inval);
  EXPECT_EQ(m.mremap(va, K4, 0, f::maymove).error(), errc::inval);
  EXPECT_EQ(m.mremap(va, K4, K4, mremap_flags(64)).error(), errc::inval);
  EXPECT_EQ(m.mremap(va + 64 * K4, K4, 2 * K4, f::maymove).error(), errc::fault);  // unknown address
  EXPECT_EQ(m.mremap(va, 8 * K4, 9 * K4, f::maymove).error(), errc::fault);  // growing beyond the VMA
  // Same size, not fixed: Linux returns the address without looking further.
  EXPECT_EQ(m.mremap(va, 8 * K4, 8 * K4, f::maymove).value(), va);
  EXPECT_EQ(vma_count(m), 1u);
  EXPECT_EQ(m.load<int>(va).value(), 5);
}

TEST(Mm, MremapDontUnmapLeavesAnEmptyOldMapping) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 8), errc::ok);
  auto nv = m.mremap(va, 2 * K4, 2 * K4, mremap_flags::maymove | mremap_flags::dontunmap);
  ASSERT_TRUE(nv.ok());
  EXPECT_EQ(m.load<int>(*nv).value(), 8);
  EXPECT_EQ(m.load<int>(va).value(), 0);  // still mapped, empty
  EXPECT_EQ(vma_count(m), 2u);
}

TEST(Mm, MremapShrinksAndGrowsInPlace) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va + 3 * K4, 1), errc::ok);
  EXPECT_EQ(m.mremap(va, 4 * K4, 2 * K4, mremap_flags::none).value(), va);
  EXPECT_EQ(m.load<int>(va + 3 * K4).error(), errc::fault);
  EXPECT_EQ(m.mremap(va, 2 * K4, 6 * K4, mremap_flags::none).value(), va);
  EXPECT_EQ(m.load<int>(va + 5 * K4).value(), 0);
  EXPECT_EQ(m.vmas()[0].end, va + 6 * K4);
}

TEST(Mm, ForkSharesPrivatePagesCopyOnWrite) {
  mm parent;
  const va_t va = parent.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(parent.store<int>(va, 1), errc::ok);
  auto child = parent.fork().value();
  EXPECT_EQ(child->cpu_translate(va).pfn, parent.cpu_translate(va).pfn);
  EXPECT_FALSE(parent.cpu_translate(va).writable);
  EXPECT_EQ(child->load<int>(va).value(), 1);
  ASSERT_EQ(child->store<int>(va, 2), errc::ok);
  EXPECT_EQ(parent.load<int>(va).value(), 1);
  EXPECT_EQ(child->load<int>(va).value(), 2);
  EXPECT_NE(child->cpu_translate(va).pfn, parent.cpu_translate(va).pfn);
  // The parent is now the only user: its write reuses the frame.
  const auto pfn = parent.cpu_translate(va).pfn;
  ASSERT_EQ(parent.store<int>(va, 3), errc::ok);
  EXPECT_EQ(parent.cpu_translate(va).pfn, pfn);
  EXPECT_EQ(child->load<int>(va).value(), 2);
}

TEST(Mm, ForkSharedMappingIsSeenByBoth) {
  mm parent;
  const va_t va = parent.mmap(0, K4, rw, map::shared | map::anonymous).value();
  ASSERT_EQ(parent.store<int>(va, 1), errc::ok);
  auto child = parent.fork().value();
  ASSERT_EQ(child->store<int>(va, 2), errc::ok);
  EXPECT_EQ(parent.load<int>(va).value(), 2);
}

TEST(Mm, ForkOfAHugePageBreaksCowPerPage) {
  mm parent;
  const va_t va = parent.mmap(0, M2, rw, anon_priv).value();
  ASSERT_EQ(parent.madvise(va, M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(parent.store<int>(va + K4, 5), errc::ok);
  ASSERT_EQ(parent.cpu_translate(va).order, 9u);
  auto child = parent.fork().value();
  ASSERT_EQ(child->store<int>(va + K4, 6), errc::ok);
  EXPECT_EQ(parent.load<int>(va + K4).value(), 5);
  EXPECT_EQ(child->cpu_translate(va + K4).order, 0u);
  EXPECT_EQ(child->cpu_translate(va + 2 * K4).pfn, parent.cpu_translate(va + 2 * K4).pfn);
}

TEST(Mm, ReclaimSwapsOutAndFaultBringsBytesBack) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  for (int i = 0; i < 4; ++i) ASSERT_EQ(m.store<int>(va + i * K4 + 100, 1000 + i), errc::ok);
  const auto free0 = m.pool().free_frames();
  EXPECT_EQ(m.reclaim(va, 4 * K4).value(), 4u);
  EXPECT_EQ(m.swap_used(), 4u);
  EXPECT_EQ(m.pool().free_frames(), free0 + 4);
  EXPECT_FALSE(m.cpu_translate(va).present);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(m.load<int>(va + i * K4 + 100).value(), 1000 + i);
  EXPECT_EQ(m.swap_used(), 0u);
  EXPECT_EQ(m.stats().swap_ins, 4u);
  EXPECT_EQ(m.reclaim(va + 1, K4).error(), errc::inval);
}

TEST(Mm, MigrateToAnotherPoolKeepsData) {
  mm m;
  auto p1 = std::make_shared<frame_pool>(1024);
  const unsigned id = m.attach_pool(p1, pool_kind::numa).value();
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 31), errc::ok);
  const auto old = m.cpu_translate(va);
  EXPECT_EQ(m.migrate(va, 2 * K4, id, nullptr).value(), 1u);  // the zero-less untouched page stays
  const auto t = m.cpu_translate(va);
  EXPECT_EQ(t.pool, id);
  EXPECT_EQ(m.pool(0).frame_generation(old.pfn), old.generation + 1);  // old frame freed
  EXPECT_EQ(m.load<int>(va).value(), 31);
  ASSERT_EQ(m.store<int>(va, 32), errc::ok);
  EXPECT_EQ(m.cpu_translate(va).pool, id);
  EXPECT_EQ(m.migrate(va, K4, 9, nullptr).error(), errc::inval);
}

TEST(Mm, DevicePrivateMigrationFaultsBackOnCpuAccess) {
  mm m;
  int dev = 0;
  auto vram = std::make_shared<frame_pool>(1024, aperture::vram);
  const unsigned id = m.attach_pool(vram, pool_kind::device_private, &dev).value();
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 12), errc::ok);
  ASSERT_EQ(m.migrate(va, K4, id, &dev).value(), 1u);
  EXPECT_FALSE(m.cpu_translate(va).present);
  EXPECT_EQ(vram->free_frames(), vram->frame_count() - 2);
  EXPECT_EQ(m.load<int>(va).value(), 12);  // migrated back to pool 0
  EXPECT_EQ(m.cpu_translate(va).pool, 0u);
  EXPECT_EQ(vram->free_frames(), vram->frame_count() - 1);
}

TEST(Mm, AtomicOperations) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  EXPECT_EQ(m.atomic_fetch_add(va + 8, 5).value(), 0u);
  EXPECT_EQ(m.atomic_fetch_add(va + 8, 5).value(), 5u);
  EXPECT_EQ(m.atomic_compare_exchange(va + 8, 10, 1).value(), 10u);
  EXPECT_EQ(m.atomic_compare_exchange(va + 8, 10, 2).value(), 1u);
  EXPECT_EQ(m.load<std::uint64_t>(va + 8).value(), 1u);
  EXPECT_EQ(m.atomic_fetch_add(va + 4, 1).error(), errc::inval);
  ASSERT_EQ(m.mprotect(va, K4, prot::read), errc::ok);
  EXPECT_EQ(m.atomic_fetch_add(va + 8, 1).error(), errc::perm);
}

TEST(Mm, CpuAccessErrorsAreSegfaults) {
  mm m;
  const va_t ro = m.mmap(0, K4, prot::read, anon_priv).value();
  const va_t io = m.mmap(0, K4, rw, map::shared | map::io).value();
  EXPECT_EQ(m.store<int>(ro, 1), errc::perm);
  EXPECT_EQ(m.load<int>(ro + 64 * K4).error(), errc::fault);
  EXPECT_EQ(m.load<int>(io).error(), errc::fault);
  mm::read_guard g(m);
  EXPECT_EQ(m.handle_mm_fault(ro, access::write), errc::perm);
  ASSERT_TRUE(m.find_vma(io).has_value());
  EXPECT_EQ(m.find_vma(io)->kind, vma_kind::io);
  EXPECT_FALSE(m.find_vma(ro + 64 * K4).has_value());
}

TEST(Mm, FileMappingsPrivateCopyAndSharedWriteThrough) {
  mm m;
  auto f = std::make_shared<file>(m.pool_ptr(), 4 * K4);
  const std::uint64_t hello = 0x6f6c6c6568;
  ASSERT_EQ(f->pwrite(K4, std::as_bytes(std::span{&hello, 1})), errc::ok);
  const va_t sh = m.mmap(0, 2 * K4, rw, map::shared, f, K4).value();
  const va_t pr = m.mmap(0, 2 * K4, rw, map::private_, f, K4).value();
  EXPECT_EQ(m.load<std::uint64_t>(sh).value(), hello);
  EXPECT_EQ(m.load<std::uint64_t>(pr).value(), hello);
  EXPECT_EQ(m.cpu_translate(sh).pfn, m.cpu_translate(pr).pfn);  // both map the cache page
  ASSERT_EQ(m.store<std::uint64_t>(pr, 1), errc::ok);          // private: COW
  EXPECT_EQ(m.load<std::uint64_t>(sh).value(), hello);
  ASSERT_EQ(m.store<std::uint64_t>(sh, 2), errc::ok);          // shared: into the file
  std::uint64_t v = 0;
  ASSERT_EQ(f->pread(K4, std::as_writable_bytes(std::span{&v, 1})), errc::ok);
  EXPECT_EQ(v, 2u);
  EXPECT_EQ(m.mmap(0, K4, rw, map::shared, f, 100).error(), errc::inval);  // unaligned offset
  EXPECT_EQ(m.mmap(0, K4, rw, map::shared | map::anonymous, f).error(), errc::inval);
}

TEST(Mm, FramesAreFreedOnlyAfterRangeEnd) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 1), errc::ok);
  const auto t = m.cpu_translate(va);
  int checked = 0;
  m.set_test_hooks({.before_invalidate_end = [&](const mmu_notifier_range&) {
    EXPECT_FALSE(m.cpu_translate(va).present);                    // PTE cleared
    EXPECT_EQ(m.pool().refcount(t.pfn), 1u);                      // still held
    EXPECT_EQ(m.pool().frame_generation(t.pfn), t.generation);  // not freed
    ++checked;
  }});
  ASSERT_EQ(m.munmap(va, 2 * K4), errc::ok);
  m.set_test_hooks({});
  EXPECT_EQ(checked, 1);
  EXPECT_EQ(m.pool().refcount(t.pfn), 0u);
  EXPECT_EQ(m.pool().frame_generation(t.pfn), t.generation + 1);
}

TEST(Mm, OutOfFramesIsEnomemAndChangesNothing) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  m.pool().set_alloc_failure([](bool) { return true; });
  EXPECT_EQ(m.store<int>(va, 1), errc::nomem);
  EXPECT_FALSE(m.cpu_translate(va).present);
  m.pool().set_alloc_failure({});
  EXPECT_EQ(m.store<int>(va, 1), errc::ok);
}

TEST(Mm, TeardownReleasesEverything) {
  mm m({.frames = 2048});
  const auto free0 = m.pool().free_frames();
  const va_t va = m.mmap(0, 8 * K4, rw, anon_priv).value();
  for (int i = 0; i < 8; ++i) ASSERT_EQ(m.store<int>(va + i * K4, i), errc::ok);
  ASSERT_EQ(m.reclaim(va, 2 * K4).value(), 2u);
  m.teardown();
  EXPECT_EQ(m.pool().free_frames(), free0);
  EXPECT_EQ(m.swap_used(), 0u);
  EXPECT_EQ(m.resident_pages(), 0u);
  EXPECT_EQ(m.mmap(0, K4, rw, anon_priv).error(), errc::nomem);
  m.teardown();  // idempotent
}

}  // namespace
}  // namespace svm
