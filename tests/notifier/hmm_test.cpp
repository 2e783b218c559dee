// hmm_range_fault: docs/contracts.md §2, row by row.
#include <gtest/gtest.h>

#include "test_mirror.h"

namespace svm {
namespace {

constexpr std::uint64_t K4 = page_size, M2 = huge_size;
const prot rw = prot::read | prot::write;
const map anon_priv = map::private_ | map::anonymous;

struct nop_ops : interval_notifier_ops {
  bool invalidate(interval_notifier& s, const mmu_notifier_range&, std::uint64_t seq) override {
    s.set_seq(seq);
    return true;
  }
};

struct fixture {
  mm m;
  nop_ops ops;
  interval_notifier sub;
  std::vector<hmm_pfn> pfns;
  hmm_range range;
  fixture() { EXPECT_EQ(sub.insert(m, 0, va_t{1} << 47, ops), errc::ok); }
  ~fixture() { sub.remove(); }
  errc run(va_t start, std::size_t pages, hmm_pfn flags, hmm_pfn mask = 0, std::vector<hmm_pfn> in = {}) {
    pfns = in.empty() ? std::vector<hmm_pfn>(pages, 0) : in;
    range = hmm_range{.notifier = &sub, .start = start, .end = start + pages * K4, .hmm_pfns = pfns,
                      .default_flags = flags, .pfn_flags_mask = mask};
    range.notifier_seq = sub.read_begin();
    auto g = m.read_lock();
    return hmm_range_fault(range);
  }
};

TEST(Hmm, PresentPagesAreValidWithWritePermission) {
  fixture f;
  const va_t va = f.m.mmap(0, 2 * K4, rw, anon_priv).value();
  ASSERT_EQ(f.m.store<int>(va, 1), errc::ok);
  ASSERT_EQ(f.m.load<int>(va + K4).error(), errc::ok);  // zero page
  ASSERT_EQ(f.run(va, 2, 0), errc::ok);
  EXPECT_EQ(f.pfns[0] & (hmm_pfn_valid | hmm_pfn_write), hmm_pfn_valid | hmm_pfn_write);
  EXPECT_EQ(hmm_pfn_to_pfn(f.pfns[0]), f.m.cpu_translate(va).pfn);
  EXPECT_EQ(hmm_pfn_to_map_order(f.pfns[0]), 0u);
  EXPECT_EQ(f.pfns[1] & (hmm_pfn_valid | hmm_pfn_write), hmm_pfn_valid);
  EXPECT_EQ(hmm_pfn_to_pfn(f.pfns[1]), mm::zero_pfn());
}

TEST(Hmm, SnapshotOfAbsentPagesIsZeroAndNeverFaults) {
  fixture f;
  const va_t va = f.m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(f.run(va, 4, 0), errc::ok);
  for (auto e : f.pfns) EXPECT_EQ(e, 0u);
  EXPECT_EQ(f.m.stats().faults, 0u);
  EXPECT_FALSE(f.m.cpu_translate(va).present);
}

TEST(Hmm, FaultRequestedFaultsPagesIn) {
  fixture f;
  const va_t va = f.m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(f.run(va, 4, hmm_req::fault), errc::ok);
  for (auto e : f.pfns) {
    EXPECT_TRUE(e & hmm_pfn_valid);
    EXPECT_FALSE(e & hmm_pfn_write);  // a read fault maps the zero page
  }
  errc r;
  do r = f.run(va, 4, hmm_req::fault | hmm_req::write);
  while (r == errc::busy);  // a COW break invalidates, like the kernel's
  ASSERT_EQ(r, errc::ok);
  for (auto e : f.pfns) EXPECT_TRUE(e & hmm_pfn_write);
  EXPECT_TRUE(f.m.cpu_translate(va + 3 * K4).writable);
}

TEST(Hmm, WriteOnReadOnlyVmaIsEpermWithPartialOutput) {
  fixture f;
  const va_t va = f.m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(f.m.mprotect(va + 2 * K4, 2 * K4, prot::read), errc::ok);
  const hmm_pfn marker = 0x1234;
  std::vector<hmm_pfn> in(4, marker | hmm_req::fault | hmm_req::write);
  errc r;
  do r = f.run(va, 4, 0, hmm_req::fault | hmm_req::write, in);
  while (r == errc::busy);
  EXPECT_EQ(r, errc::perm);
  EXPECT_TRUE(f.pfns[0] & hmm_pfn_write);  // before the point reached: output
  EXPECT_TRUE(f.pfns[1] & hmm_pfn_write);
  EXPECT_EQ(f.pfns[2], in[2]);             // from it on: still the input
  EXPECT_EQ(f.pfns[3], in[3]);
}

TEST(Hmm, HolesAndProtNoneAreEfaultOrErrorEntries) {
  fixture f;
  const va_t va = f.m.mmap(0, 4 * K4, rw, anon_priv).value();
  ASSERT_EQ(f.m.munmap(va + K4, K4), errc::ok);
  ASSERT_EQ(f.m.mprotect(va + 2 * K4, K4, prot::none), errc::ok);
  ASSERT_EQ(f.run(va, 4, 0), errc::ok);  // snapshot: ERROR entries
  EXPECT_EQ(f.pfns[0], 0u);
  EXPECT_EQ(f.pfns[1], hmm_pfn_error);
  EXPECT_EQ(f.pfns[2], hmm_pfn_error);
  EXPECT_EQ(f.pfns[3], 0u);
  EXPECT_EQ(f.run(va, 4, hmm_req::fault), errc::fault);
  EXPECT_TRUE(f.pfns[0] & hmm_pfn_valid);
  EXPECT_EQ(f.pfns[1], 0u);  // input left in place
  // Per-page requests: fault only page 3 of the range.
  std::vector<hmm_pfn> in{0, 0, 0, hmm_req::fault};
  ASSERT_EQ(f.run(va, 4, 0, hmm_req::fault, in), errc::ok);
  EXPECT_EQ(f.pfns[1], hmm_pfn_error);
  EXPECT_TRUE(f.pfns[3] & hmm_pfn_valid);
}

TEST(Hmm, IoMappingsAreRefused) {
  fixture f;
  const va_t io = f.m.mmap(0, 2 * K4, rw, map::shared | map::io).value();
  EXPECT_EQ(f.run(io, 2, hmm_req::fault), errc::fault);
  ASSERT_EQ(f.run(io, 2, 0), errc::ok);
  EXPECT_EQ(f.pfns[0], hmm_pfn_error);
}

TEST(Hmm, HugeMappingReportsOrderOnEveryEntry) {
  fixture f;
  const va_t va = f.m.mmap(0, M2, rw, anon_priv).value();
  ASSERT_EQ(f.m.madvise(va, M2, madvice::hugepage), errc::ok);
  ASSERT_EQ(f.run(va, 512, hmm_req::fault | hmm_req::write), errc::ok);
  const pfn_t base = hmm_pfn_to_pfn(f.pfns[0]);
  EXPECT_EQ(base % 512, 0u);
  for (std::size_t i = 0; i < 512; ++i) {
    ASSERT_EQ(hmm_pfn_to_map_order(f.pfns[i]), 9u) << i;
    ASSERT_EQ(hmm_pfn_to_pfn(f.pfns[i]), base + i);
    ASSERT_TRUE(f.pfns[i] & hmm_pfn_write);
  }
}

TEST(Hmm, EbusyWhenTheSequenceMoved) {
  fixture f;
  const va_t va = f.m.mmap(0, 2 * K4, rw, anon_priv).value();
  const auto seq = f.sub.read_begin();
  ASSERT_EQ(f.m.madvise(va, K4, madvice::dontneed), errc::ok);
  f.pfns.assign(2, 0);
  f.range = hmm_range{.notifier = &f.sub, .notifier_seq = seq, .start = va, .end = va + 2 * K4, .hmm_pfns = f.pfns,
                      .default_flags = hmm_req::fault};
  auto g = f.m.read_lock();
  EXPECT_EQ(hmm_range_fault(f.range), errc::busy);
  EXPECT_EQ(f.pfns[0], 0u);  // nothing walked
}

TEST(Hmm, ValidityCallbackReplacesTheNotifierCheck) {
  mm m;
  const va_t va = m.mmap(0, 2 * K4, rw, anon_priv).value();
  std::vector<hmm_pfn> pfns(2);
  int calls = 0;
  bool valid = true;
  hmm_range r{.start = va, .end = va + 2 * K4, .hmm_pfns = pfns, .default_flags = hmm_req::fault, .mm = &m,
              .is_valid = [&] {
                ++calls;
                return valid;
              }};
  {
    auto g = m.read_lock();
    EXPECT_EQ(hmm_range_fault(r), errc::ok);
  }
  EXPECT_EQ(calls, 3);  // one pass per faulted page, plus the final walk
  valid = false;
  auto g = m.read_lock();
  EXPECT_EQ(hmm_range_fault(r), errc::busy);
}

TEST(Hmm, DevicePrivatePagesOfTheOwnerAreReportedOthersFaulted) {
  fixture f;
  int me = 0, other = 0;
  auto vram = std::make_shared<frame_pool>(1024, aperture::vram);
  const unsigned id = f.m.attach_pool(vram, pool_kind::device_private, &me).value();
  const va_t va = f.m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(f.m.store<int>(va, 3), errc::ok);
  ASSERT_EQ(f.m.migrate(va, K4, id, &me).value(), 1u);
  f.pfns.assign(1, 0);
  f.range = hmm_range{.notifier = &f.sub, .start = va, .end = va + K4, .hmm_pfns = f.pfns,
                      .default_flags = hmm_req::fault, .dev_private_owner = &me};
  {
    f.range.notifier_seq = f.sub.read_begin();
    auto g = f.m.read_lock();
    ASSERT_EQ(hmm_range_fault(f.range), errc::ok);
  }
  EXPECT_TRUE(f.pfns[0] & hmm_pfn_valid);
  EXPECT_EQ(hmm_pfn_to_pool(f.pfns[0]), id);
  EXPECT_FALSE(f.m.cpu_translate(va).present);  // not faulted back
  // Snapshot by another owner: 0. Fault by another owner: migrated back.
  f.range.dev_private_owner = &other;
  f.range.default_flags = 0;
  {
    f.range.notifier_seq = f.sub.read_begin();
    auto g = f.m.read_lock();
    ASSERT_EQ(hmm_range_fault(f.range), errc::ok);
  }
  EXPECT_EQ(f.pfns[0], 0u);
  f.range.default_flags = hmm_req::fault;
  errc r;
  do {
    f.range.notifier_seq = f.sub.read_begin();
    auto g = f.m.read_lock();
    r = hmm_range_fault(f.range);
  } while (r == errc::busy);
  ASSERT_EQ(r, errc::ok);
  EXPECT_EQ(hmm_pfn_to_pool(f.pfns[0]), 0u);
  EXPECT_EQ(f.m.load<int>(va).value(), 3);
}

TEST(Hmm, SwappedOutPagesAreFaultedBackOrReportedAbsent) {
  fixture f;
  const va_t va = f.m.mmap(0, K4, rw, anon_priv).value();
  ASSERT_EQ(f.m.store<int>(va, 99), errc::ok);
  ASSERT_EQ(f.m.reclaim(va, K4).value(), 1u);
  ASSERT_EQ(f.run(va, 1, 0), errc::ok);
  EXPECT_EQ(f.pfns[0], 0u);
  ASSERT_EQ(f.run(va, 1, hmm_req::fault), errc::ok);
  EXPECT_TRUE(f.pfns[0] & hmm_pfn_valid);
  EXPECT_EQ(f.m.swap_used(), 0u);
}

TEST(Hmm, BadRangesAreEinval) {
  fixture f;
  std::vector<hmm_pfn> pfns(2);
  hmm_range r{.notifier = nullptr, .start = 0x10000, .end = 0x12000, .hmm_pfns = pfns};
  EXPECT_EQ(hmm_range_fault(r), errc::inval);  // no notifier, no mm
  r.notifier = &f.sub;
  auto g = f.m.read_lock();
  r.end = 0x11001;
  EXPECT_EQ(hmm_range_fault(r), errc::inval);
  r.end = 0x10000;
  EXPECT_EQ(hmm_range_fault(r), errc::inval);
  r.end = 0x13000;  // three pages, two entries
  EXPECT_EQ(hmm_range_fault(r), errc::inval);
}

}  // namespace
}  // namespace svm
