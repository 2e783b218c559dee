// Address, frame and size vocabulary shared by every svm component.
#pragma once

#include <cstddef>
#include <cstdint>

namespace svm {

/// A virtual address, CPU or GPU. Plain integer: address arithmetic is common
/// and the components never dereference it.
using va_t = std::uint64_t;

/// A physical frame number (address >> page_shift) inside one frame pool.
using pfn_t = std::uint64_t;

inline constexpr unsigned page_shift = 12;
inline constexpr std::uint64_t page_size = std::uint64_t{1} << page_shift;   // 4K
inline constexpr unsigned huge_shift = 21;
inline constexpr std::uint64_t huge_size = std::uint64_t{1} << huge_shift;   // 2M
inline constexpr unsigned giant_shift = 30;
inline constexpr std::uint64_t giant_size = std::uint64_t{1} << giant_shift; // 1G

/// Map orders as hmm_range_fault reports them: log2(pages) of the CPU mapping.
inline constexpr unsigned order_4k = 0;
inline constexpr unsigned order_2m = 9;
inline constexpr unsigned order_1g = 18;

[[nodiscard]] constexpr bool is_aligned(std::uint64_t v, std::uint64_t align) noexcept {
  return (v & (align - 1)) == 0;
}
[[nodiscard]] constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t align) noexcept {
  return v & ~(align - 1);
}
[[nodiscard]] constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t align) noexcept {
  return (v + align - 1) & ~(align - 1);
}

/// A half-open VA range [start, end).
struct va_range {
  va_t start = 0;  ///< first address
  va_t end = 0;    ///< one past the last address

  /// Bytes in the range (end - start; meaningless when empty()).
  [[nodiscard]] constexpr std::uint64_t size() const noexcept { return end - start; }
  /// True when the range holds no address.
  [[nodiscard]] constexpr bool empty() const noexcept { return end <= start; }
  /// True when the two ranges share at least one address.
  [[nodiscard]] constexpr bool overlaps(va_range o) const noexcept {
    return start < o.end && o.start < end;
  }
  /// True when `va` is in [start, end).
  [[nodiscard]] constexpr bool contains(va_t va) const noexcept { return va >= start && va < end; }
  friend constexpr bool operator==(va_range, va_range) = default;
};

/// Kinds of memory access, ordered by strength (the fault handler coalesces
/// duplicate faults to the strongest one: atomic > write > read > prefetch).
enum class access : std::uint8_t { prefetch = 0, read = 1, write = 2, atomic = 3 };

[[nodiscard]] constexpr bool needs_write(access a) noexcept {
  return a == access::write || a == access::atomic;
}
[[nodiscard]] constexpr const char* to_string(access a) noexcept {
  switch (a) {
    case access::prefetch: return "prefetch";
    case access::read: return "read";
    case access::write: return "write";
    case access::atomic: return "atomic";
  }
  return "?";
}

}  // namespace svm
