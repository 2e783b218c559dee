// Epoch-based reclamation for lock-free readers of page tables.
//
// A hardware page-table walker reads nodes without locks. A node that a zap
// unlinks may still be in some walker's hands, so it is retired here instead
// of freed, and freed only once every walker that could have seen it has
// left its read-side section.
//
// Protocol (one global domain, like the kernel's RCU):
//
//   reader (walker)                          writer (zap)
//   ---------------                          ------------
//   enter: rec.state = global|ACTIVE         unlink: parent entry = 0
//          (seq_cst store)                           (seq_cst store)
//   entry/link loads (seq_cst)               retire(node) tagged e = global
//   exit:  rec.state = 0 (release)           ...
//                                            advance: global g -> g+1 only when
//                                              every ACTIVE record (seq_cst
//                                              loads) shows g
//                                            free items tagged e <= global - 2
//
// All four marked operations are seq_cst, so they sit in one total order:
// either the walker's link load comes after the unlink (and sees 0, never
// reaching the node), or the reclaimer's scan comes after the walker's
// announcement and waits for it. An item retired at e survives until
// global >= e + 2, i.e. until every reader active at e or e+1 has left.
//
// Why not fences: ThreadSanitizer does not model atomic_thread_fence. The
// walker's seq_cst loads compile to the same plain loads as acquire loads on
// x86-64 (mov) and AArch64 (ldar), so the hardware walk stays "acquire loads
// only" in cost; the unlink's seq_cst store costs an xchg, off the hot path.
//
// Entering is a thread-local nesting check plus, for the outermost guard, one
// seq_cst store: a few nanoseconds. Engines that walk often keep one guard
// across many accesses and call quiescent() at access boundaries.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace svm::epoch {

/// Per-thread reader record. One per thread (reused after the thread exits);
/// linked into the domain's record list, never freed.
struct record {
  /// (epoch << 1) | 1 while the owner is inside a read-side section, 0 when
  /// not. Written only by the owner; read by reclaimers. The owner's release
  /// store of 0 on exit pairs with the acquire load in try_advance().
  std::atomic<std::uint64_t> state{0};
  /// Owned by a live thread. CAS-acquired by a thread on first use, released
  /// by its thread-exit hook.
  std::atomic<bool> in_use{false};
  /// Nesting depth of guards; touched only by the owner.
  std::uint32_t nest = 0;
  record* next = nullptr;  ///< immutable after publication in the list
};

/// Enter a read-side section (nestable). Cheap; never blocks.
void enter() noexcept;
/// Leave a read-side section.
void leave() noexcept;
/// For a thread that holds a long-lived guard: announce a quiescent point by
/// re-reading the global epoch, as if it left and entered again. Only valid
/// at nesting depth 1 (no node pointer may be live across it).
void quiescent() noexcept;
/// True if the calling thread is inside a read-side section.
bool in_section() noexcept;

/// RAII read-side section.
class guard {
 public:
  guard() noexcept { enter(); }
  ~guard() { leave(); }
  guard(const guard&) = delete;
  guard& operator=(const guard&) = delete;
};

using deleter = void (*)(void* obj, void* ctx);

/// Retire `obj`: `del(obj, ctx)` runs once no reader that could see it is
/// left. Must be called after `obj` is unreachable for new readers. May run
/// reclamation of older items inline (their deleters run on this thread).
/// Locking: takes the domain's retire lock (rank leaf); callers may hold
/// page-table node locks. Deleters must not take page-table locks.
void retire(void* obj, deleter del, void* ctx) noexcept;

/// Try to advance the epoch and free what is safe. Never blocks on readers.
/// Returns the number of items freed.
std::size_t try_reclaim() noexcept;

/// Wait until every item retired before the call is freed (its deleter has
/// returned, on whichever thread ran it): waits for every reader that is in
/// a section now to leave, and for reclamation passes of other threads in
/// progress. Must not be called inside a read-side section (it would wait
/// for itself: reported and aborted), nor from a deleter.
void synchronize() noexcept;

/// Items retired and not yet freed (all threads).
std::size_t pending() noexcept;

/// Current global epoch (for tests and statistics).
std::uint64_t current() noexcept;

}  // namespace svm::epoch
