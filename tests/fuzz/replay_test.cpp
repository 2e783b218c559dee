// Replays the op-sequence fuzzer's seed corpus and regression inputs
// (tests/fuzz/corpus, tests/fuzz/regressions) against svm and the reference
// model, one test per directory, and checks that the checked-in seed corpus
// is what the generator produces.
//
// Regenerate the seeds: SVM_FUZZ_WRITE_CORPUS=1 ./fuzz_tests --gtest_filter='FuzzCorpus.*'
// Replay another directory (a fuzzer's working corpus): SVM_FUZZ_REPLAY_DIR=<dir>.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz/conc_runner.h"
#include "fuzz/op_runner.h"

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

void replay_dir(const fs::path& dir, run_result (*run)(std::span<const std::uint8_t>) = run_input) {
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
  replay_dir(fuzz_dir / "corpus_conc", run_concurrent);
}

TEST(FuzzReplay, ConcurrentRegressions) { replay_dir(fuzz_dir / "regressions_conc", run_concurrent); }

// SVM_FUZZ_REPLAY_DIR=<dir>: replay a fuzzer's working corpus too
// (SVM_FUZZ_REPLAY_CONC_DIR for the concurrent mode's).
TEST(FuzzReplay, ExtraDirFromEnvironment) {
  const char* d = std::getenv("SVM_FUZZ_REPLAY_DIR");
  const char* c = std::getenv("SVM_FUZZ_REPLAY_CONC_DIR");
  if (!d && !c) GTEST_SKIP() << "SVM_FUZZ_REPLAY_DIR / SVM_FUZZ_REPLAY_CONC_DIR not set";
  if (d) replay_dir(d);
  if (c) replay_dir(c, run_concurrent);
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
    EXPECT_GE(r.accesses, 32u) << name;
    std::printf("[ conc     ] %-30s %3llu records %6llu device accesses\n", name.c_str(),
                static_cast<unsigned long long>(r.ops), static_cast<unsigned long long>(r.accesses));
  }
  const run_totals after = concurrent_totals();
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
// device seeds (range kernels, kernels beside CPU operations) reach the
// device at scale: the fuzzer's start points are not one access per kernel.
TEST(FuzzCorpus, SeedsRunToTheEndAndDeviceSeedsReachTheDevice) {
  std::uint64_t device_seeds = 0;
  for (const auto& [name, bytes] : seed_corpus()) {
    const run_result r = run_input(bytes);
    EXPECT_TRUE(r.ok) << name << ": " << r.message;
    EXPECT_FALSE(r.exhausted) << name;
    EXPECT_EQ(r.ops, decode(bytes).ops.size()) << name;
    if (name.starts_with("range_") || name.starts_with("during_")) {
      ++device_seeds;
      EXPECT_GE(r.accesses, 32u) << name << " made " << r.accesses << " device accesses";
    }
    std::printf("[ seed     ] %-28s %3llu ops %6llu device accesses\n", name.c_str(),
                static_cast<unsigned long long>(r.ops), static_cast<unsigned long long>(r.accesses));
  }
  EXPECT_GE(device_seeds, 8u);
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

}  // namespace
}  // namespace svm::fuzz
