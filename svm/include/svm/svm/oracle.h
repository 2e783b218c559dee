// The access oracle: a checker installed on the simulated device that
// validates every translated device access against the CPU page tables and
// reports stale accesses.
//
// ## The rule
// An access through an SVM PTE (no gpu_vm::bo_pte_bit) of a watched VM, at
// GPU VA `gva` mirroring CPU VA `cpu`, is fine if the device frame it
// touches is
//  (a) the frame the CPU maps at `cpu` now: same pool and pfn (a present
//      PTE, or a device-private entry of that frame), and for a write or an
//      atomic the CPU mapping is writable; or
//  (b) a frame whose invalidation has not completed yet: an invalidation
//      overlapping the page is active (mm's range_is_invalidating).
// Anything else is a stale access: it is counted, and the first
// `max_reports` are recorded with the addresses, both frames, their
// generations, the access kind and why it failed.
//
// The frame is named by the aperture: a system-aperture PTE names pool
// (pfn >> 32) of the mm, frame (pfn & 0xffffffff); a VRAM-aperture PTE (an
// SVM page migrated to VRAM, docs/migration.md) names a frame of the
// device's VRAM, which the mm has attached as a device-private pool: its
// pool is that pool's index, so the access is fine only while the CPU entry
// at `cpu` is the device-private entry of that very VRAM frame. Once the
// chunk migrated back and the frame was reused, the access is stale
// (frame_mismatch, or cpu_not_present).
//
// BO PTEs (bo_pte_bit) are counted as checked but not SVM (not_svm()):
// checking a BO access against the BO's current backing and its bind/evict
// state is future work. Accesses of VMs the oracle does not watch are
// counted in unwatched() and not checked.
//
// ## Why the check is race-free (no false report, in this order)
// The check runs on the engine thread inside the access: after translation,
// before the memory operation, before the engine's next invalidation
// acknowledgement. An invalidation I of the page goes through these steps,
// and frees the old frame only after the last one:
//
//   invalidation I (mm, mmap_lock held)       access A (engine), check inside
//   ------------------------------------       -------------------------------
//   t0  register range R (notifier lock)       ts  translate gva -> frame F
//   t1  callbacks: clear device PTEs,          c1  cpu_translate(cpu)  (acquire
//       invalidate_tlb: waits for every            loads of the CPU PTE)
//       access that began before it            c2  on mismatch only:
//   t2  clear / replace the CPU PTE                range_is_invalidating(page)
//   t3  unregister R (notifier lock)               (takes the notifier lock)
//   t4  free the old frame (generation++)      te  memory op; next boundary acks
//
// Take A legitimate: F was mapped at `cpu` when the PTE A used was written,
// and the first invalidation I that changed `cpu` away from F has not
// completed before A. invalidate_tlb (t1) waits for A if A began before it;
// if A began after it, A cannot have found the cleared PTE, and a later fault
// could only have mapped what the CPU maps after t2 (the sequence protocol).
// So A's whole check lies before I's shootdown completes, which in this
// driver is before t2, and c1 sees F (case a). A driver that shoots down
// later (between t2 and t3, as IOMMU-style secondary TLBs do) is still
// accepted: if c1 saw the CPU PTE changed by I, then c1 > t2 > t0, and c2 <
// te < I's shootdown < t3, so R is still registered at c2 (case b). The
// acquire load at c1 that read I's PTE store orders R's registration (made
// earlier by I's thread) before c2's lock acquisition.
//
// The order matters: querying range_is_invalidating first could see no range
// (before t0) and then a changed CPU PTE (after t2), a false report. Querying
// it only on mismatch also keeps the notifier lock off the common path.
//
// What it cannot see: (1) a stale access whose frame happens to be the one
// the CPU maps now (an ABA: freed, reused and mapped at the same address) is
// not stale by the rule; (2) case (b) accepts any frame while an overlapping
// invalidation is active — the oracle cannot know which frame was mapped
// before it, so a stale access racing with an invalidation of the same page
// goes unreported (excused() counts every access accepted by (b); with this
// driver it is normally 0); (3) it checks one instant inside the access.
//
// ## Lifetime
// The validator installed on the device holds the oracle's state by
// shared_ptr, so an access racing with the oracle's destruction still finds
// live state (the device keeps old validators alive until it is destroyed).
// The oracle therefore need not outlive the device's use of it, but the
// svm::driver must be alive when the oracle is destroyed or detach() is
// called (they call set_oracle(nullptr)).
//
// A watched mm may be torn down (or destroyed) before the oracle: the first
// watch() of an mm subscribes the oracle to its teardown (mm_release_ops).
// The release, which runs before the mm frees anything, replaces each
// registration of that mm by an mm-less one, then waits out every check in
// flight (one device TLB invalidation: it returns once every access that
// began before it completed). Later SVM accesses of those VMs are stale
// with reason mm_released; no check touches the dead mm. ~access_oracle
// unsubscribes from the mms still alive, so an mm and its oracle must not
// be destroyed at the same time on two threads (as with a VM and its mm).
// One oracle per device: attaching replaces the device's validator, and
// detaching turns the hook off whatever was installed after it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "svm/base/errc.h"
#include "svm/base/types.h"
#include "svm/device_sim/device.h"
#include "svm/notifier/mm.h"
#include "svm/svm/gpu_vm.h"

namespace svm {

/// A mirror window as the oracle knows it: CPU VA [cpu, cpu + size) at GPU
/// VA gpu (the same triple as gpu_vm::add_window).
struct oracle_window {
  va_t cpu = 0;            ///< first CPU VA of the window (4K aligned)
  va_t gpu = 0;            ///< GPU VA that mirrors `cpu` (4K aligned)
  std::uint64_t size = 0;  ///< window length in bytes (non-zero, 4K multiple)
};

/// Why an access was stale.
enum class stale_reason : std::uint8_t {
  not_mirrored,     ///< the GPU VA is in no mirror window of the VM (or the VM mirrors nothing)
  cpu_not_present,  ///< the CPU maps nothing usable there (unmapped, swapped, PROT_NONE)
  frame_mismatch,   ///< the CPU maps another frame there
  cpu_read_only,    ///< same frame, but a write/atomic while the CPU maps it read-only
  mm_released,      ///< the VM's watched mm was torn down (nothing is mapped any more)
};
/// The reason's name, as in the enumerator (e.g. "frame_mismatch").
[[nodiscard]] const char* to_string(stale_reason r) noexcept;

/// One stale access.
struct stale_report {
  dev::vm_id vm = 0;           ///< the VM whose access it was
  unsigned engine = 0;         ///< the device engine that made the access
  access acc = access::read;   ///< read, write or atomic
  stale_reason reason = stale_reason::frame_mismatch;  ///< why the rule rejected it
  va_t gva = 0;                ///< the GPU VA accessed
  va_t cpu_va = 0;             ///< 0 when not mirrored
  std::uint64_t pte = 0;       ///< the device leaf entry used
  unsigned level = 0;          ///< its level (0: 4K, 1: 2M, 2: 1G)
  bool tlb_hit = false;        ///< the translation came from the TLB (else a fresh walk)
  /// The device frame touched, as the mm's pool and pfn (the device pfn is
  /// (pool << 32) | pfn, see mm_device_pfn): this is the pool.
  unsigned dev_pool = 0;
  /// The device frame touched: its pfn within pool dev_pool.
  pfn_t dev_pfn = 0;
  /// The touched frame's generation, read at report time (it advanced if
  /// the frame was freed since it was mapped).
  std::uint64_t dev_generation = 0;
  /// What the CPU mapped at cpu_va when checked (cpu.present false: nothing,
  /// or a device-private entry of another frame).
  cpu_translation cpu{};
};
/// One line, e.g. "stale write vm 1 gva 0x... cpu 0x... engine 0 (tlb miss,
/// 4K pte 0x...): device frame pool 0 pfn 0x12 gen 3; cpu maps pool 0 pfn
/// 0x34 gen 1 rw (frame_mismatch)".
[[nodiscard]] std::string describe(const stale_report& r);

/// Counter snapshot (see access_oracle's accessors).
struct oracle_counts {
  std::uint64_t checked = 0;      ///< every access the validator saw
  std::uint64_t svm_checked = 0;  ///< SVM accesses of watched VMs, checked against the CPU page table
  std::uint64_t not_svm = 0;      ///< BO accesses (not checked by the rule)
  std::uint64_t unwatched = 0;    ///< accesses of VMs not watched
  std::uint64_t excused = 0;      ///< SVM accesses accepted only by rule (b)
  std::uint64_t stale = 0;        ///< stale accesses (all counted, some reported)
};

/// Construction-time settings of an access_oracle.
struct oracle_options {
  /// Reports kept (the first ones); every stale access is counted.
  std::size_t max_reports = 64;
};

/// The access oracle. Construct it on a device (it installs the validator at
/// once), then watch() each VM to check.
///
/// Thread safety: every member may be called concurrently with kernels and
/// with each other, except the destructor. Counters are relaxed, per-engine
/// sums: exact once the kernels counted have completed (completion::wait()
/// returns after every work item of the kernel, with acquire), racy
/// snapshots while kernels run.
class access_oracle {
 public:
  /// Attach to `dev` (dev.hw().set_oracle). `dev` must be alive until the
  /// oracle is destroyed or detach()ed. Locking: takes the device's oracle
  /// lock (leaf); never blocks.
  explicit access_oracle(driver& dev, oracle_options o = {});
  /// detach(), then unsubscribe from the teardown of every watched mm still
  /// alive (mm::remove_release: waits for a release running on another
  /// thread). Locking: as detach(), then each mm's release lock.
  ~access_oracle();
  access_oracle(const access_oracle&) = delete;
  access_oracle& operator=(const access_oracle&) = delete;

  /// Turn the device's hook off (idempotent). Accesses already inside the
  /// validator finish against live state; later ones are not checked.
  /// Locking: takes the registry lock (leaf) and the device's oracle lock
  /// (leaf) one after the other; never blocks; not from a kernel.
  void detach();
  /// True while the oracle's validator is installed (until detach()).
  /// Locking: takes the registry lock (leaf).
  [[nodiscard]] bool attached() const;

  /// Watch `vm`, whose mirror is of `m`. full_mm: GPU VA == CPU VA; none:
  /// every SVM access is stale (not_mirrored). A windows mirror needs its
  /// windows: gpu_vm does not expose them yet, use the overload below.
  /// Watching an id again replaces its registration (windows included).
  /// Errors: EINVAL (windows mirror, `m` already torn down).
  /// Locking: as the primitive below.
  errc watch(const gpu_vm& vm, mm& m);
  /// Watch a windows-mirror `vm` with its windows (call again after each
  /// add_window; a GPU VA in no window is stale). Errors: EINVAL (not a
  /// windows mirror, an empty/unaligned/overflowing window, overlapping GPU
  /// ranges, `m` already torn down). Locking: as the primitive below.
  errc watch(const gpu_vm& vm, mm& m, std::vector<oracle_window> windows);
  /// The primitive: VM id `id` mirrors `m` per `kind` (windows used only
  /// for mirror_kind::windows). Errors: EINVAL (id > dev::max_vm_id, bad
  /// windows, `m` already torn down). Locking: takes the registry lock
  /// (leaf); the first watch of an mm also subscribes to its teardown
  /// (mm::add_release: the mm's release lock, rank driver, not nested in
  /// the registry lock).
  errc watch(dev::vm_id id, mm& m, mirror_kind kind, std::vector<oracle_window> windows = {});
  /// Stop checking VM `id` (its accesses count as unwatched). ENOENT if not
  /// watched. The registration's memory is kept until the oracle's state
  /// dies, so a racing check never reads freed memory.
  /// Locking: takes the registry lock (leaf); never blocks.
  errc unwatch(dev::vm_id id);

  /// Every access the validator saw.
  [[nodiscard]] std::uint64_t checked() const noexcept;
  /// SVM accesses of watched VMs, checked against the CPU page table.
  [[nodiscard]] std::uint64_t svm_checked() const noexcept;
  /// BO accesses (checked-not-SVM).
  [[nodiscard]] std::uint64_t not_svm() const noexcept;
  /// Accesses of VMs not watched.
  [[nodiscard]] std::uint64_t unwatched() const noexcept;
  /// SVM accesses accepted only by rule (b) (an overlapping invalidation
  /// was active).
  [[nodiscard]] std::uint64_t excused() const noexcept;
  /// Stale accesses.
  [[nodiscard]] std::uint64_t stale() const noexcept;
  /// All the counters above in one struct (each read separately, so racy
  /// while kernels run).
  [[nodiscard]] oracle_counts counts() const noexcept;
  /// A copy of the reports kept (at most max_reports, oldest first).
  /// Locking: takes the reports lock (leaf); never blocks.
  [[nodiscard]] std::vector<stale_report> reports() const;
  /// Zero the counters and drop the reports. Exact only with no kernel
  /// running. Locking: takes the reports lock (leaf).
  void reset();

  /// The validator body (what the device calls). Exposed for tests that
  /// drive it with hand-made access_checks (c.engine < 256). Locking: runs on an engine
  /// thread inside the access: takes no lock on the matching path; on a
  /// mismatch takes the mm's notifier lock (via range_is_invalidating) and,
  /// for a stale access, the reports lock (leaf), one after the other.
  /// Never blocks beyond those short locks; never takes vm or mmap locks.
  void check(const dev::access_check& c);

 private:
  struct state;   // oracle.cpp: the registry, counters and reports
  struct mm_sub;  // oracle.cpp: the subscription to a watched mm's teardown

  driver& dev_;
  /// The state the validator shares (immutable pointer). Its registry lock
  /// ("access_oracle.registry", rank leaf) guards registrations and the
  /// attached flag; see oracle.cpp.
  std::shared_ptr<state> st_;
};

}  // namespace svm
