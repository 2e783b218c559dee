// libFuzzer entry of the op-sequence fuzzer (issue 7): each input is a
// program (op_runner.h) run against svm and the reference model; a mismatch
// prints the op and both results and aborts (a crash for libFuzzer).
//
// At exit it prints its own totals ("svm_fuzz: runs ... ops ..."), next to
// libFuzzer's -print_final_stats=1 figures.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "fuzz/op_runner.h"

namespace {
void print_totals() {
  const svm::fuzz::run_totals t = svm::fuzz::totals();
  std::fprintf(stderr, "svm_fuzz: runs %llu ops %llu kernels %llu device accesses %llu out-of-frames %llu\n",
               static_cast<unsigned long long>(t.runs), static_cast<unsigned long long>(t.ops),
               static_cast<unsigned long long>(t.kernels), static_cast<unsigned long long>(t.accesses),
               static_cast<unsigned long long>(t.exhausted));
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::atexit(print_totals);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const svm::fuzz::run_result r = svm::fuzz::run_input(std::span<const std::uint8_t>(data, size));
  if (!r.ok) {
    std::fprintf(stderr, "svm_fuzz: MISMATCH %s\n", r.message.c_str());
    std::fflush(stderr);
    __builtin_trap();
  }
  return 0;
}
