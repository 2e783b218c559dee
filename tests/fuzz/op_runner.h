// The op-sequence fuzzer's engine: decode an input into a VM
// configuration and a sequence of API operations, run them against svm and
// against the reference model (ref_model.h), and report the first
// disagreement. Used by the libFuzzer target (fuzz_ops.cpp) and by the
// replay suite (replay_test.cpp); it knows neither.
//
// ## Input format (all integers little-endian; reading past the end yields 0)
//
//   byte 0   config: bit0 seq_mode (0 pgtable, 1 notifier); bit1 mirror_impl
//            (0 page, 1 range); bits2-3 window policy (0 largest, 1 fixed 4K,
//            2 fixed 64K, 3 fixed 2M); bit4 engines (0: 1, 1: 2); bit5 THP
//            (0 madvise, 1 always); bit6 mirror (0 full mm, 1 one window);
//            bit7 huge device leaves off
//   byte 1   VRAM size: 16 + (b % 48) pages. b >= 192: SVM placement mode:
//            the universe's SVM memory prefers VRAM (gpu_vm::set_attrs;
//            64K chunks, 4K if b bit1; device atomics if b bit0) with no
//            migration timeslice, so device faults migrate private
//            anonymous chunks to VRAM, CPU accesses bring them back, and
//            VRAM BOs and SVM chunks evict each other. In this mode a VRAM
//            bo_create may answer ENOMEM (device pages that eviction cannot
//            reach, a fork child's or pages mremap moved out of their chunk,
//            hold the VRAM: docs/migration.md); it must then change nothing
//   then up to max_ops operations, each an opcode byte (taken mod op_count)
//   followed by its argument bytes:
//
//   op                 args                                 meaning
//   0  mmap_anon       fl pg:u16 n                          MAP_FIXED anonymous; fl bit0 shared,
//                                                           bits1-3 prot
//   1  mmap_file       fl pg:u16 n off                      MAP_FIXED of file (fl bit4) at page off;
//                                                           fl bit0 shared, bits1-3 prot
//   2  munmap          pg:u16 n
//   3  mprotect        pg:u16 n p                           prot = p & 7
//   4  madvise         pg:u16 n a                           a%3: DONTNEED, HUGEPAGE, NOHUGEPAGE
//   5  mremap          pg:u16 n n2 fl pg2:u16               fl&7 = MAYMOVE|FIXED|DONTUNMAP bits
//   6  fork            -                                    replaces the child
//   7  child_store     pg:u16 off v                         8 bytes at pg + off*16 in the child
//   8  child_load      pg:u16 off                           8 bytes, compared
//   9  reclaim         pg:u16 n
//   10 migrate         pg:u16 n t                           to pool 1 (numa, t even) or 2 (device
//                                                           private of another owner, t odd)
//   11 cpu_store       pg:u16 off sz v                      see "CPU bytes" below
//   12 cpu_load        pg:u16 off sz                        compared
//   13 cpu_fetch_add   pg:u16 off v                         at pg + off*16 (+4, unaligned: EINVAL,
//                                                           if v bit7); adds v
//   14 file_pwrite     f off:u16 v                          8 bytes at byte off*8 of file f&1
//   15 bo_create       n w                                  1 + n%12 pages, VRAM if w even
//   16 bo_destroy      b                                    see "BO choice"
//   17 bo_bind         b gpg:u16 boff n                     bind pages [boff%16, +1+n%16) of the BO
//   18 bo_unbind       gpg:u16 n
//   19 bo_evict        b
//   20 bo_write        b boff off v                         8 bytes at page boff%16, byte off*16
//   21 bo_read         b boff off                           8 bytes, compared
//   22 kernel          k, then 1 + k%8 accesses             one work item runs them in order
//   23 child_exit      -
//   24 gc_notifiers    -
//   25 kernel_range    k pg:u16 n s v                       a kernel over many pages: see "Range
//                                                           kernels" below
//   26 kernel_during   c cpg:u16 cn x, then k pg:u16 n s v  a range kernel with a CPU operation run
//                                                           while it runs: see "Kernels under a CPU
//                                                           operation" below
//   27 kernel_cancel   k pg:u16 n s v r                     a range kernel cancelled from the host
//                                                           (completion::cancel, reason ECANCELED if
//                                                           r is even, else ETIMEDOUT) once its items
//                                                           reach their midpoint
//
//   Addresses: pg is a CPU page index (pg % 1088) in the universe at
//   cpu_base; gpg a GPU page index (gpg % 1088) at gpu_base (== cpu_base for
//   the full-mm mirror; the window maps the universe's 1024 pages). n is a
//   page count: n < 240: 1 + n%16; else 256, 511, 512, 513, 1024, ... (see
//   decode_pages). Pages 1024..1087 lie past the universe (past the window).
//   CPU bytes: sz%8 picks 1, 2, 4, 8, 16, 24, 3, 5 bytes; the offset is
//   off*16 + sz/16, so accesses may be unaligned and may cross a page.
//   Values: the byte v repeated (v * 0x0101010101010101), plus the op index.
//   BO choice: b == 255 names a BO that does not exist; otherwise the
//   (b % live)th live BO in creation order (none live: a bad handle).
//   Kernel access: kind pg:u16 off v — pg < 1088: that page; pg >= 1088:
//   the ((pg - 1088) mod count)th page the device can reach now (a mirrored
//   page with a CPU VMA, or a BO-bound page; ascending GPU VA). kind%8: 0 load, 1 store, 2 add,
//   3 cmpxchg (expected v, desired v+1), 4 exchange, 5-7 load; size 1 <<
//   ((kind>>3)&3); byte offset off*16 + ((kind>>6)&3)*4, aligned down to the
//   size unless kind bit5 (then +1: unaligned, EINVAL; for a steered page
//   only when v%8 == 0 as well).
//
//   Range kernels (k pg:u16 n s v): access j (j = 0 .. count-1) goes to GPU
//   page pg + j*stride (pg >= 1088: steered, the start is the
//   ((pg - 1088) mod count)th reachable page), stopping at the decoder's
//   range; count = decode_pages(n), at most max_range_accesses. stride = 1 +
//   s%4 pages, times 16 if k bit5. Work items: 1 + (s>>2)%8, item w runs the
//   accesses j == w (mod items) in order. k%8: 0 load, 1 store, 2 add, 3
//   cmpxchg, 4 exchange, 5 prefetch, 6-7 mixed (access j takes kind (j + v)
//   % 6 of those); size 1 << ((k>>3)&3); byte offset ((v + 7j) % 256) * 16 +
//   ((k>>6)&3)*4 aligned down to the size; value pattern(v + j). Each access
//   touches its own page, so the items never race on data. If the model
//   says an access will fail, the kernel runs as one item (the first failure
//   in order is then the kernel's status, exactly). A prefetch must not
//   report a page mapped that the device may not read. Every store is read
//   back by the CPU afterwards and compared with the model.
//
//   A cancelled kernel ends {ECANCELED, reason}, or with the failure of an
//   access before the midpoint if the model says one fails (it then runs as
//   one item); no item completes an access past its midpoint; the accesses
//   that did complete are exact and stay in the model; the queue's next
//   kernel runs normally.
//
//   Kernels under a CPU operation (c cpg:u16 cn x): c%8 picks 0 munmap, 1
//   mprotect (prot x&7), 2 madvise DONTNEED, 3 mremap to page x*4 (MAYMOVE|
//   FIXED, | DONTUNMAP if c bit3), 4 fork, 5 reclaim, 6 migrate (pool as
//   migrate's t = x), 7 madvise (x%3) over [cpg, cpg + decode_pages(cn)).
//   The kernel is submitted, its items run up to half their accesses, the
//   operation runs on the host, then the kernel finishes: real concurrency,
//   so what is checked is an invariant, not an interleaving. Accesses to
//   pages the operation may change (every page for fork) become loads; each
//   must return what the page held before the operation or after it, and a
//   failure must be one the state before or after explains. Accesses to
//   other pages keep their kind and must behave exactly as the model says.
//   The operation's own result is compared as usual.
//
// Each run makes a fresh mm (+ child), files, device, gpu_vm and access
// oracle; nothing is shared between runs. A run is deterministic: one work
// item per kernel, operations one after another.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace svm {
class mm;
}

namespace svm::fuzz {

/// CPU VA of the universe's page 0 (both modes; 2M aligned).
inline constexpr std::uint64_t universe_base = std::uint64_t{1} << 30;
inline constexpr std::size_t max_ops = 64;
inline constexpr unsigned max_kernel_accesses = 8;
inline constexpr std::uint64_t universe_pages = 1024;
inline constexpr std::uint64_t address_pages = 1088;  ///< decoder's page index range
inline constexpr unsigned max_range_accesses = 512;  ///< accesses of one range kernel, at most

enum class op_kind : std::uint8_t {
  mmap_anon, mmap_file, munmap, mprotect, madvise, mremap, fork, child_store, child_load, reclaim,
  migrate, cpu_store, cpu_load, cpu_fetch_add, file_pwrite, bo_create, bo_destroy, bo_bind, bo_unbind,
  bo_evict, bo_write, bo_read, kernel, child_exit, gc_notifiers, kernel_range, kernel_during, kernel_cancel, count
};
inline constexpr unsigned op_count = static_cast<unsigned>(op_kind::count);
[[nodiscard]] const char* to_string(op_kind k) noexcept;

/// One device access of a kernel, as encoded.
struct access_desc {
  std::uint8_t kind = 0;
  std::uint16_t page = 0;
  std::uint8_t off = 0;
  std::uint8_t v = 0;
};

/// One operation, as encoded (args in order; unused ones are 0).
struct op_desc {
  op_kind kind = op_kind::fork;
  std::vector<std::uint8_t> args;  ///< the raw argument bytes
  std::vector<access_desc> accesses;  ///< kernel only
};

struct program {
  std::uint8_t config = 0;
  std::uint8_t vram = 0;
  std::vector<op_desc> ops;
};

/// Decode (never fails: missing bytes read as 0; at most max_ops ops).
[[nodiscard]] program decode(std::span<const std::uint8_t> data);
/// The bytes decode() turns into `p`.
[[nodiscard]] std::vector<std::uint8_t> encode(const program& p);

struct run_result {
  bool ok = true;
  std::string message;        ///< the first mismatch: op index, op, svm's and the model's results
  std::uint64_t ops = 0;      ///< operations executed
  std::uint64_t accesses = 0; ///< device accesses executed (kernel items)
  bool exhausted = false;     ///< ended early: svm ran out of system frames (not a mismatch)
};

/// Test hooks: what a test does behind the models' back, to show that the
/// checks catch it.
struct run_hooks {
  /// Called on the running thread after operation `op` (the concurrent
  /// mode: after phase `op`'s records, before its checks) with the run's mm.
  std::function<void(std::size_t op, mm& m)> after_op;
};

/// Run `data` against svm and the model (hooks: tests only).
[[nodiscard]] run_result run_input(std::span<const std::uint8_t> data, const run_hooks* hooks = nullptr);

/// Totals over every run_input() of this process (relaxed atomics: read
/// them once the runs are over, e.g. at exit).
struct run_totals {
  std::uint64_t runs = 0, ops = 0, accesses = 0, kernels = 0, exhausted = 0;
  std::uint64_t faults = 0;        ///< device fault records raised (device_stats::faults)
  std::uint64_t replays = 0;       ///< stalled accesses replayed
  std::uint64_t cancels = 0;       ///< stalled accesses cancelled
  std::uint64_t oracle_checked = 0;  ///< SVM accesses the access oracle checked
  std::uint64_t concurrent = 0;    ///< kernels that ran beside a CPU operation (or the CPU stream)
  std::uint64_t migrations_to_vram = 0;  ///< SVM chunk migrations to VRAM (vm_stats)
  std::uint64_t migrations_to_ram = 0;   ///< ... and back to system memory
  std::uint64_t vram_bo_enomem = 0;      ///< VRAM BOs refused in placement mode (see byte 1)
};
/// One line of totals (runs, ops, kernels, accesses, accesses per run and
/// per kernel, faults, replays, cancels, oracle checks, migrations),
/// prefixed `prefix`.
[[nodiscard]] std::string describe(const run_totals& t, const char* prefix);
[[nodiscard]] run_totals totals() noexcept;

/// The seed corpus: named inputs covering every op kind (reproducible).
[[nodiscard]] std::vector<std::pair<std::string, std::vector<std::uint8_t>>> seed_corpus();
/// Write seed_corpus() into `dir` (one file per seed).
void write_seed_corpus(const std::filesystem::path& dir);

}  // namespace svm::fuzz
