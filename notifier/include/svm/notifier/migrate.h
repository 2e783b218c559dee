// Device migration in three steps (kernel: migrate_vma_setup /
// migrate_vma_pages / migrate_vma_finalize, mm/migrate_device.c) and the
// pgmap owner's migrate_to_ram (kernel: struct dev_pagemap_ops).
//
// A driver moves the private anonymous pages of one VMA between system
// memory and a device-private pool it owns:
//   1. migrate_vma_setup (mmap_lock shared held) raises MIGRATE over the
//      range, then collects the pages it may move: each becomes a migration
//      entry (cpu_pte.h describes the protocol) and src[i] says what it was;
//   2. the driver allocates a frame for each page it wants to move, copies
//      the bytes (the source cannot change: CPU accesses wait on the
//      migration entry) and describes the new frame in dst[i];
//   3. migrate_vma_pages (mmap_lock shared held) checks each pair and fills
//      the collected holes; migrate_vma_finalize (no lock needed) installs
//      the new entries, restores the pages that did not move, and frees
//      what is no longer used.
// A CPU fault on a device-private entry of a pool attached with ops calls
// ops->migrate_to_ram(), which does the same with select device_private.
#pragma once

#include <cstdint>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/types.h"
#include "svm/notifier/mm.h"

namespace svm {

/// The pgmap owner's operations on its device-private pages (kernel: struct
/// dev_pagemap_ops). Attach with mm::attach_pool(pool, device_private,
/// owner, &ops).
class dev_pagemap_ops {
 public:
  virtual ~dev_pagemap_ops() = default;
  /// A CPU fault (or hmm_range_fault for a caller that does not own the
  /// page) met a device-private entry of this pool at `addr` (page aligned)
  /// in `m`. Move that page back to system memory, normally with
  /// migrate_vma_setup(select device_private) .. migrate_vma_finalize.
  /// Called with m's mmap_lock held shared and no other mm lock; the fault
  /// retries afterwards. errc::ok or errc::again: look again (the fault
  /// gives up with EFAULT after max_migrate_to_ram_calls calls that left
  /// the page on the device); ENOMEM is returned to the faulting caller; any
  /// other error becomes EFAULT (kernel: VM_FAULT_SIGBUS).
  virtual errc migrate_to_ram(mm& m, va_t addr) SVM_REQUIRES_SHARED(m.mmap_lock()) = 0;
};

/// How many times one CPU fault calls migrate_to_ram for a page that stays
/// device-private before it fails with EFAULT.
inline constexpr unsigned max_migrate_to_ram_calls = 8;

/// Flags of a migrate_vma page entry (kernel: MIGRATE_PFN_*).
enum class migrate_pfn : std::uint32_t {
  none = 0,     ///< no frame, not migrating
  valid = 1,    ///< pool and pfn name a frame
  migrate = 2,  ///< src: collected (may move); cleared where the page cannot move
  write = 4,    ///< src: the old entry was writable (the new one will be)
  /// dst, set by migrate_vma_pages: the frame filled a hole and the PTE
  /// owns it now (finalize does not free it).
  installed = 8,
  is_flag_enum_ = 0
};

/// One page of a migrate_vma (kernel: an entry of the src/dst pfn arrays).
struct migrate_page {
  migrate_pfn flags = migrate_pfn::none;  ///< see migrate_pfn
  unsigned pool = 0;                      ///< index of the frame's pool in the mm
  pfn_t pfn = 0;                          ///< the frame (valid only with migrate_pfn::valid)
  /// True if all the bits of `f` are set.
  [[nodiscard]] bool has(migrate_pfn f) const noexcept { return (flags & f) == f; }
};

/// Which pages migrate_vma_setup collects (kernel: MIGRATE_VMA_SELECT_*).
enum class migrate_select : std::uint8_t {
  none = 0,            ///< nothing (refused by setup)
  system = 1,          ///< present system-memory pages, and empty PTEs (holes)
  device_private = 2,  ///< device-private pages whose pool owner is pgmap_owner
  is_flag_enum_ = 0
};

/// A device migration of [start, end) (kernel: struct migrate_vma). The
/// caller fills start, end, pgmap_owner and select; setup fills src, cpages,
/// npages and resizes dst; the driver fills dst.
struct migrate_vma {
  va_t start = 0;  ///< page aligned, non-zero
  va_t end = 0;    ///< exclusive, page aligned; [start, end) lies in one VMA
  /// The owner the MIGRATE invalidation carries; device-private pages are
  /// collected only from pools attached with this owner.
  const void* pgmap_owner = nullptr;
  migrate_select select = migrate_select::none;  ///< which pages to collect
  /// Per page, set by setup: VALID with the old frame (pool, pfn) for a
  /// collected page (+WRITE if it was writable), MIGRATE alone for a
  /// collected hole, nothing for a page that is not migrated.
  std::vector<migrate_page> src = {};
  /// Per page, filled by the driver: VALID with a frame it allocated (one
  /// reference, which migration takes over) holding the page's new bytes.
  /// A device-private pool's frame becomes a device-private entry, any other
  /// pool's a present PTE.
  std::vector<migrate_page> dst = {};
  std::size_t cpages = 0;  ///< pages (holes included) setup marked MIGRATE
  std::size_t npages = 0;  ///< pages in [start, end), set by setup
  /// The mm setup ran on (set by setup, cleared by finalize); pages and
  /// finalize refuse another.
  mm* owner_mm = nullptr;
  /// Set by migrate_vma_pages: finalize moves pages only after it checked
  /// them (without it, finalize restores every page and leaves the dst
  /// frames to the driver).
  bool pages_done = false;
};

/// Collect the pages of `args` (step 1). EINVAL, with `args` and the mm
/// unchanged: start 0 or unaligned, end unaligned or not above start, end
/// past m.va_limit(), no select bit or an unknown one, the range not inside
/// one VMA, or `args` already set up and not finalized. A shared,
/// file-backed or I/O VMA is not an error: nothing is collected (cpages 0),
/// as the kernel refuses to move such pages to device memory. Pages not
/// collected: the zero page, pages mapped more than once (COW, page cache),
/// swap and PROT_NONE entries, pages already under migration, another
/// owner's device pages. A 2M mapping is split first. Every collected page
/// must be finished by migrate_vma_finalize. ENOMEM: no memory for src/dst.
/// Locking: requires m's mmap_lock shared (or m's rmap lock shared, for
/// eviction: mm::rmap_read_guard); takes node locks; raises MIGRATE.
[[nodiscard]] errc migrate_vma_setup(mm& m, migrate_vma& args) SVM_REQUIRES_SHARED(m.mmap_lock());

/// Step 3a: check each collected page against its dst; clear MIGRATE where
/// it cannot proceed (no or bad dst: not a valid, allocated, non-zero frame
/// of an attached pool, or the source frame itself; a bad dst entry is
/// cleared, so finalize does not free a frame the driver does not own;
/// a hole whose PTE is no longer empty or whose VMA is gone). A hole is
/// filled now with dst's frame (dst gets migrate_pfn::installed). EINVAL:
/// `args` was not set up on `m`, or src/dst do not have npages entries.
/// Locking: requires m's mmap_lock shared (the holes' VMA), or m's rmap
/// lock shared; takes node locks.
[[nodiscard]] errc migrate_vma_pages(mm& m, migrate_vma& args) SVM_REQUIRES_SHARED(m.mmap_lock());

/// Step 3b: for each page still MIGRATE, replace its migration entry by the
/// new frame's entry (write permission as before) and drop the old frame;
/// for the others, restore the old entry and free the unused dst frame. A
/// page whose PTE is no longer its migration entry (zapped, or restored by
/// mprotect/mremap/fork) keeps what is there and its dst frame is freed.
/// Ends the migration (owner_mm becomes null). EINVAL: `args` was not set
/// up on `m`, or src/dst do not have npages entries (nothing changes; call
/// again with the arrays fixed). Locking: none required (mmap_lock may be held); node locks.
[[nodiscard]] errc migrate_vma_finalize(mm& m, migrate_vma& args);

}  // namespace svm
