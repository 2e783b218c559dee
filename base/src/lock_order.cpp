#include "svm/base/lock_order.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace svm::lockdep {
namespace {

struct held_lock {
  const void* lock;
  const char* name;
  rank r;
  std::uint64_t key;
  bool nestable;
  site where;
};

// Per-thread held set. Deep nesting beyond this is itself a design smell;
// overflowing it is reported rather than silently ignored.
constexpr int max_held = 48;
struct held_set {
  held_lock locks[max_held];
  int n = 0;
};
thread_local held_set tl_held;

std::atomic<violation_handler> g_handler{nullptr};

void report(const violation& v) {
  if (auto h = g_handler.load(std::memory_order_acquire)) {
    h(v);
    return;
  }
  std::fprintf(stderr, "svm lockdep: %s\n", v.describe().c_str());
  std::abort();
}

}  // namespace

const char* to_string(rank r) noexcept {
  switch (r) {
    case rank::driver: return "driver";
    case rank::vm: return "vm";
    case rank::mmap: return "mmap";
    case rank::rmap: return "rmap";
    case rank::resv: return "resv";
    case rank::notifier: return "notifier";
    case rank::mirror: return "mirror";
    case rank::pt_node: return "pt_node";
    case rank::leaf: return "leaf";
  }
  return "?";
}

std::string violation::describe() const {
  char buf[768];
  std::snprintf(buf, sizeof buf,
                "lock %s: taking %s (rank %s, key %#llx) at %s:%d while holding %s (rank %s, "
                "key %#llx) taken at %s:%d",
                what, new_name ? new_name : "?", to_string(new_rank),
                static_cast<unsigned long long>(new_key), new_site.file, new_site.line,
                held_name ? held_name : "?", to_string(held_rank),
                static_cast<unsigned long long>(held_key), held_site.file, held_site.line);
  return buf;
}

violation_handler set_violation_handler(violation_handler h) noexcept {
  return g_handler.exchange(h, std::memory_order_acq_rel);
}

void on_acquire(const void* lock, const char* name, rank r, std::uint64_t key, bool nestable,
                bool try_lock, site s) {
  held_set& hs = tl_held;
  for (int i = 0; i < hs.n; ++i) {
    const held_lock& h = hs.locks[i];
    const char* what = nullptr;
    if (h.lock == lock) {
      what = "recursive";
    } else if (!try_lock) {
      if (h.r > r) what = "order";
      else if (h.r == r && !(nestable && h.nestable) && h.key >= key) what = "order";
    }
    if (what) {
      report({h.lock, h.name, h.r, h.key, h.where, lock, name, r, key, s, what});
      if (h.lock == lock) return;  // don't record a recursive acquisition twice
      break;
    }
  }
  if (hs.n == max_held) {
    report({nullptr, "held-set", r, 0, s, lock, name, r, key, s, "overflow"});
    return;
  }
  hs.locks[hs.n++] = {lock, name, r, key, nestable, s};
}

void on_release(const void* lock, site s) {
  held_set& hs = tl_held;
  for (int i = hs.n - 1; i >= 0; --i) {
    if (hs.locks[i].lock == lock) {
      for (int j = i; j + 1 < hs.n; ++j) hs.locks[j] = hs.locks[j + 1];
      --hs.n;
      return;
    }
  }
  report({nullptr, "-", rank::leaf, 0, s, lock, "?", rank::leaf, 0, s, "not-held"});
}

bool is_held(const void* lock) noexcept {
  const held_set& hs = tl_held;
  for (int i = 0; i < hs.n; ++i)
    if (hs.locks[i].lock == lock) return true;
  return false;
}

void check_held(const void* lock, const char* name, site s) {
  if (!is_held(lock)) report({nullptr, "-", rank::leaf, 0, s, lock, name, rank::leaf, 0, s, "not-held"});
}

void check_none_held(const char* what, site s) {
  const held_set& hs = tl_held;
  if (hs.n > 0) {
    const held_lock& h = hs.locks[hs.n - 1];
    report({h.lock, h.name, h.r, h.key, h.where, nullptr, what, rank::leaf, 0, s, "held-across-block"});
  }
}

int held_count() noexcept { return tl_held.n; }

}  // namespace svm::lockdep
