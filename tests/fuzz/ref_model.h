// The op-sequence fuzzer's sequential reference model: what every
// CPU operation, CPU access, BO operation and device access must return, per
// 4K page of CPU VA, with none of svm's machinery (no page tables, no
// frames, no notifiers, no TLBs).
//
// It knows VMAs (split exactly where mm splits them: VMAs are never merged,
// and mremap's "grow in place" depends on where a VMA ends), the bytes of
// every page a private mapping owns, and the bytes of memory objects (files
// and shmem segments) that shared mappings and not-yet-copied private file
// pages read through. Residency (present, swapped, migrated, huge or not,
// zero page) is invisible here: it must not change any outcome.
//
// The device side: BO bindings by GPU page take precedence over the mirror;
// otherwise a GPU VA maps CPU VA through the mirror (full mm: the same VA;
// windows: one window) and the CPU rules apply, with hmm_range_fault's error
// choice (EFAULT unless the VMA is readable; EPERM for a write to a readable
// VMA without write).
//
// Thread safety: none; one model per run, used by one thread.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/types.h"
#include "svm/notifier/mm.h"

namespace svm::fuzz {

using page_bytes = std::array<std::uint8_t, page_size>;

/// A file or a shmem segment: sparse pages (absent pages read zero).
struct ref_object {
  std::uint64_t pages = 0;  ///< size in pages; past it an access is EFAULT (SIGBUS)
  bool shmem = false;       ///< shmem grows with mremap; files never do
  std::map<std::uint64_t, page_bytes> data;
};

struct ref_vma {
  va_t end = 0;
  prot p = prot::none;
  bool shared = false;
  int obj = -1;             ///< the backing object; -1: private anonymous
  std::uint64_t pgoff = 0;  ///< object page of the VMA's start
  bool file = false;        ///< vma_kind::file (else anonymous)
  // What decides VMA merging in svm::mm (as in Linux): the THP advice,
  // VM_ACCOUNT, and the anon_vma identity (0: none yet; given by the first
  // private page written, shared by split pieces, fresh in a fork child).
  // Known approximation: svm::mm also gives a VMA its anon_vma on a read
  // fault that maps a THP or the huge zero page; the model does not.
  madvice advice = madvice::dontneed;  ///< dontneed here means "no advice"
  bool account = false;
  std::uint64_t anon = 0;
  [[nodiscard]] bool readable() const noexcept { return any(p & prot::read); }
  [[nodiscard]] bool writable() const noexcept { return any(p & prot::write); }
  [[nodiscard]] bool private_anon() const noexcept { return !file && !shared; }
};

/// One address space: VMAs by start, and the pages private mappings own
/// (written anonymous pages and copied-on-write file pages).
struct ref_space {
  std::map<va_t, ref_vma> vmas;
  std::map<va_t, page_bytes> priv;
};

/// A BO and its bytes.
struct ref_bo {
  std::uint64_t pages = 0;
  std::vector<std::uint8_t> bytes;
};

/// What a device access returned: kernel error/reason (ok when it went
/// through) and the value a load or atomic returned.
struct ref_dev_result {
  errc error = errc::ok;
  errc reason = errc::ok;
  std::uint64_t value = 0;
};

/// A BO handle as the model counts them (gpu_vm numbers BOs from 1).
using bo_ref = std::uint64_t;

enum class dev_op : std::uint8_t { load, store, add, cmpxchg, xchg };

class ref_model {
 public:
  /// mmap_base and mmap_limit as in the mm's options (get_unmapped_area).
  ref_model(va_t mmap_base, va_t mmap_limit) : base_(mmap_base), limit_(mmap_limit) {}

  ref_space parent;
  std::optional<ref_space> child;
  std::vector<ref_object> objects;

  // ---- memory objects ----
  int add_file(std::uint64_t pages);
  errc file_pwrite(int obj, std::uint64_t off, std::span<const std::uint8_t> in);

  // ---- system calls (mm's error codes and order of checks) ----
  /// MAP_FIXED only. obj < 0: anonymous (shared: a new shmem segment).
  result<va_t> mmap_fixed(ref_space& s, va_t addr, std::uint64_t len, prot p, bool shared, int obj,
                          std::uint64_t offset);
  errc munmap(ref_space& s, va_t addr, std::uint64_t len);
  errc mprotect(ref_space& s, va_t addr, std::uint64_t len, prot p);
  errc madvise(ref_space& s, va_t addr, std::uint64_t len, madvice a);
  result<va_t> mremap(ref_space& s, va_t old_addr, std::uint64_t old_len, std::uint64_t new_len,
                      mremap_flags f, va_t new_addr);
  void fork() {
    child = parent;
    for (auto& [start, v] : child->vmas)
      if (v.anon) v.anon = next_anon_++;
  }
  /// reclaim and migrate keep every byte: only their argument checks show.
  errc reclaim_or_migrate_check(va_t addr, std::uint64_t len) const;

  // ---- CPU access (mm::read/write: page by page, stop at the first error) ----
  errc cpu_read(ref_space& s, va_t va, std::span<std::uint8_t> out) const;
  errc cpu_write(ref_space& s, va_t va, std::span<const std::uint8_t> in);
  result<std::uint64_t> cpu_fetch_add(ref_space& s, va_t va, std::uint64_t v);

  // ---- BOs ----
  /// The id a successful create returns (ids count from 1).
  bo_ref create_bo(std::uint64_t pages);
  errc destroy_bo(bo_ref id);
  errc bind(bo_ref id, va_t gva, std::uint64_t offset, std::uint64_t size);
  errc unbind(va_t gva, std::uint64_t size);
  errc bo_write(bo_ref id, std::uint64_t off, std::span<const std::uint8_t> in);
  errc bo_read(bo_ref id, std::uint64_t off, std::span<std::uint8_t> out) const;
  [[nodiscard]] bool bo_exists(bo_ref id) const { return bos_.contains(id); }
  /// Live BOs in creation order (the decoder picks among them).
  [[nodiscard]] const std::vector<bo_ref>& live_bos() const noexcept { return live_; }

  // ---- the device (parent space) ----
  /// Mirror: full mm (gpu == cpu), or one window cpu [wcpu, wcpu+wsize) at gpu wgpu.
  void set_window(va_t wcpu, va_t wgpu, std::uint64_t wsize) {
    windows_ = true;
    wcpu_ = wcpu;
    wgpu_ = wgpu;
    wsize_ = wsize;
  }
  ref_dev_result dev_access(va_t gva, unsigned size, dev_op op, std::uint64_t v, std::uint64_t desired);

  /// GPU VAs of the pages in [gpu_base, gpu_base + pages * 4K) the device
  /// can reach now: mirrored pages with a CPU VMA (any protection) and
  /// BO-bound pages, ascending. The decoder steers kernel accesses to them.
  [[nodiscard]] std::vector<va_t> reachable_gpu_pages(va_t cpu_base, va_t gpu_base, std::uint64_t pages) const;

  /// A one-line summary of the VMA layout (for mismatch messages).
  [[nodiscard]] std::string describe(const ref_space& s) const;

 private:
  /// CPU access permission and backing check for one page (EFAULT/EPERM).
  errc cpu_check(const ref_space& s, va_t va, bool write) const;
  /// The bytes a page reads (nullptr: zero).
  const page_bytes* page_read(const ref_space& s, va_t page) const;
  /// The bytes a write lands in (a private copy made on demand).
  page_bytes& page_write(ref_space& s, va_t page);
  const ref_vma* find_vma(const ref_space& s, va_t va, va_t* start = nullptr) const;
  void split_at(ref_space& s, va_t va);
  /// Merge every adjacent pair svm::mm would merge.
  void merge(ref_space& s);
  /// Move [lo, hi) (one ref VMA after splits) to `target` with `new_len`.
  void move_piece(ref_space& s, va_t lo, va_t hi, va_t target, std::uint64_t new_len, bool keep_old);
  bool range_free(const ref_space& s, va_t lo, va_t hi) const;
  void do_munmap(ref_space& s, va_t lo, va_t hi);
  std::optional<va_t> get_unmapped_area(const ref_space& s, std::uint64_t len) const;
  bool beyond_eof(const ref_vma& v, va_t start, va_t page) const;

  va_t base_, limit_;
  std::map<bo_ref, ref_bo> bos_;
  std::vector<bo_ref> live_;
  bo_ref next_bo_ = 1;
  std::uint64_t next_anon_ = 1;
  struct binding {
    bo_ref bo;
    std::uint64_t page;  ///< page of the BO
  };
  std::map<va_t, binding> bound_;  ///< by GPU page
  bool windows_ = false;
  va_t wcpu_ = 0, wgpu_ = 0;
  std::uint64_t wsize_ = 0;
};

}  // namespace svm::fuzz
