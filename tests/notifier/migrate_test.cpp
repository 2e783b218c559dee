// migrate_vma (setup / pages / finalize) and a pgmap owner's migrate_to_ram:
// the semantics of the kernel's hmm selftests (tools/testing/selftests/mm/
// hmm-tests.c) for device-private migration, on the model.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "svm/notifier/hmm.h"
#include "svm/notifier/migrate.h"
#include "svm/notifier/notifier.h"

namespace svm {
namespace {

constexpr std::uint64_t K4 = page_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

// A page of bytes that depend on (seed, page).
std::vector<std::byte> pattern(unsigned seed, std::size_t page) {
  std::vector<std::byte> v(K4);
  for (std::size_t i = 0; i < K4; ++i) v[i] = std::byte((seed * 131 + page * 17 + i * 7) & 0xff);
  return v;
}

void fill(mm& m, va_t va, std::size_t pages, unsigned seed) {
  for (std::size_t p = 0; p < pages; ++p) ASSERT_EQ(m.write(va + p * K4, pattern(seed, p)), errc::ok);
}

// True if every page reads back its pattern.
bool holds(mm& m, va_t va, std::size_t pages, unsigned seed) {
  for (std::size_t p = 0; p < pages; ++p) {
    std::vector<std::byte> got(K4);
    if (m.read(va + p * K4, got) != errc::ok || got != pattern(seed, p)) return false;
  }
  return true;
}

std::uint64_t raw(const mm& m, va_t va) { return m.raw_pte(va).entry; }

// A device with a device-private pool whose pgmap ops migrate pages back
// with the three steps (as lib/test_hmm.c's dmirror does).
struct test_device : dev_pagemap_ops {
  std::shared_ptr<frame_pool> vram = std::make_shared<frame_pool>(256, aperture::vram);
  unsigned pool = 0;
  std::atomic<int> calls{0};
  bool refuse = false;  // migrate_to_ram returns ok without migrating

  explicit test_device(mm& m, bool with_ops = true)
      : pool(m.attach_pool(vram, pool_kind::device_private, this, with_ops ? this : nullptr).value()) {}

  errc migrate_to_ram(mm& m, va_t addr) SVM_REQUIRES_SHARED(m.mmap_lock()) override {
    calls.fetch_add(1);
    if (refuse) return errc::ok;
    migrate_vma a{.start = addr, .end = addr + K4, .pgmap_owner = this, .select = migrate_select::device_private};
    if (errc e = migrate_vma_setup(m, a); e != errc::ok) return e;
    copy_out(m, a, m.pool_ptr(0), 0);
    (void)migrate_vma_pages(m, a);
    return migrate_vma_finalize(m, a);
  }

  // Allocate a frame of `dst` for each collected page and copy it there
  // (holes: zeros, or `hole_fill` if set).
  static void copy_out(mm& m, migrate_vma& a, const std::shared_ptr<frame_pool>& dst, unsigned dst_pool) {
    for (std::size_t i = 0; i < a.npages; ++i) {
      const migrate_page& s = a.src[i];
      if (!s.has(migrate_pfn::migrate)) continue;
      auto f = dst->alloc();
      if (!f) return;
      if (s.has(migrate_pfn::valid)) frame_pool::copy_frame(dst->frame_data(*f), m.pool(s.pool).frame_data(s.pfn));
      else frame_pool::zero_frame(dst->frame_data(*f));
      a.dst[i] = {migrate_pfn::valid, dst_pool, *f};
    }
  }

  // Three-step migration of [va, va+len) to the device; returns the pages
  // that moved.
  std::size_t to_device(mm& m, va_t va, std::uint64_t len) {
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + len, .pgmap_owner = this, .select = migrate_select::system};
    EXPECT_EQ(migrate_vma_setup(m, a), errc::ok);
    copy_out(m, a, vram, pool);
    EXPECT_EQ(migrate_vma_pages(m, a), errc::ok);
    std::size_t n = 0;
    for (const migrate_page& s : a.src) n += s.has(migrate_pfn::migrate) ? 1 : 0;
    EXPECT_EQ(migrate_vma_finalize(m, a), errc::ok);
    return n;
  }

  // Three-step migration of this device's pages in [va, va+len) back to pool 0.
  std::size_t to_system(mm& m, va_t va, std::uint64_t len) {
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + len, .pgmap_owner = this, .select = migrate_select::device_private};
    EXPECT_EQ(migrate_vma_setup(m, a), errc::ok);
    copy_out(m, a, m.pool_ptr(0), 0);
    EXPECT_EQ(migrate_vma_pages(m, a), errc::ok);
    std::size_t n = 0;
    for (const migrate_page& s : a.src) n += s.has(migrate_pfn::migrate) ? 1 : 0;
    EXPECT_EQ(migrate_vma_finalize(m, a), errc::ok);
    return n;
  }
};

TEST(MigrateVma, ToDevicePrivateAndBackPreservesBytes) {
  auto m = std::make_unique<mm>();
  test_device dev(*m);
  const pfn_t sys_free = m->pool(0).free_frames(), vram_free = dev.vram->free_frames();
  const va_t va = m->mmap(0, 4 * K4, rw, anon_priv).value();
  fill(*m, va, 4, 1);
  ASSERT_EQ(dev.to_device(*m, va, 4 * K4), 4u);
  for (std::size_t p = 0; p < 4; ++p) {
    const std::uint64_t e = raw(*m, va + p * K4);
    EXPECT_TRUE(cpu_pte::is_devpriv(e));
    EXPECT_TRUE(cpu_pte::is_writable(e));
    EXPECT_EQ(cpu_pte::pool(e), dev.pool);
    EXPECT_FALSE(m->cpu_translate(va + p * K4).present);
    // The device frame holds the bytes.
    EXPECT_EQ(std::memcmp(dev.vram->frame_data(cpu_pte::pfn(e)), pattern(1, p).data(), K4), 0);
  }
  EXPECT_EQ(dev.vram->free_frames(), vram_free - 4);
  EXPECT_EQ(m->pool(0).free_frames(), sys_free);  // the system frames were freed
  ASSERT_EQ(dev.to_system(*m, va, 4 * K4), 4u);
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
  for (std::size_t p = 0; p < 4; ++p) {
    const cpu_translation t = m->cpu_translate(va + p * K4);
    EXPECT_TRUE(t.present);
    EXPECT_TRUE(t.writable);
    EXPECT_EQ(t.pool, 0u);
  }
  EXPECT_EQ(dev.calls.load(), 0);  // no CPU fault was needed
  EXPECT_TRUE(holds(*m, va, 4, 1));
  // Teardown frees device pages too.
  ASSERT_EQ(dev.to_device(*m, va, 4 * K4), 4u);
  m.reset();
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
}

TEST(MigrateVma, CpuReadOfDevicePageCallsMigrateToRam) {
  mm m;
  test_device dev(m);
  const pfn_t vram_free = dev.vram->free_frames();
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  fill(m, va, 2, 2);
  ASSERT_EQ(dev.to_device(m, va, 2 * K4), 2u);
  std::vector<std::byte> got(K4);
  ASSERT_EQ(m.read(va + K4, got), errc::ok);
  EXPECT_EQ(got, pattern(2, 1));
  EXPECT_EQ(dev.calls.load(), 1);
  EXPECT_TRUE(m.cpu_translate(va + K4).present);
  EXPECT_EQ(m.cpu_translate(va + K4).pool, 0u);
  EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va)));  // only the faulting page came back
  EXPECT_EQ(dev.vram->free_frames(), vram_free - 1);
}

TEST(MigrateVma, PoolWithoutOpsKeepsBuiltInMigrationBack) {
  mm m;
  test_device dev(m, /*with_ops=*/false);
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  fill(m, va, 1, 3);
  ASSERT_EQ(dev.to_device(m, va, K4), 1u);
  EXPECT_TRUE(holds(m, va, 1, 3));
  EXPECT_EQ(dev.calls.load(), 0);
  EXPECT_EQ(m.cpu_translate(va).pool, 0u);
}

TEST(MigrateVma, MigrateToRamThatLeavesThePageFailsWithEfault) {
  mm m;
  test_device dev(m);
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  fill(m, va, 1, 4);
  ASSERT_EQ(dev.to_device(m, va, K4), 1u);
  dev.refuse = true;
  EXPECT_EQ(m.load<int>(va).error(), errc::fault);
  EXPECT_EQ(dev.calls.load(), int(max_migrate_to_ram_calls));
  EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va)));
  dev.refuse = false;
  EXPECT_TRUE(holds(m, va, 1, 4));
}

TEST(MigrateVma, SharedAndFileBackedMemoryIsNotMigrated) {
  mm m;
  test_device dev(m);
  const va_t sh = m.mmap(0, 2 * K4, rw, map::shared | map::anonymous).value();
  fill(m, sh, 2, 5);
  auto file = svm::file::create(m.pool_ptr(0), 2 * K4).value();
  const va_t fp = m.mmap(0, 2 * K4, rw, map::private_, file).value();
  fill(m, fp, 2, 6);  // private COW copies: still a file VMA
  const pfn_t vram_free = dev.vram->free_frames();
  for (va_t va : {sh, fp}) {
    const std::uint64_t before = raw(m, va);
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + 2 * K4, .pgmap_owner = &dev, .select = migrate_select::system};
    ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
    EXPECT_EQ(a.cpages, 0u);
    for (const migrate_page& s : a.src) EXPECT_FALSE(s.has(migrate_pfn::migrate));
    EXPECT_EQ(raw(m, va), before);
    EXPECT_EQ(migrate_vma_pages(m, a), errc::ok);
    EXPECT_EQ(migrate_vma_finalize(m, a), errc::ok);
  }
  EXPECT_TRUE(holds(m, sh, 2, 5));
  EXPECT_TRUE(holds(m, fp, 2, 6));
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
}

TEST(MigrateVma, ZeroPageAndCowSharedPagesAreNotCollected) {
  mm m;
  test_device dev(m);
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(m.load<int>(va).value(), 0);  // the zero page
  ASSERT_EQ(m.store<int>(va + K4, 9), errc::ok);
  auto child = m.fork().value();  // page 1 now shared copy-on-write
  mm::read_guard g(m);
  migrate_vma a{.start = va, .end = va + 2 * K4, .pgmap_owner = &dev, .select = migrate_select::system};
  ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
  EXPECT_EQ(a.cpages, 0u);
  EXPECT_TRUE(cpu_pte::is_zero(raw(m, va)));
  EXPECT_TRUE(cpu_pte::is_valid(raw(m, va + K4)));
  EXPECT_EQ(migrate_vma_finalize(m, a), errc::ok);
}

TEST(MigrateVma, MultipleMigrationsBackAndForth) {
  mm m;
  test_device dev(m);
  const pfn_t vram_free = dev.vram->free_frames();
  const va_t va = m.mmap(0, 3 * K4, rw, anon_priv).value();
  for (unsigned round = 0; round < 6; ++round) {
    fill(m, va, 3, 10 + round);  // CPU writes fault the pages back first (after round 0)
    ASSERT_EQ(dev.to_device(m, va, 3 * K4), 3u) << round;
    EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va + 2 * K4)));
    if (round % 2) {
      ASSERT_EQ(dev.to_system(m, va, 3 * K4), 3u);
    }
    EXPECT_TRUE(holds(m, va, 3, 10 + round)) << round;
  }
  EXPECT_EQ(dev.calls.load(), 3 * 3);  // the even rounds' reads faulted each page back
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
}

TEST(MigrateVma, AbsentPagesAreFilledOnlyWhereTheDriverGivesDst) {
  mm m;
  test_device dev(m);
  const pfn_t vram_free = dev.vram->free_frames();
  const va_t va = m.mmap(0, 4 * K4, rw, anon_priv).value();
  fill(m, va, 1, 7);  // page 0 present, pages 1..3 never touched
  {
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + 4 * K4, .pgmap_owner = &dev, .select = migrate_select::system};
    ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
    EXPECT_EQ(a.cpages, 4u);
    EXPECT_TRUE(a.src[0].has(migrate_pfn::valid | migrate_pfn::migrate | migrate_pfn::write));
    for (std::size_t i = 1; i < 4; ++i) {
      EXPECT_EQ(a.src[i].flags, migrate_pfn::migrate);
      EXPECT_EQ(raw(m, va + i * K4), 0u);
    }
    // The driver fills page 1 only, with bytes of its own.
    auto f = dev.vram->alloc().value();
    std::memcpy(dev.vram->frame_data(f), pattern(8, 0).data(), K4);
    a.dst[1] = {migrate_pfn::valid, dev.pool, f};
    ASSERT_EQ(migrate_vma_pages(m, a), errc::ok);
    EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va + K4)));  // filled by pages
    EXPECT_FALSE(a.src[0].has(migrate_pfn::migrate));   // no dst: stays
    EXPECT_FALSE(a.src[2].has(migrate_pfn::migrate));
    ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);
  }
  EXPECT_TRUE(m.cpu_translate(va).present);  // restored
  EXPECT_EQ(raw(m, va + 2 * K4), 0u);
  EXPECT_EQ(raw(m, va + 3 * K4), 0u);
  EXPECT_EQ(dev.vram->free_frames(), vram_free - 1);
  EXPECT_TRUE(holds(m, va, 1, 7));
  std::vector<std::byte> got(K4);
  ASSERT_EQ(m.read(va + K4, got), errc::ok);
  EXPECT_EQ(got, pattern(8, 0));
  EXPECT_EQ(dev.calls.load(), 1);
  ASSERT_EQ(m.read(va + 2 * K4, got), errc::ok);
  EXPECT_EQ(got, std::vector<std::byte>(K4));
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
}

TEST(MigrateVma, CpuAccessWaitsOnMigrationEntryThenSeesNewData) {
  mm m;
  auto numa = std::make_shared<frame_pool>(64);
  const unsigned np = m.attach_pool(numa, pool_kind::numa).value();
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  fill(m, va, 1, 20);
  std::atomic<bool> done{false};
  std::vector<std::byte> seen(K4);
  std::thread reader;
  {
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + K4, .select = migrate_select::system};
    ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
    ASSERT_EQ(a.cpages, 1u);
    EXPECT_TRUE(cpu_pte::is_migration(raw(m, va)));
    EXPECT_FALSE(m.cpu_translate(va).present);
    reader = std::thread([&] {
      EXPECT_EQ(m.read(va, seen), errc::ok);
      done.store(true);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_FALSE(done.load());  // waiting on the migration entry
    // The "copy" writes new bytes, which the reader must see.
    const pfn_t f = numa->alloc().value();
    std::memcpy(numa->frame_data(f), pattern(21, 0).data(), K4);
    a.dst[0] = {migrate_pfn::valid, np, f};
    ASSERT_EQ(migrate_vma_pages(m, a), errc::ok);
    ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);
  }
  reader.join();
  EXPECT_TRUE(done.load());
  EXPECT_EQ(seen, pattern(21, 0));
  EXPECT_EQ(m.cpu_translate(va).pool, np);
  EXPECT_TRUE(m.cpu_translate(va).writable);
}

// Setup, drop the lock, let `zap` change the range, then pages + finalize.
void invalidate_during_copy(bool unmap) {
  mm m;
  test_device dev(m);
  const pfn_t sys_free = m.pool(0).free_frames(), vram_free = dev.vram->free_frames();
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  fill(m, va, 2, 30);
  migrate_vma a{.start = va, .end = va + 2 * K4, .pgmap_owner = &dev, .select = migrate_select::system};
  {
    mm::read_guard g(m);
    ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
    ASSERT_EQ(a.cpages, 2u);
    test_device::copy_out(m, a, dev.vram, dev.pool);
  }
  if (unmap) ASSERT_EQ(m.munmap(va, K4), errc::ok);
  else ASSERT_EQ(m.madvise(va, K4, madvice::dontneed), errc::ok);
  EXPECT_EQ(raw(m, va), 0u);
  EXPECT_TRUE(cpu_pte::is_migration(raw(m, va + K4)));
  // The page's owner uses the range again before the copy finishes.
  if (unmap) {
    ASSERT_EQ(m.mmap(va, K4, rw, anon_priv | map::fixed).value(), va);
  }
  ASSERT_EQ(m.store<int>(va, 77), errc::ok);
  const std::uint64_t fresh = raw(m, va);
  {
    mm::read_guard g(m);
    ASSERT_EQ(migrate_vma_pages(m, a), errc::ok);
    ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);
  }
  EXPECT_EQ(raw(m, va), fresh);  // nothing installed over the page's new owner
  EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va + K4)));
  EXPECT_EQ(dev.vram->free_frames(), vram_free - 1);  // page 0's new frame was dropped
  EXPECT_EQ(m.load<int>(va).value(), 77);
  std::vector<std::byte> got(K4);
  ASSERT_EQ(m.read(va + K4, got), errc::ok);
  EXPECT_EQ(got, pattern(30, 1));
  ASSERT_EQ(m.munmap(va, 2 * K4), errc::ok);
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
  EXPECT_EQ(m.pool(0).free_frames(), sys_free);
}

TEST(MigrateVma, DontneedDuringCopyDropsTheNewFrame) { invalidate_during_copy(false); }
TEST(MigrateVma, MunmapDuringCopyDropsTheNewFrame) { invalidate_during_copy(true); }

TEST(MigrateVma, MprotectDuringCopyRestoresThePage) {
  mm m;
  test_device dev(m);
  const pfn_t vram_free = dev.vram->free_frames();
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  fill(m, va, 1, 40);
  migrate_vma a{.start = va, .end = va + K4, .pgmap_owner = &dev, .select = migrate_select::system};
  {
    mm::read_guard g(m);
    ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
    test_device::copy_out(m, a, dev.vram, dev.pool);
  }
  ASSERT_EQ(m.mprotect(va, K4, prot::read), errc::ok);
  const cpu_translation t = m.cpu_translate(va);
  EXPECT_TRUE(t.present);
  EXPECT_FALSE(t.writable);
  {
    mm::read_guard g(m);
    ASSERT_EQ(migrate_vma_pages(m, a), errc::ok);
    ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);
  }
  EXPECT_EQ(m.cpu_translate(va).pfn, t.pfn);  // not moved
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
  EXPECT_TRUE(holds(m, va, 1, 40));
}

TEST(MigrateVma, ForkKeepsDevicePagesCopyOnWriteInBoth) {
  mm parent;
  test_device dev(parent);
  const pfn_t vram_free = dev.vram->free_frames();
  const va_t va = parent.mmap(0, 2 * K4, rw, anon_priv).value();
  fill(parent, va, 2, 50);
  ASSERT_EQ(dev.to_device(parent, va, 2 * K4), 2u);
  auto child = parent.fork().value();
  for (va_t a : {va, va + K4}) {
    const std::uint64_t pe = raw(parent, a), ce = raw(*child, a);
    EXPECT_TRUE(cpu_pte::is_devpriv(pe));
    EXPECT_TRUE(cpu_pte::is_devpriv(ce));
    EXPECT_FALSE(cpu_pte::is_writable(pe));
    EXPECT_FALSE(cpu_pte::is_writable(ce));
    EXPECT_EQ(cpu_pte::pfn(pe), cpu_pte::pfn(ce));
    EXPECT_EQ(dev.vram->refcount(cpu_pte::pfn(pe)), 2u);
  }
  // A write in the child faults through migrate_to_ram and gets its own page.
  ASSERT_EQ(child->store<int>(va, 1234), errc::ok);
  EXPECT_EQ(dev.calls.load(), 1);
  EXPECT_TRUE(child->cpu_translate(va).writable);
  EXPECT_TRUE(cpu_pte::is_devpriv(raw(parent, va)));
  EXPECT_EQ(dev.vram->refcount(cpu_pte::pfn(raw(parent, va))), 1u);
  // The parent still reads its own data, then writes its own.
  EXPECT_TRUE(holds(parent, va, 2, 50));
  ASSERT_EQ(parent.store<int>(va + K4, 99), errc::ok);
  EXPECT_EQ(child->load<int>(va).value(), 1234);
  EXPECT_EQ(parent.load<int>(va + K4).value(), 99);
  std::vector<std::byte> got(K4);
  ASSERT_EQ(child->read(va + K4, got), errc::ok);
  EXPECT_EQ(got, pattern(50, 1));  // the child's copy of page 1 is untouched
  child.reset();
  EXPECT_EQ(dev.vram->free_frames(), vram_free);
}

struct nop_notifier : interval_notifier_ops {
  bool invalidate(interval_notifier& s, const mmu_notifier_range&, std::uint64_t seq) override {
    s.set_seq(seq);
    return true;
  }
};

TEST(MigrateVma, HmmRangeFaultOwnerSeesDevicePfnsOthersMigrateToRam) {
  mm m;
  test_device dev(m);
  nop_notifier ops;
  interval_notifier sub;
  ASSERT_EQ(sub.insert(m, 0, va_t{1} << 47, ops), errc::ok);
  const va_t va = m.mmap(0, K4, rw, anon_priv).value();
  fill(m, va, 1, 60);
  ASSERT_EQ(dev.to_device(m, va, K4), 1u);
  const pfn_t dpfn = cpu_pte::pfn(raw(m, va));
  std::vector<hmm_pfn> pfns(1);
  auto fault = [&](const void* owner) {
    hmm_range r{.notifier = &sub, .start = va, .end = va + K4, .hmm_pfns = pfns, .default_flags = hmm_req::fault,
                .dev_private_owner = owner};
    errc e;
    do {
      r.notifier_seq = sub.read_begin();
      mm::read_guard g(m);
      e = hmm_range_fault(r);
    } while (e == errc::busy);
    return e;
  };
  ASSERT_EQ(fault(&dev), errc::ok);
  EXPECT_EQ(hmm_pfn_to_pool(pfns[0]), dev.pool);
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[0]), dpfn);
  EXPECT_EQ(dev.calls.load(), 0);
  EXPECT_TRUE(cpu_pte::is_devpriv(raw(m, va)));
  int other = 0;
  ASSERT_EQ(fault(&other), errc::ok);
  EXPECT_EQ(dev.calls.load(), 1);
  EXPECT_EQ(hmm_pfn_to_pool(pfns[0]), 0u);
  EXPECT_TRUE(m.cpu_translate(va).present);
  EXPECT_TRUE(holds(m, va, 1, 60));
  ASSERT_EQ(dev.to_device(m, va, K4), 1u);
  ASSERT_EQ(fault(nullptr), errc::ok);
  EXPECT_EQ(dev.calls.load(), 2);
  EXPECT_EQ(hmm_pfn_to_pool(pfns[0]), 0u);
  sub.remove();
}

TEST(MigrateVma, BadInputIsEinvalAndChangesNothing) {
  mm other;  // destroyed after the read guard below is gone
  mm m;
  test_device dev(m);
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  fill(m, va, 2, 70);
  const std::uint64_t before = raw(m, va);
  const std::uint64_t inval_before = m.stats().invalidations;
  struct bad {
    va_t start, end;
    migrate_select sel;
  };
  const bad cases[] = {
      {va + 1, va + K4, migrate_select::system},                 // unaligned start
      {va, va + K4 + 1, migrate_select::system},                 // unaligned end
      {va, va, migrate_select::system},                          // empty
      {va + K4, va, migrate_select::system},                     // inverted
      {0, K4, migrate_select::system},                           // start 0
      {m.va_limit() - K4, m.va_limit() + K4, migrate_select::system},  // past the VA limit
      {va, va + K4, migrate_select::none},                       // nothing selected
      {va, va + K4, migrate_select(8)},                          // unknown select bit
      {va, va + 3 * K4, migrate_select::system},                 // past the VMA
      {va - K4, va + K4, migrate_select::system},                // starts before the VMA
  };
  mm::read_guard g(m);
  for (const bad& c : cases) {
    migrate_vma a{.start = c.start, .end = c.end, .pgmap_owner = &dev, .select = c.sel};
    EXPECT_EQ(migrate_vma_setup(m, a), errc::inval) << c.start << " " << c.end;
    EXPECT_EQ(a.owner_mm, nullptr);
    EXPECT_TRUE(a.src.empty());
    EXPECT_EQ(migrate_vma_pages(m, a), errc::inval);
    EXPECT_EQ(migrate_vma_finalize(m, a), errc::inval);
  }
  EXPECT_EQ(raw(m, va), before);
  EXPECT_EQ(m.stats().invalidations, inval_before);
  // A second setup of a live migrate_vma is refused too, and a migrate_vma
  // belongs to the mm that set it up.
  migrate_vma a{.start = va, .end = va + K4, .pgmap_owner = &dev, .select = migrate_select::system};
  ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
  EXPECT_EQ(migrate_vma_setup(m, a), errc::inval);
  EXPECT_EQ(migrate_vma_finalize(other, a), errc::inval);
  EXPECT_TRUE(cpu_pte::is_migration(raw(m, va)));
  ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);  // no pages step: restored
  EXPECT_EQ(raw(m, va), before);
}

}  // namespace
}  // namespace svm
