// A small entry encoding for the page-table tests: pfn in bits 12.., bit 1
// valid, bit 2 writable. Bit 0 stays clear, as the table requires.
#pragma once

#include <cstdint>

#include "svm/pagetable/radix.h"

namespace svm::test {

struct test_enc {
  static constexpr std::uint64_t valid = 1u << 1;
  static constexpr std::uint64_t write = 1u << 2;
  static std::uint64_t make(std::uint64_t pfn, bool w = true) { return (pfn << 12) | valid | (w ? write : 0); }
  static std::uint64_t pfn(std::uint64_t e) { return e >> 12; }
  static bool is_valid(std::uint64_t e) { return (e & valid) != 0; }
  // A huge leaf at `level` maps 512^level consecutive pages; sub-slot i of
  // the split starts i * 512^(level-1) pages in.
  static std::uint64_t split(std::uint64_t e, unsigned level, unsigned i) {
    const std::uint64_t pages = std::uint64_t{1} << (9 * (level - 1));
    return e + ((i * pages) << 12);
  }
};
static_assert(pt::entry_encoding<test_enc>);

using table = pt::radix_table<test_enc>;

}  // namespace svm::test
