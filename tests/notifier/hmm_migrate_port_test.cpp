// Ports of the device-private migration cases of the kernel's HMM selftest
// (tools/testing/selftests/mm/hmm-tests.c, driven there by lib/test_hmm.c's
// dmirror device) onto svm's mm model. The semantics are reproduced with our
// own driver and checks; no kernel code or text is used. Each test names the
// case it models and says what it asserts.
//
// The kernel tests look at a buffer of ints where int i holds i. Here every
// buffer holds int i = i + `base` (a per-test or per-round base), written and
// read back a page at a time, so the tests can tell rounds and processes
// apart.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "svm/notifier/hmm.h"
#include "svm/notifier/migrate.h"
#include "svm/notifier/mm.h"

namespace svm {
namespace {

constexpr std::uint64_t K4 = page_size;
constexpr std::uint64_t M2 = huge_size;
constexpr std::size_t ints_per_page = K4 / sizeof(std::int32_t);
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

// The bytes of page `page` of a buffer whose int i holds i + base.
std::vector<std::byte> page_bytes(std::uint32_t base, std::size_t page) {
  std::vector<std::int32_t> ints(ints_per_page);
  for (std::size_t k = 0; k < ints_per_page; ++k) ints[k] = std::int32_t(base + page * ints_per_page + k);
  std::vector<std::byte> out(K4);
  std::memcpy(out.data(), ints.data(), K4);
  return out;
}

// CPU writes of the buffer [va, va + pages*4K) (first page index `first`).
::testing::AssertionResult cpu_fill(mm& m, va_t va, std::size_t pages, std::uint32_t base, std::size_t first = 0) {
  for (std::size_t p = 0; p < pages; ++p)
    if (errc e = m.write(va + p * K4, page_bytes(base, first + p)); e != errc::ok)
      return ::testing::AssertionFailure() << "CPU write of page " << p << ": errc " << int(e);
  return ::testing::AssertionSuccess();
}

// CPU reads of [va, va + pages*4K): every page must hold its ints. `first`
// is the buffer index of the page at `va`.
::testing::AssertionResult cpu_check(mm& m, va_t va, std::size_t pages, std::uint32_t base, std::size_t first = 0) {
  std::vector<std::byte> got(K4);
  for (std::size_t p = 0; p < pages; ++p) {
    if (errc e = m.read(va + p * K4, got); e != errc::ok)
      return ::testing::AssertionFailure() << "CPU read of page " << first + p << ": errc " << int(e);
    if (got != page_bytes(base, first + p))
      return ::testing::AssertionFailure() << "CPU read of page " << first + p << ": wrong bytes";
  }
  return ::testing::AssertionSuccess();
}

std::uint64_t raw(const mm& m, va_t va) { return m.raw_pte(va).entry; }

// The dmirror of lib/test_hmm.c, reduced to what the migration cases use: a
// device-private pool (its VRAM) attached to one mm, whose pgmap ops move a
// faulting page back to system memory with the three migrate_vma steps.
struct dmirror : dev_pagemap_ops {
  static constexpr pfn_t vram_frames = 4096;
  std::shared_ptr<frame_pool> vram = std::make_shared<frame_pool>(vram_frames, aperture::vram);
  unsigned pool = 0;
  int cpu_faults = 0;  // migrate_to_ram calls

  explicit dmirror(mm& m) : pool(m.attach_pool(vram, pool_kind::device_private, this, this).value()) {}

  errc migrate_to_ram(mm& m, va_t addr) SVM_REQUIRES_SHARED(m.mmap_lock()) override {
    ++cpu_faults;
    migrate_vma a{.start = addr, .end = addr + K4, .pgmap_owner = this, .select = migrate_select::device_private};
    if (errc e = migrate_vma_setup(m, a); e != errc::ok) return e;
    if (errc e = alloc_and_copy(m, a, *m.pool_ptr(0), 0); e != errc::ok) {
      (void)migrate_vma_finalize(m, a);
      return e;
    }
    (void)migrate_vma_pages(m, a);
    return migrate_vma_finalize(m, a);
  }

  // Step 2 of a migration: a frame of `dst` for every collected page, with
  // the page's bytes (a collected hole reads as zeros).
  static errc alloc_and_copy(mm& m, migrate_vma& a, frame_pool& dst, unsigned dst_pool) {
    for (std::size_t i = 0; i < a.npages; ++i) {
      const migrate_page& s = a.src[i];
      if (!s.has(migrate_pfn::migrate)) continue;
      auto f = dst.alloc();
      if (!f) return f.error();
      if (s.has(migrate_pfn::valid)) frame_pool::copy_frame(dst.frame_data(*f), m.pool(s.pool).frame_data(s.pfn));
      a.dst[i] = {migrate_pfn::valid, dst_pool, *f};
    }
    return errc::ok;
  }

  // What the test driver's MIGRATE_TO_DEV ioctl does: move the system pages
  // of [va, va+len) to VRAM, then read the range back through the device's
  // own view. `cpages` gets the pages the device holds afterwards; ENOENT
  // (as the kernel's driver reports) when some page is not in VRAM, e.g.
  // because migration refused it.
  struct result_t {
    errc err = errc::ok;
    std::size_t cpages = 0;
  };
  result_t migrate_to_dev(mm& m, va_t va, std::uint64_t len) {
    {
      mm::read_guard g(m);
      migrate_vma a{.start = va, .end = va + len, .pgmap_owner = this, .select = migrate_select::system};
      if (errc e = migrate_vma_setup(m, a); e != errc::ok) return {e, 0};
      if (errc e = alloc_and_copy(m, a, *vram, pool); e != errc::ok) {
        (void)migrate_vma_finalize(m, a);
        return {e, 0};
      }
      if (errc e = migrate_vma_pages(m, a); e != errc::ok) return {e, 0};
      if (errc e = migrate_vma_finalize(m, a); e != errc::ok) return {e, 0};
    }
    result_t r;
    for (va_t p = va; p < va + len; p += K4)
      if (device_frame(m, p) != 0) ++r.cpages;
    if (r.cpages != len / K4) r.err = errc::noent;
    return r;
  }

  // The VRAM frame this device holds for `va` (a device-private entry of its
  // pool), or 0.
  pfn_t device_frame(const mm& m, va_t va) const {
    const std::uint64_t e = raw(m, va);
    return cpu_pte::is_devpriv(e) && cpu_pte::pool(e) == pool ? cpu_pte::pfn(e) : 0;
  }

  // The device reads its copy of [va, va + pages*4K): every page must be in
  // VRAM and hold its ints ("check what the device read").
  ::testing::AssertionResult device_check(const mm& m, va_t va, std::size_t pages, std::uint32_t base,
                                          std::size_t first = 0) const {
    for (std::size_t p = 0; p < pages; ++p) {
      const pfn_t f = device_frame(m, va + p * K4);
      if (f == 0) return ::testing::AssertionFailure() << "page " << first + p << " is not in VRAM";
      if (std::memcmp(vram->frame_data(f), page_bytes(base, first + p).data(), K4) != 0)
        return ::testing::AssertionFailure() << "VRAM frame of page " << first + p << ": wrong bytes";
    }
    return ::testing::AssertionSuccess();
  }

  // The driver gives its memory back (the test driver's RELEASE ioctl, which
  // evicts every chunk): the device-private pages of [va, va+len) move to
  // system memory. Returns the pages moved.
  std::size_t evict(mm& m, va_t va, std::uint64_t len) {
    mm::read_guard g(m);
    migrate_vma a{.start = va, .end = va + len, .pgmap_owner = this, .select = migrate_select::device_private};
    EXPECT_EQ(migrate_vma_setup(m, a), errc::ok);
    EXPECT_EQ(alloc_and_copy(m, a, *m.pool_ptr(0), 0), errc::ok);
    EXPECT_EQ(migrate_vma_pages(m, a), errc::ok);
    std::size_t n = 0;
    for (const migrate_page& s : a.src) n += s.has(migrate_pfn::migrate) ? 1 : 0;
    EXPECT_EQ(migrate_vma_finalize(m, a), errc::ok);
    return n;
  }

  [[nodiscard]] pfn_t vram_used() const { return vram_free0 - vram->free_frames(); }
  const pfn_t vram_free0 = vram->free_frames();
};

// The CPU view of [va, va + pages*4K) by kind: how many pages are this
// device's device-private entries, and how many are present in system memory.
struct pte_census {
  std::size_t devpriv = 0, present_sys = 0, present_writable = 0, none = 0;
};
pte_census census(const mm& m, const dmirror& d, va_t va, std::size_t pages) {
  pte_census c;
  for (std::size_t p = 0; p < pages; ++p) {
    const va_t a = va + p * K4;
    const cpu_translation t = m.cpu_translate(a);
    if (d.device_frame(m, a) != 0) ++c.devpriv;
    else if (t.present && t.pool == 0) {
      ++c.present_sys;
      if (t.writable) ++c.present_writable;
    } else if (raw(m, a) == 0) ++c.none;
  }
  return c;
}

// A snapshot of the CPU page table through hmm_range_fault without faulting
// (the test driver's SNAPSHOT ioctl), as this device sees it.
std::vector<hmm_pfn> snapshot(mm& m, const dmirror& d, va_t va, std::size_t pages) {
  std::vector<hmm_pfn> pfns(pages);
  hmm_range r{.start = va, .end = va + pages * K4, .hmm_pfns = pfns, .dev_private_owner = &d, .mm = &m,
              .is_valid = [] { return true; }};
  mm::read_guard g(m);
  EXPECT_EQ(hmm_range_fault(r), errc::ok);
  return pfns;
}

// A 2M-aligned 2M range inside a fresh 4M anonymous mapping (the kernel
// tests' ALIGN(ptr, pmd size) on a buffer twice that size), with THP advice.
va_t map_aligned_2m(mm& m, bool thp) {
  const va_t raw_va = m.mmap(0, 2 * M2, rw, anon_priv).value();
  const va_t va = (raw_va + M2 - 1) & ~(M2 - 1);
  EXPECT_EQ(m.madvise(va, M2, thp ? madvice::hugepage : madvice::nohugepage), errc::ok);
  return va;
}

constexpr std::size_t buffer_pages = 1024;  // HMM_BUFFER_SIZE: 1024 pages

// Kernel hmm-tests.c migrate: CPU-written anon buffer moves whole to VRAM, bytes intact, no leak.
// Detail: a private anonymous buffer written by the CPU moves whole to
// device-private memory; the device reads the CPU's bytes, every PTE is this
// device's writable device-private entry, the system frames are freed and
// munmap frees every VRAM frame.
TEST(HmmPort, Migrate) {
  auto m = mm::create().value();
  dmirror dev(*m);
  const pfn_t sys_free = m->pool(0).free_frames();
  const va_t va = m->mmap(0, buffer_pages * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(*m, va, buffer_pages, 0));
  EXPECT_EQ(m->pool(0).free_frames(), sys_free - buffer_pages);

  const auto r = dev.migrate_to_dev(*m, va, buffer_pages * K4);
  ASSERT_EQ(r.err, errc::ok);
  ASSERT_EQ(r.cpages, buffer_pages);
  EXPECT_TRUE(dev.device_check(*m, va, buffer_pages, 0));
  for (std::size_t p = 0; p < buffer_pages; ++p) {
    const std::uint64_t e = raw(*m, va + p * K4);
    ASSERT_TRUE(cpu_pte::is_devpriv(e)) << p;
    ASSERT_TRUE(cpu_pte::is_writable(e)) << p;
    ASSERT_FALSE(m->cpu_translate(va + p * K4).present) << p;
    ASSERT_EQ(dev.vram->refcount(cpu_pte::pfn(e)), 1u) << p;
  }
  // The owner's snapshot reports its own device pages, writable, not faulted.
  const std::vector<hmm_pfn> snap = snapshot(*m, dev, va, buffer_pages);
  for (std::size_t p = 0; p < buffer_pages; ++p) {
    ASSERT_EQ(snap[p] & (hmm_pfn_valid | hmm_pfn_write), hmm_pfn_valid | hmm_pfn_write) << p;
    ASSERT_EQ(hmm_pfn_to_pool(snap[p]), dev.pool) << p;
    ASSERT_EQ(hmm_pfn_to_pfn(snap[p]), dev.device_frame(*m, va + p * K4)) << p;
  }
  EXPECT_EQ(dev.vram_used(), buffer_pages);
  EXPECT_EQ(m->pool(0).free_frames(), sys_free);  // the system copies are gone
  EXPECT_EQ(m->resident_pages(), 0u);             // device entries are not resident
  EXPECT_EQ(dev.cpu_faults, 0);

  ASSERT_EQ(m->munmap(va, buffer_pages * K4), errc::ok);
  EXPECT_EQ(dev.vram_used(), 0u);
  EXPECT_EQ(m->pool(0).free_frames(), sys_free);
  EXPECT_EQ(dev.cpu_faults, 0);  // munmap frees device pages without migrating them
}

// Kernel hmm-tests.c migrate_fault: half faulted back by the CPU, then the mixed range migrates again.
// Detail: after a migration the CPU reads the first half back (one
// migrate_to_ram per page: those pages become present system pages, the second
// half stays in VRAM); migrating the mixed range again leaves the whole buffer
// in VRAM with the CPU's bytes, and it reads back intact.
TEST(HmmPort, MigrateFault) {
  mm m;
  dmirror dev(m);
  const pfn_t sys_free = m.pool(0).free_frames();
  const std::size_t n = buffer_pages, half = n / 2;
  const va_t va = m.mmap(0, n * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(m, va, n, 7));
  auto r = dev.migrate_to_dev(m, va, n * K4);
  ASSERT_EQ(r.err, errc::ok);
  ASSERT_EQ(r.cpages, n);
  ASSERT_TRUE(dev.device_check(m, va, n, 7));

  // Fault half the pages back to system memory and check them.
  ASSERT_TRUE(cpu_check(m, va, half, 7));
  EXPECT_EQ(dev.cpu_faults, int(half));
  pte_census c = census(m, dev, va, n);
  EXPECT_EQ(c.present_sys, half);
  EXPECT_EQ(c.present_writable, half);  // a private page mapped once comes back writable
  EXPECT_EQ(c.devpriv, n - half);
  EXPECT_TRUE(dev.device_check(m, va + half * K4, n - half, 7, half));
  EXPECT_EQ(dev.vram_used(), n - half);
  EXPECT_EQ(m.pool(0).free_frames(), sys_free - half);

  // Migrate the mix of system and device-private pages to the device again.
  r = dev.migrate_to_dev(m, va, n * K4);
  ASSERT_EQ(r.err, errc::ok);
  ASSERT_EQ(r.cpages, n);
  EXPECT_TRUE(dev.device_check(m, va, n, 7));
  EXPECT_EQ(census(m, dev, va, n).devpriv, n);
  EXPECT_EQ(dev.vram_used(), n);
  EXPECT_EQ(m.pool(0).free_frames(), sys_free);

  // Everything reads back through the CPU, after which VRAM is empty.
  ASSERT_TRUE(cpu_check(m, va, n, 7));
  EXPECT_EQ(dev.cpu_faults, int(half + n));
  EXPECT_EQ(dev.vram_used(), 0u);
  ASSERT_EQ(m.munmap(va, n * K4), errc::ok);
  EXPECT_EQ(m.pool(0).free_frames(), sys_free);
}

// Kernel hmm-tests.c migrate_release: the device evicts its pages; the CPU reads them without faults.
// Detail: the device gives its memory back while the buffer lives in it (the
// driver evicts every device page to system memory); no CPU fault is needed,
// every VRAM frame is free, the PTEs are present system pages again, and the
// CPU reads the bytes it wrote.
TEST(HmmPort, MigrateRelease) {
  mm m;
  dmirror dev(m);
  const std::size_t n = buffer_pages;
  const va_t va = m.mmap(0, n * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(m, va, n, 11));
  const auto r = dev.migrate_to_dev(m, va, n * K4);
  ASSERT_EQ(r.err, errc::ok);
  ASSERT_EQ(r.cpages, n);
  ASSERT_TRUE(dev.device_check(m, va, n, 11));

  EXPECT_EQ(dev.evict(m, va, n * K4), n);
  EXPECT_EQ(dev.vram_used(), 0u);
  const pte_census c = census(m, dev, va, n);
  EXPECT_EQ(c.present_sys, n);
  EXPECT_EQ(c.present_writable, n);
  ASSERT_TRUE(cpu_check(m, va, n, 11));
  EXPECT_EQ(dev.cpu_faults, 0);
}

// Kernel hmm-tests.c migrate_release (process exit): mm teardown frees every VRAM and system frame.
// Companion of hmm-tests.c `migrate_release` (the process exits with its
// buffer in VRAM): tearing the mm down frees every VRAM frame and every system
// frame, including pages a fork child shares copy-on-write, without calling
// migrate_to_ram.
TEST(HmmPort, MigrateReleaseTeardown) {
  auto m = mm::create().value();
  dmirror dev(*m);
  const std::shared_ptr<frame_pool> sys = m->pool_ptr(0);
  const pfn_t sys_free = sys->free_frames();
  const std::size_t n = buffer_pages;
  const va_t va = m->mmap(0, n * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(*m, va, n, 13));
  ASSERT_EQ(dev.migrate_to_dev(*m, va, n * K4).cpages, n);
  ASSERT_TRUE(cpu_check(*m, va, 3, 13));  // three pages back in system memory
  EXPECT_EQ(dev.vram_used(), n - 3);
  auto child = m->fork().value();  // the child shares the rest, still in VRAM
  for (std::size_t p = 3; p < n; ++p) ASSERT_EQ(dev.vram->refcount(dev.device_frame(*m, va + p * K4)), 2u) << p;

  m->teardown();
  EXPECT_EQ(dev.vram_used(), n - 3);  // the child still maps them
  child->teardown();
  EXPECT_EQ(dev.vram_used(), 0u);
  EXPECT_EQ(sys->free_frames(), sys_free);
  EXPECT_EQ(dev.cpu_faults, 3);
  child.reset();
  m.reset();
  EXPECT_EQ(dev.vram_used(), 0u);
  EXPECT_EQ(sys->free_frames(), sys_free);
}

// Kernel hmm-tests.c migrate_shared: MAP_SHARED anonymous memory is not migrated (ENOENT).
// Detail: MAP_SHARED anonymous memory is not migrated (the kernel's driver
// gets no page and reports ENOENT): no page is collected, the PTEs and bytes
// stay as they were and no VRAM frame is used; both for an untouched buffer
// (as the kernel test) and for one the CPU wrote.
TEST(HmmPort, MigrateShared) {
  mm m;
  dmirror dev(m);
  const std::size_t n = buffer_pages;
  const va_t untouched = m.mmap(0, n * K4, rw, map::shared | map::anonymous).value();
  const va_t written = m.mmap(0, n * K4, rw, map::shared | map::anonymous).value();
  ASSERT_TRUE(cpu_fill(m, written, n, 17));
  std::vector<std::uint64_t> before(n);
  for (std::size_t p = 0; p < n; ++p) before[p] = raw(m, written + p * K4);

  for (va_t va : {untouched, written}) {
    {
      mm::read_guard g(m);
      migrate_vma a{.start = va, .end = va + n * K4, .pgmap_owner = &dev, .select = migrate_select::system};
      ASSERT_EQ(migrate_vma_setup(m, a), errc::ok);
      EXPECT_EQ(a.cpages, 0u);
      for (const migrate_page& s : a.src) ASSERT_FALSE(s.has(migrate_pfn::migrate));
      ASSERT_EQ(migrate_vma_finalize(m, a), errc::ok);
    }
    const auto r = dev.migrate_to_dev(m, va, n * K4);
    EXPECT_EQ(r.err, errc::noent);
    EXPECT_EQ(r.cpages, 0u);
  }
  EXPECT_EQ(dev.vram_used(), 0u);
  for (std::size_t p = 0; p < n; ++p) {
    ASSERT_EQ(raw(m, untouched + p * K4), 0u) << p;  // holes of shmem are not filled either
    ASSERT_EQ(raw(m, written + p * K4), before[p]) << p;
  }
  EXPECT_TRUE(cpu_check(m, written, n, 17));
  EXPECT_EQ(dev.cpu_faults, 0);
}

// Kernel hmm-tests.c migrate_multiple: ten migrate/fault-back rounds, each with its own bytes, no leak.
// Detail: ten rounds of mmap, CPU write, migrate to VRAM, device check, CPU
// read back (each page through migrate_to_ram), munmap; every round sees its
// own bytes, and no system or VRAM frame leaks across the rounds.
TEST(HmmPort, MigrateMultiple) {
  mm m;
  dmirror dev(m);
  const pfn_t sys_free = m.pool(0).free_frames();
  const std::size_t n = buffer_pages;
  for (std::uint32_t round = 0; round < 10; ++round) {
    SCOPED_TRACE(round);
    const std::uint32_t base = 1000 * round;
    const va_t va = m.mmap(0, n * K4, rw, anon_priv).value();
    ASSERT_TRUE(cpu_fill(m, va, n, base));
    const auto r = dev.migrate_to_dev(m, va, n * K4);
    ASSERT_EQ(r.err, errc::ok);
    ASSERT_EQ(r.cpages, n);
    ASSERT_TRUE(dev.device_check(m, va, n, base));
    EXPECT_EQ(dev.vram_used(), n);
    const int faults_before = dev.cpu_faults;
    ASSERT_TRUE(cpu_check(m, va, n, base));
    EXPECT_EQ(dev.cpu_faults - faults_before, int(n));
    EXPECT_EQ(census(m, dev, va, n).present_writable, n);
    EXPECT_EQ(dev.vram_used(), 0u);
    ASSERT_EQ(m.munmap(va, n * K4), errc::ok);
    EXPECT_EQ(m.pool(0).free_frames(), sys_free);
  }
}

// Kernel hmm-tests.c hmm_cow_in_device: fork keeps VRAM pages COW in both; writes diverge them.
// Detail: fork while the buffer is in VRAM. Both processes keep read-only
// device-private entries for the same VRAM frames (copy-on-write); the
// parent's writes fault each page back through migrate_to_ram and give it
// private writable system pages (the snapshot then shows WRITE in system
// memory, as in the kernel test), while the child still reads the old bytes;
// the child's own writes diverge in turn, and nothing leaks once both are
// gone.
TEST(HmmPort, HmmCowInDevice) {
  mm parent;
  dmirror dev(parent);
  const pfn_t sys_free = parent.pool(0).free_frames();
  constexpr std::size_t n = 4;
  const va_t va = parent.mmap(0, n * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(parent, va, n, 0));
  const auto r = dev.migrate_to_dev(parent, va, n * K4);
  ASSERT_EQ(r.err, errc::ok);
  ASSERT_EQ(r.cpages, n);

  auto child = parent.fork().value();
  for (std::size_t p = 0; p < n; ++p) {
    const va_t a = va + p * K4;
    const std::uint64_t pe = raw(parent, a), ce = raw(*child, a);
    ASSERT_TRUE(cpu_pte::is_devpriv(pe)) << p;
    ASSERT_TRUE(cpu_pte::is_devpriv(ce)) << p;
    EXPECT_FALSE(cpu_pte::is_writable(pe)) << p;  // write-protected in both
    EXPECT_FALSE(cpu_pte::is_writable(ce)) << p;
    EXPECT_EQ(cpu_pte::pfn(pe), cpu_pte::pfn(ce)) << p;
    EXPECT_EQ(dev.vram->refcount(cpu_pte::pfn(pe)), 2u) << p;
  }
  EXPECT_EQ(dev.vram_used(), n);

  // The parent writes new values over its COW pages: each write faults the
  // page out of VRAM first.
  ASSERT_TRUE(cpu_fill(parent, va, n, 500));
  EXPECT_GE(dev.cpu_faults, int(n));
  const std::vector<hmm_pfn> snap = snapshot(parent, dev, va, n);
  for (std::size_t p = 0; p < n; ++p) {
    EXPECT_EQ(snap[p] & (hmm_pfn_valid | hmm_pfn_write), hmm_pfn_valid | hmm_pfn_write) << p;
    EXPECT_EQ(hmm_pfn_to_pool(snap[p]), 0u) << p;  // system memory, not VRAM
    const cpu_translation pt = parent.cpu_translate(va + p * K4), ct = child->cpu_translate(va + p * K4);
    EXPECT_TRUE(pt.present && pt.writable) << p;
    EXPECT_FALSE(ct.writable) << p;  // the child's copy is still shared or its own, not written
    if (ct.present) {
      EXPECT_NE(ct.pfn, pt.pfn) << p;
    }
  }
  EXPECT_TRUE(cpu_check(parent, va, n, 500));
  EXPECT_TRUE(cpu_check(*child, va, n, 0));

  // The child writes too: both keep their own data.
  ASSERT_TRUE(cpu_fill(*child, va, n, 900));
  EXPECT_TRUE(cpu_check(parent, va, n, 500));
  EXPECT_TRUE(cpu_check(*child, va, n, 900));
  EXPECT_EQ(dev.vram_used(), 0u);

  child.reset();
  ASSERT_EQ(parent.munmap(va, n * K4), errc::ok);
  EXPECT_EQ(dev.vram_used(), 0u);
  EXPECT_EQ(parent.pool(0).free_frames(), sys_free);
}

// Kernel hmm-tests.c hmm_cow_in_device, child side: the child's write breaks the COW first.
// The same fork case with the copy-on-write broken from the child side while
// both entries are still device-private: the child's write gives it a private
// page, the parent keeps reading (and then writing) its own bytes.
TEST(HmmPort, HmmCowInDeviceChildWritesFirst) {
  mm parent;
  dmirror dev(parent);
  const pfn_t sys_free = parent.pool(0).free_frames();
  constexpr std::size_t n = 4;
  const va_t va = parent.mmap(0, n * K4, rw, anon_priv).value();
  ASSERT_TRUE(cpu_fill(parent, va, n, 0));
  ASSERT_EQ(dev.migrate_to_dev(parent, va, n * K4).cpages, n);
  auto child = parent.fork().value();

  ASSERT_TRUE(cpu_fill(*child, va, n, 300));
  for (std::size_t p = 0; p < n; ++p) {
    const cpu_translation ct = child->cpu_translate(va + p * K4);
    EXPECT_TRUE(ct.present && ct.writable && ct.pool == 0) << p;
    EXPECT_FALSE(cpu_pte::is_writable(raw(parent, va + p * K4))) << p;
  }
  EXPECT_TRUE(cpu_check(parent, va, n, 0));
  EXPECT_TRUE(cpu_check(*child, va, n, 300));
  ASSERT_TRUE(cpu_fill(parent, va, n, 600));
  EXPECT_TRUE(cpu_check(parent, va, n, 600));
  EXPECT_TRUE(cpu_check(*child, va, n, 300));
  EXPECT_EQ(dev.vram_used(), 0u);
  child.reset();
  ASSERT_EQ(parent.munmap(va, n * K4), errc::ok);
  EXPECT_EQ(parent.pool(0).free_frames(), sys_free);
}

// Kernel hmm-tests.c migrate_partial_unmap_fault: unmap 1M of a migrated 2M, fault back the rest.
// Detail: a 2M range (THP-backed or 4K pages) moves to VRAM, then 1M of it at
// offset 0, 512K or 1M is unmapped: the unmapped pages' VRAM frames are freed
// at once and their VAs fault (EFAULT), the rest faults back through
// migrate_to_ram with the CPU's bytes, and nothing leaks.
TEST(HmmPort, MigratePartialUnmapFault) {
  const std::uint64_t unmap_size = M2 / 2;
  const std::size_t n = M2 / K4, nun = unmap_size / K4;
  for (bool thp : {false, true}) {
    for (std::uint64_t off : {std::uint64_t{0}, M2 / 4, M2 / 2}) {
      SCOPED_TRACE(::testing::Message() << "thp " << thp << " offset " << off);
      mm m;
      dmirror dev(m);
      const pfn_t sys_free = m.pool(0).free_frames();
      const va_t va = map_aligned_2m(m, thp);
      ASSERT_TRUE(cpu_fill(m, va, n, 0));
      EXPECT_EQ(m.cpu_translate(va).order, thp ? 9u : 0u);  // a THP when advised
      const auto r = dev.migrate_to_dev(m, va, M2);
      ASSERT_EQ(r.err, errc::ok);
      ASSERT_EQ(r.cpages, n);
      ASSERT_TRUE(dev.device_check(m, va, n, 0));
      EXPECT_EQ(m.pool(0).free_frames(), sys_free);  // the THP (or pages) freed whole

      ASSERT_EQ(m.munmap(va + off, unmap_size), errc::ok);
      EXPECT_EQ(dev.vram_used(), n - nun);
      EXPECT_EQ(dev.cpu_faults, 0);
      for (std::size_t p = off / K4; p < off / K4 + nun; ++p) {
        ASSERT_EQ(raw(m, va + p * K4), 0u) << p;
        ASSERT_EQ(m.load<std::int32_t>(va + p * K4).error(), errc::fault) << p;
      }
      // Fault the remaining pages back and check them.
      for (std::size_t p = 0; p < n; ++p) {
        if (p * K4 >= off && p * K4 < off + unmap_size) continue;
        ASSERT_TRUE(cpu_check(m, va + p * K4, 1, 0, p));
      }
      EXPECT_EQ(dev.cpu_faults, int(n - nun));
      EXPECT_EQ(dev.vram_used(), 0u);
      EXPECT_EQ(m.pool(0).free_frames(), sys_free - (n - nun));
      ASSERT_EQ(m.munmap(va - M2, 3 * M2), errc::ok);
      EXPECT_EQ(m.pool(0).free_frames(), sys_free);
      EXPECT_TRUE(m.vmas().empty());
    }
  }
}

// Kernel hmm-tests.c migrate_remap_fault: mremap a migrated 2M buffer, the CPU reads it at the new VA.
// Detail: a 2M buffer is moved with mremap(MAYMOVE|FIXED[|DONTUNMAP]) to 2M +
// {0, 512K, 1M} past itself, before or after its migration to VRAM; the CPU
// reads at the new address fault each page back with the CPU's bytes; the old
// range is gone (or, with DONTUNMAP, empty and reading zeros), and nothing
// leaks.
TEST(HmmPort, MigrateRemapFault) {
  const std::size_t n = M2 / K4;
  for (bool before : {false, true}) {
    for (bool dont_unmap : {false, true}) {
      for (bool thp : {false, true}) {
        for (std::uint64_t off : {std::uint64_t{0}, M2 / 4, M2 / 2}) {
          SCOPED_TRACE(::testing::Message() << "before " << before << " dontunmap " << dont_unmap << " thp " << thp
                                            << " offset " << off);
          mm m;
          dmirror dev(m);
          const pfn_t sys_free = m.pool(0).free_frames();
          const va_t buf = m.mmap(0, 8 * M2, rw, anon_priv).value();
          const va_t va = (buf + M2 - 1) & ~(M2 - 1);
          ASSERT_EQ(m.madvise(va, M2, thp ? madvice::hugepage : madvice::nohugepage), errc::ok);
          ASSERT_EQ(m.munmap(va + M2, 2 * M2), errc::ok);
          ASSERT_TRUE(cpu_fill(m, va, n, 0));
          const mremap_flags flags = mremap_flags::maymove | mremap_flags::fixed |
                                     (dont_unmap ? mremap_flags::dontunmap : mremap_flags::none);
          const va_t target = va + M2 + off;
          va_t cur = va;
          if (before) {
            ASSERT_EQ(m.mremap(va, M2, M2, flags, target).value(), target);
            cur = target;
          }
          const auto r = dev.migrate_to_dev(m, cur, M2);
          ASSERT_EQ(r.err, errc::ok);
          ASSERT_EQ(r.cpages, n);
          ASSERT_TRUE(dev.device_check(m, cur, n, 0));
          if (!before) {
            ASSERT_EQ(m.mremap(va, M2, M2, flags, target).value(), target);
            cur = target;
            // The device-private entries moved with the mapping.
            EXPECT_TRUE(dev.device_check(m, cur, n, 0));
          }
          EXPECT_EQ(dev.vram_used(), n);
          for (std::size_t p = 0; p < n; ++p) ASSERT_EQ(raw(m, va + p * K4), 0u) << p;  // nothing left behind

          // Fault the pages back at the new address and check them.
          ASSERT_TRUE(cpu_check(m, cur, n, 0));
          EXPECT_EQ(dev.cpu_faults, int(n));
          EXPECT_EQ(dev.vram_used(), 0u);
          if (dont_unmap) {
            // The old range keeps an empty VMA: private anonymous zeros.
            EXPECT_EQ(m.load<std::int32_t>(va).value(), 0);
            EXPECT_EQ(m.load<std::int32_t>(va + M2 - K4).value(), 0);
          } else {
            EXPECT_EQ(m.load<std::int32_t>(va).error(), errc::fault);
          }
          ASSERT_EQ(m.munmap(buf, 10 * M2), errc::ok);
          EXPECT_EQ(m.pool(0).free_frames(), sys_free);
          EXPECT_EQ(dev.vram_used(), 0u);
        }
      }
    }
  }
}

}  // namespace
}  // namespace svm
