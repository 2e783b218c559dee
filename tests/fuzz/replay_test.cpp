// Replays the fuzzer's seed corpora and regression inputs against svm:
// tests/fuzz/corpus and tests/fuzz/regressions through the sequential mode
// (op_runner.h, against the reference model), tests/fuzz/corpus_conc and
// tests/fuzz/regressions_conc through the concurrent mode (conc_runner.h).
// It checks that the checked-in seeds are what the generators produce, that
// the seeds reach every op kind and the device at scale, and that the checks
// can fail (FuzzChecks: a byte changed behind the models' back is caught).
//
// Regenerate the seeds: SVM_FUZZ_WRITE_CORPUS=1 ./fuzz_tests --gtest_filter='FuzzCorpus.*'
// Replay another directory (a fuzzer's working corpus): SVM_FUZZ_REPLAY_DIR=<dir>
// (sequential) or SVM_FUZZ_REPLAY_CONC_DIR=<dir> (concurrent).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz/conc_runner.h"
#include "fuzz/op_runner.h"
#include "svm/notifier/mm.h"

namespace svm::fuzz {
namespace {

namespace fs = std::filesystem;
const fs::path fuzz_dir = SVM_FUZZ_DIR;

std::vector<std::uint8_t> slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<fs::path> inputs(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::exists(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename().string().front() != '.') out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

run_result replay_seq(std::span<const std::uint8_t> b) { return run_input(b); }
run_result replay_conc(std::span<const std::uint8_t> b) { return run_concurrent(b); }

void replay_dir(const fs::path& dir, run_result (*run)(std::span<const std::uint8_t>) = replay_seq) {
  for (const fs::path& p : inputs(dir)) {
    SCOPED_TRACE(p.string());
    const auto bytes = slurp(p);
    const run_result r = run(bytes);
    EXPECT_TRUE(r.ok) << p.filename().string() << ": " << r.message;
  }
}

TEST(FuzzReplay, SeedCorpus) {
  ASSERT_FALSE(inputs(fuzz_dir / "corpus").empty());
  replay_dir(fuzz_dir / "corpus");
}

TEST(FuzzReplay, Regressions) { replay_dir(fuzz_dir / "regressions"); }

TEST(FuzzReplay, ConcurrentSeedCorpus) {
  ASSERT_FALSE(inputs(fuzz_dir / "corpus_conc").empty());
  replay_dir(fuzz_dir / "corpus_conc", replay_conc);
}

TEST(FuzzReplay, ConcurrentRegressions) { replay_dir(fuzz_dir / "regressions_conc", replay_conc); }

// SVM_FUZZ_REPLAY_DIR=<dir>: replay a fuzzer's working corpus too
// (SVM_FUZZ_REPLAY_CONC_DIR for the concurrent mode's).
TEST(FuzzReplay, ExtraDirFromEnvironment) {
  const char* d = std::getenv("SVM_FUZZ_REPLAY_DIR");
  const char* c = std::getenv("SVM_FUZZ_REPLAY_CONC_DIR");
  if (!d && !c) GTEST_SKIP() << "SVM_FUZZ_REPLAY_DIR / SVM_FUZZ_REPLAY_CONC_DIR not set";
  if (d) replay_dir(d);
  if (c) replay_dir(c, replay_conc);
}

TEST(FuzzCorpus, CheckedInSeedsMatchTheGenerator) {
  if (std::getenv("SVM_FUZZ_WRITE_CORPUS")) {
    write_seed_corpus(fuzz_dir / "corpus");
    write_conc_seed_corpus(fuzz_dir / "corpus_conc");
  }
  for (const auto& [name, bytes] : seed_corpus()) {
    const fs::path p = fuzz_dir / "corpus" / (name + ".bin");
    EXPECT_EQ(slurp(p), bytes) << p << " is stale: regenerate with SVM_FUZZ_WRITE_CORPUS=1";
  }
  for (const auto& [name, bytes] : conc_seed_corpus()) {
    const fs::path p = fuzz_dir / "corpus_conc" / (name + ".bin");
    EXPECT_EQ(slurp(p), bytes) << p << " is stale: regenerate with SVM_FUZZ_WRITE_CORPUS=1";
  }
}

// The concurrent seeds run every record, reach the device at scale and run
// phases on two threads at once.
TEST(FuzzCorpus, ConcurrentSeedsRunToTheEndOnTwoThreads) {
  const run_totals before = concurrent_totals();
  for (const auto& [name, bytes] : conc_seed_corpus()) {
    const run_result r = run_concurrent(bytes);
    EXPECT_TRUE(r.ok) << name << ": " << r.message;
    EXPECT_GT(r.accesses, 0u) << name;  // a kernel on C may stop early: the count varies
    std::printf("[ conc     ] %-30s %3llu records %6llu device accesses\n", name.c_str(),
                static_cast<unsigned long long>(r.ops), static_cast<unsigned long long>(r.accesses));
  }
  const run_totals after = concurrent_totals();
  // Kernels on S always run every access: the seeds' S kernels alone make
  // well over this.
  EXPECT_GE(after.accesses - before.accesses, 500u);
  EXPECT_GT(after.concurrent, before.concurrent);  // phases run at once
  EXPECT_GT(after.oracle_checked, before.oracle_checked);
}

TEST(FuzzCorpus, ConcurrentGarbageDecodesAndRuns) {
  for (const std::vector<std::uint8_t>& in :
       {std::vector<std::uint8_t>{}, std::vector<std::uint8_t>{0xff}, std::vector<std::uint8_t>(64, 0xff),
        std::vector<std::uint8_t>(200, 0x3f), std::vector<std::uint8_t>{0, 0, 0x3f}}) {
    const run_result r = run_concurrent(in);
    EXPECT_TRUE(r.ok) << r.message;
  }
}

// Every seed runs to its end (no early stop on exhausted frames), and the
// device seeds (range kernels, kernels beside CPU operations, host cancels)
// reach the device, the range seeds at scale: the fuzzer's start points are
// not one access per kernel.
TEST(FuzzCorpus, SeedsRunToTheEndAndDeviceSeedsReachTheDevice) {
  std::uint64_t device_seeds = 0;
  for (const auto& [name, bytes] : seed_corpus()) {
    const run_result r = run_input(bytes);
    EXPECT_TRUE(r.ok) << name << ": " << r.message;
    EXPECT_FALSE(r.exhausted) << name;
    EXPECT_EQ(r.ops, decode(bytes).ops.size()) << name;
    // Range seeds have no concurrency: their count is exact. A kernel beside
    // a CPU operation or a host cancel may stop earlier or later from run to
    // run, so for those only "it reached the device" is fixed.
    if (name.starts_with("range_")) {
      ++device_seeds;
      EXPECT_GE(r.accesses, 32u) << name << " made " << r.accesses << " device accesses";
    } else if (name.starts_with("during_") || name.starts_with("cancel_")) {
      ++device_seeds;
      EXPECT_GT(r.accesses, 0u) << name;
    }
    std::printf("[ seed     ] %-28s %3llu ops %6llu device accesses\n", name.c_str(),
                static_cast<unsigned long long>(r.ops), static_cast<unsigned long long>(r.accesses));
  }
  EXPECT_GE(device_seeds, 8u);
}

// Run the vram_ seeds of `corpus` with `run` (whose process totals `totals`
// reads): each must pass, at least `min_seeds` exist, and together they
// migrate chunks to VRAM and back.
template <class Run, class Totals>
void expect_vram_seeds_migrate(const std::vector<std::pair<std::string, std::vector<std::uint8_t>>>& corpus, Run run,
                               Totals totals_of, std::uint64_t min_seeds, const char* what) {
  const run_totals before = totals_of();
  std::uint64_t seeds = 0;
  for (const auto& [name, bytes] : corpus) {
    if (!name.starts_with("vram_")) continue;
    ++seeds;
    const run_result r = run(bytes);
    EXPECT_TRUE(r.ok) << name << ": " << r.message;
  }
  const run_totals after = totals_of();
  EXPECT_GE(seeds, min_seeds);
  EXPECT_GT(after.migrations_to_vram - before.migrations_to_vram, 0u);
  EXPECT_GT(after.migrations_to_ram - before.migrations_to_ram, 0u);
  std::printf("[ vram     ] %llu %s: %llu migrations to VRAM, %llu back\n", static_cast<unsigned long long>(seeds), what,
              static_cast<unsigned long long>(after.migrations_to_vram - before.migrations_to_vram),
              static_cast<unsigned long long>(after.migrations_to_ram - before.migrations_to_ram));
}

// The seeds in SVM placement mode do migrate: chunks go to VRAM on device
// faults and come back on CPU accesses (and evictions), and every one of
// them still agrees with the model.
TEST(FuzzCorpus, VramModeSeedsMigrateBothWays) {
  expect_vram_seeds_migrate(
      seed_corpus(), [](const std::vector<std::uint8_t>& b) { return run_input(b); }, [] { return totals(); }, 12,
      "seeds");
}

// The concurrent seeds in placement mode migrate too, while the CPU stream
// runs beside the kernels, and every invariant holds.
TEST(FuzzCorpus, ConcurrentVramModeSeedsMigrateBothWays) {
  expect_vram_seeds_migrate(
      conc_seed_corpus(), [](const std::vector<std::uint8_t>& b) { return run_concurrent(b); },
      [] { return concurrent_totals(); }, 6, "concurrent seeds");
}

TEST(FuzzCorpus, SeedsCoverEveryOpKind) {
  std::vector<bool> seen(op_count, false);
  for (const auto& [name, bytes] : seed_corpus())
    for (const op_desc& op : decode(bytes).ops) seen[static_cast<unsigned>(op.kind)] = true;
  for (unsigned k = 0; k < op_count; ++k) EXPECT_TRUE(seen[k]) << to_string(op_kind(k));
}

TEST(FuzzCorpus, EncodeDecodeRoundTrips) {
  for (const auto& [name, bytes] : seed_corpus()) EXPECT_EQ(encode(decode(bytes)), bytes) << name;
}

TEST(FuzzCorpus, GarbageDecodesAndRuns) {
  // Short, truncated and all-ones inputs are valid programs.
  for (const std::vector<std::uint8_t>& in :
       {std::vector<std::uint8_t>{}, std::vector<std::uint8_t>{0xff}, std::vector<std::uint8_t>(64, 0xff),
        std::vector<std::uint8_t>{0, 0, 22}}) {
    const run_result r = run_input(in);
    EXPECT_TRUE(r.ok) << r.message;
  }
}

// The checks can fail: a byte changed behind the models' back is reported.
std::vector<std::uint8_t> seed_named(const char* name, bool conc) {
  for (const auto& [n, b] : conc ? conc_seed_corpus() : seed_corpus())
    if (n == name) return b;
  ADD_FAILURE() << "no seed " << name;
  return {};
}
void scribble(mm& m, va_t va, std::uint64_t v) {
  std::uint8_t b[8];
  std::memcpy(b, &v, 8);
  ASSERT_EQ(m.write(va, std::as_bytes(std::span{b})), errc::ok);
}

TEST(FuzzChecks, ARangeKernelReadsWhatTheModelDoesNot) {
  // range_many_pages: op 1 stores over pages 0..255 (access 0 at byte 16 of
  // page 0), op 2 loads them back.
  run_hooks h{[](std::size_t op, mm& m) {
    if (op == 1) scribble(m, universe_base + 16, 0xeeeeeeeeeeeeeeee);
  }};
  const run_result r = run_input(seed_named("range_many_pages", false), &h);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("op #2 kernel_range"), std::string::npos) << r.message;
}

TEST(FuzzChecks, AKernelBesideAnOperationIsExactOnPagesItDoesNotTouch) {
  // during_munmap: op 1 stores over pages 0..63, op 2 runs a mixed kernel
  // beside munmap of pages 16..31; its access 1 is an atomic add at byte
  // 128 of page 1 (not unmapped), where op 1 stored.
  run_hooks h{[](std::size_t op, mm& m) {
    if (op == 1) scribble(m, universe_base + page_size + 128, 0xeeeeeeeeeeeeeeee);
  }};
  const run_result r = run_input(seed_named("during_munmap", false), &h);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("op #2 kernel_during"), std::string::npos) << r.message;
}

TEST(FuzzChecks, TheConcurrentModeChecksTheStableBufferEveryPhase) {
  run_hooks h{[](std::size_t ph, mm& m) {
    if (ph == 1) scribble(m, universe_base + 5 * page_size + 64, 0x1234);  // the device's half of page 5
  }};
  const run_result r = run_concurrent(seed_named("stable_beside_reclaim_migrate", true), &h);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("after phase 1: stable page 5"), std::string::npos) << r.message;
}

TEST(FuzzChecks, TheConcurrentModeRejectsAChurnedValueNobodyWrote) {
  // Phase 0 does nothing (the hook then writes an untagged value at byte 0
  // of C page 256); phase 1 is one device record: a one-item kernel loading
  // byte 0 of C pages 256..259.
  const std::vector<std::uint8_t> in = {0x00, 48, 0x40, 0x08, 1, 0, 3, 0, 0 | 3 << 3, 0};
  run_hooks h{[](std::size_t ph, mm& m) {
    if (ph == 0) scribble(m, universe_base + 256 * page_size, 0x1234);
  }};
  const run_result r = run_concurrent(in, &h);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("neither zero nor a CPU-written value"), std::string::npos) << r.message;
  EXPECT_TRUE(run_concurrent(in).ok);  // and without the scribble, it passes
}

}  // namespace
}  // namespace svm::fuzz
