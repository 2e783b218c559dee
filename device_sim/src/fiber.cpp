// Wave stacks with guard pages, the stack-overflow report, and the
// sanitizer annotations every wave switch makes.
//
// Stacks. Each engine maps one region of `waves` slots; a slot is a
// PROT_NONE guard page followed by the usable stack (growing down towards
// the guard). An overflow touches the guard and raises SIGSEGV; the handler
// below, running on the engine thread's alternate signal stack, recognises
// the address as a guard page, prints which engine overflowed and how large
// its stacks are, and aborts. Faults elsewhere go to the handler that was
// installed before (or the default action): the handler never hides a bug.
//
// Sanitizers. ASan must know the stack it runs on (fake stacks, stack-use
// checks): every switch is bracketed by __sanitizer_start_switch_fiber (in
// the old context) and __sanitizer_finish_switch_fiber (in the new one).
// TSan keeps one shadow state per fiber: each wave gets a TSan fiber
// (__tsan_create_fiber), each switch calls __tsan_switch_to_fiber just
// before the jump, and the fiber is destroyed when its wave ends. Switches
// synchronise (no __tsan_switch_to_fiber_no_sync flag): waves of one engine
// really are ordered by their switches, while waves on different engines
// run on different threads, so a race between them is still reported.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "device_impl.h"

#if defined(__SANITIZE_ADDRESS__)
#define SVM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SVM_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define SVM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SVM_TSAN 1
#endif
#endif

#if defined(SVM_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, std::size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, std::size_t* size_old);
}
#endif
#if defined(SVM_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
}
#endif

namespace svm::dev::detail {

// ---------------------------------------------------------------------------
// Sanitizer annotations

void before_switch(void** fake, const void* bottom, std::size_t size, void* to_tsan) noexcept {
#if defined(SVM_ASAN)
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
#if defined(SVM_TSAN)
  __tsan_switch_to_fiber(to_tsan, 0);
#else
  (void)to_tsan;
#endif
}

void after_switch(void* fake, const void** from_bottom, std::size_t* from_size) noexcept {
#if defined(SVM_ASAN)
  __sanitizer_finish_switch_fiber(fake, from_bottom, from_size);
#else
  (void)fake, (void)from_bottom, (void)from_size;
#endif
}

void* tsan_current_fiber() noexcept {
#if defined(SVM_TSAN)
  return __tsan_get_current_fiber();
#else
  return nullptr;
#endif
}

void* tsan_create_fiber() noexcept {
#if defined(SVM_TSAN)
  return __tsan_create_fiber(0);
#else
  return nullptr;
#endif
}

void tsan_destroy_fiber(void* f) noexcept {
#if defined(SVM_TSAN)
  if (f) __tsan_destroy_fiber(f);
#else
  (void)f;
#endif
}

// ---------------------------------------------------------------------------
// The overflow handler's registry: one slot per engine's stack region.
// Written (release) when a region is mapped or unmapped, read (acquire) by
// the signal handler, which may only use lock-free atomics.

namespace {

struct region_slot {
  std::atomic<std::uintptr_t> base{0};  // 0: free
  std::atomic<std::size_t> stride{0};
  std::atomic<std::size_t> bytes{0};
  std::atomic<unsigned> engine{0};
};
constexpr int max_regions = 1024;
region_slot regions[max_regions];

struct sigaction previous_segv;
std::atomic<bool> handler_installed{false};

void write_str(const char* s) noexcept { (void)!::write(2, s, std::strlen(s)); }

void write_num(std::size_t v) noexcept {
  char buf[24];
  int i = sizeof buf;
  buf[--i] = 0;
  do {
    buf[--i] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v && i > 0);
  write_str(buf + i);
}

void on_segv(int sig, siginfo_t* info, void* uctx) {
  const auto a = reinterpret_cast<std::uintptr_t>(info->si_addr);
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  for (auto& r : regions) {
    const std::uintptr_t b = r.base.load(std::memory_order_acquire);
    if (b == 0 || a < b || a >= b + r.bytes.load(std::memory_order_relaxed)) continue;
    const std::size_t stride = r.stride.load(std::memory_order_relaxed);
    if ((a - b) % stride >= page) continue;
    write_str("svm device: wave stack overflow on engine ");
    write_num(r.engine.load(std::memory_order_relaxed));
    write_str(", wave ");
    write_num((a - b) / stride);
    write_str(" (stacks of ");
    write_num(stride - page);
    write_str(" bytes): raise device_config::wave_stack_bytes\n");
    std::abort();
  }
  // Not a guard page: whatever was there before handles it.
  if (previous_segv.sa_flags & SA_SIGINFO) {
    if (previous_segv.sa_sigaction) return previous_segv.sa_sigaction(sig, info, uctx);
  } else if (previous_segv.sa_handler != SIG_DFL && previous_segv.sa_handler != SIG_IGN) {
    return previous_segv.sa_handler(sig);
  }
  ::signal(SIGSEGV, SIG_DFL);  // returning re-runs the access: the default action
}

void install_handler() {
  if (handler_installed.exchange(true)) return;
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSEGV, &sa, &previous_segv);
}

}  // namespace

bool wave_stacks::init(unsigned engine, unsigned count, std::size_t stack_bytes) noexcept {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  guard_ = page;
  stride_ = guard_ + align_up(stack_bytes, page);
  bytes_ = stride_ * count;
  void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    base_ = nullptr;
    return false;
  }
  base_ = static_cast<char*>(p);
  for (unsigned i = 0; i < count; ++i)
    if (::mprotect(base_ + i * stride_, guard_, PROT_NONE) != 0) return false;
  install_handler();
  for (int s = 0; s < max_regions; ++s) {
    std::uintptr_t exp = 0;
    auto& r = regions[s];
    // Claim the slot with a provisional base, fill it, then publish.
    if (!r.base.compare_exchange_strong(exp, 1, std::memory_order_acq_rel)) continue;
    r.stride.store(stride_, std::memory_order_relaxed);
    r.bytes.store(bytes_, std::memory_order_relaxed);
    r.engine.store(engine, std::memory_order_relaxed);
    r.base.store(reinterpret_cast<std::uintptr_t>(base_), std::memory_order_release);
    slot_ = s;
    break;
  }
  return true;
}

wave_stacks::~wave_stacks() {
  if (slot_ >= 0) regions[slot_].base.store(0, std::memory_order_release);
  if (base_) ::munmap(base_, bytes_);
}

}  // namespace svm::dev::detail
