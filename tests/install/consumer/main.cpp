// A runtime that embeds svm: builds against the installed package only.
#include <cstdio>

#include "svm/pagetable/radix.h"

struct enc {
  static bool is_valid(std::uint64_t e) { return (e & 2) != 0; }
  static std::uint64_t split(std::uint64_t e, unsigned, unsigned i) { return e + (std::uint64_t{i} << 12); }
};

int main() {
  svm::pt::radix_table<enc> t;
  if (t.populate(0x1000, 0x3000, 0, [](svm::va_t va) { return va | 2; }) != svm::errc::ok) return 1;
  auto tr = t.translate(0x2000);
  if (tr.entry != (0x2000 | 2) || tr.level != 0) return 2;
  std::puts("consumer: ok");
  return 0;
}
