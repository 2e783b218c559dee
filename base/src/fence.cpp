#include "svm/base/fence.h"

#include <cstdio>
#include <cstdlib>
#include <thread>

namespace svm {

fence_ptr fence::create(const char* name) { return std::make_shared<fence>(name); }

fence_ptr fence::signaled_fence(errc err, const char* name) {
  auto f = create(name);
  f->signal(err);
  return f;
}

errc fence::error() const noexcept {
  // acquire: pairs with the release store of state_ in signal().
  if (!is_signaled()) return errc::ok;
  return static_cast<errc>(err_.load(std::memory_order_relaxed));
}

bool fence::signal(errc err) {
  std::vector<callback> cbs;
  {
    lock_guard g(cb_lock_);
    if (signalling_) return false;
    signalling_ = true;
    err_.store(static_cast<int>(err), std::memory_order_relaxed);
    // release: pairs with the acquire loads in is_signaled()/error()/wait().
    state_.store(1, std::memory_order_release);
    cbs.swap(callbacks_);
  }
  state_.notify_all();
  for (auto& cb : cbs) cb(*this);
  return true;
}

bool fence::add_callback(callback cb) {
  lock_guard g(cb_lock_);
  if (signalling_) return false;
  callbacks_.push_back(std::move(cb));
  return true;
}

errc fence::wait(std::chrono::nanoseconds timeout, lockdep::site s) const {
  fence_sig::check_forbidden("fence wait", s);
  if (is_signaled()) return errc::ok;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (int i = 0; i < 256; ++i) {
    SVM_CPU_RELAX();
    if (is_signaled()) return errc::ok;
  }
  if (timeout >= std::chrono::hours(24)) {
    while (state_.load(std::memory_order_acquire) == 0) state_.wait(0, std::memory_order_acquire);
    return errc::ok;
  }
  // Bounded wait: atomic wait has no timeout, so sleep in growing steps.
  auto step = std::chrono::microseconds(1);
  while (!is_signaled()) {
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return errc::timedout;
    std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(step, deadline - now));
    step = std::min(step * 2, std::chrono::microseconds(1000));
  }
  return errc::ok;
}

namespace fence_sig {
namespace {

struct open_section {
  const char* what;
  lockdep::site where;
};
thread_local open_section tl_sections[16];
thread_local int tl_depth = 0;
std::atomic<violation_handler> g_handler{nullptr};

}  // namespace

section::section(const char* what, lockdep::site s) {
  if (tl_depth < 16) tl_sections[tl_depth] = {what, s};
  ++tl_depth;
}

section::~section() { --tl_depth; }

bool in_section() noexcept { return tl_depth > 0; }

std::string violation::describe() const {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s at %s:%d inside signalling section '%s' begun at %s:%d", op,
                op_site.file, op_site.line, section_what, section_site.file, section_site.line);
  return buf;
}

violation_handler set_violation_handler(violation_handler h) noexcept { return g_handler.exchange(h); }

void check_forbidden([[maybe_unused]] const char* op, [[maybe_unused]] lockdep::site s) {
#if SVM_LOCK_CHECKS
  if (tl_depth == 0) return;
  const open_section& sec = tl_sections[tl_depth > 16 ? 15 : tl_depth - 1];
  violation v{sec.what, sec.where, op, s};
  if (auto h = g_handler.load()) {
    h(v);
    return;
  }
  std::fprintf(stderr, "svm fence_sig: %s\n", v.describe().c_str());
  std::abort();
#endif
}

}  // namespace fence_sig
}  // namespace svm
