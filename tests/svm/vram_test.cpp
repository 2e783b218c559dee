// One VRAM per device: the vram_manager's allocation and eviction protocol
// (unit tests with stand-in VRAM users), and BOs of several VMs sharing it
// (cross-VM eviction, an evicted BO returning to VRAM on its next device
// access, a failed allocation leaving everything as it was).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "svm/base/fence.h"
#include "svm/svm/driver.h"
#include "svm/svm/gpu_vm.h"
#include "svm/svm/vram.h"
#include "handler_hold.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

// ---- the manager, with stand-in users ---------------------------------------------

/// A VRAM user that holds `n` frames and gives them back when evicted
/// (or answers EBUSY while `refuse` is set).
struct fake_user final : vram_object {
  fake_user(vram_manager& m, std::size_t n, int tag) : mgr(m), id(tag) {
    EXPECT_EQ(mgr.alloc(n, frames), errc::ok);
    held = frames.size();
    mgr.insert(*this);
  }
  ~fake_user() override {
    mgr.remove(*this);
    mgr.put(frames);
  }
  errc evict(const evict_context&) override {
    if (gate) gate();
    if (refuse) return errc::busy;
    order->push_back(id);
    mgr.put(frames);
    frames.clear();
    held = 0;
    return errc::ok;
  }
  [[nodiscard]] std::size_t resident_frames() const noexcept override { return held.load(); }
  [[nodiscard]] const void* vm() const noexcept override { return this; }
  vram_manager& mgr;
  int id;
  std::vector<pfn_t> frames;
  std::atomic<std::size_t> held{0};
  bool refuse = false;
  std::function<void()> gate;
  std::vector<int>* order = nullptr;
};

TEST(VramManager, CapacityIsTheBytesAskedFor) {
  vram_manager m(64 * page_size);
  EXPECT_EQ(m.stats().capacity_frames, 64u);
  std::vector<pfn_t> f;
  ASSERT_EQ(m.alloc(64, f), errc::ok);
  EXPECT_EQ(f.size(), 64u);
  EXPECT_EQ(std::count(f.begin(), f.end(), pfn_t{0}), 0) << "frame 0 is the zero page";
  EXPECT_EQ(m.stats().used_frames, 64u);
  std::vector<pfn_t> more;
  EXPECT_EQ(m.alloc(1, more), errc::nomem);
  EXPECT_TRUE(more.empty());
  m.put(f);
  EXPECT_EQ(m.stats().used_frames, 0u);
  EXPECT_EQ(m.alloc(0, more), errc::nomem);
  EXPECT_EQ(m.alloc(65, more), errc::nomem);
  EXPECT_EQ(m.stats().alloc_failures, 3u);
}

// Room is made by evicting the least recently inserted or touched user
// first, and only as many as needed.
TEST(VramManager, EvictsLeastRecentlyUsedFirstAndOnlyWhatItNeeds) {
  vram_manager m(32 * page_size);
  std::vector<int> order;
  fake_user a(m, 8, 1), b(m, 8, 2), c(m, 8, 3), d(m, 8, 4);
  for (fake_user* u : {&a, &b, &c, &d}) u->order = &order;
  m.touch(a);  // a is now the most recent: b is the LRU
  std::vector<pfn_t> f;
  ASSERT_EQ(m.alloc(12, f), errc::ok);
  EXPECT_EQ(order, (std::vector<int>{2, 3}));
  EXPECT_EQ(a.held.load(), 8u);
  EXPECT_EQ(d.held.load(), 8u);
  EXPECT_EQ(m.stats().evictions, 2u);
  m.put(f);
}

// A swapped-in policy decides the order (here: most recently used first).
TEST(VramManager, PolicyIsSwappable) {
  struct mru final : eviction_policy {
    std::vector<vram_object*> v;
    void inserted(vram_object& o) override { v.push_back(&o); }
    void touched(vram_object& o) override {
      removed(o);
      v.push_back(&o);
    }
    void removed(vram_object& o) override { std::erase(v, &o); }
    void order(std::vector<vram_object*>& out) const override { out.insert(out.end(), v.rbegin(), v.rend()); }
  };
  vram_manager m(16 * page_size, std::make_unique<mru>());
  std::vector<int> order;
  fake_user a(m, 8, 1), b(m, 8, 2);
  a.order = b.order = &order;
  std::vector<pfn_t> f;
  ASSERT_EQ(m.alloc(4, f), errc::ok);
  EXPECT_EQ(order, (std::vector<int>{2}));
  m.put(f);
}

// A user that cannot be evicted now (EBUSY) is skipped for the next; when
// nothing else can make room the allocation fails and gives back the
// frames it had taken.
TEST(VramManager, BusyUsersAreSkippedAndAFailedAllocationGivesEverythingBack) {
  vram_manager m(24 * page_size);
  std::vector<int> order;
  fake_user a(m, 8, 1), b(m, 8, 2);
  a.order = b.order = &order;
  a.refuse = true;
  std::vector<pfn_t> f;
  ASSERT_EQ(m.alloc(16, f), errc::ok);  // 8 free + b
  EXPECT_EQ(order, (std::vector<int>{2}));
  EXPECT_EQ(m.stats().evict_busy, 1u);
  const std::uint64_t used = m.stats().used_frames;
  std::vector<pfn_t> g;
  EXPECT_EQ(m.alloc(8, g), errc::nomem);  // only a could make room, and it refuses
  EXPECT_TRUE(g.empty());
  EXPECT_EQ(m.stats().used_frames, used);
  EXPECT_EQ(a.held.load(), 8u);
  m.put(f);
}

// More than free frames plus every other user's frames: ENOMEM before any
// eviction.
TEST(VramManager, HopelessAllocationEvictsNothing) {
  vram_manager m(16 * page_size);
  std::vector<int> order;
  fake_user a(m, 8, 1);
  a.order = &order;
  std::vector<pfn_t> f;
  EXPECT_EQ(m.alloc(17, f), errc::nomem);
  // The requester itself is never its own victim: 8 free + 0.
  EXPECT_EQ(m.alloc(9, f, &a), errc::nomem);
  EXPECT_TRUE(order.empty());
  EXPECT_EQ(m.stats().evictions, 0u);
}

// remove() waits while an eviction of its object runs, so an object is
// never destroyed under its evictor (deterministic: the eviction is held
// at a gate until remove() is known to be waiting).
TEST(VramManager, RemoveWaitsForAnEvictionInProgress) {
  vram_manager m(8 * page_size);
  std::vector<int> order;
  auto a = std::make_unique<fake_user>(m, 8, 1);
  a->order = &order;
  std::promise<void> in_evict, release;
  std::shared_future<void> rel = release.get_future().share();
  a->gate = [&] {
    in_evict.set_value();
    rel.wait();
  };
  std::vector<pfn_t> f;
  std::thread alloc([&] { EXPECT_EQ(m.alloc(4, f), errc::ok); });
  in_evict.get_future().wait();
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    m.remove(*a);
    removed = true;
  });
  std::this_thread::sleep_for(50ms);  // give remove() every chance to return early
  EXPECT_FALSE(removed.load()) << "remove() returned while the eviction was running";
  release.set_value();
  remover.join();
  alloc.join();
  EXPECT_TRUE(removed.load());
  EXPECT_EQ(order, (std::vector<int>{1}));
  a.reset();
  m.put(f);
}

// ---- BOs of several VMs on one VRAM ----------------------------------------------

struct env {
  std::unique_ptr<mm> m = std::make_unique<mm>(mm_options{.frames = 4096});
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> a, b;
  explicit env(std::uint64_t vram_pages) {
    dev = driver::create(driver_config{.hw = {.engines = 1, .vram_bytes = vram_pages * page_size}}).value();
    a = gpu_vm::create(*dev, *m).value();
    b = gpu_vm::create(*dev, *m).value();
  }
  ~env() {
    a.reset();
    b.reset();
    dev.reset();
    m.reset();
  }
  std::uint64_t read(gpu_vm& vm, va_t va) {
    std::atomic<std::uint64_t> v{~0ull};
    auto c = dev->submit(vm, 1, [&v, va](dev::work_item& wi) { v = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(c.ok());
    if (c.ok()) {
      EXPECT_TRUE(c->wait(60s).ok());
    }
    return v.load();
  }
};

std::vector<std::byte> words(std::uint64_t pages, std::uint64_t seed) {
  std::vector<std::byte> v(pages * page_size);
  for (std::uint64_t i = 0; i < pages * page_size / 8; ++i) {
    const std::uint64_t w = seed * 1000003 + i;
    std::memcpy(v.data() + i * 8, &w, 8);
  }
  return v;
}

constexpr va_t bo_va = 0x7e00'0000'0000;

// VRAM belongs to the device: a VM that needs room evicts another VM's
// idle BO (the LRU), whose bytes survive in system memory; that BO comes
// back to VRAM on its VM's next device access, evicting in turn.
TEST(VramBo, AnotherVmsIdleBoIsEvictedAndComesBackOnItsNextAccess) {
  env e(32);
  auto ob = e.b->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(ob.ok());
  const auto pb = words(16, 7);
  ASSERT_EQ(e.b->bo_write(*ob, 0, pb), errc::ok);
  ASSERT_EQ(e.b->bind(*ob, bo_va, 0, 16 * page_size), errc::ok);
  EXPECT_EQ(e.read(*e.b, bo_va + 5 * page_size), 7 * 1000003 + 5 * page_size / 8);

  auto a1 = e.a->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(a1.ok());
  auto a2 = e.a->create_bo(16 * page_size, placement::vram);  // VRAM full: b's BO is the LRU
  ASSERT_TRUE(a2.ok()) << errc_name(a2.error());
  EXPECT_EQ(*e.b->bo_placement(*ob), placement::system);
  EXPECT_EQ(e.b->stats().evictions, 1u);
  EXPECT_EQ(e.a->stats().evictions, 0u);
  std::vector<std::byte> back(pb.size());
  ASSERT_EQ(e.b->bo_read(*ob, 0, back), errc::ok);
  EXPECT_EQ(back, pb);

  // b's kernel touches its BO: it returns to VRAM (evicting a1, the LRU).
  EXPECT_EQ(e.read(*e.b, bo_va + 9 * page_size), 7 * 1000003 + 9 * page_size / 8);
  EXPECT_EQ(*e.b->bo_placement(*ob), placement::vram);
  EXPECT_EQ(e.b->stats().bo_restores, 1u);
  EXPECT_EQ(*e.a->bo_placement(*a1), placement::system);
  EXPECT_EQ(*e.a->bo_placement(*a2), placement::vram);
  EXPECT_EQ(e.dev->vram().stats().used_frames, 32u);
  ASSERT_EQ(e.b->bo_read(*ob, 0, back), errc::ok);
  EXPECT_EQ(back, pb);
}

// The forward-progress rule for BOs (docs/migration.md). VRAM holds one BO;
// both VMs' BOs were evicted. A kernel of each VM faults on its BO in one
// batch (the only handler thread is held in a third VM's fault until both
// records are in the buffer). The VM serviced first restores its BO and
// replays its item, which the engine holds ("before_resume") until the
// other VM's service is done: that one restores its own BO, evicting the
// first. The held item then faults again, and that retried access maps
// its BO in system memory instead of restoring it and evicting the other
// again.
TEST(VramBo, ARetriedAccessMapsTheBoWhereItLies) {
  handler_hold hold;
  std::atomic<gpu_vm*> va{nullptr}, vb{nullptr};
  auto both_serviced = [&] {
    gpu_vm* a = va.load();
    gpu_vm* b = vb.load();
    return a && b && a->stats().faults_serviced >= 1 && b->stats().faults_serviced >= 1;
  };
  dev::device_config hw{.engines = 1, .vram_bytes = 16 * page_size};
  hw.test_hook = hold.device_hook([&](const char* point, unsigned, unsigned) {
    if (std::strcmp(point, "before_resume") == 0)
      while (!both_serviced()) std::this_thread::sleep_for(1ms);
  });
  auto m = std::make_unique<mm>(mm_options{.frames = 4096});
  auto dev = driver::create(driver_config{.hw = hw}).value();
  auto a = gpu_vm::create(*dev, *m).value();
  auto b = gpu_vm::create(*dev, *m).value();
  auto c = gpu_vm::create(*dev, *m).value();
  auto ba = a->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(ba.ok());
  ASSERT_EQ(a->bo_write(*ba, 0, words(16, 3)), errc::ok);
  ASSERT_EQ(a->bind(*ba, bo_va, 0, 16 * page_size), errc::ok);
  auto bb = b->create_bo(16 * page_size, placement::vram);  // evicts a's BO
  ASSERT_TRUE(bb.ok());
  ASSERT_EQ(b->bo_write(*bb, 0, words(16, 4)), errc::ok);
  ASSERT_EQ(b->bind(*bb, bo_va, 0, 16 * page_size), errc::ok);
  ASSERT_EQ(b->evict(*bb), errc::ok);
  ASSERT_EQ(*a->bo_placement(*ba), placement::system);
  constexpr va_t held_va = 0x10'0000'0000;
  ASSERT_TRUE(m->mmap(held_va, page_size, prot::read | prot::write, map::private_ | map::anonymous | map::fixed).ok());

  // c's fault holds the handler until three faults are in the buffer.
  hold.arm(*c, 3);
  auto kc = dev->submit(*c, 1, [](dev::work_item& wi) { wi.store<std::uint64_t>(held_va, 1); });
  ASSERT_TRUE(kc.ok());
  hold.wait_held();
  va = a.get();
  vb = b.get();
  std::uint64_t got_a = 0, got_b = 0;
  auto ka = dev->submit(*a, 1, [&got_a](dev::work_item& wi) { got_a = wi.load<std::uint64_t>(bo_va + 8); });
  auto kb = dev->submit(*b, 1, [&got_b](dev::work_item& wi) { got_b = wi.load<std::uint64_t>(bo_va + 8); });
  ASSERT_TRUE(ka.ok() && kb.ok());
  EXPECT_TRUE(kc->wait(60s).ok());
  ASSERT_TRUE(ka->wait(60s).ok());
  ASSERT_TRUE(kb->wait(60s).ok());
  EXPECT_EQ(got_a, 3 * 1000003 + 1);
  EXPECT_EQ(got_b, 4 * 1000003 + 1);

  // One restore each; the one evicted under its item retried in place.
  const vm_stats sa = a->stats(), sb = b->stats();
  EXPECT_EQ(sa.bo_restores, 1u);
  EXPECT_EQ(sb.bo_restores, 1u);
  EXPECT_EQ(sa.retries_in_place + sb.retries_in_place, 1u);
  const placement pa = *a->bo_placement(*ba), pb = *b->bo_placement(*bb);
  EXPECT_NE(pa, pb) << "exactly one BO in VRAM";
  EXPECT_EQ(sa.retries_in_place == 1 ? pa : pb, placement::system);
  c.reset();
  b.reset();
  a.reset();
  dev.reset();
}

// An explicit eviction in a fault VM: the next device access brings the BO
// back, and the device then maps VRAM (the write lands in VRAM, visible
// through bo_read).
TEST(VramBo, ExplicitlyEvictedBoReturnsToVramOnAccess) {
  env e(64);
  auto bo = e.a->create_bo(4 * page_size, placement::vram);
  ASSERT_TRUE(bo.ok());
  ASSERT_EQ(e.a->bind(*bo, bo_va, 0, 4 * page_size), errc::ok);
  ASSERT_EQ(e.a->evict(*bo), errc::ok);
  EXPECT_EQ(e.a->evict(*bo), errc::inval);  // not in VRAM any more
  EXPECT_EQ(*e.a->bo_placement(*bo), placement::system);
  EXPECT_EQ(e.dev->vram().stats().used_frames, 0u);
  auto c = e.dev->submit(*e.a, 4, [](dev::work_item& wi) { wi.store<std::uint64_t>(bo_va + wi.id() * page_size, 40 + wi.id()); });
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->wait(60s).ok());
  EXPECT_EQ(*e.a->bo_placement(*bo), placement::vram);
  EXPECT_EQ(e.a->stats().bo_restores, 1u);
  EXPECT_EQ(e.dev->vram().stats().used_frames, 4u);
  for (std::uint64_t i = 0; i < 4; ++i) {
    std::uint64_t w = 0;
    ASSERT_EQ(e.a->bo_read(*bo, i * page_size, std::as_writable_bytes(std::span(&w, 1))), errc::ok);
    EXPECT_EQ(w, 40 + i);
  }
}

// A BO whose job is still running (an unsignalled fence in its
// reservation) cannot be evicted for another VM: it is skipped, the
// allocation fails with ENOMEM, and nothing changed.
TEST(VramBo, BusyBoIsNotEvictedAndTheFailedAllocationChangesNothing) {
  env e(16);
  auto ob = e.b->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(ob.ok());
  auto job = fence::create("job");
  resv* r = e.b->bo_resv(*ob);
  r->lock();
  r->add_fence(job, resv_usage::write);
  r->unlock();
  auto a1 = e.a->create_bo(8 * page_size, placement::vram);
  ASSERT_FALSE(a1.ok());
  EXPECT_EQ(a1.error(), errc::nomem);
  EXPECT_EQ(*e.b->bo_placement(*ob), placement::vram);
  EXPECT_EQ(e.b->stats().evictions, 0u);
  EXPECT_EQ(e.dev->vram().stats().used_frames, 16u);
  EXPECT_GE(e.dev->vram().stats().evict_busy, 1u);
  job->signal();
  auto a2 = e.a->create_bo(8 * page_size, placement::vram);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(*e.b->bo_placement(*ob), placement::system);
}

// Destroying a VM gives its VRAM back, and its BOs leave the eviction list
// (a later allocation must not find them).
TEST(VramBo, DestroyedVmsBosLeaveVramAndThePolicy) {
  env e(16);
  ASSERT_TRUE(e.b->create_bo(16 * page_size, placement::vram).ok());
  EXPECT_EQ(e.dev->vram().stats().used_frames, 16u);
  e.b.reset();
  EXPECT_EQ(e.dev->vram().stats().used_frames, 0u);
  auto a1 = e.a->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(a1.ok());
  EXPECT_EQ(e.dev->vram().stats().evictions, 0u);
}

}  // namespace
}  // namespace svm::test
