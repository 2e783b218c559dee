// The kernel's error vocabulary as a scoped enum with std::error_code support.
//
// Public operations return `svm::errc` (or `svm::result<T>`): errc::ok is
// success, any other value is the negated kernel errno the same operation
// would give in Linux. A failed operation leaves the state as it was unless
// its documentation says otherwise (mprotect's partial application, for one).
#pragma once

#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace svm {

enum class errc : int {
  ok = 0,
  perm = EPERM,          ///< write to read-only memory, operation not permitted
  noent = ENOENT,        ///< unknown handle or object
  again = EAGAIN,        ///< non-blockable operation would have to block
  nomem = ENOMEM,        ///< out of frames, VRAM or page-table nodes; mprotect hole
  fault = EFAULT,        ///< bad address: no VMA, no permission to read, I/O map
  busy = EBUSY,          ///< sequence moved under hmm_range_fault; retry timed out
  exist = EEXIST,        ///< overlapping bind or insert
  inval = EINVAL,        ///< malformed input: unaligned, zero length, bad flags
  overflow = EOVERFLOW,  ///< range end overflows
  timedout = ETIMEDOUT,  ///< a bounded wait expired
  canceled = ECANCELED,  ///< a kernel was aborted by a cancelled fault
  range = ERANGE,        ///< address outside the VA width
  nospc = ENOSPC,        ///< a fixed-capacity table is full
  io = EIO,              ///< an injected or simulated device failure
};

/// The std::error_category of svm::errc; messages are strerror()'s.
const std::error_category& svm_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), svm_category()};
}

/// Short symbolic name ("EFAULT", "ok"), for logs and JSON.
const char* errc_name(errc e) noexcept;

/// A value or an error. `value()` on an error prints the error and aborts:
/// svm is built without a hard dependency on exceptions in its hot paths, and
/// a caller that wants to branch uses `ok()`/`error()` first.
template <class T>
class [[nodiscard]] result {
 public:
  result(T v) : v_(std::in_place_index<0>, std::move(v)) {}  // NOLINT: implicit on purpose
  result(errc e) : v_(std::in_place_index<1>, e) {}           // NOLINT
  [[nodiscard]] bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  [[nodiscard]] errc error() const noexcept { return ok() ? errc::ok : std::get<1>(v_); }
  T& value() & { check(); return std::get<0>(v_); }
  const T& value() const& { check(); return std::get<0>(v_); }
  T&& value() && { check(); return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

 private:
  void check() const {
    if (!ok()) {
      std::fprintf(stderr, "svm: result::value() on error %s\n", errc_name(std::get<1>(v_)));
      std::abort();
    }
  }
  std::variant<T, errc> v_;
};

}  // namespace svm

template <>
struct std::is_error_code_enum<svm::errc> : std::true_type {};
