// libFuzzer entry of the op-sequence fuzzer: each input is a
// program (op_runner.h) run against svm and the reference model; a mismatch
// prints the op and both results and aborts (a crash for libFuzzer).
//
// At exit it prints its own totals ("svm_fuzz: runs ... device accesses ...
// (N per execution ...)"), next to libFuzzer's -print_final_stats=1 figures.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "fuzz/op_runner.h"

namespace {
void print_totals() {
  std::fprintf(stderr, "%s\n", svm::fuzz::describe(svm::fuzz::totals(), "svm_fuzz").c_str());
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
