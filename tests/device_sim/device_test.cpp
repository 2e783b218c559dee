// Engines, kernels, translation, permissions, faults, replay, cancel,
// queues, errors, the oracle hook and statistics.
#include <gtest/gtest.h>

#include <mutex>
#include <set>

#include "svm/base/epoch.h"
#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;
using test::map_range;
using test::run_kernel;

constexpr va_t base_va = 0x10'0000'0000;  // 64 GiB: 1G aligned

class DeviceSim : public ::testing::Test {
 protected:
  void make(device_config c) {
    auto made = device::create(std::move(c));
    ASSERT_TRUE(made.ok()) << errc_name(made.error());
    dev = std::move(*made);
    ASSERT_EQ(dev->attach_vm(vm, pt, mem), errc::ok);
    auto qq = dev->create_queue(vm);
    ASSERT_TRUE(qq.ok());
    q = *qq;
  }
  std::vector<fault_record> fetch_n(std::size_t n) {
    std::vector<fault_record> out;
    std::array<fault_record, 16> buf;
    while (out.size() < n) {
      const std::size_t k = dev->faults().fetch_wait(buf, 10s);
      EXPECT_GT(k, 0u) << "expected a fault";
      if (k == 0) break;
      out.insert(out.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(k));
    }
    return out;
  }

  test::watchdog wd;
  test::test_mem mem{64, std::size_t{1} << 19};  // pfns alias 64 real frames
  dev_page_table pt;
  const vm_id vm = 3;
  std::unique_ptr<device> dev;  // after what it references: destroyed first
  queue_id q = 0;
};

TEST_F(DeviceSim, LoadAndStoreThroughFourKMappings) {
  make({.engines = 2});
  map_range(pt, base_va, 16 * page_size, 0, aperture::system, 0);
  auto st = run_kernel(*dev, q, 16 * 512, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 8 * wi.id(), wi.id() * 3); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (std::uint64_t i = 0; i < 16 * 512; i += 97) EXPECT_EQ(mem.word(i / 512, (i % 512) * 8), i * 3);
  std::atomic<std::uint64_t> sum{0};
  st = run_kernel(*dev, q, 16 * 512, [&](work_item& wi) { sum += wi.load<std::uint64_t>(base_va + 8 * wi.id()); });
  ASSERT_TRUE(st.ok());
  const std::uint64_t n = 16 * 512;
  EXPECT_EQ(sum.load(), 3 * n * (n - 1) / 2);
  // Narrower types and floats share the same bytes.
  st = run_kernel(*dev, q, 1, [](work_item& wi) {
    wi.store<float>(base_va + 0x100, 2.5f);
    wi.store<std::uint16_t>(base_va + 0x104, 0xbeef);
    wi.store<std::uint8_t>(base_va + 0x107, 0x7f);
    if (wi.load<float>(base_va + 0x100) != 2.5f) throw std::runtime_error("float");
  });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(mem.word(0, 0x100) >> 32, 0x7f00beefu);
}

TEST_F(DeviceSim, TranslatesAndChecksPermissionsAtEveryLeafSize) {
  make({.engines = 1});
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, [](const fault_record&) { return std::nullopt; });
  drv.cancel_reason = errc::perm;
  struct leaf { unsigned level; std::uint64_t size; va_t va; pfn_t pfn; };
  const leaf leaves[] = {{0, page_size, base_va + 0x1000, 5},
                         {1, huge_size, base_va + 0x4000'0000, 1024},
                         {2, giant_size, base_va + 0x8000'0000, 1u << 18}};
  for (const leaf& l : leaves) {
    SCOPED_TRACE(l.level);
    map_range(pt, l.va, l.size, l.level, aperture::system, l.pfn, /*writable=*/true);
    const va_t off = l.size - 8;  // the last word of the leaf
    auto st = run_kernel(*dev, q, 1, [&](work_item& wi) {
      wi.store<std::uint64_t>(l.va + off, 0xabc0 + l.level);
      wi.atomic_add<std::uint64_t>(l.va + off, 1);
    });
    ASSERT_TRUE(st.ok()) << errc_name(st.error);
    const pfn_t frame = (l.pfn + (off >> page_shift)) % 64;
    EXPECT_EQ(mem.word(frame, page_size - 8), 0xabc1u + l.level);
    // Read-only leaf of the same size: loads work, stores and atomics fault
    // (the driver cancels them with EPERM).
    ASSERT_EQ(pt.populate(l.va, l.va + l.size, l.level,
                          [&](va_t v) { return dev_pte::make(aperture::system, l.pfn + ((v - l.va) >> 12), false); }),
              errc::ok);
    ASSERT_EQ(dev->invalidate_tlb(vm, {l.va, l.va + l.size}), errc::ok);
    std::uint64_t seen = 0;
    st = run_kernel(*dev, q, 1, [&](work_item& wi) { seen = wi.load<std::uint64_t>(l.va + off); });
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(seen, 0xabc1u + l.level);
    st = run_kernel(*dev, q, 1, [&](work_item& wi) { wi.store<std::uint32_t>(l.va + 4, 1); });
    EXPECT_EQ(st.error, errc::canceled);
    EXPECT_EQ(st.reason, errc::perm);
    EXPECT_EQ(st.address, l.va + 4);
    EXPECT_EQ(st.acc, access::write);
    st = run_kernel(*dev, q, 1, [&](work_item& wi) { wi.atomic_cmpxchg<std::uint32_t>(l.va + 8, 0, 1); });
    EXPECT_EQ(st.error, errc::canceled);
    EXPECT_EQ(st.acc, access::atomic);
  }
}

TEST_F(DeviceSim, VramApertureReachesDeviceFrames) {
  make({.engines = 1, .vram_bytes = 16 * page_size});
  auto f = dev->vram().alloc();
  ASSERT_TRUE(f.ok());
  map_range(pt, base_va, page_size, 0, aperture::vram, *f);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 16, 77); }).ok());
  EXPECT_EQ(std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(dev->vram().frame_data(*f) + 16)).load(),
            77u);
}

TEST_F(DeviceSim, PermissionUpgradeIsPickedUpOnReplay) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 9, /*writable=*/false);
  // The driver upgrades the PTE to writable and replays.
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, [](const fault_record& r) -> std::optional<std::uint64_t> {
    EXPECT_EQ(r.acc, access::write);
    return dev_pte::make(aperture::system, 9, true);
  });
  auto st = run_kernel(*dev, q, 1, [](work_item& wi) {
    (void)wi.load<std::uint32_t>(base_va);      // caches the read-only translation
    wi.store<std::uint32_t>(base_va + 4, 5);     // permission fault, then replay
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  EXPECT_EQ(mem.word(9, 0) >> 32, 5u);
  EXPECT_EQ(dev->stats().faults, 1u);
  EXPECT_EQ(dev->stats().replays, 1u);
}

// A writable PTE without atomic permission: loads and stores hit (the
// micro-TLB included), an atomic faults, and the replay picks up the entry
// the driver granted atomics on.
TEST_F(DeviceSim, AtomicThroughANoAtomicEntryFaultsOnce) {
  static_assert(dev_pte::permits(dev_pte::make(aperture::system, 1, true, false), access::write));
  static_assert(!dev_pte::permits(dev_pte::make(aperture::system, 1, true, false), access::atomic));
  static_assert(dev_pte::permits(dev_pte::make(aperture::system, 1, true), access::atomic));
  static_assert(!dev_pte::permits(dev_pte::make(aperture::system, 1, false), access::atomic));
  static_assert(dev_pte::permits(dev_pte::make(aperture::system, 1, false, false), access::read));
  make({.engines = 1});
  ASSERT_EQ(pt.populate(base_va, base_va + page_size, 0,
                        [](va_t) { return dev_pte::make(aperture::system, 9, true, /*atomics=*/false); }),
            errc::ok);
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, [](const fault_record& r) -> std::optional<std::uint64_t> {
    EXPECT_EQ(r.acc, access::atomic);
    return dev_pte::make(aperture::system, 9, true);
  });
  auto st = run_kernel(*dev, q, 1, [](work_item& wi) {
    for (int i = 0; i < 4; ++i) wi.store<std::uint32_t>(base_va + 4 * i, 1);  // TLB and micro-TLB hits
    (void)wi.atomic_add<std::uint32_t>(base_va, 2);                         // faults, then replays
    (void)wi.atomic_add<std::uint32_t>(base_va, 4);                         // hits the new entry
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  EXPECT_EQ(mem.word(9, 0) & 0xffffffffu, 7u);
  EXPECT_EQ(dev->stats().faults, 1u);
  EXPECT_EQ(dev->stats().replays, 1u);
}

TEST_F(DeviceSim, TlbHitsAfterTheFirstMiss) {
  make({.engines = 1});
  map_range(pt, base_va, 2 * page_size, 0, aperture::system, 0);
  ASSERT_TRUE(run_kernel(*dev, q, 100, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va + 4 * wi.id()); }).ok());
  auto s = dev->stats();
  EXPECT_EQ(s.accesses, 100u);
  EXPECT_EQ(s.tlb_misses, 1u);
  EXPECT_EQ(s.tlb_hits, 99u);
  ASSERT_TRUE(run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va + page_size); }).ok());
  EXPECT_EQ(dev->stats().tlb_misses, 2u);
}

TEST_F(DeviceSim, TinyTlbEvicts) {
  make({.engines = 1, .tlb = {.sets = 1, .ways = 2}});
  map_range(pt, base_va, 5 * page_size, 0, aperture::system, 0);
  // Two pages fit: 2 misses then hits.
  ASSERT_TRUE(run_kernel(*dev, q, 20, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va + (wi.id() % 2) * page_size); }).ok());
  EXPECT_EQ(dev->stats().tlb_misses, 2u);
  // Three pages cycling through two ways with round-robin replacement: every
  // access misses.
  ASSERT_TRUE(run_kernel(*dev, q, 30, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va + (2 + wi.id() % 3) * page_size); }).ok());
  EXPECT_EQ(dev->stats().tlb_misses, 32u);
}

TEST_F(DeviceSim, MapOnFaultDriverServicesEveryFault) {
  make({.engines = 4, .fault_buffer_entries = 32});
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, test::modulo_policy(64));
  constexpr std::uint64_t pages = 64, items = pages * 64;
  auto st = run_kernel(*dev, q, items, [](work_item& wi) {
    const va_t va = base_va + (wi.id() % pages) * page_size + (wi.id() / pages) * 8;
    wi.store<std::uint64_t>(va, wi.id());
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (std::uint64_t i = 0; i < items; i += 31) EXPECT_EQ(mem.word(i % pages, (i / pages) * 8), i);
  auto s = dev->stats();
  EXPECT_GE(s.faults, pages);
  EXPECT_EQ(s.faults, drv.records.load());
  EXPECT_EQ(s.replays, s.faults);
  EXPECT_EQ(s.cancels, 0u);
}

// The same storm with the timed spin on both sides (engines waiting for a
// reply, the driver waiting for records): nothing lost, every fault replayed.
TEST_F(DeviceSim, MapOnFaultDriverWithTimedSpinServicesEveryFault) {
  make({.engines = 2, .fault_buffer_entries = 8, .wait_spin_ns = 50'000});
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, test::modulo_policy(64));
  constexpr std::uint64_t pages = 64, items = pages * 16;
  auto st = run_kernel(*dev, q, items, [](work_item& wi) {
    const va_t va = base_va + (wi.id() % pages) * page_size + (wi.id() / pages) * 8;
    wi.store<std::uint64_t>(va, wi.id() + 1);
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (std::uint64_t i = 0; i < items; ++i) ASSERT_EQ(mem.word(i % pages, (i / pages) * 8), i + 1) << i;
  const auto s = dev->stats();
  EXPECT_GE(s.faults, pages);
  EXPECT_EQ(s.replays, s.faults);
  EXPECT_EQ(s.cancels, 0u);
}

TEST_F(DeviceSim, FaultRecordsCarryVmAddressAccessEngineAndTime) {
  make({.engines = 1});
  const auto t0 = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  auto c = dev->submit(q, 1, [](work_item& wi) { wi.atomic_add<std::uint32_t>(base_va + 0x2004, 1); });
  ASSERT_TRUE(c.ok());
  auto recs = fetch_n(1);
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].vm, vm);
  EXPECT_EQ(recs[0].gva, base_va + 0x2004);
  EXPECT_EQ(recs[0].page(), base_va + 0x2000);
  EXPECT_EQ(recs[0].acc, access::atomic);
  EXPECT_EQ(recs[0].engine, 0u);
  EXPECT_GE(recs[0].time_ns, t0);
  map_range(pt, base_va + 0x2000, page_size, 0, aperture::system, 2);
  EXPECT_EQ(dev->replay(recs), 1u);
  EXPECT_TRUE(c->wait(10s).ok());
  EXPECT_EQ(mem.word(2, 0) >> 32, 1u);
}

// A replay that does not resolve the access makes it fault again, and the
// new record counts the retries (fault_record::retries); the wave's next
// access starts again from 0.
TEST_F(DeviceSim, ReplayOfAStillMissingPageFaultsAgainAndStaleRecordsAreIgnored) {
  make({.engines = 1});
  auto c = dev->submit(q, 1, [](work_item& wi) {
    (void)wi.load<std::uint64_t>(base_va);
    (void)wi.load<std::uint64_t>(base_va + page_size);
  });
  ASSERT_TRUE(c.ok());
  auto first = fetch_n(1);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].retries, 0u);
  ASSERT_EQ(dev->replay(first), 1u);  // nothing mapped: the access faults again
  auto second = fetch_n(1);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].gva, base_va);
  EXPECT_EQ(second[0].retries, 1u);
  EXPECT_NE(second[0].token, first[0].token);
  EXPECT_EQ(dev->replay(first), 0u);           // stale: ignored
  EXPECT_EQ(dev->cancel(first, errc::fault), 0u);
  ASSERT_EQ(dev->replay(second), 1u);          // still nothing mapped
  auto third = fetch_n(1);
  ASSERT_EQ(third.size(), 1u);
  EXPECT_EQ(third[0].retries, 2u);
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  EXPECT_EQ(dev->replay(third), 1u);
  EXPECT_EQ(dev->replay(third), 0u);           // already replayed
  auto next = fetch_n(1);                      // the second load, a new access
  ASSERT_EQ(next.size(), 1u);
  EXPECT_EQ(next[0].gva, base_va + page_size);
  EXPECT_EQ(next[0].retries, 0u);
  map_range(pt, base_va + page_size, page_size, 0, aperture::system, 1);
  EXPECT_EQ(dev->replay(next), 1u);
  EXPECT_TRUE(c->wait(10s).ok());
  auto s = dev->stats();
  EXPECT_EQ(s.faults, 4u);
  EXPECT_EQ(s.replays, 4u);
}

TEST_F(DeviceSim, CancelAbortsTheKernelAndTheNextKernelOnTheQueueRunsNormally) {
  make({.engines = 2});
  map_range(pt, base_va, page_size, 0, aperture::system, 1);
  std::atomic<int> after_fault{0};
  auto bad = dev->submit(q, 1, [&](work_item& wi) {
    wi.store<std::uint32_t>(base_va + 0x5018, 1);  // unmapped
    ++after_fault;                                  // never reached
  });
  auto good = dev->submit(q, 64, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 8 * wi.id(), 7); });
  ASSERT_TRUE(bad.ok() && good.ok());
  auto recs = fetch_n(1);
  EXPECT_FALSE(good->done()) << "the next kernel waits for the faulting one";
  EXPECT_EQ(dev->cancel(recs, errc::fault), 1u);
  auto st = bad->wait(10s);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::fault);
  EXPECT_EQ(st.address, base_va + 0x5018);
  EXPECT_EQ(st.acc, access::write);
  EXPECT_EQ(after_fault.load(), 0);
  EXPECT_EQ(bad->fence()->error(), errc::canceled);
  EXPECT_TRUE(good->wait(10s).ok());
  EXPECT_EQ(mem.word(1, 63 * 8), 7u);
  auto s = dev->stats();
  EXPECT_EQ(s.cancels, 1u);
  EXPECT_EQ(s.kernels_failed, 1u);
  EXPECT_EQ(s.kernels_completed, 1u);
}

TEST_F(DeviceSim, CancelInAWideKernelStopsItAndOtherQueuesKeepRunning) {
  make({.engines = 4});
  map_range(pt, base_va, 8 * page_size, 0, aperture::system, 0);
  test::map_on_fault_driver drv(*dev, {{vm, &pt}}, [](const fault_record&) { return std::nullopt; });
  auto q2 = dev->create_queue(vm);
  ASSERT_TRUE(q2.ok());
  std::atomic<std::uint64_t> ran{0};
  auto bad = dev->submit(q, 20000, [&](work_item& wi) {
    ++ran;
    if (wi.id() == 300) (void)wi.load<std::uint8_t>(base_va + 100 * page_size);
    else wi.store<std::uint8_t>(base_va + wi.id() % (8 * page_size), 1);
  });
  auto other = dev->submit(*q2, 5000, [](work_item& wi) { (void)wi.load<std::uint8_t>(base_va + wi.id()); });
  ASSERT_TRUE(bad.ok() && other.ok());
  auto st = bad->wait(20s);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.address, base_va + 100 * page_size);
  EXPECT_TRUE(other->wait(20s).ok());
  EXPECT_LE(ran.load(), 20000u);
  EXPECT_TRUE(run_kernel(*dev, q, 10, [](work_item& wi) { wi.store<std::uint8_t>(base_va + wi.id(), 2); }).ok());
}

TEST_F(DeviceSim, KernelsOfOneQueueRunInSubmissionOrder) {
  make({.engines = 4});
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  std::vector<completion> cs;
  for (std::uint64_t k = 0; k < 32; ++k) {
    auto c = dev->submit(q, 1 + k % 3, [k](work_item& wi) {
      if (wi.id() != 0) return;
      const auto order = wi.atomic_add<std::uint64_t>(base_va, 1);
      wi.store<std::uint64_t>(base_va + 8 + 8 * k, order);
    });
    ASSERT_TRUE(c.ok());
    cs.push_back(*c);
  }
  for (auto& c : cs) ASSERT_TRUE(c.wait(10s).ok());
  for (std::uint64_t k = 0; k < 32; ++k) EXPECT_EQ(mem.word(0, 8 + 8 * k), k);
}

TEST_F(DeviceSim, ManyEnginesRunOneKernel) {
  make({.engines = 8});
  map_range(pt, base_va, 64 * page_size, 0, aperture::system, 0);
  constexpr std::uint64_t items = 64 * 512;
  std::mutex m;
  std::set<unsigned> engines;
  auto st = run_kernel(*dev, q, items, [&](work_item& wi) {
    wi.atomic_add<std::uint64_t>(base_va + 8 * wi.id(), wi.id() + 1);
    if (wi.id() % 256 == 0) {
      std::lock_guard g(m);
      engines.insert(wi.engine());
    }
  });
  ASSERT_TRUE(st.ok());
  for (std::uint64_t i = 0; i < items; ++i) ASSERT_EQ(mem.word(i / 512, (i % 512) * 8), i + 1) << i;
  EXPECT_GE(engines.size(), 1u);
  EXPECT_EQ(dev->stats().accesses, items);
}

TEST_F(DeviceSim, AtomicsAtEverySize) {
  make({.engines = 4});
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  auto st = run_kernel(*dev, q, 1000, [](work_item& wi) {
    wi.atomic_add<std::uint8_t>(base_va + 0, 1);
    wi.atomic_add<std::uint16_t>(base_va + 2, 1);
    wi.atomic_add<std::int32_t>(base_va + 4, -1);
    wi.atomic_add<std::uint64_t>(base_va + 8, 3);
  });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(mem.word(0, 0) & 0xff, 1000u % 256);
  EXPECT_EQ((mem.word(0, 0) >> 16) & 0xffff, 1000u);
  EXPECT_EQ(static_cast<std::int32_t>(mem.word(0, 0) >> 32), -1000);
  EXPECT_EQ(mem.word(0, 8), 3000u);
  std::uint64_t r[4] = {};
  st = run_kernel(*dev, q, 1, [&](work_item& wi) {
    r[0] = wi.atomic_cmpxchg<std::uint64_t>(base_va + 8, 3000, 1);  // succeeds: returns 3000
    r[1] = wi.atomic_cmpxchg<std::uint64_t>(base_va + 8, 3000, 2);  // fails: returns 1
    r[2] = wi.atomic_exchange<std::uint16_t>(base_va + 2, 9);
    r[3] = wi.atomic_cmpxchg<std::uint8_t>(base_va + 0, 1000 % 256, 5);
  });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(r[0], 3000u);
  EXPECT_EQ(r[1], 1u);
  EXPECT_EQ(r[2], 1000u);
  EXPECT_EQ(r[3], 1000u % 256);
  EXPECT_EQ(mem.word(0, 8), 1u);
  EXPECT_EQ((mem.word(0, 0) >> 16) & 0xffff, 9u);
  EXPECT_EQ(mem.word(0, 0) & 0xff, 5u);
}

TEST_F(DeviceSim, UnalignedAccessFailsWithEinvalAndTheAddress) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  auto st = run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va + 2); });
  EXPECT_EQ(st.error, errc::inval);
  EXPECT_EQ(st.address, base_va + 2);
  st = run_kernel(*dev, q, 1, [](work_item& wi) { wi.atomic_add<std::uint64_t>(base_va + 12, 1); });
  EXPECT_EQ(st.error, errc::inval);
  EXPECT_EQ(st.acc, access::atomic);
  // Run-time sizes: 3 is not an access size; 2 at an even address is fine.
  st = run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load_bytes(base_va, 3); });
  EXPECT_EQ(st.error, errc::inval);
  std::uint64_t v = 0;
  st = run_kernel(*dev, q, 1, [&](work_item& wi) {
    wi.store_bytes(base_va + 6, 2, 0x1234);
    v = wi.load_bytes(base_va + 6, 2);
  });
  EXPECT_TRUE(st.ok());
  EXPECT_EQ(v, 0x1234u);
  EXPECT_EQ(dev->stats().faults, 0u);
}

TEST_F(DeviceSim, AddressOutsideTheVaWidthFailsWithErange) {
  make({.engines = 1});
  const va_t past = pt.va_limit();
  auto st = run_kernel(*dev, q, 1, [&](work_item& wi) { wi.store<std::uint64_t>(past + 0x1000, 1); });
  EXPECT_EQ(st.error, errc::range);
  EXPECT_EQ(st.address, past + 0x1000);
  st = run_kernel(*dev, q, 1, [&](work_item& wi) { (void)wi.load<std::uint8_t>(~va_t{0}); });
  EXPECT_EQ(st.error, errc::range);
  EXPECT_EQ(dev->stats().faults, 0u);
}

TEST_F(DeviceSim, BadHandlesAreErrors) {
  make({.engines = 1});
  EXPECT_EQ(dev->submit(q + 100, 1, [](work_item&) {}).error(), errc::noent);
  EXPECT_EQ(dev->submit(q, 1, kernel_fn{}).error(), errc::inval);
  EXPECT_EQ(dev->create_queue(vm + 1).error(), errc::noent);
  EXPECT_EQ(dev->attach_vm(vm, pt, mem), errc::exist);
  EXPECT_EQ(dev->attach_vm(max_vm_id + 1, pt, mem), errc::inval);
  EXPECT_EQ(dev->detach_vm(vm), errc::busy);
  EXPECT_EQ(dev->detach_vm(vm + 1), errc::noent);
  EXPECT_EQ(dev->destroy_queue(q), errc::ok);
  EXPECT_EQ(dev->destroy_queue(q), errc::noent);
  EXPECT_EQ(dev->submit(q, 1, [](work_item&) {}).error(), errc::noent);
  EXPECT_EQ(dev->detach_vm(vm), errc::ok);
  EXPECT_EQ(completion{}.wait(1ms).error, errc::inval);
}

TEST_F(DeviceSim, ZeroItemKernelsCompleteInQueueOrder) {
  make({.engines = 2});
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  auto first = dev->submit(q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va + 0x10'0000); });  // faults
  auto empty = dev->submit(q, 0, [](work_item&) {});
  ASSERT_TRUE(first.ok() && empty.ok());
  auto recs = fetch_n(1);
  EXPECT_FALSE(empty->done());
  dev->cancel(recs, errc::fault);
  EXPECT_EQ(first->wait(10s).error, errc::canceled);
  EXPECT_TRUE(empty->wait(10s).ok());
  auto alone = dev->submit(q, 0, [](work_item&) {});
  ASSERT_TRUE(alone.ok());
  EXPECT_TRUE(alone->done());
}

TEST_F(DeviceSim, AKernelThatThrowsFailsWithEio) {
  make({.engines = 1});
  auto st = run_kernel(*dev, q, 4, [](work_item& wi) {
    if (wi.id() == 2) throw std::runtime_error("boom");
  });
  EXPECT_EQ(st.error, errc::io);
  EXPECT_TRUE(run_kernel(*dev, q, 4, [](work_item&) {}).ok());
}

TEST_F(DeviceSim, APteNamingAFrameOutsideItsMemoryFailsWithEio) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::vram, 1u << 30);  // no such VRAM frame
  auto st = run_kernel(*dev, q, 1, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va); });
  EXPECT_EQ(st.error, errc::io);
  EXPECT_EQ(st.address, base_va);
}

TEST_F(DeviceSim, OracleSeesEveryTranslatedAccessAndCostsNothingWhenOff) {
  make({.engines = 1});
  map_range(pt, base_va, page_size, 0, aperture::system, 4);
  map_range(pt, base_va + huge_size, huge_size, 1, aperture::system, 512);
  std::vector<access_check> seen;  // one engine: called from one thread, then read after wait()
  dev->set_oracle([&](const access_check& c) { seen.push_back(c); });
  auto st = run_kernel(*dev, q, 1, [](work_item& wi) {
    (void)wi.load<std::uint32_t>(base_va + 0x10);
    wi.store<std::uint32_t>(base_va + 0x14, 1);
    wi.atomic_add<std::uint64_t>(base_va + huge_size + 3 * page_size + 8, 1);
  });
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].vm, vm);
  EXPECT_EQ(seen[0].gva, base_va + 0x10);
  EXPECT_EQ(seen[0].acc, access::read);
  EXPECT_FALSE(seen[0].tlb_hit);
  EXPECT_EQ(seen[0].pfn, 4u);
  EXPECT_EQ(seen[0].level, 0u);
  EXPECT_EQ(seen[0].ap, aperture::system);
  EXPECT_EQ(seen[0].mem, &mem);
  EXPECT_EQ(seen[0].pte, dev_pte::make(aperture::system, 4, true));
  EXPECT_EQ(seen[1].acc, access::write);
  EXPECT_TRUE(seen[1].tlb_hit);
  EXPECT_EQ(seen[2].acc, access::atomic);
  EXPECT_EQ(seen[2].level, 1u);
  EXPECT_EQ(seen[2].pfn, 512u + 3);
  dev->set_oracle(nullptr);
  ASSERT_TRUE(run_kernel(*dev, q, 10, [](work_item& wi) { (void)wi.load<std::uint32_t>(base_va); }).ok());
  EXPECT_EQ(seen.size(), 3u);
}

TEST_F(DeviceSim, TwoVmsShareTheDeviceAndFaultsNameTheirVm) {
  make({.engines = 2});
  dev_page_table pt2;
  test::test_mem mem2(64);
  const vm_id vm2 = 7;
  ASSERT_EQ(dev->attach_vm(vm2, pt2, mem2), errc::ok);
  auto q2 = dev->create_queue(vm2);
  ASSERT_TRUE(q2.ok());
  std::atomic<int> faults_vm1{0}, faults_vm2{0};
  test::map_on_fault_driver drv(*dev, {{vm, &pt}, {vm2, &pt2}}, [&](const fault_record& r) -> std::optional<std::uint64_t> {
    ++(r.vm == vm ? faults_vm1 : faults_vm2);
    return dev_pte::make(aperture::system, 1, true);
  });
  auto a = dev->submit(q, 64, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 8 * wi.id(), 1); });
  auto b = dev->submit(*q2, 64, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 8 * wi.id(), 2); });
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->wait(10s).ok());
  EXPECT_TRUE(b->wait(10s).ok());
  EXPECT_EQ(mem.word(1, 8), 1u);
  EXPECT_EQ(mem2.word(1, 8), 2u);
  EXPECT_GE(faults_vm1.load(), 1);
  EXPECT_GE(faults_vm2.load(), 1);
  drv.stop();
  ASSERT_EQ(dev->destroy_queue(*q2), errc::ok);
  ASSERT_EQ(dev->detach_vm(vm2), errc::ok);
}

TEST_F(DeviceSim, PrefetchRaisesAPrefetchFaultAndNeverAborts) {
  make({.engines = 1});
  bool first = true, second = true;
  auto c = dev->submit(q, 1, [&](work_item& wi) {
    first = wi.prefetch(base_va);             // serviced: true
    second = wi.prefetch(base_va + 0x10000);  // cancelled: false, kernel goes on
    wi.store<std::uint32_t>(base_va, 1);
  });
  ASSERT_TRUE(c.ok());
  auto r1 = fetch_n(1);
  EXPECT_EQ(r1[0].acc, access::prefetch);
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  dev->replay(r1);
  auto r2 = fetch_n(1);
  EXPECT_EQ(r2[0].acc, access::prefetch);
  dev->cancel(r2, errc::fault);
  EXPECT_TRUE(c->wait(10s).ok());
  EXPECT_TRUE(first);
  EXPECT_FALSE(second);
}

TEST_F(DeviceSim, AStalledWaveDoesNotHoldUpEpochReclamation) {
  make({.engines = 2});
  auto c = dev->submit(q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va); });
  ASSERT_TRUE(c.ok());
  auto recs = fetch_n(1);
  epoch::synchronize();  // would wait forever if the stalled engine stayed in its section
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  dev->replay(recs);
  EXPECT_TRUE(c->wait(10s).ok());
}

TEST_F(DeviceSim, InvalidatingFromInsideAKernelIsRejected) {
  make({.engines = 1});
  errc got = errc::ok;
  device* d = dev.get();
  ASSERT_TRUE(run_kernel(*dev, q, 1, [&](work_item&) { got = d->invalidate_tlb(vm, {0, page_size}); }).ok());
  EXPECT_EQ(got, errc::inval);
}

TEST_F(DeviceSim, ShutdownCancelsStalledWavesAndPendingKernels) {
  make({.engines = 2, .fault_buffer_entries = 1});
  auto stalled = dev->submit(q, 8, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va + wi.id() * page_size); });
  auto queued = dev->submit(q, 1, [](work_item&) {});
  ASSERT_TRUE(stalled.ok() && queued.ok());
  while (dev->faults().size() == 0) std::this_thread::sleep_for(1ms);
  dev.reset();  // no driver: must not hang
  EXPECT_EQ(stalled->wait(1s).error, errc::canceled);
  EXPECT_EQ(queued->wait(1s).error, errc::canceled);
}

}  // namespace
}  // namespace svm::dev
