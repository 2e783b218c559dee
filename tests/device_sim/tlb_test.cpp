// The device PTE encoding and the set-associative TLB policy, in isolation.
#include <gtest/gtest.h>

#include "svm/device_sim/dev_pte.h"
#include "svm/device_sim/tlb.h"
#include "test_support.h"

namespace svm::dev {
namespace {

tlb_entry entry(vm_id vm, va_t va, unsigned level, pfn_t pfn) {
  tlb_entry e;
  e.level = static_cast<std::uint8_t>(level);
  e.base = align_down(va, std::uint64_t{1} << (page_shift + 9 * level));
  e.tag = tlb_entry::make_tag(vm, va, level);
  e.pte = dev_pte::make(aperture::system, pfn, true);
  return e;
}

TEST(DevPte, EncodingRoundTripsAndKeepsBitZeroClear) {
  const auto e = dev_pte::make(aperture::vram, 0x12345, true);
  EXPECT_TRUE(dev_pte::is_valid(e));
  EXPECT_TRUE(dev_pte::is_writable(e));
  EXPECT_EQ(dev_pte::aperture_of(e), aperture::vram);
  EXPECT_EQ(dev_pte::pfn(e), 0x12345u);
  EXPECT_EQ(e & pt::link_bit, 0u);
  const auto ro = dev_pte::make(aperture::system, 7, false);
  EXPECT_FALSE(dev_pte::is_writable(ro));
  EXPECT_EQ(dev_pte::aperture_of(ro), aperture::system);
  EXPECT_FALSE(dev_pte::is_valid(0));
  EXPECT_FALSE(dev_pte::is_valid(e | pt::link_bit));
  EXPECT_EQ(dev_pte::read_only(e), e & ~dev_pte::write_bit);
  // Splitting a 2M leaf: sub-entry i maps frame pfn + i; a 1G: pfn + 512 i.
  EXPECT_EQ(dev_pte::pfn(dev_pte::split(e, 1, 5)), 0x12345u + 5);
  EXPECT_EQ(dev_pte::pfn(dev_pte::split(e, 2, 3)), 0x12345u + 3 * 512);
  EXPECT_EQ(dev_pte::split(e, 1, 5) & ~dev_pte::pfn_mask, e & ~dev_pte::pfn_mask);
}

TEST(Tlb, HitAndMissAtEveryLeafSize) {
  set_assoc_tlb t({.sets = 16, .ways = 4});
  EXPECT_EQ(t.lookup(1, 0x1000), nullptr);
  t.insert(entry(1, 0x1000, 0, 10));
  t.insert(entry(1, 0x4000'0000 + 0x20'0000, 1, 512));   // a 2M leaf
  t.insert(entry(1, 0x80'0000'0000, 2, 1 << 18));       // a 1G leaf
  ASSERT_NE(t.lookup(1, 0x1fff), nullptr);
  EXPECT_EQ(t.lookup(1, 0x1fff)->level, 0);
  EXPECT_EQ(t.lookup(1, 0x2000), nullptr);               // next 4K page: miss
  ASSERT_NE(t.lookup(1, 0x4000'0000 + 0x3f'ffff), nullptr);
  EXPECT_EQ(t.lookup(1, 0x4000'0000 + 0x3f'ffff)->level, 1);
  EXPECT_EQ(t.lookup(1, 0x4000'0000 + 0x40'0000), nullptr);
  ASSERT_NE(t.lookup(1, 0x80'0000'0000 + 0x3fff'ffff), nullptr);
  EXPECT_EQ(t.lookup(1, 0x80'0000'0000 + 0x3fff'ffff)->level, 2);
  // Other VMs never hit (tags carry the vm).
  EXPECT_EQ(t.lookup(2, 0x1000), nullptr);
  EXPECT_EQ(t.lookup(2, 0x80'0000'0000), nullptr);
  EXPECT_EQ(t.occupancy(), 3u);
}

TEST(Tlb, EvictsRoundRobinWhenASetIsFull) {
  set_assoc_tlb t({.sets = 4, .ways = 2});
  // Pages 4 sets apart share a set.
  const va_t stride = 4 * page_size;
  ASSERT_EQ(t.set_index(0, 0, 0), t.set_index(0, stride, 0));
  t.insert(entry(0, 0, 0, 1));
  t.insert(entry(0, stride, 0, 2));
  EXPECT_NE(t.lookup(0, 0), nullptr);
  EXPECT_NE(t.lookup(0, stride), nullptr);
  t.insert(entry(0, 2 * stride, 0, 3));  // evicts the oldest (way 0: va 0)
  EXPECT_EQ(t.lookup(0, 0), nullptr);
  EXPECT_NE(t.lookup(0, stride), nullptr);
  EXPECT_NE(t.lookup(0, 2 * stride), nullptr);
  EXPECT_EQ(t.counters().evictions, 1u);
  // Re-inserting a cached tag replaces it in place (no eviction).
  t.insert(entry(0, stride, 0, 9));
  EXPECT_EQ(dev_pte::pfn(t.lookup(0, stride)->pte), 9u);
  EXPECT_EQ(t.counters().evictions, 1u);
}

TEST(Tlb, RangedInvalidateDropsOverlappingEntriesOnly) {
  set_assoc_tlb t({.sets = 64, .ways = 4});
  for (va_t va = 0; va < 16 * page_size; va += page_size) t.insert(entry(1, va, 0, va >> page_shift));
  t.insert(entry(2, 0x3000, 0, 99));
  t.insert(entry(1, huge_size, 1, 512));  // 2M leaf at 2M
  t.invalidate(1, {0x3000, 0x5000});
  EXPECT_EQ(t.lookup(1, 0x3000), nullptr);
  EXPECT_EQ(t.lookup(1, 0x4000), nullptr);
  EXPECT_NE(t.lookup(1, 0x2000), nullptr);
  EXPECT_NE(t.lookup(1, 0x5000), nullptr);
  EXPECT_NE(t.lookup(2, 0x3000), nullptr);  // another VM's entry stays
  // A 4K range inside a 2M leaf drops the whole leaf.
  t.invalidate(1, {huge_size + 0x7000, huge_size + 0x8000});
  EXPECT_EQ(t.lookup(1, huge_size), nullptr);
  // A wide range takes the scanning path.
  t.invalidate(1, {0, va_t{1} << 40});
  for (va_t va = 0; va < 16 * page_size; va += page_size) EXPECT_EQ(t.lookup(1, va), nullptr);
  EXPECT_NE(t.lookup(2, 0x3000), nullptr);
  t.flush_all();
  EXPECT_EQ(t.occupancy(), 0u);
}

}  // namespace
}  // namespace svm::dev
