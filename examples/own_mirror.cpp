// A driver developer's own mirror, built from the two kernel-shaped pieces
// svm's driver uses: an interval notifier and hmm_range_fault. The "device
// page table" is a map from VA to hmm_pfn under one mutex. Populate follows
// the kernel's documented pattern: read_begin, hmm_range_fault under the mmap
// read lock, take the driver lock, read_retry, program, unlock. The notifier
// callback takes the same lock, calls set_seq and clears the entries.
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <vector>

#include "svm/notifier/notifier.h"

namespace {

class my_mirror final : public svm::interval_notifier_ops {
 public:
  std::mutex lock;                       // the driver lock: guards pt
  std::map<svm::va_t, svm::hmm_pfn> pt;  // the "device page table"
  svm::interval_notifier sub;

  bool invalidate(svm::interval_notifier& s, const svm::mmu_notifier_range& r, std::uint64_t cur_seq) override {
    if (!r.blockable) return false;  // a real driver try-locks here
    std::lock_guard g(lock);
    s.set_seq(cur_seq);  // under the driver lock: read_retry is exact under it
    pt.erase(pt.lower_bound(r.start), pt.lower_bound(r.end));
    return true;
  }

  svm::errc populate(svm::mm& mm, svm::va_t start, svm::va_t end, bool write) {
    std::vector<svm::hmm_pfn> pfns((end - start) / svm::page_size);
    svm::hmm_range range{.notifier = &sub, .start = start, .end = end, .hmm_pfns = pfns,
                         .default_flags = svm::hmm_req::fault | (write ? svm::hmm_req::write : 0)};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);  // the kernel's bound
    for (;;) {
      if (std::chrono::steady_clock::now() > deadline) return svm::errc::busy;
      range.notifier_seq = sub.read_begin();
      svm::errc e;
      {
        auto rd = mm.read_lock();
        e = svm::hmm_range_fault(range);
      }
      if (e == svm::errc::busy) continue;  // an invalidation ran: start over
      if (e != svm::errc::ok) return e;
      std::lock_guard g(lock);
      if (sub.read_retry(range.notifier_seq)) continue;  // invalidated since read_begin
      for (std::size_t i = 0; i < pfns.size(); ++i) pt[start + i * svm::page_size] = pfns[i];
      return svm::errc::ok;
    }
  }
};

int check(bool ok, const char* what) {
  if (!ok) std::fprintf(stderr, "own_mirror: %s\n", what);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  constexpr std::uint64_t len = 16 * svm::page_size;
  svm::mm mm;
  auto va = mm.mmap(0, len, svm::prot::read | svm::prot::write, svm::map::private_ | svm::map::anonymous);
  if (!va) return check(false, "mmap failed");
  my_mirror m;
  if (m.sub.insert(mm, *va, len, m) != svm::errc::ok) return check(false, "insert failed");

  if (m.populate(mm, *va, *va + len, /*write=*/true) != svm::errc::ok) return check(false, "populate failed");
  int bad = check(m.pt.size() == 16, "expected 16 mirrored pages");
  for (const auto& [addr, e] : m.pt) bad |= check((e & svm::hmm_pfn_valid) && (e & svm::hmm_pfn_write), "entry not valid+write");

  // The CPU unmaps the upper half: the callback drops those entries before the frames go.
  if (mm.munmap(*va + len / 2, len / 2) != svm::errc::ok) return check(false, "munmap failed");
  bad |= check(m.pt.size() == 8, "expected 8 pages after munmap");
  // Faulting the hole is refused with EFAULT (no VMA), and the mirror is unchanged.
  bad |= check(m.populate(mm, *va + len / 2, *va + len, false) == svm::errc::fault, "expected EFAULT on the hole");
  bad |= check(m.pt.size() == 8, "a failed populate changed the mirror");
  m.sub.remove();  // no callback runs after this returns
  if (!bad) std::puts("own_mirror: ok (16 pages mirrored, 8 invalidated by munmap, EFAULT on the hole)");
  return bad;
}
