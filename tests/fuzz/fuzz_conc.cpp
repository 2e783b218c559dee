// libFuzzer entry of the fuzzer's concurrent mode (conc_runner.h): each
// input lays out two operation streams (CPU operations; kernels and BO
// binds) and the phases they run in; a broken invariant prints the record
// and aborts (a crash for libFuzzer). At exit it prints its totals
// ("svm_fuzz_conc: runs ... device accesses ... (N per execution ...)").
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "fuzz/conc_runner.h"

namespace {
void print_totals() {
  std::fprintf(stderr, "%s\n", svm::fuzz::describe(svm::fuzz::concurrent_totals(), "svm_fuzz_conc").c_str());
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::atexit(print_totals);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const svm::fuzz::run_result r = svm::fuzz::run_concurrent(std::span<const std::uint8_t>(data, size));
  if (!r.ok) {
    std::fprintf(stderr, "svm_fuzz_conc: INVARIANT BROKEN %s\n", r.message.c_str());
    std::fflush(stderr);
    __builtin_trap();
  }
  return 0;
}
