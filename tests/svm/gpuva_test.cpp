#include "svm/svm/gpuva.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <new>
#include <random>
#include <tuple>
#include <vector>

// Allocation counting, to check that commit() allocates nothing. Counts only
// on the thread that armed it.
namespace {
thread_local bool tl_count_allocs = false;
thread_local long tl_allocs = 0;
}  // namespace

// GCC sees through the replacement and flags the malloc/free pairing it
// itself produces; the pairing is consistent (every new here is malloc).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  if (tl_count_allocs) ++tl_allocs;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace svm {
namespace {

constexpr std::uint64_t P = page_size;
constexpr std::uint64_t big_bo = std::uint64_t{1} << 40;

struct desc {
  va_t start;
  va_t end;
  bo_handle bo;
  std::uint64_t offset;
  friend bool operator==(const desc&, const desc&) = default;
};
std::ostream& operator<<(std::ostream& os, const desc& d) {
  return os << "[" << d.start / P << "," << d.end / P << ") bo" << d.bo << "@" << d.offset / P;
}
desc d(std::uint64_t s, std::uint64_t e, bo_handle bo, std::uint64_t off) { return {s * P, e * P, bo, off * P}; }

static constexpr lock_class vm_class{"gpu_vm.lock", lockdep::rank::vm};

class GpuvaTest : public ::testing::Test {
 protected:
  explicit GpuvaTest(gpuva_tree_options o = {}) : tree_(vm_lock_, o) {}

  result<gpuva_plan> plan_map(std::uint64_t pg, std::uint64_t n, bo_handle bo, std::uint64_t off_pg,
                              gpuva_flags fl = 0, std::uint64_t bo_size = big_bo) {
    lock_guard g(vm_lock_);
    return tree_.plan_map({pg * P, n * P, bo, off_pg * P, bo_size, fl});
  }
  errc map(std::uint64_t pg, std::uint64_t n, bo_handle bo, std::uint64_t off_pg, gpuva_flags fl = 0) {
    lock_guard g(vm_lock_);
    auto p = tree_.plan_map({pg * P, n * P, bo, off_pg * P, big_bo, fl});
    if (!p) return p.error();
    tree_.commit(*p);
    return errc::ok;
  }
  errc unmap(std::uint64_t pg, std::uint64_t n) {
    lock_guard g(vm_lock_);
    auto p = tree_.plan_unmap(pg * P, n * P);
    if (!p) return p.error();
    tree_.commit(*p);
    return errc::ok;
  }
  void commit(gpuva_plan& p) {
    lock_guard g(vm_lock_);
    tree_.commit(p);
  }
  std::vector<desc> dump() {
    shared_lock_guard g(vm_lock_);
    std::vector<desc> out;
    tree_.for_each([&](const gpuva& v) { out.push_back({v.start(), v.end(), v.bo(), v.bo_offset()}); });
    EXPECT_TRUE(tree_.check_invariants());
    return out;
  }
  static std::vector<gpuva_op_kind> kinds(const gpuva_plan& p) {
    std::vector<gpuva_op_kind> k;
    for (const auto& op : p.ops()) k.push_back(op.kind);
    return k;
  }
  static desc of(const gpuva* v) { return {v->start(), v->end(), v->bo(), v->bo_offset()}; }

  shared_mutex vm_lock_{vm_class};
  gpuva_tree tree_;
};

using K = gpuva_op_kind;

TEST_F(GpuvaTest, MapIntoEmpty) {
  auto p = plan_map(16, 4, 1, 0);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::map}));
  EXPECT_EQ(p->ops()[0].write_range(), (va_range{16 * P, 20 * P}));
  EXPECT_TRUE(p->ops()[0].clear_range().empty());
  commit(*p);
  EXPECT_TRUE(p->committed());
  EXPECT_EQ(dump(), (std::vector{d(16, 20, 1, 0)}));
  shared_lock_guard g(vm_lock_);
  EXPECT_EQ(tree_.find(15 * P), nullptr);
  ASSERT_NE(tree_.find(16 * P), nullptr);
  EXPECT_EQ(tree_.find(20 * P - 1)->bo(), 1u);
  EXPECT_EQ(tree_.find(20 * P), nullptr);
}

TEST_F(GpuvaTest, MapOverTheMiddleSplitsIntoTwo) {
  ASSERT_EQ(map(0, 16, 1, 100), errc::ok);
  auto p = plan_map(4, 4, 2, 0);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::remap, K::map}));
  const gpuva_op& r = p->ops()[0];
  EXPECT_EQ(of(r.old), d(0, 16, 1, 100));
  EXPECT_EQ(of(r.prev), d(0, 4, 1, 100));
  EXPECT_EQ(of(r.next), d(8, 16, 1, 108));
  EXPECT_EQ(r.clear_range(), (va_range{4 * P, 8 * P}));
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(0, 4, 1, 100), d(4, 8, 2, 0), d(8, 16, 1, 108)}));
}

TEST_F(GpuvaTest, MapSpanningSeveralMappings) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(4, 4, 2, 0), errc::ok);
  ASSERT_EQ(map(10, 2, 3, 0), errc::ok);  // hole at [8,10)
  ASSERT_EQ(map(12, 4, 4, 0), errc::ok);
  auto p = plan_map(2, 12, 5, 0);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::remap, K::unmap, K::unmap, K::remap, K::map}));
  EXPECT_EQ(of(p->ops()[0].prev), d(0, 2, 1, 0));
  EXPECT_EQ(p->ops()[0].next, nullptr);
  EXPECT_EQ(p->ops()[0].clear_range(), (va_range{2 * P, 4 * P}));
  EXPECT_EQ(p->ops()[1].clear_range(), (va_range{4 * P, 8 * P}));
  EXPECT_EQ(of(p->ops()[3].next), d(14, 16, 4, 2));
  EXPECT_EQ(p->ops()[3].clear_range(), (va_range{12 * P, 14 * P}));
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(0, 2, 1, 0), d(2, 14, 5, 0), d(14, 16, 4, 2)}));
}

TEST_F(GpuvaTest, MapExactlyOverAMappingReplacesIt) {
  ASSERT_EQ(map(8, 8, 1, 0), errc::ok);
  auto p = plan_map(8, 8, 2, 8);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::unmap, K::map}));
  EXPECT_FALSE(p->ops()[0].merged);
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(8, 16, 2, 8)}));
}

TEST_F(GpuvaTest, UnmapTrimsBothEdges) {
  ASSERT_EQ(map(0, 16, 1, 0), errc::ok);
  ASSERT_EQ(unmap(0, 4), errc::ok);
  EXPECT_EQ(dump(), (std::vector{d(4, 16, 1, 4)}));
  auto p = [&] {
    lock_guard g(vm_lock_);
    return tree_.plan_unmap(12 * P, 8 * P);  // past the end, over nothing
  }();
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::remap}));
  EXPECT_EQ(of(p->ops()[0].prev), d(4, 12, 1, 4));
  EXPECT_EQ(p->ops()[0].clear_range(), (va_range{12 * P, 16 * P}));
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(4, 12, 1, 4)}));
}

TEST_F(GpuvaTest, UnmapInTheMiddleSplits) {
  ASSERT_EQ(map(0, 16, 1, 0), errc::ok);
  ASSERT_EQ(unmap(6, 2), errc::ok);
  EXPECT_EQ(dump(), (std::vector{d(0, 6, 1, 0), d(8, 16, 1, 8)}));
}

TEST_F(GpuvaTest, UnmapAcrossHoles) {
  ASSERT_EQ(map(0, 2, 1, 0), errc::ok);
  ASSERT_EQ(map(4, 2, 2, 0), errc::ok);
  ASSERT_EQ(map(8, 2, 3, 0), errc::ok);
  lock_guard g(vm_lock_);
  auto p = tree_.plan_unmap(1 * P, 8 * P);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::remap, K::unmap, K::remap}));
  tree_.commit(*p);
  std::vector<desc> got;
  tree_.for_each([&](const gpuva& v) { got.push_back(of(&v)); });
  EXPECT_EQ(got, (std::vector{d(0, 1, 1, 0), d(9, 10, 3, 1)}));
}

TEST_F(GpuvaTest, UnmapOfNothingIsAnEmptyPlan) {
  ASSERT_EQ(map(0, 2, 1, 0), errc::ok);
  lock_guard g(vm_lock_);
  auto p = tree_.plan_unmap(100 * P, 8 * P);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->empty());
  tree_.commit(*p);
  EXPECT_EQ(tree_.size(), 1u);
}

TEST_F(GpuvaTest, MergesWithContiguousLeftNeighbour) {
  ASSERT_EQ(map(0, 4, 1, 10), errc::ok);
  auto p = plan_map(4, 4, 1, 14);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::unmap, K::map}));
  EXPECT_TRUE(p->ops()[0].merged);
  EXPECT_TRUE(p->ops()[0].clear_range().empty());  // its PTEs stay
  EXPECT_EQ(of(p->ops()[1].map), d(0, 8, 1, 10));
  EXPECT_EQ(p->ops()[1].write_range(), (va_range{4 * P, 8 * P}));  // only the request
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(0, 8, 1, 10)}));
}

TEST_F(GpuvaTest, FillingAHoleMergesBothNeighbours) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(8, 4, 1, 8), errc::ok);
  auto p = plan_map(4, 4, 1, 4);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::unmap, K::unmap, K::map}));
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(0, 12, 1, 0)}));
}

TEST_F(GpuvaTest, MergesWithTheRemainingPiecesOfASplit) {
  ASSERT_EQ(map(0, 16, 1, 0), errc::ok);
  ASSERT_EQ(map(16, 4, 2, 0), errc::ok);
  // Rebinding a sub-range of bo1 at its own offsets changes no translation:
  // it absorbs both pieces, so the mapping stays whole.
  auto p = plan_map(4, 4, 1, 4);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(kinds(*p), (std::vector{K::unmap, K::map}));
  EXPECT_EQ(of(p->ops()[1].map), d(0, 16, 1, 0));
  commit(*p);
  EXPECT_EQ(dump(), (std::vector{d(0, 16, 1, 0), d(16, 20, 2, 0)}));
  // Partially over bo2, contiguous with bo1's tail: the left piece of bo1's
  // split merges, bo2's remainder stays separate.
  ASSERT_EQ(map(14, 4, 1, 14), errc::ok);
  EXPECT_EQ(dump(), (std::vector{d(0, 18, 1, 0), d(18, 20, 2, 2)}));
}

TEST_F(GpuvaTest, NoMergeAcrossBoOffsetOrFlagsDifferences) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(4, 4, 1, 5), errc::ok);      // offset gap
  ASSERT_EQ(map(8, 4, 2, 9), errc::ok);      // other BO
  ASSERT_EQ(map(12, 4, 2, 13, 1), errc::ok);  // other flags
  EXPECT_EQ(dump().size(), 4u);
}

class GpuvaNoMergeTest : public GpuvaTest {
 protected:
  GpuvaNoMergeTest() : GpuvaTest(gpuva_tree_options{{0, std::uint64_t{1} << 48}, false}) {}
};

TEST_F(GpuvaNoMergeTest, MergeDisabledKeepsNeighboursApart) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(4, 4, 1, 4), errc::ok);
  ASSERT_EQ(map(0, 16, 2, 0), errc::ok);
  ASSERT_EQ(map(4, 4, 2, 4), errc::ok);  // would rejoin with merging
  EXPECT_EQ(dump(), (std::vector{d(0, 4, 2, 0), d(4, 8, 2, 4), d(8, 16, 2, 8)}));
}

TEST_F(GpuvaTest, DroppedPlansLeaveTheTreeUnchanged) {
  ASSERT_EQ(map(0, 8, 1, 0), errc::ok);
  ASSERT_EQ(map(8, 8, 2, 0), errc::ok);
  const auto before = dump();
  {
    auto p1 = plan_map(4, 8, 3, 0);
    ASSERT_TRUE(p1.ok());
    EXPECT_EQ(p1->ops().size(), 3u);
  }
  {
    lock_guard g(vm_lock_);
    auto p2 = tree_.plan_unmap(2 * P, 4 * P);
    ASSERT_TRUE(p2.ok());
  }
  {
    auto p3 = plan_map(8, 4, 1, 8);  // would merge
    ASSERT_TRUE(p3.ok());
  }
  EXPECT_EQ(dump(), before);
  // And a later plan still commits fine.
  ASSERT_EQ(map(4, 8, 3, 0), errc::ok);
  EXPECT_EQ(dump(), (std::vector{d(0, 4, 1, 0), d(4, 12, 3, 0), d(12, 16, 2, 4)}));
}

TEST_F(GpuvaTest, EveryErrorLeavesTheTreeUnchanged) {
  ASSERT_EQ(map(0, 8, 1, 0), errc::ok);
  const auto before = dump();
  lock_guard g(vm_lock_);
  auto err = [&](gpuva_map_req r) { return tree_.plan_map(r).error(); };
  EXPECT_EQ(err({0, 0, 2, 0, big_bo, 0}), errc::inval);              // zero size
  EXPECT_EQ(err({P / 2, P, 2, 0, big_bo, 0}), errc::inval);           // unaligned va
  EXPECT_EQ(err({0, P + 1, 2, 0, big_bo, 0}), errc::inval);           // unaligned size
  EXPECT_EQ(err({0, P, 2, 512, big_bo, 0}), errc::inval);             // unaligned offset
  EXPECT_EQ(err({~std::uint64_t{0} - P + 1, 2 * P, 2, 0, big_bo, 0}), errc::overflow);
  EXPECT_EQ(err({std::uint64_t{0} - P, P, 2, 0, big_bo, 0}), errc::overflow);  // end == 2^64
  EXPECT_EQ(err({std::uint64_t{1} << 48, P, 2, 0, big_bo, 0}), errc::inval);  // outside managed
  EXPECT_EQ(err({0, 4 * P, 2, 0, 3 * P, 0}), errc::inval);            // past the BO's end
  EXPECT_EQ(err({0, 4 * P, 2, 2 * P, 5 * P, 0}), errc::inval);        // past it via offset
  EXPECT_EQ(err({0, 4 * P, 2, ~std::uint64_t{0} - P + 1, big_bo, 0}), errc::inval);  // offset wraps
  EXPECT_EQ(err({0, 4 * P, 2, P, 5 * P, 0}), errc::ok);               // exactly to the end
  EXPECT_EQ(tree_.plan_unmap(0, 0).error(), errc::inval);
  EXPECT_EQ(tree_.plan_unmap(P / 2, P).error(), errc::inval);
  EXPECT_EQ(tree_.plan_unmap(P, 3).error(), errc::inval);
  EXPECT_EQ(tree_.plan_unmap(~std::uint64_t{0} - P + 1, 2 * P).error(), errc::overflow);
  std::vector<desc> got;
  tree_.for_each([&](const gpuva& v) { got.push_back(of(&v)); });
  EXPECT_EQ(got, before);
}

struct test_bos final : gpuva_bo_resolver {
  result<std::uint64_t> bo_size(bo_handle bo) const override {
    if (bo == 7) return 16 * P;
    return errc::noent;
  }
};

TEST_F(GpuvaTest, ResolverHookRejectsUnknownBoAndBindPastItsEnd) {
  test_bos bos;
  lock_guard g(vm_lock_);
  EXPECT_EQ(tree_.plan_map(0, 4 * P, 8, 0, 0, bos).error(), errc::noent);
  EXPECT_EQ(tree_.plan_map(0, 4 * P, 7, 13 * P, 0, bos).error(), errc::inval);
  EXPECT_EQ(tree_.plan_map(0, 0, 8, 0, 0, bos).error(), errc::inval);  // range checks first
  auto p = tree_.plan_map(0, 4 * P, 7, 12 * P, 0, bos);
  ASSERT_TRUE(p.ok());
  tree_.commit(*p);
  EXPECT_EQ(tree_.size(), 1u);
}

struct recording_visitor final : gpuva_ops_visitor {
  const gpuva_tree* tree = nullptr;
  std::vector<std::pair<K, va_range>> steps;
  bool consistent = true;
  void sm_step_map(const gpuva_op& op) noexcept override {
    steps.emplace_back(K::map, op.write_range());
    consistent &= tree->find(op.req.start) == op.map;  // already applied
  }
  void sm_step_remap(const gpuva_op& op) noexcept override {
    steps.emplace_back(K::remap, op.clear_range());
    consistent &= tree->find(op.req.start) != op.old;
    if (op.prev) consistent &= tree->find(op.prev->start()) == op.prev;
    if (op.next) consistent &= tree->find(op.next->start()) == op.next;
  }
  void sm_step_unmap(const gpuva_op& op) noexcept override {
    steps.emplace_back(K::unmap, op.clear_range());
    consistent &= tree->find(op.old->start()) != op.old;
  }
};

TEST_F(GpuvaTest, VisitorSeesEachStepRightAfterItIsApplied) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(4, 4, 2, 0), errc::ok);
  ASSERT_EQ(map(8, 8, 3, 0), errc::ok);
  recording_visitor v;
  v.tree = &tree_;
  lock_guard g(vm_lock_);
  auto p = tree_.plan_map({2 * P, 8 * P, 4, 0, big_bo, 0});
  ASSERT_TRUE(p.ok());
  tree_.commit(*p, v);
  EXPECT_TRUE(v.consistent);
  using S = std::pair<K, va_range>;
  EXPECT_EQ(v.steps, (std::vector<S>{{K::remap, {2 * P, 4 * P}},
                                     {K::unmap, {4 * P, 8 * P}},
                                     {K::remap, {8 * P, 10 * P}},
                                     {K::map, {2 * P, 10 * P}}}));
  // The removed nodes stay readable while the plan lives.
  EXPECT_EQ(p->ops()[1].old->bo(), 2u);
}

TEST_F(GpuvaTest, LambdaVisitorAndLookupHelpers) {
  ASSERT_EQ(map(0, 4, 1, 0), errc::ok);
  ASSERT_EQ(map(8, 4, 2, 0), errc::ok);
  ASSERT_EQ(map(16, 4, 1, 100), errc::ok);
  lock_guard g(vm_lock_);
  std::vector<bo_handle> seen;
  tree_.for_each_overlap({2 * P, 17 * P}, [&](const gpuva& v) { seen.push_back(v.bo()); });
  EXPECT_EQ(seen, (std::vector<bo_handle>{1, 2, 1}));
  EXPECT_TRUE(tree_.is_free({4 * P, 8 * P}));
  EXPECT_FALSE(tree_.is_free({4 * P, 9 * P}));
  EXPECT_EQ(tree_.first_overlap({12 * P, 16 * P}), nullptr);
  std::vector<va_t> of_bo1;
  tree_.for_each_bo_mapping(1, [&](const gpuva& v) { of_bo1.push_back(v.start()); });
  EXPECT_EQ(of_bo1, (std::vector<va_t>{0, 16 * P}));
  int n = 0;
  auto p = tree_.plan_unmap(0, 32 * P);
  ASSERT_TRUE(p.ok());
  tree_.commit(*p, [&](const gpuva_op& op) { n += op.kind == K::unmap; });
  EXPECT_EQ(n, 3);
  EXPECT_TRUE(tree_.empty());
}

TEST_F(GpuvaTest, CommitAllocatesNothing) {
  ASSERT_EQ(map(0, 16, 1, 0), errc::ok);
  ASSERT_EQ(map(16, 16, 2, 0), errc::ok);
  lock_guard g(vm_lock_);
  auto p = tree_.plan_map({8 * P, 16 * P, 3, 0, big_bo, 0});
  ASSERT_TRUE(p.ok());
  int steps = 0;
  tl_allocs = 0;
  tl_count_allocs = true;
  tree_.commit(*p, [&](const gpuva_op&) { ++steps; });
  tl_count_allocs = false;
  EXPECT_EQ(tl_allocs, 0);
  EXPECT_EQ(steps, 3);
  // Lookups do not allocate either.
  tl_count_allocs = true;
  const gpuva* v = tree_.find(9 * P);
  tl_count_allocs = false;
  EXPECT_EQ(tl_allocs, 0);
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->bo(), 3u);
}

TEST_F(GpuvaTest, CommittingAStalePlanAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        lock_guard g(vm_lock_);
        auto a = tree_.plan_map({0, P, 1, 0, big_bo, 0});
        auto b = tree_.plan_map({P, P, 2, 0, big_bo, 0});
        tree_.commit(*b);
        tree_.commit(*a);
      },
      "tree changed since the plan");
}

// --- randomized, against a page-granular reference model --------------------------

struct page_ref {
  bo_handle bo;
  std::uint64_t off;  // in pages
  gpuva_flags flags;
  friend bool operator==(const page_ref&, const page_ref&) = default;
};

// Applies each step's clear_range / write_range to a model of the PTEs, as a
// driver would: the result must equal the reference after every commit.
struct pte_model_visitor final : gpuva_ops_visitor {
  std::map<std::uint64_t, page_ref>* ptes;
  void clear(va_range r) {
    for (va_t va = r.start; va < r.end; va += P) ptes->erase(va / P);
  }
  void sm_step_map(const gpuva_op& op) noexcept override {
    const va_range w = op.write_range();
    for (va_t va = w.start; va < w.end; va += P)
      (*ptes)[va / P] = {op.map->bo(), op.map->bo_offset_at(va) / P, op.map->flags()};
  }
  void sm_step_remap(const gpuva_op& op) noexcept override { clear(op.clear_range()); }
  void sm_step_unmap(const gpuva_op& op) noexcept override { clear(op.clear_range()); }
};

void random_against_model(bool merge, unsigned seed) {
  constexpr std::uint64_t va_pages = 96;
  static constexpr lock_class cls{"vm", lockdep::rank::vm};
  shared_mutex lock(cls);
  gpuva_tree tree(lock, gpuva_tree_options{{0, va_pages * P}, merge});
  std::map<std::uint64_t, page_ref> ref;   // page -> backing
  std::map<std::uint64_t, page_ref> ptes;  // page -> what the visitor wrote
  pte_model_visitor vis;
  vis.ptes = &ptes;
  std::mt19937_64 rng(seed);
  auto rnd = [&](std::uint64_t n) { return rng() % n; };
  const std::uint64_t bo_pages[4] = {0, 40, 64, 24};
  int maps = 0, unmaps = 0, errors = 0, dropped = 0, splits = 0, merges = 0;

  lock_guard g(lock);
  for (int i = 0; i < 6000; ++i) {
    const std::uint64_t pg = rnd(va_pages);
    const std::uint64_t n = 1 + rnd(std::min<std::uint64_t>(16, va_pages - pg + 2));  // may run past the end
    const bool drop = rnd(10) == 0;
    if (rnd(3) != 0) {
      const bo_handle bo = 1 + rnd(3);
      // Offsets that often line up with the neighbours, so merges happen.
      std::uint64_t off = rnd(2) ? pg % bo_pages[bo] : rnd(bo_pages[bo]);
      const gpuva_flags fl = rnd(8) == 0 ? 1 : 0;
      auto p = tree.plan_map({pg * P, n * P, bo, off * P, bo_pages[bo] * P, fl});
      const bool valid = pg + n <= va_pages && off + n <= bo_pages[bo];
      ASSERT_EQ(p.ok(), valid) << "map " << pg << "+" << n << " off " << off;
      if (!p) {
        ++errors;
        continue;
      }
      for (const auto& op : p->ops()) {
        splits += op.kind == K::remap;
        merges += op.kind == K::map && op.map->range() != op.req;  // grew over a neighbour
      }
      if (drop) {
        ++dropped;
        continue;
      }
      tree.commit(*p, vis);
      ++maps;
      for (std::uint64_t k = 0; k < n; ++k) ref[pg + k] = {bo, off + k, fl};
    } else {
      auto p = tree.plan_unmap(pg * P, n * P);
      const bool valid = pg + n <= va_pages;
      ASSERT_EQ(p.ok(), valid);
      if (!p) {
        ++errors;
        continue;
      }
      if (drop) {
        ++dropped;
        continue;
      }
      tree.commit(*p, vis);
      ++unmaps;
      for (std::uint64_t k = 0; k < n; ++k) ref.erase(pg + k);
    }
    ASSERT_TRUE(tree.check_invariants()) << "op " << i;
    ASSERT_EQ(ptes, ref) << "op " << i;
    for (std::uint64_t k = 0; k < va_pages; ++k) {
      const gpuva* v = tree.find(k * P);
      auto it = ref.find(k);
      if (it == ref.end()) {
        ASSERT_EQ(v, nullptr) << "page " << k << " op " << i;
      } else {
        ASSERT_NE(v, nullptr) << "page " << k << " op " << i;
        ASSERT_EQ((page_ref{v->bo(), v->bo_offset_at(k * P) / P, v->flags()}), it->second)
            << "page " << k << " op " << i;
      }
    }
  }
  // Per-BO index agrees with the VA tree.
  std::size_t by_bo = 0;
  for (bo_handle bo = 1; bo <= 3; ++bo) tree.for_each_bo_mapping(bo, [&](const gpuva& v) {
    ++by_bo;
    EXPECT_EQ(v.bo(), bo);
  });
  EXPECT_EQ(by_bo, tree.size());
  EXPECT_GT(maps, 2000);
  EXPECT_GT(unmaps, 500);
  EXPECT_GT(errors, 50);
  EXPECT_GT(dropped, 100);
  EXPECT_GT(splits, 500);
  if (merge) {
    EXPECT_GT(merges, 100);
  } else {
    EXPECT_EQ(merges, 0);
  }
}

TEST(GpuvaRandom, MatchesPageModelWithMerging) { random_against_model(true, 42); }
TEST(GpuvaRandom, MatchesPageModelWithoutMerging) { random_against_model(false, 7); }
TEST(GpuvaRandom, MatchesPageModelOtherSeed) { random_against_model(true, 2024); }

}  // namespace
}  // namespace svm
