// Regression tests: the mm follows Linux on VMA merging, mremap, fork, the
// huge zero page, large folios and fault-around; bad input is refused.
#include <gtest/gtest.h>

#include <sstream>

#include "svm/notifier/mm.h"

namespace svm {
namespace {

constexpr std::uint64_t K4 = page_size, M2 = huge_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;
const map anon_shared = map::shared | map::anonymous;
const map fixed_priv = map::private_ | map::anonymous | map::fixed;

std::size_t vma_count(mm& m) { return m.vmas().size(); }

TEST(MmLinux, CpuAccessPastTheVaWidthIsEfault) {
  mm m;
  for (va_t va : {va_t{1} << 47, va_t{1} << 48, va_t{1} << 57, va_t{0xffff800000000000ull}, ~va_t{0} - 7}) {
    EXPECT_EQ(m.load<std::uint64_t>(va).error(), errc::fault) << std::hex << va;
    EXPECT_EQ(m.store<std::uint64_t>(va, 1), errc::fault) << std::hex << va;
    EXPECT_EQ(m.atomic_fetch_add(va, 1).error(), errc::fault) << std::hex << va;
    EXPECT_EQ(m.atomic_compare_exchange(va, 0, 1).error(), errc::fault) << std::hex << va;
    EXPECT_FALSE(m.cpu_translate(va).present);
    EXPECT_EQ(m.raw_pte(va).entry, 0u);
  }
}

TEST(MmLinux, MadviseOutsideTheEnumIsEinvalAndChangesNothing) {
  mm m;
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 7), errc::ok);
  EXPECT_EQ(m.madvise(va + K4, K4, static_cast<madvice>(3)), errc::inval);
  EXPECT_EQ(m.madvise(va + K4, K4, static_cast<madvice>(200)), errc::inval);
  ASSERT_EQ(vma_count(m), 1u);
  EXPECT_EQ(m.vmas()[0].advice, huge_advice::none);
  EXPECT_EQ(m.load<int>(va).value(), 7);
}

TEST(MmLinux, MmOptionsWithZeroMmapLimitAreRefusedAtConstruction) {
  mm_options o;
  o.mmap_limit = 0;
  EXPECT_EQ(o.validate(), errc::inval);
  EXPECT_EQ(mm::create(o).error(), errc::inval);
  // The constructor does not abort either: the mm maps nothing.
  mm m(o);
  EXPECT_EQ(m.mmap(0, K4, rw, anon_priv).error(), errc::nomem);
  EXPECT_EQ(m.load<int>(0x10000).error(), errc::fault);
  mm_options bad[5];
  bad[0].frames = 0;
  bad[1].mmap_base = bad[1].mmap_limit;
  bad[2].fault_around_bytes = 3 * K4;
  bad[3].mmap_min_addr = 1;
  bad[4].thp = static_cast<thp_mode>(9);
  for (const auto& b : bad) EXPECT_EQ(mm::create(b).error(), errc::inval);
  auto good = mm::create({});
  ASSERT_TRUE(good.has_value());
  EXPECT_TRUE((*good)->mmap(0, K4, rw, anon_priv).has_value());
}

TEST(MmLinux, FileOfSize2To64Minus1IsAnError) {
  auto pool = std::make_shared<frame_pool>(1024);
  EXPECT_EQ(file::create(pool, ~std::uint64_t{0}).error(), errc::overflow);
  EXPECT_EQ(file::create(nullptr, K4).error(), errc::inval);
  auto f = file::create(pool, 3 * K4 + 1);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ((*f)->size(), 4 * K4);
  // The constructor clamps instead of wrapping to a 0-byte file.
  file big(pool, ~std::uint64_t{0});
  EXPECT_EQ(big.size(), file::max_size);
}

TEST(MmLinux, MmapFixedBelowMmapMinAddrIsEperm) {
  mm m;
  EXPECT_EQ(m.mmap(0, K4, rw, fixed_priv).error(), errc::perm);
  EXPECT_EQ(m.mmap(0x1000, K4, rw, fixed_priv).error(), errc::perm);
  EXPECT_EQ(m.mmap(0, K4, rw, map::private_ | map::anonymous | map::fixed_noreplace).error(), errc::perm);
  EXPECT_EQ(vma_count(m), 0u);
  EXPECT_TRUE(m.mmap(0x10000, K4, rw, fixed_priv).has_value());  // at mmap_min_addr: fine
  // A hint below it is moved up to it.
  const va_t h = m.mmap(0x2000, K4, rw, anon_priv).value();
  EXPECT_GE(h, va_t{0x10000});
}

TEST(MmLinux, MprotectToTheSameProtectionKeepsTheVmaWhole) {
  mm m;
  const va_t va = m.mmap(0, 8 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.mprotect(va + K4, 2 * K4, rw), errc::ok);
  EXPECT_EQ(vma_count(m), 1u);
  ASSERT_EQ(m.madvise(va + K4, 2 * K4, madvice::dontneed), errc::ok);
  EXPECT_EQ(vma_count(m), 1u);
}

TEST(MmLinux, VmasMergeAfterMprotectMadviseAndMmap) {
  mm m;
  const va_t va = m.mmap(0, 8 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.mprotect(va + K4, 2 * K4, prot::read), errc::ok);
  EXPECT_EQ(vma_count(m), 3u);
  ASSERT_EQ(m.mprotect(va + K4, 2 * K4, rw), errc::ok);
  EXPECT_EQ(vma_count(m), 1u);
  ASSERT_EQ(m.madvise(va, 4 * K4, madvice::hugepage), errc::ok);
  EXPECT_EQ(vma_count(m), 2u);
  ASSERT_EQ(m.madvise(va + 4 * K4, 4 * K4, madvice::hugepage), errc::ok);
  EXPECT_EQ(vma_count(m), 1u);
  // A new mapping right after a compatible one extends it.
  ASSERT_TRUE(m.mmap(va + 8 * K4, 4 * K4, rw, fixed_priv).has_value());
  ASSERT_EQ(m.madvise(va + 8 * K4, 4 * K4, madvice::hugepage), errc::ok);
  EXPECT_EQ(vma_count(m), 1u);
  // Shared anonymous mappings are distinct objects: never merged.
  const va_t s = m.mmap(va + 64 * K4, 4 * K4, rw, anon_shared | map::fixed).value();
  ASSERT_TRUE(m.mmap(s + 4 * K4, 4 * K4, rw, anon_shared | map::fixed).has_value());
  EXPECT_EQ(vma_count(m), 3u);
  // /proc/self/maps form.
  std::istringstream lines(m.maps());
  std::string l;
  std::getline(lines, l);
  char want[64];
  std::snprintf(want, sizeof want, "%llx-%llx rw-p %08llx", static_cast<unsigned long long>(va),
                static_cast<unsigned long long>(va + 12 * K4), static_cast<unsigned long long>(va));
  EXPECT_EQ(l.substr(0, std::string(want).size()), want);
  std::getline(lines, l);
  EXPECT_NE(l.find("rw-s 00000000 00:00 0 /dev/zero (deleted)"), std::string::npos) << l;
}

TEST(MmLinux, FaultedAnonymousVmasWithDifferentAnonVmasDoNotMerge) {
  mm m;
  const va_t a = m.mmap(0x100000000, 4 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.store<int>(a, 1), errc::ok);
  const va_t b = m.mmap(0x100000000 + 8 * K4, 4 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.store<int>(b, 1), errc::ok);
  // Fill the gap: merges with the first (its anon_vma) but not the second.
  ASSERT_TRUE(m.mmap(a + 4 * K4, 4 * K4, rw, fixed_priv).has_value());
  EXPECT_EQ(vma_count(m), 2u);
}

TEST(MmLinux, MremapMovesARangeThatSpansSeveralVmas) {
  mm m;
  const va_t va = m.mmap(0x100000000, 8 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.mprotect(va + 2 * K4, 2 * K4, prot::read), errc::ok);
  ASSERT_EQ(m.munmap(va + 5 * K4, K4), errc::ok);
  ASSERT_EQ(m.store<int>(va, 11), errc::ok);
  ASSERT_EQ(m.store<int>(va + 7 * K4, 12), errc::ok);
  const va_t to = 0x200000000;
  using f = mremap_flags;
  ASSERT_EQ(m.mremap(va, 8 * K4, 8 * K4, f::maymove | f::fixed, to).value(), to);
  EXPECT_EQ(m.load<int>(to).value(), 11);
  EXPECT_EQ(m.load<int>(to + 7 * K4).value(), 12);
  EXPECT_EQ(m.load<int>(to + 5 * K4).error(), errc::fault);  // the gap moved along
  EXPECT_EQ(m.store<int>(to + 2 * K4, 1), errc::perm);
  EXPECT_EQ(m.load<int>(va).error(), errc::fault);
  // Starting in a gap is EFAULT.
  EXPECT_EQ(m.mremap(to + 5 * K4, 2 * K4, 2 * K4, f::maymove | f::fixed, va).error(), errc::fault);
}

TEST(MmLinux, MremapDontUnmapWorksOnSharedAnonymousMemory) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_shared).value();
  ASSERT_EQ(m.store<int>(va, 8), errc::ok);
  using f = mremap_flags;
  const va_t nv = m.mremap(va, 2 * K4, 2 * K4, f::maymove | f::dontunmap).value();
  EXPECT_NE(nv, va);
  EXPECT_EQ(m.load<int>(nv).value(), 8);
  EXPECT_EQ(m.load<int>(va).value(), 8);  // the old mapping refaults the same shmem page
}

TEST(MmLinux, MremapShrinksInPlaceAcrossAVmaEnd) {
  mm m;
  const va_t va = m.mmap(0x100000000, 8 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.mprotect(va + 4 * K4, 4 * K4, prot::read), errc::ok);
  ASSERT_EQ(m.mremap(va, 8 * K4, 2 * K4, mremap_flags::none).value(), va);
  ASSERT_EQ(vma_count(m), 1u);
  EXPECT_EQ(m.vmas()[0].end, va + 2 * K4);
}

TEST(MmLinux, GrowingSharedAnonymousMemoryKeepsTheObjectSize) {
  mm m;
  const va_t va = m.mmap(0x100000000, 2 * K4, rw, anon_shared | map::fixed).value();
  ASSERT_EQ(m.store<int>(va + K4, 3), errc::ok);
  ASSERT_EQ(m.mremap(va, 2 * K4, 4 * K4, mremap_flags::none).value(), va);
  EXPECT_EQ(m.vmas()[0].backing->size(), 2 * K4);
  EXPECT_EQ(m.load<int>(va + K4).value(), 3);
  EXPECT_EQ(m.load<int>(va + 2 * K4).error(), errc::fault);  // SIGBUS: past the object's end
}

TEST(MmLinux, ForkCopiesPtesOnlyForVmasThatNeedIt) {
  mm m;
  // Gaps between them: adjacent private VMAs would merge into one.
  const va_t sh = m.mmap(0x100000000, 4 * K4, rw, anon_shared | map::fixed).value();
  const va_t ro = m.mmap(0x100010000, 4 * K4, rw, fixed_priv).value();
  const va_t wr = m.mmap(0x100020000, 4 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.store<int>(sh, 1), errc::ok);
  ASSERT_EQ(m.load<int>(ro).value(), 0);  // the zero page: no anon_vma
  ASSERT_EQ(m.store<int>(wr, 2), errc::ok);
  auto c = m.fork().value();
  EXPECT_FALSE(c->cpu_translate(sh).present);  // the child faults it from shmem
  EXPECT_FALSE(c->cpu_translate(ro).present);
  EXPECT_TRUE(c->cpu_translate(wr).present);
  EXPECT_FALSE(c->cpu_translate(wr).writable);
  EXPECT_TRUE(m.cpu_translate(sh).writable);  // the parent's shared PTE is untouched
  EXPECT_EQ(c->load<int>(sh).value(), 1);
  EXPECT_EQ(c->load<int>(wr).value(), 2);
}

TEST(MmLinux, ThpEligibleReadMapsTheHugeZeroPage) {
  mm m;
  const va_t va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  const va_t slot = align_up(va, M2);
  ASSERT_EQ(m.madvise(va, 2 * M2, madvice::hugepage), errc::ok);
  const auto free0 = m.pool().free_frames();
  ASSERT_EQ(m.load<int>(slot + 5 * K4).value(), 0);
  auto t = m.cpu_translate(slot + 7 * K4);
  EXPECT_TRUE(t.present && t.zero_page && t.huge_zero);
  EXPECT_EQ(t.order, 9u);
  EXPECT_EQ(m.pool().free_frames(), free0);
  // A write replaces it with a real THP.
  ASSERT_EQ(m.store<int>(slot + 5 * K4, 4), errc::ok);
  t = m.cpu_translate(slot + 7 * K4);
  EXPECT_TRUE(t.present && !t.zero_page);
  EXPECT_EQ(t.order, 9u);
  EXPECT_EQ(m.folio(t.pfn).order, 9u);
  // Without use_zero_page a read allocates the THP at once.
  mm_options o;
  o.thp_use_zero_page = false;
  mm n(o);
  const va_t v2 = n.mmap(0, 2 * M2, rw, anon_priv).value();
  ASSERT_EQ(n.madvise(v2, 2 * M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(n.load<int>(align_up(v2, M2)).value(), 0);
  EXPECT_FALSE(n.cpu_translate(align_up(v2, M2)).zero_page);
}

TEST(MmLinux, LargeFoliosSurviveAPmdSplit) {
  mm m;
  const va_t va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  const va_t slot = align_up(va, M2);
  ASSERT_EQ(m.madvise(va, 2 * M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(m.store<int>(slot, 1), errc::ok);
  const pfn_t head = m.cpu_translate(slot).pfn;
  ASSERT_EQ(m.cpu_translate(slot).order, 9u);
  const auto free0 = m.pool().free_frames();
  ASSERT_EQ(m.munmap(slot + M2 / 2, M2 / 2), errc::ok);  // PTE-maps the first half
  const auto t = m.cpu_translate(slot + 3 * K4);
  EXPECT_EQ(t.order, 0u);
  EXPECT_EQ(t.pfn, head + 3);
  EXPECT_EQ(m.folio(t.pfn).head, head);
  EXPECT_EQ(m.folio(t.pfn).order, 9u);
  EXPECT_EQ(m.mapcount(t.pfn), 1u);
  EXPECT_EQ(m.mapcount(head + 300), 0u);  // unmapped, but the folio holds it
  EXPECT_EQ(m.pool().free_frames(), free0);
  ASSERT_EQ(m.munmap(slot, M2 / 2), errc::ok);
  EXPECT_EQ(m.pool().free_frames(), free0 + 512);  // the folio is freed whole
  EXPECT_EQ(m.folio(head).order, 0u);
}

TEST(MmLinux, MapcountCountsEveryMappingInTheForkFamily) {
  mm m;
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(m.store<int>(va, 1), errc::ok);
  const pfn_t p = m.cpu_translate(va).pfn;
  EXPECT_EQ(m.mapcount(p), 1u);
  {
    auto c = m.fork().value();
    EXPECT_EQ(m.mapcount(p), 2u);
  }
  EXPECT_EQ(m.mapcount(p), 1u);
  EXPECT_EQ(m.mapcount(mm::zero_pfn()), 0u);
}

TEST(MmLinux, ReadFaultOnSharedMemoryFaultsAround) {
  mm m;
  const va_t va = m.mmap(0x100000000, 32 * K4, rw, anon_shared | map::fixed).value();
  for (int i = 0; i < 32; ++i) ASSERT_EQ(m.store<int>(va + i * K4, i), errc::ok);
  ASSERT_EQ(m.madvise(va, 32 * K4, madvice::dontneed), errc::ok);
  const std::shared_ptr<file> obj = m.vmas()[0].backing;
  EXPECT_NE(obj->lookup(3), 0u);  // still cached; lookup allocates nothing
  EXPECT_EQ(obj->lookup(40), 0u);
  ASSERT_EQ(m.load<int>(va + 20 * K4).value(), 20);
  for (int i = 0; i < 32; ++i)  // the aligned 64K window [16, 32)
    EXPECT_EQ(m.cpu_translate(va + i * K4).present, i >= 16) << i;
  mm_options o;
  o.fault_around_bytes = K4;
  mm n(o);
  const va_t v2 = n.mmap(0, 4 * K4, rw, anon_shared).value();
  for (int i = 0; i < 4; ++i) ASSERT_EQ(n.store<int>(v2 + i * K4, i), errc::ok);
  ASSERT_EQ(n.madvise(v2, 4 * K4, madvice::dontneed), errc::ok);
  ASSERT_EQ(n.load<int>(v2).value(), 0);
  EXPECT_FALSE(n.cpu_translate(v2 + K4).present);
}

TEST(MmLinux, MremapDontUnmapLeavesTheOldPieceMergedWithItsNeighbours) {
  mm m;
  const va_t va = m.mmap(0x100000000, 16 * K4, prot::none, fixed_priv).value();
  using f = mremap_flags;
  ASSERT_EQ(m.mremap(va + 4 * K4, 2 * K4, 2 * K4, f::maymove | f::fixed | f::dontunmap, 0x200000000).value(),
            va_t{0x200000000});
  EXPECT_EQ(vma_count(m), 2u);  // [va, va+16 pages) whole again, and the new one
}

TEST(MmLinux, MremapMultiVmaMoveUnmapsOnlyEachVmasOwnTarget) {
  mm m;
  const va_t va = m.mmap(0x100000000, 8 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.munmap(va + 2 * K4, 2 * K4), errc::ok);  // a gap in the middle
  const va_t to = m.mmap(0x200000000, 8 * K4, prot::read, fixed_priv).value();
  ASSERT_EQ(m.load<int>(to + 2 * K4).value(), 0);
  using f = mremap_flags;
  ASSERT_EQ(m.mremap(va, 8 * K4, 8 * K4, f::maymove | f::fixed, to).value(), to);
  // Opposite the gap the old target mapping stays (read-only, as it was).
  EXPECT_EQ(m.store<int>(to + 2 * K4, 1), errc::perm);
  EXPECT_EQ(m.store<int>(to, 1), errc::ok);
}

TEST(MmLinux, MremapShrinkingMoveChecksTheKeptPartFirst) {
  mm m;
  const va_t va = m.mmap(0x100000000, 2 * K4, rw, fixed_priv).value();
  ASSERT_TRUE(m.mmap(va + 2 * K4, 6 * K4, prot::read, fixed_priv).has_value());
  const va_t to = m.mmap(0x200000000, 8 * K4, rw, fixed_priv).value();
  using f = mremap_flags;
  // Keeping 4 pages would span two VMAs: EFAULT, and nothing was unmapped.
  EXPECT_EQ(m.mremap(va, 8 * K4, 4 * K4, f::maymove | f::fixed, to).error(), errc::fault);
  EXPECT_EQ(vma_count(m), 3u);
  EXPECT_TRUE(m.load<int>(to).has_value());
  EXPECT_TRUE(m.load<int>(va + 7 * K4).has_value());
  // Keeping 2 pages is fine: the tail goes across the VMA end.
  EXPECT_EQ(m.mremap(va, 8 * K4, 2 * K4, f::maymove | f::fixed, to).value(), to);
  EXPECT_EQ(m.load<int>(va + 7 * K4).error(), errc::fault);
}

TEST(MmLinux, MremapOldSizeZeroDuplicatesASharedMapping) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_shared).value();
  ASSERT_EQ(m.store<int>(va + K4, 9), errc::ok);
  using f = mremap_flags;
  const va_t dup = m.mremap(va, 0, 2 * K4, f::maymove).value();
  EXPECT_NE(dup, va);
  EXPECT_EQ(m.load<int>(dup + K4).value(), 9);
  ASSERT_EQ(m.store<int>(dup, 4), errc::ok);
  EXPECT_EQ(m.load<int>(va).value(), 4);  // one object, two mappings
  EXPECT_EQ(m.mremap(va, 0, 2 * K4, f::none).error(), errc::nomem);
  const va_t priv = m.mmap(0, K4, rw, anon_priv).value();
  EXPECT_EQ(m.mremap(priv, 0, K4, f::maymove).error(), errc::inval);
}

TEST(MmLinux, ZeroPageOffMakesAnonymousReadsAllocate) {
  mm_options o;
  o.zero_page = false;
  mm m(o);
  const va_t va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  ASSERT_EQ(m.load<int>(va).value(), 0);
  EXPECT_TRUE(m.cpu_translate(va).present);
  EXPECT_FALSE(m.cpu_translate(va).zero_page);
  EXPECT_EQ(m.mapcount(m.cpu_translate(va).pfn), 1u);
  const va_t slot = align_up(va + 1, M2);  // a slot with no 4K page in it yet
  ASSERT_EQ(m.madvise(slot, M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(m.load<int>(slot).value(), 0);
  EXPECT_FALSE(m.cpu_translate(slot).zero_page);  // a THP, not the huge zero page
  EXPECT_EQ(m.cpu_translate(slot).order, 9u);
}


// ---- empty 4K page tables (Linux keeps them until free_pgtables or PT reclaim) ----

// A 2M slot, THP-advised and without VM_NOHUGEPAGE, with one page faulted at
// 4K (the slot was NOHUGEPAGE then) and made eligible again afterwards.
va_t slot_with_a_4k_table(mm& m, va_t* base) {
  const va_t va = m.mmap(0, 8 * M2, rw, anon_priv).value();
  *base = va;
  const va_t slot = align_up(va, M2);
  EXPECT_EQ(m.madvise(slot, M2, madvice::nohugepage), errc::ok);
  EXPECT_EQ(m.store<int>(slot + 5 * K4, 1), errc::ok);
  EXPECT_FALSE(m.cpu_translate(slot + 5 * K4).huge_zero);
  return slot;
}

bool read_maps_huge_zero(mm& m, va_t slot) {
  EXPECT_EQ(m.madvise(slot, M2, madvice::hugepage), errc::ok);
  EXPECT_EQ(m.load<int>(slot + 0x100000).value(), 0);
  const auto t = m.cpu_translate(slot + 0x100000);
  EXPECT_TRUE(t.present && t.zero_page);
  return t.huge_zero;
}

TEST(MmLinux, EmptyPageTableLeftByDontunmapMoveKeepsTheSlotAt4K) {
  mm m;
  va_t base = 0;
  const va_t slot = slot_with_a_4k_table(m, &base);
  using f = mremap_flags;
  ASSERT_TRUE(m.mremap(slot + 5 * K4, K4, K4, f::maymove | f::fixed | f::dontunmap, slot + 3 * M2).has_value());
  EXPECT_FALSE(m.cpu_translate(slot + 5 * K4).present);
  EXPECT_FALSE(read_maps_huge_zero(m, slot));  // the table is still there: a 4K zero page
}

TEST(MmLinux, EmptyPageTableLeftByMunmapStaysWhileAVmaTouchesTheSlot) {
  mm m;
  va_t base = 0;
  const va_t slot = slot_with_a_4k_table(m, &base);
  ASSERT_EQ(m.munmap(slot + 5 * K4, K4), errc::ok);
  ASSERT_TRUE(m.mmap(slot + 5 * K4, K4, rw, fixed_priv).has_value());
  EXPECT_FALSE(read_maps_huge_zero(m, slot));
  // Once no VMA touches the slot, munmap frees the table (free_pgtables).
  ASSERT_EQ(m.munmap(slot, M2), errc::ok);
  ASSERT_TRUE(m.mmap(slot, M2, rw, fixed_priv).has_value());
  EXPECT_TRUE(read_maps_huge_zero(m, slot));
}

TEST(MmLinux, DontneedOfTwoMegabytesReclaimsTheEmptyPageTable) {
  mm m;
  va_t base = 0;
  const va_t slot = slot_with_a_4k_table(m, &base);
  // Smaller than 2M: no page-table reclaim, the emptied table stays.
  ASSERT_EQ(m.madvise(slot, M2 - K4, madvice::dontneed), errc::ok);
  EXPECT_FALSE(m.cpu_translate(slot + 5 * K4).present);
  EXPECT_FALSE(read_maps_huge_zero(m, slot));
  ASSERT_EQ(m.madvise(slot, M2, madvice::nohugepage), errc::ok);
  ASSERT_EQ(m.store<int>(slot + 5 * K4, 1), errc::ok);
  ASSERT_EQ(m.madvise(slot, M2, madvice::dontneed), errc::ok);  // 2M: reclaimed
  EXPECT_TRUE(read_maps_huge_zero(m, slot));
}

TEST(MmLinux, MremapGivesTheTargetAPageTableWhereTheSourceSlotHasOne) {
  mm m;
  va_t base = 0;
  const va_t slot = slot_with_a_4k_table(m, &base);
  const va_t target = slot + 2 * M2;
  // Move a never-touched page of the slot: no entry moves, yet the target
  // slot gets a table, so a later read there maps 4K pages.
  using f = mremap_flags;
  ASSERT_TRUE(m.mremap(slot + 9 * K4, K4, K4, f::maymove | f::fixed, target).has_value());
  EXPECT_FALSE(read_maps_huge_zero(m, target));
  // A move from a slot without a table leaves the target free for a THP.
  const va_t clean = slot + 3 * M2;
  ASSERT_TRUE(m.mremap(slot + 4 * M2 + 9 * K4, K4, K4, f::maymove | f::fixed, clean).has_value());
  EXPECT_TRUE(read_maps_huge_zero(m, clean));
}

TEST(MmLinux, MremapDontUnmapOfSeveralVmasLeavesTheSourceBoundariesAsTheyWere) {
  mm m;
  const va_t va = m.mmap(0x100000000, 16 * K4, rw, fixed_priv).value();
  ASSERT_EQ(m.mprotect(va + 8 * K4, 8 * K4, prot::read), errc::ok);
  ASSERT_EQ(m.store<int>(va + 6 * K4, 6), errc::ok);
  const auto before = m.vmas();
  ASSERT_EQ(before.size(), 2u);
  using f = mremap_flags;
  // [va+4, va+12) spans both VMAs: each piece moves, the sources stay whole.
  ASSERT_EQ(m.mremap(va + 4 * K4, 8 * K4, 8 * K4, f::maymove | f::fixed | f::dontunmap, 0x200000000).value(),
            va_t{0x200000000});
  const auto after = m.vmas();
  ASSERT_GE(after.size(), 3u);
  EXPECT_EQ(after[0].start, before[0].start);
  EXPECT_EQ(after[0].end, before[0].end);
  EXPECT_EQ(after[1].start, before[1].start);
  EXPECT_EQ(after[1].end, before[1].end);
  EXPECT_EQ(m.load<int>(0x200000000 + 2 * K4).value(), 6);
  EXPECT_EQ(m.load<int>(va + 6 * K4).value(), 0);  // the source is mapped and empty
}

TEST(MmLinux, SplittingAVmaInsideAHugeZeroPmdMapsFourKZeroPages) {
  mm m;
  const va_t va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  const va_t slot = align_up(va, M2);
  ASSERT_EQ(m.madvise(va, 2 * M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(m.load<int>(slot).value(), 0);
  ASSERT_TRUE(m.cpu_translate(slot + 100 * K4).huge_zero);
  // NOHUGEPAGE on part of the slot splits the VMA inside the PMD: the PMD
  // becomes 4K entries, each the 4K zero page.
  ASSERT_EQ(m.madvise(slot + 43 * K4, M2, madvice::nohugepage), errc::ok);
  for (va_t p : {slot, slot + 42 * K4, slot + 43 * K4, slot + 511 * K4}) {
    const auto t = m.cpu_translate(p);
    EXPECT_TRUE(t.present && t.zero_page) << std::hex << p;
    EXPECT_FALSE(t.huge_zero) << std::hex << p;
    EXPECT_EQ(t.order, 0u) << std::hex << p;
  }
  // A THP cut the same way stays one folio, now mapped by 4K entries.
  const va_t v2 = m.mmap(0, 2 * M2, rw, anon_priv).value();
  const va_t s2 = align_up(v2, M2);
  ASSERT_EQ(m.madvise(v2, 2 * M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(m.store<int>(s2, 7), errc::ok);
  ASSERT_EQ(m.cpu_translate(s2).order, 9u);
  const pfn_t head = m.cpu_translate(s2).pfn;
  ASSERT_EQ(m.madvise(s2 + 43 * K4, M2, madvice::nohugepage), errc::ok);
  const auto t = m.cpu_translate(s2 + 100 * K4);
  EXPECT_EQ(t.order, 0u);
  EXPECT_EQ(t.pfn, head + 100);
  EXPECT_EQ(m.folio(t.pfn).order, 9u);
  EXPECT_EQ(m.load<int>(s2).value(), 7);
}

}  // namespace
}  // namespace svm
