// The lock-order validator reports a seeded inversion with both acquisition
// sites; the lock wrappers exclude each other.
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "svm/base/mutex.h"

namespace svm {
namespace {

constexpr lock_class k_vm{"vm", lockdep::rank::vm};
constexpr lock_class k_mmap{"mmap", lockdep::rank::mmap};
constexpr lock_class k_resv{"resv", lockdep::rank::resv, true};
constexpr lock_class k_node{"node", lockdep::rank::pt_node};
constexpr lock_class k_leaf{"leaf", lockdep::rank::leaf};

std::vector<lockdep::violation> g_seen;
void capture(const lockdep::violation& v) { g_seen.push_back(v); }

class LockOrder : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!SVM_LOCK_CHECKS) GTEST_SKIP() << "lock-order checks are compiled out in this build";
    g_seen.clear();
    prev_ = lockdep::set_violation_handler(&capture);
  }
  void TearDown() override {
    if (SVM_LOCK_CHECKS) lockdep::set_violation_handler(prev_);
  }
  lockdep::violation_handler prev_ = nullptr;
};

TEST_F(LockOrder, SeededInversionIsReportedWithBothSites) {
  mutex mmap_like(k_mmap);
  mutex node_like(k_node);
  node_like.lock();
  const int inner_line = __LINE__ + 1;
  mmap_like.lock();  // inversion: mmap is outer to pt_node
  mmap_like.unlock();
  node_like.unlock();
  ASSERT_EQ(g_seen.size(), 1u);
  const auto& v = g_seen[0];
  EXPECT_STREQ(v.what, "order");
  EXPECT_STREQ(v.held_name, "node");
  EXPECT_STREQ(v.new_name, "mmap");
  EXPECT_EQ(v.new_site.line, inner_line);
  EXPECT_EQ(v.held_site.line, inner_line - 2);
  EXPECT_NE(std::string(v.held_site.file).find("lock_order_test.cpp"), std::string::npos);
  EXPECT_NE(v.describe().find("lock_order_test.cpp"), std::string::npos);
  EXPECT_EQ(lockdep::held_count(), 0);
}

TEST_F(LockOrder, DeclaredOrderIsSilent) {
  shared_mutex vm(k_vm);
  shared_mutex mm(k_mmap);
  mutex parent(k_node, 1);
  mutex child(k_node, 2);
  {
    shared_lock_guard a(vm);
    shared_lock_guard b(mm);
    lock_guard c(parent);
    lock_guard d(child);
    EXPECT_EQ(lockdep::held_count(), 4);
  }
  EXPECT_TRUE(g_seen.empty());
}

TEST_F(LockOrder, SameRankDescendingKeyIsAnInversion) {
  mutex a(k_node, 5);
  mutex b(k_node, 3);
  a.lock();
  b.lock();
  b.unlock();
  a.unlock();
  ASSERT_EQ(g_seen.size(), 1u);
  EXPECT_EQ(g_seen[0].held_key, 5u);
}

TEST_F(LockOrder, TrylockIsNeverAnInversion) {
  mutex inner(k_node);
  mutex outer(k_mmap);
  inner.lock();
  bool got = false;
  if (outer.try_lock()) {
    got = true;
    outer.unlock();
  }
  inner.unlock();
  EXPECT_TRUE(got);
  EXPECT_TRUE(g_seen.empty());
}

TEST_F(LockOrder, NestableLocksNestInAnyOrder) {
  mutex r1(k_resv);
  mutex r2(k_resv);
  r2.lock();
  r1.lock();
  r1.unlock();
  r2.unlock();
  EXPECT_TRUE(g_seen.empty());
}

// Deliberately wrong: asserts a lock it does not hold, which the static
// analysis would (rightly) reject.
void assert_without_holding(mutex& m) SVM_NO_THREAD_SAFETY_ANALYSIS { m.assert_held(); }

TEST_F(LockOrder, AssertHeldReportsWhenNotHeld) {
  mutex m(k_leaf);
  assert_without_holding(m);
  ASSERT_EQ(g_seen.size(), 1u);
  EXPECT_STREQ(g_seen[0].what, "not-held");
  m.lock();
  m.assert_held();
  m.unlock();
  EXPECT_EQ(g_seen.size(), 1u);
}

TEST(Mutex, ExcludesUnderContention) {
  mutex m(k_leaf);
  std::uint64_t counter = 0;  // guarded by m
  {
    std::vector<std::jthread> ts;
    for (int t = 0; t < 4; ++t)
      ts.emplace_back([&] {
        for (int i = 0; i < 20000; ++i) {
          lock_guard g(m);
          ++counter;
        }
      });
  }
  EXPECT_EQ(counter, 80000u);
  EXPECT_FALSE(m.is_locked());
}

TEST(Mutex, SharedMutexAdmitsReadersTogether) {
  shared_mutex m(k_mmap);
  m.lock_shared();
  bool other_reader_got_in = false;
  std::jthread t([&] {
    if (m.try_lock_shared()) {
      other_reader_got_in = true;
      m.unlock_shared();
    }
  });
  t.join();
  EXPECT_TRUE(other_reader_got_in);
  bool writer_got_in = false;
  std::jthread w([&] {
    if (m.try_lock()) {
      writer_got_in = true;
      m.unlock();
    }
  });
  w.join();
  EXPECT_FALSE(writer_got_in);
  m.unlock_shared();
}

}  // namespace
}  // namespace svm
