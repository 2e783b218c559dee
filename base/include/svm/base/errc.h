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
#include <functional>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace svm {

/// [[nodiscard]]: every function returning an errc warns when its result is
/// dropped; write `(void)f()` where dropping it is deliberate.
enum class [[nodiscard]] errc : int {
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

/// A value or an error, with the vocabulary of std::expected (C++23):
/// has_value(), value(), error(), value_or(), and_then(), transform(),
/// or_else(). `value()` on an error prints the error and aborts: svm is
/// built without a hard dependency on exceptions in its hot paths, so a
/// caller that may see an error branches on has_value() (or ok()) first.
template <class T>
class [[nodiscard]] result {
 public:
  using value_type = T;     ///< the value held on success
  using error_type = errc;  ///< the error held on failure

  /// A success holding `v` (implicit, so `return value;` works).
  result(T v) : v_(std::in_place_index<0>, std::move(v)) {}  // NOLINT: implicit on purpose
  /// A failure holding `e` (implicit, so `return errc::inval;` works).
  result(errc e) : v_(std::in_place_index<1>, e) {}           // NOLINT
  /// True when a value is held.
  [[nodiscard]] bool ok() const noexcept { return v_.index() == 0; }
  /// True when a value is held (the std::expected name of ok()).
  [[nodiscard]] bool has_value() const noexcept { return ok(); }
  /// True when a value is held.
  explicit operator bool() const noexcept { return ok(); }
  /// errc::ok when a value is held (std::expected leaves that undefined).
  [[nodiscard]] errc error() const noexcept { return ok() ? errc::ok : std::get<1>(v_); }
  /// The value. Calling it on an error is a programming error: it prints
  /// the error and aborts (check has_value() first).
  T& value() & { check(); return std::get<0>(v_); }
  /// The value (see the non-const overload).
  const T& value() const& { check(); return std::get<0>(v_); }
  /// The value, moved out (see the lvalue overload).
  T&& value() && { check(); return std::get<0>(std::move(v_)); }
  /// Member access to the value (value()'s precondition applies).
  T* operator->() { return &value(); }
  /// Member access to the value (value()'s precondition applies).
  const T* operator->() const { return &value(); }
  /// The value (value()'s precondition applies).
  T& operator*() & { return value(); }
  /// The value (value()'s precondition applies).
  const T& operator*() const& { return value(); }
  /// The value, moved out (value()'s precondition applies).
  T&& operator*() && { return std::move(*this).value(); }

  /// The value, or `fallback` on an error.
  template <class U>
  [[nodiscard]] T value_or(U&& fallback) const& {
    return ok() ? std::get<0>(v_) : static_cast<T>(std::forward<U>(fallback));
  }
  /// The value moved out, or `fallback` on an error.
  template <class U>
  [[nodiscard]] T value_or(U&& fallback) && {
    return ok() ? std::get<0>(std::move(v_)) : static_cast<T>(std::forward<U>(fallback));
  }
  /// f(value) when a value is held, which must return a `result<U>`; else the error.
  template <class F>
  auto and_then(F&& f) const& -> std::invoke_result_t<F, const T&> {
    if (ok()) return std::invoke(std::forward<F>(f), std::get<0>(v_));
    return std::get<1>(v_);
  }
  /// f(moved value) when a value is held, which must return a `result<U>`; else the error.
  template <class F>
  auto and_then(F&& f) && -> std::invoke_result_t<F, T&&> {
    if (ok()) return std::invoke(std::forward<F>(f), std::get<0>(std::move(v_)));
    return std::get<1>(v_);
  }
  /// A `result<U>` holding f(value) when a value is held; else the error.
  template <class F>
  auto transform(F&& f) const& -> result<std::remove_cvref_t<std::invoke_result_t<F, const T&>>> {
    if (ok()) return std::invoke(std::forward<F>(f), std::get<0>(v_));
    return std::get<1>(v_);
  }
  /// The value when held; else f(error), which must return a `result<T>`.
  template <class F>
  result or_else(F&& f) const& {
    if (ok()) return *this;
    return std::invoke(std::forward<F>(f), std::get<1>(v_));
  }

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
