// The data oracle's values: every word a storm writes is derived from
// (seed, address, round, writer), so whoever reads it back knows what it
// must find.
#pragma once

#include <cstdint>

namespace svm::storm {

/// Who wrote a word (part of its value, so a CPU word read where a device
/// word belongs is caught).
enum writer : std::uint64_t { by_cpu = 0, by_device = 1, by_bo = 2 };

/// splitmix64 of the inputs; never 0, so a lost write (reading zero) is
/// always told apart from a stored value.
[[nodiscard]] constexpr std::uint64_t value_of(std::uint64_t seed, std::uint64_t addr, std::uint64_t round,
                                               std::uint64_t who) noexcept {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull ^ addr ^ (round << 48) ^ (who << 40) ^ (round >> 16);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z ? z : 1;
}

/// A cheap per-item hash (random access patterns).
[[nodiscard]] constexpr std::uint64_t mix(std::uint64_t a, std::uint64_t b) noexcept {
  return value_of(a, b, 0, 7);
}

}  // namespace svm::storm
