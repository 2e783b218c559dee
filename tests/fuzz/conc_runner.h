// The fuzzer's concurrent mode: two operation streams, one of CPU
// operations and one of device work (kernels, BO create/bind/unbind/evict/
// destroy), run by two threads through phases that a seeded schedule (the
// input) lays out, and checked by invariants that hold whatever the
// interleaving: the access oracle (0 stale accesses), exact data where one
// side owns it, and "zero or a CPU-written value" where the other side races.
// Used by the libFuzzer target svm_fuzz_conc (fuzz_conc.cpp) and by the
// replay suite (replay_test.cpp, corpus_conc/).
//
// ## Memory layout (CPU pages from cpu_base; full-mm mirror: GPU VA == CPU VA)
//   S  pages [0, 64)      the stable buffer, mapped once, private anonymous,
//                         read-write. Bytes [0, 2048) of each page belong to
//                         the device, bytes [2048, 4096) to the CPU. The CPU
//                         stream changes only residency and sharing there
//                         (reclaim, migrate, fork, madvise THP advice), and
//                         its own bytes (fetch_add): device kernels on S must
//                         always succeed, and both halves are exact.
//   C  pages [256, 512)   the churned buffer: the CPU stream maps, unmaps,
//                         mprotects, DONTNEEDs, mremaps and stores there
//                         (exact against its own model); device kernels only
//                         load and prefetch there, and a value loaded is 0 or
//                         carries the CPU's tag (top 16 bits 0xc5c5); a
//                         kernel there may end ECANCELED (EFAULT, EPERM, or
//                         EBUSY at the fault timeout) at one of its accesses.
//   B  pages [1024, 1088) GPU VAs with no CPU VMA, where the device stream
//                         binds BOs: exact against the device model.
//
// ## Input (reading past the end yields 0)
//   byte 0   config: bit0 seq_mode (0 pgtable, 1 notifier); bit1 mirror_impl
//            (0 page, 1 range); bits2-3 window policy (as op_runner.h);
//            bit4 engines (0: 1, 1: 2); bit5 THP (0 madvise, 1 always)
//   byte 1   VRAM size: 16 + (b % 48) pages. b >= 192: SVM placement mode:
//            S and C prefer VRAM (64K chunks, 4K if b bit1; device atomics if
//            b bit0; no migration timeslice), so kernels migrate S's pages
//            to VRAM while the CPU's fetch_adds, reclaims, forks and
//            migrations bring them back, and every invariant must still
//            hold; a VRAM bo_create may be refused (ENOMEM)
//   then up to max_phases phases: a schedule byte s (s&7 CPU records, (s>>3)&7
//   device records; bit6 set: run the two chunks one after the other, CPU
//   first unless bit7, else run them at once on two threads), then the CPU
//   records (5 bytes: op a b c d) and the device records (6 bytes: op a b c d e).
//   After each phase both threads stop and the checks run (oracle, S).
//
//   CPU record (op % 11)           device record (op % 8)
//   0 mmap_anon C  pg=a|b<<8 n=c fl=d   0 kernel on S  start a, count b, s c, kind d, v e
//   1 munmap C     pg n                 1 kernel on C  (loads, prefetches) as above
//   2 mprotect C   pg n prot=d&7        2 kernel on B  as above (exact; one item if it fails)
//   3 DONTNEED C   pg n                 3 bo_create    1 + a%8 pages, VRAM if b even
//   4 mremap C     pg n -> 1 + d%16 at  4 bo_destroy   the (a % live)th live BO
//                  C page (d*7)%240,    5 bo_bind      BO a at B page b, BO page c%16,
//                  MAYMOVE|FIXED                       1 + d%16 pages
//   5 cpu_store C  pg off=c tag|d       6 bo_unbind    B page a, 1 + b%16 pages
//   6 cpu_load C   pg off=c (exact)     7 bo_evict     BO a
//   7 reclaim/migrate S  page a%64, 1 + c%16 pages, d%3: reclaim, numa, device-private
//   8 fork (d even) / child exit (d odd)
//   9 fetch_add S  page a%64, byte 2048 + (c%256)*8, by d + 1 (exact)
//   10 madvise S   page a%64, 1 + c%16 pages, HUGEPAGE (d even) or NOHUGEPAGE
//   C pages: 256 + pg % 240, n: 1 + n % 16.
//   Kernels (device records 0-2): start page (S: a%64, C: 256 + a%256, B: 1024
//   + a%64), count 1 + b%64 accesses, stride 1 + (c&3) pages, work items 1 +
//   (c>>2)%8, kind d as a range kernel's (op_runner.h; on C: loads of 8 bytes
//   and, for kind 5, prefetches), value e; accesses stop at the region's end.
//
// A run is deterministic in its verdict, not in its interleaving: a failure
// is an invariant broken, and replaying the input checks it again.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "fuzz/op_runner.h"

namespace svm::fuzz {

inline constexpr std::size_t max_phases = 16;

/// Run `data` as a concurrent-mode input (see above). The result's ops
/// counts records executed; accesses the device accesses made.
/// hooks->after_op runs after each phase's records, before its checks
/// (tests only).
[[nodiscard]] run_result run_concurrent(std::span<const std::uint8_t> data, const run_hooks* hooks = nullptr);

/// Totals over every run_concurrent() of this process (relaxed atomics).
[[nodiscard]] run_totals concurrent_totals() noexcept;

/// The concurrent mode's seed corpus (reproducible).
[[nodiscard]] std::vector<std::pair<std::string, std::vector<std::uint8_t>>> conc_seed_corpus();
/// Write conc_seed_corpus() into `dir` (one file per seed).
void write_conc_seed_corpus(const std::filesystem::path& dir);

}  // namespace svm::fuzz
