// Frame pool: reference counts, generations, huge allocation, the phys_mem
// interface.
#include <gtest/gtest.h>

#include "svm/notifier/frame_pool.h"

namespace svm {
namespace {

TEST(FramePool, AllocIsZeroedAndRefcounted) {
  frame_pool p(1024);
  auto f = p.alloc();
  ASSERT_TRUE(f.ok());
  EXPECT_NE(*f, frame_pool::zero_pfn());
  EXPECT_EQ(p.refcount(*f), 1u);
  std::byte* d = p.frame_data(*f);
  for (std::size_t i = 0; i < page_size; ++i) ASSERT_EQ(d[i], std::byte{0});
  d[7] = std::byte{42};
  p.get(*f);
  EXPECT_EQ(p.refcount(*f), 2u);
  p.put(*f);
  p.put(*f);
  EXPECT_EQ(p.refcount(*f), 0u);
  // A recycled frame comes back zeroed.
  std::vector<pfn_t> all;
  for (;;) {
    auto g = p.alloc();
    if (!g) {
      EXPECT_EQ(g.error(), errc::nomem);
      break;
    }
    all.push_back(*g);
  }
  EXPECT_EQ(all.size(), p.frame_count() - 1);
  EXPECT_EQ(p.frame_data(*f)[7], std::byte{0});
  for (pfn_t x : all) p.put(x);
  EXPECT_EQ(p.free_frames(), p.frame_count() - 1);
}

TEST(FramePool, GenerationAdvancesOnlyWhenFreed) {
  frame_pool p(1024);
  auto f = p.alloc();
  ASSERT_TRUE(f.ok());
  const auto g0 = p.frame_generation(*f);
  p.get(*f);
  p.put(*f);
  EXPECT_EQ(p.frame_generation(*f), g0);
  p.put(*f);
  EXPECT_EQ(p.frame_generation(*f), g0 + 1);
}

TEST(FramePool, HugeAllocIsAlignedAndExhausts) {
  frame_pool p(2048);  // 4 blocks; block 0 holds the zero page
  std::vector<pfn_t> h;
  for (;;) {
    auto r = p.alloc_huge();
    if (!r) {
      EXPECT_EQ(r.error(), errc::nomem);
      break;
    }
    EXPECT_EQ(*r % frame_pool::huge_frames, 0u);
    EXPECT_NE(*r, 0u);
    h.push_back(*r);
  }
  EXPECT_EQ(h.size(), 3u);
  for (pfn_t b : h)
    for (pfn_t i = 0; i < frame_pool::huge_frames; ++i) p.put(b + i);
  EXPECT_EQ(p.free_frames(), p.frame_count() - 1);
}

TEST(FramePool, PhysMemInterfaceAndZeroPage) {
  frame_pool p(1024);
  phys_mem& pm = p;
  EXPECT_EQ(pm.frame_count(), 1024u);
  EXPECT_EQ(pm.frame_data(1024), nullptr);
  EXPECT_NE(pm.frame_data(0), nullptr);
  EXPECT_EQ(p.refcount(frame_pool::zero_pfn()), 1u);
  p.put(frame_pool::zero_pfn());  // never freed
  EXPECT_EQ(p.refcount(frame_pool::zero_pfn()), 1u);
  p.set_alloc_failure([](bool) { return true; });
  EXPECT_EQ(p.alloc().error(), errc::nomem);
}

}  // namespace
}  // namespace svm
