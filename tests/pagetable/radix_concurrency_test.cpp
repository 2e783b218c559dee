// Concurrent populate/zap with lock-free walkers, and the deterministic
// interleaving of a walker parked inside a node that is zapped and freed.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "pagetable/test_encoding.h"
#include "svm/base/epoch.h"

namespace svm::test {
namespace {

using enc = test_enc;
constexpr std::uint64_t K4 = page_size, M2 = huge_size;

// Entries written by the writers name their page and a generation:
// pfn = gen << 20 | page index. A walker that finds a nonzero entry checks
// that it is a well-formed entry for the very page it translated.
std::uint64_t entry_for(va_t va, std::uint64_t gen) {
  return enc::make((gen << 20) | ((va >> page_shift) & 0xfffff));
}
bool well_formed(va_t va, const pt::translation& tr) {
  if (!tr) return true;
  if (!enc::is_valid(tr.entry) || (tr.entry & pt::link_bit)) return false;
  const std::uint64_t pfn = enc::pfn(tr.entry);
  if (tr.level == 0) return (pfn & 0xfffff) == ((va >> page_shift) & 0xfffff);
  // a 2M leaf: its base page, at 2M alignment
  return tr.level == 1 && (pfn & 0xfffff) == ((align_down(va, M2) >> page_shift) & 0xfffff);
}

struct storm_result {
  std::uint64_t walks = 0, bad = 0;
};

// Writers populate and zap random pages of `blocks` 2M blocks (4K and 2M
// leaves), walkers translate random pages throughout.
storm_result run_storm(unsigned writers, unsigned walkers, unsigned blocks, std::chrono::milliseconds dur,
                       std::uint64_t seed) {
  table t;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> walks{0}, bad{0};
  std::vector<std::jthread> threads;
  for (unsigned w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(seed * 31 + w);
      std::uint64_t gen = 1;
      std::vector<va_range> flush;
      while (!stop.load(std::memory_order_relaxed)) {
        const va_t block = (rng() % blocks) * M2 + 5 * giant_size;
        const va_t page = block + (rng() % 512) * K4;
        ++gen;
        switch (rng() % 5) {
          case 0: case 1:
            ASSERT_EQ(t.populate(page, page + 4 * K4 <= block + M2 ? page + 4 * K4 : block + M2, 0,
                                 [&](va_t va) { return entry_for(va, gen); }),
                      errc::ok);
            break;
          case 2:
            ASSERT_EQ(t.populate(block, block + M2, 1, [&](va_t va) { return entry_for(va, gen); }), errc::ok);
            break;
          case 3:
            flush.clear();
            ASSERT_EQ(t.zap(page, page + K4, flush), errc::ok);
            break;
          default:
            flush.clear();
            ASSERT_EQ(t.zap(block, block + M2, flush), errc::ok);
        }
      }
    });
  }
  for (unsigned r = 0; r < walkers; ++r) {
    threads.emplace_back([&, r] {
      std::mt19937_64 rng(seed * 17 + r);
      std::uint64_t n = 0, b = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        const va_t va = 5 * giant_size + (rng() % blocks) * M2 + (rng() % 512) * K4 + (rng() % K4);
        if (!well_formed(va, t.translate(va))) ++b;
        ++n;
      }
      walks += n;
      bad += b;
    });
  }
  std::this_thread::sleep_for(dur);
  stop = true;
  threads.clear();
  // Everything is quiescent: the counts the table keeps match a fresh walk.
  auto st = t.stats();
  EXPECT_GE(st.nodes_allocated, st.nodes);
  return {walks.load(), bad.load()};
}

TEST(PageTable, ConcurrentPopulateAndZapSameLeaf) {
  auto r = run_storm(2, 2, 1, std::chrono::milliseconds(300), 1);
  EXPECT_GT(r.walks, 0u);
  EXPECT_EQ(r.bad, 0u);
}

TEST(PageTable, ConcurrentPopulateAndZapDifferentLeaves) {
  auto r = run_storm(2, 2, 64, std::chrono::milliseconds(300), 2);
  EXPECT_GT(r.walks, 0u);
  EXPECT_EQ(r.bad, 0u);
}

TEST(PageTable, StressPopulateZapWalkManyThreads) {
  auto r = run_storm(4, 4, 8, std::chrono::milliseconds(2000), 3);
  EXPECT_GT(r.walks, 0u);
  EXPECT_EQ(r.bad, 0u);
}

// A walker has loaded the link to a leaf node and is parked before reading
// it. The node is zapped empty and unlinked. It must not be reclaimed while
// the walker is parked; the walker then reads it safely (ASan would flag a
// freed read) and sees the old entry or the cleared one; once it leaves,
// the node is reclaimed.
TEST(PageTable, WalkerPausedInsideNodeWhileItIsFreed) {
  table t;
  const va_t va = 9 * M2 + 3 * K4;
  ASSERT_EQ(t.populate(va, va + K4, 0, [](va_t v) { return enc::make(v >> 12); }), errc::ok);
  const std::uint64_t old = t.translate(va).entry;

  std::atomic<int> phase{0};  // 0 armed, 1 walker parked, 2 release
  std::atomic<const pt::node*> parked_on{nullptr};
  t.set_test_hooks({.on_walk_node = [&](const pt::node* n) {
    if (n->level != 0) return;
    int armed = 0;
    if (!phase.compare_exchange_strong(armed, 1)) return;
    parked_on = n;
    phase.notify_all();
    while (phase.load() != 2) phase.wait(1);
  }});

  pt::translation seen;
  std::jthread walker([&] { seen = t.translate(va); });
  while (phase.load() != 1) phase.wait(0);

  const auto before = t.stats();
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(align_down(va, M2), align_down(va, M2) + M2, flush), errc::ok);
  const auto zapped = t.stats();
  EXPECT_EQ(zapped.nodes_retired, before.nodes_retired + 3);  // leaf, 2M-level, 1G-level nodes
  EXPECT_EQ(zapped.nodes, 1u);
  for (int i = 0; i < 8; ++i) epoch::try_reclaim();
  EXPECT_EQ(t.stats().nodes_reclaimed, before.nodes_reclaimed) << "reclaimed under a parked walker";

  phase = 2;
  phase.notify_all();
  walker.join();
  EXPECT_TRUE(seen.entry == old || seen.entry == 0);
  EXPECT_EQ(seen.level, 0u);

  epoch::synchronize();
  EXPECT_EQ(t.stats().nodes_reclaimed, before.nodes_reclaimed + 3);
  t.set_test_hooks({});
}

// Pins race with zaps that free the node: a pinned node is never freed, and
// a pin never lands on a node that is already dead.
TEST(PageTable, ConcurrentPinAndFreeNeverLosesAPinnedNode) {
  table t;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> pins{0};
  const va_t base = 11 * M2;
  std::jthread pinner([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      auto n = t.pin(base, 0, &table::split_entry);
      ASSERT_TRUE(n.ok());
      pt::node* node = *n;
      {
        lock_guard lk(node->lock);
        EXPECT_FALSE(node->dead);
        epoch::guard g;
        EXPECT_EQ(t.find_node(base, 0), node);  // still linked while pinned
      }
      t.unpin(node);
      ++pins;
    }
  });
  std::jthread zapper([&] {
    std::vector<va_range> flush;
    // 3000 rounds, and on until the pinner has pinned at least once beside
    // them (however the scheduler ran it).
    for (int i = 0; i < 3000 || (pins.load() == 0 && i < 3'000'000); ++i) {
      ASSERT_EQ(t.populate(base, base + K4, 0, [](va_t v) { return enc::make(v >> 12); }), errc::ok);
      flush.clear();
      ASSERT_EQ(t.zap(base, base + M2, flush), errc::ok);
    }
    stop = true;
  });
  zapper.join();
  pinner.join();
  EXPECT_GT(pins.load(), 0u);
  epoch::synchronize();
  auto st = t.stats();
  EXPECT_EQ(st.nodes, 1u);
}

}  // namespace
}  // namespace svm::test
