// The simulated process address space (kernel: struct mm_struct and the mm
// system calls that change it), docs/contracts.md §0.
//
// An mm owns VMAs (a Boost.Intrusive rb-tree), a CPU page table built on
// pt::radix_table with 4K and 2M leaves, its notifier subscriptions, and
// references to frame pools that hold real bytes. Each CPU operation raises
// its notifier event before any PTE is cleared and frees frames only after
// invalidate_range_end.
//
// How closely it follows Linux, and where it deliberately differs, is
// written down in docs/mm-fidelity.md; tests/fidelity checks it against the
// host kernel. In short: VMAs merge as Linux merges them; read faults on
// shared mappings fault around (fault_around_bytes); THP-eligible read faults
// map the huge zero page; fork copies PTEs only for VMAs that need it. Not
// modelled: readahead, khugepaged, the deferred split of partly mapped THPs.
// Reclaim swaps out, and migration moves, only private anonymous pages
// mapped once.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <boost/intrusive/set.hpp>

#include "svm/base/errc.h"
#include "svm/base/mutex.h"
#include "svm/base/types.h"
#include "svm/notifier/cpu_pte.h"
#include "svm/notifier/frame_pool.h"
#include "svm/notifier/mmu_notifier.h"

namespace svm {

/// Bitmask operators for the flag enums below.
template <class E>
concept flag_enum = std::is_enum_v<E> && requires { E::is_flag_enum_; };
template <flag_enum E>
constexpr E operator|(E a, E b) noexcept {
  return E(std::underlying_type_t<E>(a) | std::underlying_type_t<E>(b));
}
template <flag_enum E>
constexpr E operator&(E a, E b) noexcept {
  return E(std::underlying_type_t<E>(a) & std::underlying_type_t<E>(b));
}
template <flag_enum E>
constexpr E operator~(E a) noexcept {
  return E(~std::underlying_type_t<E>(a));
}
template <flag_enum E>
constexpr bool any(E a) noexcept {
  return std::underlying_type_t<E>(a) != 0;
}

/// Protections (PROT_*).
enum class prot : std::uint32_t { none = 0, read = 1, write = 2, exec = 4, is_flag_enum_ = 0 };
/// mmap flags (MAP_*). `io` is our stand-in for a driver's remap_pfn_range:
/// an I/O / PFN-map VMA with no struct pages, which hmm_range_fault refuses.
enum class map : std::uint32_t {
  none = 0,
  shared = 1,
  private_ = 2,
  anonymous = 4,
  fixed = 8,
  fixed_noreplace = 16,
  io = 32,
  is_flag_enum_ = 0
};
/// mremap flags (MREMAP_*).
enum class mremap_flags : std::uint32_t { none = 0, maymove = 1, fixed = 2, dontunmap = 4, is_flag_enum_ = 0 };
/// madvise advice handled by the model. Any other value is EINVAL.
enum class madvice : std::uint8_t { dontneed, hugepage, nohugepage };
/// Transparent-huge-page policy (/sys/kernel/mm/transparent_hugepage/enabled).
enum class thp_mode : std::uint8_t { never, madvise, always };

/// What backs a VMA: anonymous memory (private, or shmem when shared), a
/// svm::file, or an I/O (PFN) map.
enum class vma_kind : std::uint8_t { anonymous, file, io };
/// The VMA's THP advice (VM_HUGEPAGE / VM_NOHUGEPAGE).
enum class huge_advice : std::uint8_t { none, hugepage, nohugepage };

/// A simple in-memory file: its page cache is its content. Pages are
/// allocated (zeroed) from `pool` on first access and live until the file is
/// destroyed. Used for file-backed mappings and, internally, for shared
/// anonymous memory (as shmem does).
/// Thread safety: all members may be called concurrently.
class file {
 public:
  /// Largest file size accepted (2^47 bytes, the user VA width).
  static constexpr std::uint64_t max_size = std::uint64_t{1} << 47;
  /// A file of `size` bytes (rounded up to pages) in `pool`. EINVAL: null
  /// pool; EFBIG is not in our vocabulary, so a size above max_size is
  /// EOVERFLOW. Never throws.
  [[nodiscard]] static result<std::shared_ptr<file>> create(std::shared_ptr<frame_pool> pool, std::uint64_t size);
  /// A file of `size` bytes (rounded up to pages) in `pool`. `size` must be
  /// at most max_size (a larger one is clamped to max_size; use create() to
  /// get the error instead).
  file(std::shared_ptr<frame_pool> pool, std::uint64_t size);
  ~file();
  file(const file&) = delete;
  file& operator=(const file&) = delete;

  /// Size in bytes. Locking: takes the file lock.
  [[nodiscard]] std::uint64_t size() const;
  /// The page-cache frame for page `pgoff`, allocated on first use, with one
  /// extra reference for the caller (a mapping). EFAULT past the end (SIGBUS),
  /// ENOMEM when the pool is empty.
  /// Locking: takes the file lock (rank leaf).
  [[nodiscard]] result<pfn_t> get_page(std::uint64_t pgoff);
  /// Page-cache residency without allocating: the frame caching page
  /// `pgoff`, or 0 if none (past the end, or never touched). No reference is
  /// taken: the answer is a snapshot. Locking: takes the file lock.
  [[nodiscard]] pfn_t lookup(std::uint64_t pgoff) const;
  /// Copy `data` into the file at byte `off` through the page cache
  /// (pwrite). EFAULT past the end. Locking: takes the file lock.
  [[nodiscard]] errc pwrite(std::uint64_t off, std::span<const std::byte> data);
  /// Copy bytes at `off` out of the page cache into `out` (pread). EFAULT
  /// past the end. Locking: takes the file lock.
  [[nodiscard]] errc pread(std::uint64_t off, std::span<std::byte> out);
  /// The frame pool the file's page-cache pages are allocated from.
  [[nodiscard]] const std::shared_ptr<frame_pool>& pool() const noexcept { return pool_; }
  /// Grow to at least `size` bytes (ftruncate upwards; mremap does not grow
  /// shmem, as in Linux). Locking: takes the file lock.
  void grow(std::uint64_t size);

 private:
  static constexpr lock_class lock_class_{"file", lockdep::rank::leaf};
  std::shared_ptr<frame_pool> pool_;  // immutable
  mutable mutex lock_{lock_class_};
  std::uint64_t npages_ SVM_GUARDED_BY(lock_) = 0;  ///< size in pages
  /// Cached pages by page offset (sparse: a file may be far larger than memory).
  std::map<std::uint64_t, pfn_t> pages_ SVM_GUARDED_BY(lock_);
};

/// What find_vma reports about one VMA.
struct vma_info {
  /// First VA of the VMA (page aligned).
  va_t start = 0, end = 0;  ///< `end`: one past the VMA's last byte (page aligned)
  prot protection = prot::none;             ///< current PROT_* bits (mprotect changes them)
  vma_kind kind = vma_kind::anonymous;      ///< what backs the VMA
  bool shared = false;                      ///< MAP_SHARED (false: MAP_PRIVATE)
  huge_advice advice = huge_advice::none;   ///< THP advice set by madvise HUGEPAGE/NOHUGEPAGE
  std::shared_ptr<svm::file> backing;  ///< file or shmem object, if any
  std::uint64_t pgoff = 0;             ///< file offset of `start`, in pages (anonymous: start's page number at mmap)
  bool anon_vma = false;               ///< has (had) anonymous pages: fork copies its PTEs
  bool account = false;                ///< VM_ACCOUNT (private writable memory charged at mmap/mprotect)
};

/// What the CPU maps at one VA now (lock-free query, for the access oracle).
struct cpu_translation {
  bool present = false;   ///< the CPU can use it (PROT_NONE/swap/device: false)
  bool writable = false;  ///< the PTE allows CPU writes
  bool zero_page = false; ///< maps the pool's zero page (4K, or huge with huge_zero)
  unsigned pool = 0;      ///< index of the frame's pool in the mm
  pfn_t pfn = 0;          ///< the 4K frame mapping `va` (huge leaves resolved)
  std::uint64_t generation = 0;  ///< that frame's generation, read after the PTE
  unsigned order = 0;     ///< 0 or 9: the order of the PTE (4K or PMD-mapped)
  bool huge_zero = false; ///< the huge zero page (zero_page is set too)
};

/// A frame's folio (kernel: page_folio): the head frame and the order of the
/// allocation it came from. A THP stays one order-9 folio after its PMD is
/// split, until every frame of it is freed.
struct folio_info {
  pfn_t head = 0;      ///< first frame of the folio
  unsigned order = 0;  ///< 0 (a 4K folio) or 9 (a THP)
};

/// How a pool attached to an mm behaves.
enum class pool_kind : std::uint8_t {
  numa,            ///< ordinary memory on another node: CPU-accessible
  device_private,  ///< device memory: not CPU-accessible; a CPU fault migrates back (through the pool's dev_pagemap_ops if it has them)
};

/// Construction options. mm::create() checks them (validate()).
struct mm_options {
  pfn_t frames = 16384;                ///< system pool size (64 MiB); at least 1
  thp_mode thp = thp_mode::madvise;    ///< /sys/kernel/mm/transparent_hugepage/enabled
  /// Read faults on untouched private anonymous memory map the shared zero
  /// page. False models a kernel where mm_forbids_zeropage() holds: such a
  /// read allocates a zeroed page (or a THP), as a write would.
  bool zero_page = true;
  /// /sys/kernel/mm/transparent_hugepage/use_zero_page: THP-eligible read
  /// faults map the huge zero page (only with zero_page).
  bool thp_use_zero_page = true;
  /// Read faults on shared and file mappings also map the page-cache pages
  /// already resident around the faulting one, in an aligned window of this
  /// many bytes clipped to the VMA and the 2M page table (kernel:
  /// fault_around_bytes). A power of two from 4096 (off) to 2M.
  std::uint64_t fault_around_bytes = 65536;
  std::size_t swap_slots = 1u << 16;   ///< swap capacity in pages
  va_t mmap_min_addr = 65536;          ///< /proc/sys/vm/mmap_min_addr: nothing maps below it
  va_t mmap_base = va_t{1} << 36;      ///< where chosen addresses start (>= mmap_min_addr)
  va_t mmap_limit = va_t{1} << 47;     ///< one past the highest user VA (> mmap_base, <= 2^48)
  /// errc::ok, or EINVAL naming no field: zero frames, an unaligned or
  /// inverted [mmap_min_addr, mmap_base, mmap_limit), a limit past the
  /// page table's VA width, a thp value outside the enum, or a
  /// fault_around_bytes that is not a power of two in [4096, 2M].
  [[nodiscard]] errc validate() const noexcept;
};

/// Test hooks (deterministic interleaving). Set before concurrent use; empty
/// functions cost one branch. They run with the operation's locks held
/// (mmap_lock; never a page-table node or notifier lock).
struct mm_test_hooks {
  /// After every overlapping callback ran, before any CPU PTE is changed.
  std::function<void(const mmu_notifier_range&)> after_invalidate_start = {};
  /// After the CPU PTEs changed, before invalidate_range_end.
  std::function<void(const mmu_notifier_range&)> before_invalidate_end = {};
  /// In hmm_range_fault, after a walk pass wrote entries [first, last) and
  /// before it returns or faults.
  std::function<void(va_t first, va_t last)> hmm_after_walk = {};
};

/// Counters (relaxed; statistics only).
struct mm_stats {
  std::uint64_t faults = 0;        ///< handle_mm_fault calls that changed a PTE
  std::uint64_t cow_breaks = 0;    ///< write faults that copied a shared or zero page (copy-on-write)
  std::uint64_t thp_faults = 0;    ///< faults that mapped a newly allocated 2M THP
  std::uint64_t swap_outs = 0;     ///< pages reclaim() swapped out
  std::uint64_t swap_ins = 0;      ///< faults that read a page back from swap
  std::uint64_t migrations = 0;    ///< pages moved by migrate() or migrated back by a CPU fault
  std::uint64_t invalidations = 0; ///< invalidate_range_start calls
};

class swap_space;
class dev_pagemap_ops;
struct hmm_range;
errc hmm_range_fault(hmm_range& range);

/// A subscriber told when its mm is torn down (kernel: the release op of
/// an mmu_notifier). release() runs once, at the start of mm::teardown()
/// (also from ~mm), before the address space goes and without mmap_lock or
/// any notifier lock held, so it may take its own locks, wait for its own
/// faults and remove its interval notifiers. It must not call
/// add_release()/remove_release() of the same mm.
class mm_release_ops {
 public:
  virtual ~mm_release_ops() = default;
  /// The mm is going away: drop everything that refers to it.
  virtual void release(mm& m) noexcept = 0;
};

/// A simulated process address space.
///
/// Locking (lock_order.h): mmap_lock (rank mmap, reader-writer) → notifier
/// lock (rank notifier, never held across callbacks) → page-table node locks
/// (rank pt_node) → frame-pool / file / swap locks (rank leaf).
///  - mmap_lock exclusive: mmap, munmap, mprotect, mremap, madvise
///    HUGEPAGE/NOHUGEPAGE, fork (parent), teardown. These change VMAs.
///  - mmap_lock shared: CPU faults and accesses, hmm_range_fault,
///    madvise DONTNEED, reclaim, migrate (as in Linux, where DONTNEED runs
///    under the read lock and reclaim under none: these race with faults and
///    with mirror faults, which is the hazard docs/protocols.md describes).
///  - every PTE change happens under its page-table node lock, with the
///    entry re-read under the lock.
class mm {
 public:
  /// A new address space, or EINVAL for options that validate() refuses
  /// (ENOMEM when the frame pool cannot be allocated). Never aborts.
  [[nodiscard]] static result<std::unique_ptr<mm>> create(mm_options o = {});
  /// A new address space. Options must be valid (mm_options::validate());
  /// invalid ones leave an mm that maps nothing (every mmap is ENOMEM and
  /// every access EFAULT) instead of aborting. Prefer create().
  explicit mm(mm_options o = {});
  /// Tears down (RELEASE) if not done yet. Notifiers still inserted become
  /// detached (their remove() is then a no-op).
  ~mm();
  mm(const mm&) = delete;
  mm& operator=(const mm&) = delete;

  // ---- mmap_lock -------------------------------------------------------
  /// The mmap_lock itself (rank mmap), for annotations and drivers.
  [[nodiscard]] shared_mutex& mmap_lock() SVM_RETURN_CAPABILITY(mmap_lock_) { return mmap_lock_; }
  /// Scoped shared hold of mmap_lock (kernel: mmap_read_lock).
  class SVM_SCOPED_CAPABILITY read_guard {
   public:
    /// Take `m`'s mmap_lock shared (blocks); `s` names the call site for
    /// the lock validator.
    explicit read_guard(mm& m, SVM_HERE_DEFAULT) SVM_ACQUIRE_SHARED(m.mmap_lock_) : m_(m), s_(s) {
      m_.mmap_lock_.lock_shared(s);
    }
    ~read_guard() SVM_RELEASE() { m_.mmap_lock_.unlock_shared(s_); }
    read_guard(const read_guard&) = delete;
    read_guard& operator=(const read_guard&) = delete;

   private:
    mm& m_;
    lockdep::site s_;
  };
  /// What read_lock() returns: a plain RAII shared hold of mmap_lock.
  /// Clang's analysis cannot follow a guard returned from a function, so
  /// this one is deliberately unannotated (the lock validator still checks
  /// it in debug builds); code that calls SVM_REQUIRES_SHARED(mmap_lock)
  /// functions declares `mm::read_guard g(mm);` instead.
  class [[nodiscard]] read_lock_holder {
   public:
    ~read_lock_holder() SVM_NO_THREAD_SAFETY_ANALYSIS { m_.mmap_lock_.unlock_shared(s_); }
    read_lock_holder(const read_lock_holder&) = delete;
    read_lock_holder& operator=(const read_lock_holder&) = delete;

   private:
    friend class mm;
    read_lock_holder(mm& m, lockdep::site s) SVM_NO_THREAD_SAFETY_ANALYSIS : m_(m), s_(s) {
      m_.mmap_lock_.lock_shared(s);
    }
    mm& m_;
    lockdep::site s_;
  };
  /// `auto g = mm.read_lock();` (kernel: mmap_read_lock). Locking: acquires
  /// mmap_lock shared until `g` goes; blocks.
  [[nodiscard]] read_lock_holder read_lock(SVM_HERE_DEFAULT) { return read_lock_holder(*this, s); }

  // ---- rmap_lock: device-memory eviction without mmap_lock --------------
  /// The rmap lock itself (rank rmap, reader-writer), for annotations.
  [[nodiscard]] shared_mutex& rmap_lock() SVM_RETURN_CAPABILITY(rmap_lock_) { return rmap_lock_; }
  /// Scoped shared hold of the rmap lock (kernel: the anon_vma read lock an
  /// rmap walk takes, as migrate_device_range does for drm_pagemap's
  /// evict_to_ram). Every mmap_lock writer holds the rmap lock exclusive, so
  /// while this guard lives the VMAs and page-table structure are as stable
  /// as under mmap_lock shared: find_vma, raw_pte and the migrate_vma steps
  /// may run (their debug lock checks accept either hold; Clang's analysis
  /// cannot express "either", so a caller that uses them under this guard
  /// opts out of it and says why). It never waits for mmap_lock readers,
  /// only for a writer's VMA change in progress. Rank rmap: it may be taken
  /// with vm.lock or an mmap_lock held, never under resv, notifier, mirror,
  /// node or leaf locks.
  class SVM_SCOPED_CAPABILITY rmap_read_guard {
   public:
    /// Take `m`'s rmap lock shared (blocks while a writer holds it).
    explicit rmap_read_guard(mm& m, SVM_HERE_DEFAULT) SVM_ACQUIRE_SHARED(m.rmap_lock_) : m_(m), s_(s) {
      m_.rmap_lock_.lock_shared(s);
    }
    ~rmap_read_guard() SVM_RELEASE() { m_.rmap_lock_.unlock_shared(s_); }
    rmap_read_guard(const rmap_read_guard&) = delete;
    rmap_read_guard& operator=(const rmap_read_guard&) = delete;

   private:
    mm& m_;
    lockdep::site s_;
  };
  /// Debug builds check that the calling thread holds mmap_lock (shared or
  /// exclusive) or the rmap lock: what find_vma and migrate_vma need.
  void assert_stable(SVM_HERE_DEFAULT) const;

  // ---- system calls (Linux semantics and error codes) ------------------
  /// mmap. `addr` is a hint unless map::fixed / fixed_noreplace. Exactly one
  /// of map::shared / map::private_; map::anonymous, or a `backing` file with
  /// a page-aligned `offset`, or map::io.
  /// Errors: EINVAL (length 0, bad flags, unaligned fixed addr or offset),
  /// ENOMEM (no room, overflow), EEXIST (fixed_noreplace over a mapping),
  /// EPERM (a fixed address below mmap_min_addr). A hint below
  /// mmap_min_addr is raised to it. MAP_FIXED over existing mappings unmaps
  /// them first (UNMAP). The new VMA merges with compatible neighbours.
  /// Locking: takes mmap_lock exclusive; blocks.
  [[nodiscard]] result<va_t> mmap(va_t addr, std::uint64_t length, prot p, map flags,
                                  std::shared_ptr<svm::file> backing = {}, std::uint64_t offset = 0)
      SVM_EXCLUDES(mmap_lock_);
  /// munmap (UNMAP). Holes are fine. EINVAL: unaligned, zero length, range
  /// beyond the VA limit or overflowing.
  /// Locking: takes mmap_lock exclusive; blocks.
  [[nodiscard]] errc munmap(va_t addr, std::uint64_t length) SVM_EXCLUDES(mmap_lock_);
  /// mprotect (PROTECTION_VMA). Zero length succeeds. EINVAL: unaligned or
  /// bad prot; ENOMEM: overflow, or a hole — after changing the mapped part
  /// before the hole (Linux's partial application). A VMA whose flags do
  /// not change is left whole; changed parts merge with their neighbours.
  /// Locking: takes mmap_lock exclusive; blocks.
  [[nodiscard]] errc mprotect(va_t addr, std::uint64_t length, prot p) SVM_EXCLUDES(mmap_lock_);
  /// madvise: DONTNEED (CLEAR; private memory reads zeros again, shared
  /// keeps its data; EINVAL on an I/O VMA), HUGEPAGE / NOHUGEPAGE (advice
  /// only; existing huge mappings are kept). Zero length succeeds. EINVAL:
  /// unaligned; ENOMEM: a hole in the range (the mapped parts are still
  /// advised, as in Linux); EINVAL for an advice outside the enum (nothing
  /// changes). HUGEPAGE/NOHUGEPAGE split only where the advice changes, and
  /// merge the changed parts with their neighbours.
  /// Locking: DONTNEED takes mmap_lock shared, the others exclusive; blocks.
  [[nodiscard]] errc madvise(va_t addr, std::uint64_t length, madvice advice) SVM_EXCLUDES(mmap_lock_);
  /// mremap. Shrinking unmaps the tail (UNMAP), wherever the tail lies.
  /// Otherwise the old range must lie in one VMA (EFAULT), except for a
  /// move (MAYMOVE|FIXED, same size), which moves every VMA in the range and
  /// keeps the gaps (Linux 6.17+; EFAULT if the range starts in a gap;
  /// with DONTUNMAP every old VMA stays, empty).
  /// Growing extends in place when the VA after it is free, else moves with
  /// MAYMOVE (ENOMEM without). A move raises UNMAP over the old range and
  /// moves the PTEs (frames are kept); DONTUNMAP leaves the old VMA mapped
  /// and empty. Growing shmem does not grow its object: the new pages lie
  /// past its end and an access there is EFAULT (SIGBUS). EINVAL:
  /// unaligned, zero new length, bad flags, FIXED or DONTUNMAP without
  /// MAYMOVE, DONTUNMAP with a size change or on a file or I/O VMA, a FIXED
  /// target that overlaps the old range (mremap onto itself).
  /// Locking: takes mmap_lock exclusive; blocks.
  [[nodiscard]] result<va_t> mremap(va_t old_addr, std::uint64_t old_length, std::uint64_t new_length,
                                    mremap_flags flags, va_t new_addr = 0) SVM_EXCLUDES(mmap_lock_);
  /// fork: a child mm with the same VMAs sharing the frame pools. As Linux's
  /// vma_needs_copy, only VMAs that have anonymous pages (anon_vma) or are
  /// I/O maps get their PTEs copied; the child faults the rest in. Copied
  /// private pages are shared copy-on-write: both sides are write-protected
  /// (PROTECTION_PAGE on the parent). ENOMEM if
  /// the child's page table cannot be built (nothing changed in the parent
  /// beyond write protection, which is harmless).
  /// Locking: takes the parent's mmap_lock exclusive; blocks.
  [[nodiscard]] result<std::unique_ptr<mm>> fork() SVM_EXCLUDES(mmap_lock_);
  /// Swap out the private anonymous pages in [addr, addr+length) that are
  /// mapped once (CLEAR); a later fault swaps them back in. Non-blockable
  /// with `blockable == false`: EAGAIN (and nothing changed) if a notifier
  /// refuses. Returns the number of pages swapped out. EINVAL: unaligned or
  /// zero length; ENOMEM: swap full (pages done so far stay swapped).
  /// Locking: takes mmap_lock shared; blocks unless !blockable.
  [[nodiscard]] result<std::size_t> reclaim(va_t addr, std::uint64_t length, bool blockable = true)
      SVM_EXCLUDES(mmap_lock_);
  /// Migrate the private anonymous pages of [addr, addr+length) mapped once
  /// to pool `target` (MIGRATE, carrying `owner`). To a device-private pool
  /// the CPU PTEs become device-private entries; a CPU fault migrates them
  /// back to pool 0. Returns the pages moved. EINVAL: unaligned, zero length
  /// or bad pool; ENOMEM: target full (pages moved so far stay moved).
  /// Locking: takes mmap_lock shared; blocks.
  [[nodiscard]] result<std::size_t> migrate(va_t addr, std::uint64_t length, unsigned target,
                                            const void* owner) SVM_EXCLUDES(mmap_lock_);
  /// Tear the address space down: SVM_RELEASE over the whole VA space
  /// (blockable), then every VMA and PTE goes. Further inserts get EINVAL,
  /// further mmaps ENOMEM. Idempotent.
  /// Locking: takes mmap_lock exclusive; blocks.
  void teardown() SVM_EXCLUDES(mmap_lock_);
  /// Subscribe `ops` to the teardown (see mm_release_ops). EINVAL if the mm
  /// is already torn down or `ops` is subscribed. Locking: takes the
  /// release lock (rank driver).
  [[nodiscard]] errc add_release(mm_release_ops& ops) SVM_EXCLUDES(release_lock_);
  /// Unsubscribe; if release() is running on another thread, wait until it
  /// returned. A no-op if `ops` is not subscribed (already released).
  /// Locking: takes the release lock; must not be called from release().
  void remove_release(mm_release_ops& ops) SVM_EXCLUDES(release_lock_);

  // ---- CPU access ------------------------------------------------------
  /// Read/write bytes at a CPU VA as a CPU thread would, faulting pages in.
  /// EFAULT: no VMA, no permission (or an I/O VMA), a VA at or past
  /// va_limit() (non-canonical too) — SIGSEGV; past a file's end — SIGBUS; EPERM: a write
  /// to a VMA without write permission; ENOMEM: out of frames. On error the
  /// bytes before the failing page were transferred.
  /// Locking: takes mmap_lock shared and page-table node locks; blocks.
  [[nodiscard]] errc read(va_t va, std::span<std::byte> out) SVM_EXCLUDES(mmap_lock_);
  /// Write `in` at `va`, as read() reads (same errors and locking).
  [[nodiscard]] errc write(va_t va, std::span<const std::byte> in) SVM_EXCLUDES(mmap_lock_);
  /// Read one `T` at `va` through read() (any alignment; same errors).
  template <class T>
    requires std::is_trivially_copyable_v<T>
  [[nodiscard]] result<T> load(va_t va) {
    T v{};
    if (errc e = read(va, std::as_writable_bytes(std::span{&v, 1})); e != errc::ok) return e;
    return v;
  }
  /// Write `v` at `va` through write() (any alignment; same errors).
  template <class T>
    requires std::is_trivially_copyable_v<T>
  [[nodiscard]] errc store(va_t va, const T& v) {
    return write(va, std::as_bytes(std::span{&v, 1}));
  }
  /// Atomic read-modify-write of an 8-byte aligned u64 (EINVAL if
  /// unaligned), seq_cst, as a locked CPU instruction. Returns the old value.
  [[nodiscard]] result<std::uint64_t> atomic_fetch_add(va_t va, std::uint64_t v) SVM_EXCLUDES(mmap_lock_);
  /// Atomic compare-and-swap of an 8-byte aligned u64 (EINVAL if
  /// unaligned), seq_cst: stores `desired` if the value equals `expected`.
  /// Returns the old value (equal to `expected` on success).
  [[nodiscard]] result<std::uint64_t> atomic_compare_exchange(va_t va, std::uint64_t expected,
                                                              std::uint64_t desired) SVM_EXCLUDES(mmap_lock_);

  /// Kernel: handle_mm_fault. Make `va` present (and writable for a
  /// write/atomic access): zero page, new frame, THP, page cache, COW break
  /// (CLEAR on the page), swap-in, migration back from device memory
  /// (MIGRATE; through the pool's dev_pagemap_ops::migrate_to_ram when it
  /// has them, EFAULT after max_migrate_to_ram_calls calls that left the page
  /// there). A migration entry (svm/notifier/migrate.h) is waited on until
  /// its migrate_vma_finalize. EFAULT: no VMA / no permission / I/O VMA;
  /// EPERM: write to a VMA without write; ENOMEM.
  /// Locking: requires mmap_lock shared (or exclusive); takes node locks and
  /// may run invalidations; blocks.
  [[nodiscard]] errc handle_mm_fault(va_t va, access a) SVM_REQUIRES_SHARED(mmap_lock_);

  // ---- queries -----------------------------------------------------------
  /// The VMA containing `va`. Locking: requires mmap_lock (shared), or the
  /// rmap lock (shared; rmap_read_guard, whose users opt out of the analysis).
  [[nodiscard]] std::optional<vma_info> find_vma(va_t va) const SVM_REQUIRES_SHARED(mmap_lock_);
  /// Every VMA, in address order. Locking: takes mmap_lock shared.
  [[nodiscard]] std::vector<vma_info> vmas() SVM_EXCLUDES(mmap_lock_);
  /// Lock-free: what the CPU maps at `va` right now. The generation is read
  /// after the PTE, so a (pfn, generation) pair that matches the pool later
  /// names the same lifetime of the frame. Locking: none; may run anywhere.
  [[nodiscard]] cpu_translation cpu_translate(va_t va) const noexcept;
  /// The raw CPU PTE (lock-free; for tests). Zero past va_limit().
  [[nodiscard]] pt::translation raw_pte(va_t va) const noexcept {
    return va < pt_.va_limit() ? pt_.translate(va) : pt::translation{};
  }

  // ---- introspection (for testers; snapshots, valid while quiescent) -----
  /// How many CPU PTEs of this fork family map 4K frame `pfn` of pool
  /// `pool` (a PMD mapping counts once for each of its frames; kernel:
  /// folio_precise_page_mapcount). 0 for the zero page and for free frames.
  /// Exact only while no fault or system call runs. Lock-free.
  [[nodiscard]] std::uint32_t mapcount(pfn_t pfn, unsigned pool = 0) const noexcept;
  /// The folio `pfn` of pool `pool` belongs to. Lock-free.
  [[nodiscard]] folio_info folio(pfn_t pfn, unsigned pool = 0) const noexcept;
  /// The VMA list in /proc/self/maps form, one line per VMA:
  /// `start-end perms offset 00:00 0 [name]` with lowercase hex bounds
  /// (no leading zeros, as the kernel prints them with %08lx), perms
  /// `rwxp`/`rwxs`, the offset in bytes (%08llx); shmem VMAs are named
  /// "/dev/zero (deleted)" as Linux names them, file VMAs "[svm file]".
  /// Locking: takes mmap_lock shared.
  [[nodiscard]] std::string maps() SVM_EXCLUDES(mmap_lock_);

  // ---- pools -------------------------------------------------------------
  /// Pool `i` (0: the system pool this mm allocates from).
  [[nodiscard]] frame_pool& pool(unsigned i = 0) const noexcept { return *pools_->pools[i].pool; }
  /// Shared ownership of pool `i` (`i` below pool_count()).
  [[nodiscard]] std::shared_ptr<frame_pool> pool_ptr(unsigned i = 0) const noexcept { return pools_->pools[i].pool; }
  /// How pool `i` behaves (pool 0 is numa).
  [[nodiscard]] pool_kind kind_of_pool(unsigned i) const noexcept { return pools_->pools[i].kind; }
  /// The owner given to attach_pool() for pool `i` (null for pool 0).
  [[nodiscard]] const void* pool_owner(unsigned i) const noexcept { return pools_->pools[i].owner; }
  /// The pgmap ops given to attach_pool() for pool `i` (null: none; a CPU
  /// fault on the pool's device-private pages then migrates them back itself).
  [[nodiscard]] dev_pagemap_ops* pool_ops(unsigned i) const noexcept { return pools_->pools[i].ops; }
  /// Pools attached, the system pool included (acquire load; at least 1).
  [[nodiscard]] unsigned pool_count() const noexcept;
  /// Attach another pool; returns its index (up to cpu_pte::max_pools). Fork
  /// children share the attached pools. `owner` names a device-private
  /// pool's owner (hmm_range's dev_private_owner). `ops` (device-private
  /// pools only; it must outlive every mm of the fork family) is the pgmap's
  /// migrate_to_ram, which a CPU fault on the pool's pages calls
  /// (svm/notifier/migrate.h).
  /// Locking: takes mmap_lock exclusive. EINVAL: null pool, or ops on a
  /// numa pool; ENOSPC: full.
  [[nodiscard]] result<unsigned> attach_pool(std::shared_ptr<frame_pool> p, pool_kind kind,
                                             const void* owner = nullptr, dev_pagemap_ops* ops = nullptr)
      SVM_EXCLUDES(mmap_lock_);
  /// Attach a device-private pool whose ops the fork family keeps alive:
  /// the pool set holds `ops` by shared ownership until its last mm goes,
  /// so a driver may be destroyed while an mm still holds pages of the
  /// pool. Idempotent per family: if this very pool is already attached as
  /// device_private with the same owner, returns that index and keeps the
  /// ops it had (the check and the attach are one step under the family's
  /// attach lock, so two concurrent callers get one index).
  /// EINVAL: null pool or null ops; ENOSPC: full.
  /// Locking: takes mmap_lock exclusive.
  [[nodiscard]] result<unsigned> attach_pool(std::shared_ptr<frame_pool> p, const void* owner,
                                             std::shared_ptr<dev_pagemap_ops> ops) SVM_EXCLUDES(mmap_lock_);
  /// The zero page's frame number, the same (frame 0) in every pool.
  [[nodiscard]] static constexpr pfn_t zero_pfn() noexcept { return frame_pool::zero_pfn(); }

  // ---- notifiers -------------------------------------------------------
  /// This mm's interval-notifier subscriptions (tree, sequence, active ranges).
  [[nodiscard]] mmu_notifier_subscriptions& notifiers() noexcept { return subs_; }
  /// Kernel: mmu_notifier_invalidate_range_start/_nonblock (see
  /// mmu_notifier_subscriptions). `r.mm` is set to this mm.
  [[nodiscard]] errc invalidate_range_start(mmu_notifier_range& r);
  /// Kernel: mmu_notifier_invalidate_range_end. Ends `r`, which a successful
  /// invalidate_range_start began.
  void invalidate_range_end(mmu_notifier_range& r);
  /// Extension: wait until no active invalidation overlaps [start, end).
  void read_begin_range(va_t start, va_t end) { subs_.read_begin_range(start, end); }

  // ---- statistics, tests -------------------------------------------------
  /// A snapshot of the counters (relaxed loads).
  [[nodiscard]] mm_stats stats() const noexcept;
  /// Pages with a present or PROT_NONE 4K/2M PTE (2M counts 512), swap
  /// entries and device entries are not counted. Lock-free walk (O(table)).
  [[nodiscard]] std::size_t resident_pages() const;
  /// Swap slots in use (all mms sharing this swap).
  [[nodiscard]] std::size_t swap_used() const noexcept;
  /// The CPU page table, read-only (for tests and lock-free walks).
  [[nodiscard]] const cpu_page_table& page_table() const noexcept { return pt_; }
  /// Set before concurrent use.
  void set_test_hooks(mm_test_hooks h) { hooks_ = std::move(h); }
  /// The hooks installed by set_test_hooks().
  [[nodiscard]] const mm_test_hooks& test_hooks() const noexcept { return hooks_; }
  /// One past the highest user VA (mm_options::mmap_limit).
  [[nodiscard]] va_t va_limit() const noexcept { return opts_.mmap_limit; }

 private:
  struct vma;
  struct vma_by_start;
  struct shared_state;
  struct pending_free;
  friend errc hmm_range_fault(hmm_range&);
  friend struct mm_impl;
  struct pool_entry {
    std::shared_ptr<frame_pool> pool;
    pool_kind kind = pool_kind::numa;
    const void* owner = nullptr;
    dev_pagemap_ops* ops = nullptr;  // not owned (unless keep holds it)
    std::shared_ptr<dev_pagemap_ops> keep;  ///< the shared-ownership overload's ops
  };
  /// Pools and swap shared by a fork family. Slot i is written once, before
  /// `count` is raised past i (release); readers index only below an
  /// acquire load of `count` (or an index they found in a PTE, which was
  /// written after the attach), so slots are immutable after publication.
  struct pool_set {
    std::array<pool_entry, cpu_pte::max_pools> pools;
    std::atomic<unsigned> count{0};
    std::shared_ptr<swap_space> swap;  // immutable
    mutex attach_lock{attach_class};   // serialises attach_pool across a fork family
    static constexpr lock_class attach_class{"pool_set.attach", lockdep::rank::leaf};
    /// Frames collected by a migrate_vma_setup whose migrate_vma_finalize
    /// has not run yet, as (pool << 52 | pfn): a frame is isolated by one
    /// migration at a time (kernel: the folio lock migrate_vma takes).
    /// Leaf lock, taken under page-table node locks.
    mutex isolate_lock{isolate_class};
    static constexpr lock_class isolate_class{"pool_set.isolate", lockdep::rank::leaf};
    std::set<std::uint64_t> isolated SVM_GUARDED_BY(isolate_lock);
  };
  mm(mm_options o, std::shared_ptr<pool_set> pools);

  mm_options opts_;  // immutable
  std::shared_ptr<pool_set> pools_;  // immutable pointer
  static constexpr lock_class mmap_class_{"mmap_lock", lockdep::rank::mmap};
  /// Keyed per mm (increasing), so that fork may hold parent then child.
  mutable shared_mutex mmap_lock_;
  static constexpr lock_class rmap_class_{"rmap_lock", lockdep::rank::rmap};
  /// The stand-in for the kernel's anon_vma lock, which an rmap walk holds
  /// so that it needs no mmap_lock. Every thread that takes mmap_lock_
  /// exclusive takes this one exclusive right after it and holds it as
  /// long; device-memory eviction (evict_device_range) takes it shared
  /// instead of mmap_lock_. Holding it shared therefore keeps the VMAs and
  /// the page-table structure as stable as mmap_lock_ shared does, while
  /// readers of mmap_lock_ (faults, DONTNEED, reclaim, migrations) run beside
  /// it as they run beside each other. Keyed like mmap_lock_.
  mutable shared_mutex rmap_lock_;
  /// VMAs by start; owned (allocated with new). Guarded by mmap_lock_:
  /// changed only with it held exclusively.
  struct vma_tree;
  std::unique_ptr<vma_tree> vmas_ SVM_PT_GUARDED_BY(mmap_lock_);
  bool torn_down_ SVM_GUARDED_BY(mmap_lock_) = false;
  /// The CPU page table. Internally synchronised (node locks, epoch).
  cpu_page_table pt_;
  static constexpr lock_class tables_class_{"mm.empty_tables", lockdep::rank::leaf};
  /// 2M slots where Linux would still hold a 4K page table whose entries are
  /// all empty. `pt_` frees an empty 4K node at once, so without this the
  /// next fault there would see "no table" and map a THP or the huge zero
  /// page where Linux maps 4K pages. A slot is added when a zap or a move
  /// empties 4K entries in it; it is dropped where Linux frees the table:
  /// munmap once no VMA touches the slot (free_pgtables), and MADV_DONTNEED
  /// of 2M or more (page-table reclaim, CONFIG_PT_RECLAIM) when the slot has
  /// no entry left. A slot whose node exists again is harmless (the fault
  /// path sees the node first). Leaf lock: taken with no node lock held; the
  /// fault path takes it under the mmap read lock, the rest under either.
  mutable mutex tables_lock_{tables_class_};
  std::set<va_t> empty_tables_ SVM_GUARDED_BY(tables_lock_);
  mmu_notifier_subscriptions subs_;
  static constexpr lock_class release_class_{"mm.release", lockdep::rank::driver};
  /// The release subscribers. teardown() holds the lock across their
  /// release() calls, so remove_release() returns only once none runs.
  mutex release_lock_{release_class_};
  std::vector<mm_release_ops*> release_subs_ SVM_GUARDED_BY(release_lock_);
  bool released_ SVM_GUARDED_BY(release_lock_) = false;
  mm_test_hooks hooks_;  // set before concurrent use
  struct counters {
    std::atomic<std::uint64_t> faults{0}, cow_breaks{0}, thp_faults{0}, swap_outs{0}, swap_ins{0},
        migrations{0}, invalidations{0};
  };
  mutable counters stats_;  // relaxed: statistics only
};

/// Kernel-style free-function spelling of the extension.
inline void read_begin_range(mm& m, va_t start, va_t end) { m.read_begin_range(start, end); }

}  // namespace svm
