// Single-threaded behaviour of the radix page table: shapes, leaf sizes,
// splits, errors and accounting.
#include <gtest/gtest.h>

#include <vector>

#include "pagetable/test_encoding.h"
#include "svm/base/epoch.h"

namespace svm::test {
namespace {

using enc = test_enc;
constexpr std::uint64_t K4 = page_size, M2 = huge_size, G1 = giant_size;

// Maps va -> pfn = va >> 12 (identity-ish), so every entry names its VA.
auto ident = [](va_t va) { return enc::make(va >> page_shift); };

TEST(PageTable, EmptyTranslateFindsNothing) {
  table t;
  auto tr = t.translate(0x1234000);
  EXPECT_EQ(tr.entry, 0u);
  EXPECT_FALSE(tr);
  EXPECT_EQ(t.stats().nodes, 1u);
}

TEST(PageTable, Map4KTranslatesAtLevelZero) {
  table t;
  ASSERT_EQ(t.populate(0x40000000, 0x40003000, 0, ident), errc::ok);
  for (va_t va = 0x40000000; va < 0x40003000; va += K4) {
    auto tr = t.translate(va + 123);
    EXPECT_EQ(tr.level, 0u);
    EXPECT_EQ(tr.size(), K4);
    EXPECT_EQ(enc::pfn(tr.entry), va >> 12);
  }
  EXPECT_FALSE(t.translate(0x40003000));
  auto s = t.stats();
  EXPECT_EQ(s.leaves_4k, 3u);
  EXPECT_EQ(s.nodes, 4u);  // root + 1G-level + 2M-level + leaf node
}

TEST(PageTable, Map2MLeafTranslatesAtLevelOne) {
  table t;
  ASSERT_EQ(t.populate(2 * M2, 4 * M2, 1, ident), errc::ok);
  auto tr = t.translate(3 * M2 + 5 * K4);
  EXPECT_EQ(tr.level, 1u);
  EXPECT_EQ(tr.size(), M2);
  EXPECT_EQ(enc::pfn(tr.entry), (3 * M2) >> 12);
  EXPECT_EQ(t.stats().leaves_2m, 2u);
  EXPECT_EQ(t.stats().nodes, 3u);  // no level-0 node at all
}

TEST(PageTable, Map1GLeafTranslatesAtLevelTwo) {
  table t;
  ASSERT_EQ(t.populate(G1, 2 * G1, 2, ident), errc::ok);
  auto tr = t.translate(G1 + 77 * M2 + 3 * K4);
  EXPECT_EQ(tr.level, 2u);
  EXPECT_EQ(tr.size(), G1);
  EXPECT_EQ(enc::pfn(tr.entry), G1 >> 12);
  EXPECT_EQ(t.stats().leaves_1g, 1u);
}

TEST(PageTable, UnalignedRangeIsEinvalAndChangesNothing) {
  table t;
  auto before = t.stats();
  EXPECT_EQ(t.populate(0x1001, 0x3000, 0, ident), errc::inval);
  EXPECT_EQ(t.populate(0x1000, 0x3001, 0, ident), errc::inval);
  EXPECT_EQ(t.populate(0x1000, 0x1000, 0, ident), errc::inval);
  std::vector<va_range> f;
  EXPECT_EQ(t.zap(0x1800, 0x3000, f), errc::inval);
  EXPECT_TRUE(f.empty());
  auto after = t.stats();
  EXPECT_EQ(after.nodes, before.nodes);
  EXPECT_EQ(after.nodes_allocated, before.nodes_allocated);
}

TEST(PageTable, UnalignedHugeLeafIsEinval) {
  table t;
  EXPECT_EQ(t.populate(M2 + K4, 2 * M2 + K4, 1, ident), errc::inval);
  EXPECT_EQ(t.populate(M2, M2 + K4, 1, ident), errc::inval);
  EXPECT_EQ(t.populate(M2, 2 * M2, 2, ident), errc::inval);  // 1G leaf at 2M alignment
  EXPECT_EQ(t.populate(0, G1, 3, ident), errc::inval);       // no 512G leaves
  EXPECT_EQ(t.stats().nodes_allocated, 1u);
}

TEST(PageTable, OverflowAndOutOfRangeAreRejected) {
  table t;
  EXPECT_EQ(t.populate(0x3000, 0x1000, 0, ident), errc::overflow);
  EXPECT_EQ(t.populate(t.va_limit() - K4, t.va_limit() + K4, 0, ident), errc::range);
  EXPECT_EQ(t.populate(t.va_limit(), t.va_limit() + K4, 0, ident), errc::range);
  std::vector<va_range> f;
  EXPECT_EQ(t.zap(~va_t{0} & ~(K4 - 1), 0, f), errc::overflow);
  EXPECT_EQ(t.stats().nodes_allocated, 1u);
  EXPECT_FALSE(t.translate(t.va_limit()));
}

TEST(PageTable, VaZeroAndTopOfVaSpace) {
  table t;
  ASSERT_EQ(t.populate(0, K4, 0, ident), errc::ok);
  ASSERT_EQ(t.populate(t.va_limit() - K4, t.va_limit(), 0, ident), errc::ok);
  EXPECT_EQ(enc::pfn(t.translate(0).entry), 0u);
  EXPECT_EQ(enc::pfn(t.translate(t.va_limit() - 1).entry), (t.va_limit() - K4) >> 12);
  EXPECT_EQ(t.va_limit(), va_t{1} << 48);
  std::vector<va_range> f;
  ASSERT_EQ(t.zap(t.va_limit() - K4, t.va_limit(), f), errc::ok);
  EXPECT_FALSE(t.translate(t.va_limit() - 1));
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0], (va_range{t.va_limit() - K4, t.va_limit()}));
}

TEST(PageTable, RangeCrossingOneGigBoundary) {
  table t;
  const va_t s = G1 - 2 * K4, e = G1 + 2 * K4;
  ASSERT_EQ(t.populate(s, e, 0, ident), errc::ok);
  for (va_t va = s; va < e; va += K4) EXPECT_EQ(enc::pfn(t.translate(va).entry), va >> 12);
  auto st = t.stats();
  EXPECT_EQ(st.leaves_4k, 4u);
  EXPECT_EQ(st.nodes, 6u);  // root, one 512G-level node, two 1G-level nodes, two leaf nodes
}

TEST(PageTable, FiveLevelTableReaches57Bits) {
  table t(pt::options{.levels = 5});
  EXPECT_EQ(t.levels(), 5u);
  EXPECT_EQ(t.va_limit(), va_t{1} << 57);
  const va_t hi = (va_t{1} << 56) + 3 * G1;
  ASSERT_EQ(t.populate(hi, hi + M2, 1, ident), errc::ok);
  auto tr = t.translate(hi + 4 * K4);
  EXPECT_EQ(tr.level, 1u);
  EXPECT_EQ(enc::pfn(tr.entry), hi >> 12);
  table four;
  EXPECT_EQ(four.populate(hi, hi + M2, 1, ident), errc::range);
}

TEST(PageTable, PartialZapSplits2MLeaf) {
  table t;
  ASSERT_EQ(t.populate(0, M2, 1, ident), errc::ok);
  std::vector<va_range> flush;
  std::vector<std::pair<va_t, std::uint64_t>> cleared;
  ASSERT_EQ(t.zap(16 * K4, 18 * K4, flush,
                  [&](va_t va, std::uint64_t old, unsigned lvl) {
                    EXPECT_EQ(lvl, 0u);
                    cleared.emplace_back(va, old);
                  }),
            errc::ok);
  ASSERT_EQ(flush.size(), 1u);
  EXPECT_EQ(flush[0], (va_range{16 * K4, 18 * K4}));
  ASSERT_EQ(cleared.size(), 2u);
  EXPECT_EQ(enc::pfn(cleared[0].second), 16u);
  EXPECT_EQ(enc::pfn(cleared[1].second), 17u);
  for (va_t va = 0; va < M2; va += K4) {
    auto tr = t.translate(va);
    if (va >= 16 * K4 && va < 18 * K4) {
      EXPECT_FALSE(tr) << va;
    } else {
      EXPECT_EQ(tr.level, 0u);
      EXPECT_EQ(enc::pfn(tr.entry), va >> 12) << va;  // split kept the translation
    }
  }
  EXPECT_EQ(t.stats().leaves_4k, 510u);
  EXPECT_EQ(t.stats().leaves_2m, 0u);
}

TEST(PageTable, PartialZapSplits1GLeafDownToFourK) {
  table t;
  ASSERT_EQ(t.populate(G1, 2 * G1, 2, ident), errc::ok);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(G1 + 5 * M2 + K4, G1 + 5 * M2 + 2 * K4, flush), errc::ok);
  EXPECT_EQ(flush, (std::vector<va_range>{{G1 + 5 * M2 + K4, G1 + 5 * M2 + 2 * K4}}));
  auto st = t.stats();
  EXPECT_EQ(st.leaves_1g, 0u);
  EXPECT_EQ(st.leaves_2m, 511u);
  EXPECT_EQ(st.leaves_4k, 511u);
  EXPECT_EQ(t.translate(G1 + 7 * M2).level, 1u);
  EXPECT_EQ(enc::pfn(t.translate(G1 + 7 * M2 + 9 * K4).entry), (G1 + 7 * M2) >> 12);
  EXPECT_EQ(enc::pfn(t.translate(G1 + 5 * M2 + 3 * K4).entry), (G1 + 5 * M2 + 3 * K4) >> 12);
  EXPECT_FALSE(t.translate(G1 + 5 * M2 + K4));
}

TEST(PageTable, ZapWithoutSplitClearsWholeHugeLeaf) {
  table t;
  ASSERT_EQ(t.populate(0, M2, 1, ident), errc::ok);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(K4, 2 * K4, flush, pt::zap_options{.split_huge = false}), errc::ok);
  EXPECT_EQ(flush, (std::vector<va_range>{{0, M2}}));
  EXPECT_FALSE(t.translate(0));
  EXPECT_FALSE(t.translate(M2 - K4));
}

TEST(PageTable, ZapFreesEmptyNodesAfterGracePeriod) {
  table t;
  ASSERT_EQ(t.populate(3 * G1, 3 * G1 + 4 * M2, 0, ident), errc::ok);
  EXPECT_EQ(t.stats().nodes, 1u + 1 + 1 + 4);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(3 * G1, 3 * G1 + 4 * M2, flush), errc::ok);
  EXPECT_EQ(flush, (std::vector<va_range>{{3 * G1, 3 * G1 + 4 * M2}}));
  auto st = t.stats();
  EXPECT_EQ(st.nodes, 1u);  // only the root is still linked
  EXPECT_EQ(st.nodes_retired, 6u);
  epoch::synchronize();
  EXPECT_EQ(t.stats().nodes_reclaimed, 6u);
}

TEST(PageTable, ZapOfEmptyRangeReportsNoFlush) {
  table t;
  ASSERT_EQ(t.populate(0, K4, 0, ident), errc::ok);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(M2, 2 * M2, flush), errc::ok);
  EXPECT_TRUE(flush.empty());
  EXPECT_TRUE(t.translate(0));
}

TEST(PageTable, AdjacentFlushRangesMerge) {
  table t;
  ASSERT_EQ(t.populate(M2 - 2 * K4, M2 + 2 * K4, 0, ident), errc::ok);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(0, 2 * M2, flush), errc::ok);
  // Two leaf nodes, one flush range each (just what was cleared), merged
  // because they touch.
  EXPECT_EQ(flush, (std::vector<va_range>{{M2 - 2 * K4, M2 + 2 * K4}}));
}

// The node's log of its recent sequence advances: two generations of
// extents. A snapshot is still good for a window its generation's extent
// misses, and never for one inside it or older than both generations.
TEST(PageTable, NodeLogTellsDisjointAdvancesFromOverlappingOnes) {
  table t;
  auto pinned = t.pin(0, 0, &table::split_entry);
  ASSERT_TRUE(pinned.ok());
  pt::node* n = *pinned;
  auto bump = [n](unsigned first, unsigned last) {
    lock_guard g(n->lock);
    n->bump_seq_locked(first, last);
  };
  const auto snap = n->read_seq();
  ASSERT_EQ(snap, 0u);
  EXPECT_TRUE(n->unchanged_since(snap, 0, 511));
  bump(10, 19);
  EXPECT_TRUE(n->unchanged_since(snap, 0, 9));
  EXPECT_TRUE(n->unchanged_since(snap, 20, 511));
  EXPECT_FALSE(n->unchanged_since(snap, 19, 19));
  EXPECT_FALSE(n->unchanged_since(snap, 0, 10));
  EXPECT_FALSE(n->unchanged_since(snap, 0, 511));
  bump(300, 300);
  EXPECT_TRUE(n->unchanged_since(snap, 0, 9));
  EXPECT_TRUE(n->unchanged_since(snap, 301, 511));
  EXPECT_FALSE(n->unchanged_since(snap, 15, 15));    // the older advance
  EXPECT_FALSE(n->unchanged_since(snap, 300, 301));  // the newer one
  EXPECT_FALSE(n->unchanged_since(snap, 100, 100));  // between them: one extent covers both
  for (int i = 0; i < 6; ++i) bump(500, 500);        // seq 8: the young generation is full
  bump(505, 505);                                    // seq 9: a new young generation
  EXPECT_TRUE(n->unchanged_since(8, 0, 504));        // only the newest advance since 8
  EXPECT_TRUE(n->unchanged_since(7, 0, 9));          // the old generation covers 7..9
  EXPECT_FALSE(n->unchanged_since(7, 100, 100));
  EXPECT_FALSE(n->unchanged_since(8, 505, 505));
  for (int i = 0; i < 8; ++i) bump(505, 505);        // seq 17: the generations move on again
  EXPECT_FALSE(n->unchanged_since(7, 0, 9));         // older than both generations
  EXPECT_TRUE(n->unchanged_since(8, 0, 9));
  EXPECT_TRUE(n->unchanged_since(17, 505, 505));     // seq still at that snapshot
  bump(0, 511);                                      // no narrower extent: the whole node
  EXPECT_FALSE(n->unchanged_since(17, 0, 0));
  t.unpin(n);
}

// Zaps log what they covered: a leaf node's advance covers the zapped pages
// only; an empty 2M-level slot's advance covers the slots zapped.
TEST(PageTable, ZapLogsTheEntriesItCovered) {
  table t;
  ASSERT_EQ(t.populate(0, M2, 0, ident), errc::ok);
  auto pinned = t.pin(0, 0, &table::split_entry);
  ASSERT_TRUE(pinned.ok());
  pt::node* leaf = *pinned;
  const auto snap = leaf->read_seq();
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(5 * K4, 8 * K4, flush, pt::zap_options{.bump_seq = true}), errc::ok);
  EXPECT_TRUE(leaf->unchanged_since(snap, 0, 4));
  EXPECT_FALSE(leaf->unchanged_since(snap, 4, 5));
  EXPECT_FALSE(leaf->unchanged_since(snap, 7, 7));
  EXPECT_TRUE(leaf->unchanged_since(snap, 8, 511));
  pt::node* l1 = leaf->parent;
  const auto s1 = l1->read_seq();
  ASSERT_EQ(t.zap(4 * M2, 6 * M2, flush, pt::zap_options{.bump_seq = true}), errc::ok);
  EXPECT_TRUE(l1->unchanged_since(s1, 0, 3));
  EXPECT_FALSE(l1->unchanged_since(s1, 5, 5));
  EXPECT_TRUE(l1->unchanged_since(s1, 6, 511));
  t.unpin(leaf);
}

TEST(PageTable, ZapBumpsSequenceOfLeafAndOfEmptyParent) {
  table t;
  ASSERT_EQ(t.populate(0, K4, 0, ident), errc::ok);
  auto pinned = t.pin(0, 0, &table::split_entry);
  ASSERT_TRUE(pinned.ok());
  pt::node* leaf = *pinned;
  pt::node* l1 = leaf->parent;
  const auto s_leaf = leaf->read_seq(), s_l1 = l1->read_seq();
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(0, K4, flush, pt::zap_options{.bump_seq = true}), errc::ok);
  EXPECT_EQ(leaf->read_seq(), s_leaf + 1);
  EXPECT_EQ(l1->read_seq(), s_l1);  // the walk ended in the leaf node
  // A range with no leaf node: the walk ends at the 2M-level node.
  ASSERT_EQ(t.zap(5 * M2, 6 * M2, flush, pt::zap_options{.bump_seq = true}), errc::ok);
  EXPECT_EQ(l1->read_seq(), s_l1 + 1);
  EXPECT_EQ(leaf->read_seq(), s_leaf + 1);
  t.unpin(leaf);
}

TEST(PageTable, PinnedEmptyNodeSurvivesZapAndIsFreedOnUnpin) {
  table t;
  auto n = t.pin(7 * M2, 0, &table::split_entry);
  ASSERT_TRUE(n.ok());
  ASSERT_EQ(t.populate(7 * M2, 7 * M2 + K4, 0, ident), errc::ok);
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(7 * M2, 8 * M2, flush), errc::ok);
  EXPECT_EQ(t.stats().nodes, 4u);  // still linked: pinned
  {
    epoch::guard g;
    EXPECT_EQ(t.find_node(7 * M2, 0), *n);
  }
  t.unpin(*n);
  EXPECT_EQ(t.stats().nodes, 1u);
}

TEST(PageTable, Populate2MOverUnpinnedTableCollapsesIt) {
  table t;
  ASSERT_EQ(t.populate(M2, M2 + 8 * K4, 0, [](va_t va) { return enc::make(1000 + (va >> 12)); }), errc::ok);
  EXPECT_EQ(t.stats().nodes, 4u);
  ASSERT_EQ(t.populate(M2, 2 * M2, 1, ident), errc::ok);
  auto st = t.stats();
  EXPECT_EQ(st.nodes, 3u);
  EXPECT_EQ(st.leaves_2m, 1u);
  EXPECT_EQ(st.leaves_4k, 0u);
  EXPECT_EQ(t.translate(M2 + K4).level, 1u);
}

TEST(PageTable, Populate2MOverPinnedTableWritesEquivalentEntries) {
  table t;
  ASSERT_EQ(t.populate(M2, M2 + 8 * K4, 0, [](va_t va) { return enc::make(1000 + (va >> 12)); }), errc::ok);
  auto n = t.pin(M2, 0, &table::split_entry);
  ASSERT_TRUE(n.ok());
  ASSERT_EQ(t.populate(M2, 2 * M2, 1, ident), errc::ok);
  for (va_t va = M2; va < 2 * M2; va += 64 * K4) {
    auto tr = t.translate(va);
    EXPECT_EQ(tr.level, 0u);
    EXPECT_EQ(enc::pfn(tr.entry), va >> 12);
  }
  EXPECT_EQ(t.stats().leaves_4k, 512u);
  t.unpin(*n);
}

TEST(PageTable, Populate4KInsideHugeLeafSplitsAndKeepsTheRest) {
  table t;
  ASSERT_EQ(t.populate(0, M2, 1, ident), errc::ok);
  ASSERT_EQ(t.populate(3 * K4, 4 * K4, 0, [](va_t) { return enc::make(99999, false); }), errc::ok);
  EXPECT_EQ(enc::pfn(t.translate(3 * K4).entry), 99999u);
  EXPECT_EQ(t.translate(3 * K4).entry & enc::write, 0u);
  EXPECT_EQ(enc::pfn(t.translate(4 * K4).entry), 4u);
  EXPECT_EQ(enc::pfn(t.translate(2 * K4).entry), 2u);
  EXPECT_EQ(t.stats().leaves_4k, 512u);
}

TEST(PageTable, AllocationFailureLeavesEntriesUnchanged) {
  table t;
  ASSERT_EQ(t.populate(0, K4, 0, ident), errc::ok);
  int allowed = 1;
  t.set_alloc_failure([&](unsigned) { return allowed-- <= 0; });
  // Needs a new leaf node for each of two 2M blocks: the second fails.
  EXPECT_EQ(t.populate(4 * M2, 6 * M2, 0, ident), errc::nomem);
  EXPECT_FALSE(t.translate(4 * M2));
  EXPECT_FALSE(t.translate(5 * M2));
  EXPECT_TRUE(t.translate(0));
  EXPECT_EQ(t.stats().leaves_4k, 1u);
  // A split that cannot allocate reports ENOMEM and keeps the huge leaf.
  t.set_alloc_failure(nullptr);
  ASSERT_EQ(t.populate(G1, G1 + M2, 1, ident), errc::ok);
  t.set_alloc_failure([](unsigned) { return true; });
  std::vector<va_range> flush;
  EXPECT_EQ(t.zap(G1, G1 + K4, flush), errc::nomem);
  EXPECT_TRUE(flush.empty());
  EXPECT_EQ(t.translate(G1).level, 1u);
  t.set_alloc_failure(nullptr);
}

TEST(PageTable, RepopulateReplacesEntriesInPlace) {
  table t;
  ASSERT_EQ(t.populate(0, 4 * K4, 0, ident), errc::ok);
  ASSERT_EQ(t.populate(K4, 2 * K4, 0, [](va_t) { return enc::make(42, false); }), errc::ok);
  EXPECT_EQ(enc::pfn(t.translate(K4).entry), 42u);
  EXPECT_EQ(t.stats().leaves_4k, 4u);
}

TEST(PageTable, AccountingCountsNodesAndLeaves) {
  // 1 GiB of 4K leaves: 512 leaf nodes under one 1G-level node, one
  // 512G-level node and the root; the bytes are exactly the live nodes.
  table t;
  ASSERT_EQ(t.populate(G1, 2 * G1, 0, ident), errc::ok);
  auto s4 = t.stats();
  EXPECT_EQ(s4.leaves_4k, 512u * 512);
  EXPECT_EQ(s4.nodes, 512u + 3);
  EXPECT_EQ(s4.bytes, s4.nodes * sizeof(pt::node));
  EXPECT_LE(static_cast<double>(s4.bytes) / (512.0 * 512), 8.2);  // P7 with 4K leaves
  table h;
  ASSERT_EQ(h.populate(G1, 2 * G1, 1, ident), errc::ok);
  auto s2 = h.stats();
  EXPECT_EQ(s2.leaves_2m, 512u);
  EXPECT_EQ(s2.nodes, 3u);
  EXPECT_LE(static_cast<double>(s2.bytes) / (512.0 * 512), 0.05);  // P7 with 2M leaves
}

TEST(PageTable, ZapWithMatchClearsOnlyTaggedLeaves) {
  table t;
  constexpr std::uint64_t tag = 1u << 11;
  ASSERT_EQ(t.populate(0, 4 * K4, 0, [](va_t va) { return enc::make(va >> 12) | ((va >> 12) % 2 ? tag : 0); }),
            errc::ok);
  ASSERT_EQ(t.populate(M2, 2 * M2, 1, [](va_t va) { return enc::make(va >> 12) | tag; }), errc::ok);
  std::vector<va_range> flush;
  int cleared = 0;
  ASSERT_EQ(t.zap(0, 2 * M2, flush, [&](va_t, std::uint64_t e, unsigned) { cleared += (e & tag) == 0; },
                  pt::zap_options{.match_mask = tag, .match_value = 0}),
            errc::ok);
  EXPECT_EQ(cleared, 2);
  EXPECT_FALSE(t.translate(0));
  EXPECT_TRUE(t.translate(K4));
  EXPECT_FALSE(t.translate(2 * K4));
  EXPECT_TRUE(t.translate(3 * K4));
  EXPECT_EQ(t.translate(M2 + K4).level, 1u);  // the tagged huge leaf stays whole
}

TEST(PageTable, AnyLeafSkipsEmptySubtrees) {
  table t;
  EXPECT_FALSE(t.any_leaf(0, t.va_limit()));
  ASSERT_EQ(t.populate(3 * G1 + 5 * K4, 3 * G1 + 6 * K4, 0, ident), errc::ok);
  EXPECT_TRUE(t.any_leaf(0, t.va_limit()));
  EXPECT_TRUE(t.any_leaf(3 * G1 + 5 * K4, 3 * G1 + 6 * K4));
  EXPECT_FALSE(t.any_leaf(3 * G1, 3 * G1 + 5 * K4));
  EXPECT_FALSE(t.any_leaf(3 * G1 + 6 * K4, 4 * G1));
}

TEST(PageTable, FreeingAChildAdvancesTheParentSequence) {
  table t;
  ASSERT_EQ(t.populate(M2, M2 + K4, 0, ident), errc::ok);
  auto l1 = t.pin(M2, 1, &table::split_entry);
  ASSERT_TRUE(l1.ok());
  const auto before = (*l1)->read_seq();
  std::vector<va_range> flush;
  ASSERT_EQ(t.zap(M2, 2 * M2, flush), errc::ok);  // frees the leaf node under l1
  EXPECT_GT((*l1)->read_seq(), before);
  t.unpin(*l1);
}

TEST(PageTable, PinRejectsBadArguments) {
  table t;
  EXPECT_EQ(t.pin(0, 9, &table::split_entry).error(), errc::inval);
  EXPECT_EQ(t.pin(t.va_limit(), 0, &table::split_entry).error(), errc::inval);
  ASSERT_EQ(t.populate(0, M2, 1, ident), errc::ok);
  EXPECT_EQ(t.pin(0, 0, nullptr).error(), errc::exist);
  EXPECT_EQ(t.translate(0).level, 1u);
}

}  // namespace
}  // namespace svm::test
