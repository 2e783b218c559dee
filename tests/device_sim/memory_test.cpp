// VRAM pool and copy engine.
#include <gtest/gtest.h>

#include <vector>

#include "svm/device_sim/copy_engine.h"
#include "svm/device_sim/vram.h"
#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;

TEST(Vram, AllocatesUntilExhaustedThenEnomem) {
  vram_pool v(8 * page_size);
  EXPECT_EQ(v.frame_count(), 8u);
  std::vector<pfn_t> got;
  for (int i = 0; i < 8; ++i) {
    auto p = v.alloc();
    ASSERT_TRUE(p.ok());
    got.push_back(*p);
  }
  EXPECT_EQ(v.alloc().error(), errc::nomem);
  EXPECT_EQ(v.used_frames(), 8u);
  const auto g = v.frame_generation(got[3]);
  EXPECT_EQ(v.free(got[3]), errc::ok);
  EXPECT_EQ(v.frame_generation(got[3]), g + 1);
  EXPECT_EQ(v.free(got[3]), errc::inval);  // double free
  EXPECT_EQ(v.free(100), errc::inval);
  auto again = v.alloc();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, got[3]);
  EXPECT_EQ(v.alloc(0).error(), errc::inval);
  EXPECT_EQ(v.alloc(1, 3).error(), errc::inval);
  EXPECT_EQ(v.frame_data(8), nullptr);
}

TEST(Vram, ContiguousAlignedRunsAndZeroedFrames) {
  vram_pool v(2048 * page_size);
  auto one = v.alloc();
  ASSERT_TRUE(one.ok());
  // Dirty the frame, free it, and check a new allocation is zeroed.
  std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(v.frame_data(*one))).store(42);
  auto big = v.alloc(512, 512);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(*big % 512, 0u);
  EXPECT_EQ(v.alloc(2048).error(), errc::nomem);  // nothing changed on failure
  EXPECT_EQ(v.used_frames(), 513u);
  ASSERT_EQ(v.free(*one), errc::ok);
  auto re = v.alloc();
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(v.frame_data(*re))).load(), 0u);
  EXPECT_EQ(v.free(*big, 512), errc::ok);
}

TEST(Vram, DeviceExhaustionGivesEnomem) {
  auto made = device::create({.engines = 1, .vram_bytes = 4 * page_size});
  ASSERT_TRUE(made.ok());
  device& d = **made;
  EXPECT_EQ(d.vram().capacity_bytes(), 4 * page_size);
  EXPECT_TRUE(d.vram().alloc(4).ok());
  EXPECT_EQ(d.vram().alloc().error(), errc::nomem);
}

TEST(CopyEngine, CopiesBetweenSystemAndVramAndSignalsFences) {
  test::watchdog wd;
  test::test_mem sys(8);
  vram_pool v(8 * page_size);
  copy_engine ce;
  for (std::size_t i = 0; i < page_size; i += 8) {
    sys.set_word(1, i, 0x1111'0000 + i);
    sys.set_word(2, i, 0x2222'0000 + i);
  }
  auto f1 = ce.copy({&sys, 1}, {&v, 4}, 2);  // sys 1,2 -> vram 4,5
  ASSERT_TRUE(f1.ok());
  ASSERT_EQ((*f1)->wait(5s), errc::ok);
  EXPECT_EQ((*f1)->error(), errc::ok);
  auto vw = [&](pfn_t p, std::size_t off) {
    return std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(v.frame_data(p) + off)).load();
  };
  EXPECT_EQ(vw(4, 8), 0x1111'0008u);
  EXPECT_EQ(vw(5, page_size - 8), 0x2222'0000u + page_size - 8);
  // And back, to other frames; then a fill. Requests complete in order.
  auto f2 = ce.copy({&v, 4}, {&sys, 6}, 2);
  auto f3 = ce.fill({&sys, 7}, 1, 0xabcdef);
  ASSERT_TRUE(f2.ok() && f3.ok());
  ASSERT_EQ((*f3)->wait(5s), errc::ok);
  EXPECT_TRUE((*f2)->is_signaled());
  EXPECT_EQ(sys.word(6, 16), 0x1111'0010u);
  EXPECT_EQ(sys.word(7, 0), 0xabcdefu);
  EXPECT_EQ(ce.stats().copies, 3u);
  EXPECT_EQ(ce.stats().pages, 5u);
}

TEST(CopyEngine, RejectsBadSpans) {
  test::test_mem sys(4);
  vram_pool v(4 * page_size);
  copy_engine ce;
  EXPECT_EQ(ce.copy({&sys, 3}, {&v, 0}, 2).error(), errc::inval);   // source overruns
  EXPECT_EQ(ce.copy({&sys, 0}, {&v, 4}, 1).error(), errc::inval);   // destination out of range
  EXPECT_EQ(ce.copy({nullptr, 0}, {&v, 0}, 1).error(), errc::inval);
  EXPECT_EQ(ce.copy({&sys, 0}, {&v, 0}, 0).error(), errc::inval);
  EXPECT_EQ(ce.fill({&v, 5}, 1).error(), errc::inval);
}

// A scattered copy moves each listed frame to its own destination as one
// request with one fence, and refuses bad lists without queueing anything.
TEST(CopyEngine, ScatteredCopyMovesEachPairAsOneRequest) {
  test::watchdog wd;
  test::test_mem sys(8);
  vram_pool v(8 * page_size);
  copy_engine ce;
  for (pfn_t p : {5u, 1u, 3u})
    for (std::size_t i = 0; i < page_size; i += 8) sys.set_word(p, i, p * 0x1000'0000 + i);
  const std::vector<frame_span> src{{&sys, 5}, {&sys, 1}, {&sys, 3}}, dst{{&v, 0}, {&v, 7}, {&v, 2}};
  auto f = ce.copy_list(src, dst);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ((*f)->wait(5s), errc::ok);
  auto vw = [&](pfn_t p, std::size_t off) {
    return std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(v.frame_data(p) + off)).load();
  };
  EXPECT_EQ(vw(0, 8), 5u * 0x1000'0000 + 8);
  EXPECT_EQ(vw(7, page_size - 8), 1u * 0x1000'0000 + page_size - 8);
  EXPECT_EQ(vw(2, 0), 3u * 0x1000'0000);
  EXPECT_EQ(vw(1, 0), 0u);  // not a destination
  EXPECT_EQ(ce.stats().copies, 1u);
  EXPECT_EQ(ce.stats().pages, 3u);
  const std::vector<frame_span> bad{{&sys, 9}};
  EXPECT_EQ(ce.copy_list(bad, std::span(dst).first(1)).error(), errc::inval);  // source out of range
  EXPECT_EQ(ce.copy_list(src, std::span(dst).first(2)).error(), errc::inval);  // lengths differ
  EXPECT_EQ(ce.copy_list({}, {}).error(), errc::inval);
  EXPECT_EQ(ce.stats().copies, 1u);
}

TEST(CopyEngine, ManyQueuedCopiesAllComplete) {
  test::watchdog wd;
  test::test_mem sys(64);
  auto made = device::create({.engines = 1, .vram_bytes = 64 * page_size});
  ASSERT_TRUE(made.ok());
  device& d = **made;
  std::vector<fence_ptr> fs;
  for (pfn_t i = 0; i < 64; ++i) {
    sys.set_word(i, 0, i + 1);
    auto f = d.copier().copy({&sys, i}, {&d.vram(), 63 - i}, 1);
    ASSERT_TRUE(f.ok());
    fs.push_back(*f);
  }
  for (auto& f : fs) ASSERT_EQ(f->wait(5s), errc::ok);
  for (pfn_t i = 0; i < 64; ++i)
    EXPECT_EQ(std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(d.vram().frame_data(63 - i))).load(),
              i + 1);
}

}  // namespace
}  // namespace svm::dev
