#include "svm/device_sim/vram.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace svm::dev {
namespace {

// Zero a frame through 8-byte atomic units: a stale device access racing
// with the clear stays defined (phys_mem.h).
void zero_frame(std::byte* p) noexcept {
  auto* w = reinterpret_cast<std::uint64_t*>(p);
  for (std::size_t i = 0; i < page_size / 8; ++i) std::atomic_ref<std::uint64_t>(w[i]).store(0, std::memory_order_relaxed);
}

}  // namespace

vram_pool::vram_pool(std::uint64_t bytes)
    : frames_(bytes / page_size),
      // calloc: large pools come from fresh anonymous mappings, zero and
      // lazily faulted, so a 1 GiB VRAM costs nothing until it is touched.
      bytes_(static_cast<std::byte*>(std::calloc(frames_ ? frames_ : 1, page_size))),
      gen_(new std::atomic<std::uint64_t>[frames_ ? frames_ : 1]) {
  if (!bytes_) throw std::bad_alloc();
  lock_guard g(lock_);
  used_.assign(frames_, false);
}

vram_pool::~vram_pool() { std::free(bytes_); }

result<pfn_t> vram_pool::alloc(std::size_t count, std::size_t align) {
  if (count == 0 || align == 0 || (align & (align - 1)) != 0) return errc::inval;
  if (count > frames_) return errc::nomem;
  pfn_t found = frames_;
  {
    lock_guard g(lock_);
    // First fit from the hint, wrapping once.
    for (int pass = 0; pass < 2 && found == frames_; ++pass) {
      pfn_t p = pass == 0 ? align_up(hint_, align) : 0;
      const pfn_t stop = pass == 0 ? frames_ : std::min<pfn_t>(frames_, hint_ + count);
      while (p + count <= frames_ && p < stop) {
        std::size_t run = 0;
        while (run < count && !used_[p + run]) ++run;
        if (run == count) {
          found = p;
          break;
        }
        p = align_up(p + run + 1, align);
      }
    }
    if (found == frames_) return errc::nomem;
    for (std::size_t i = 0; i < count; ++i) used_[found + i] = true;
    hint_ = found + count;
    used_hint_.fetch_add(count, std::memory_order_relaxed);
  }
  for (std::size_t i = 0; i < count; ++i) zero_frame(frame_data(found + i));
  return found;
}

errc vram_pool::free(pfn_t pfn, std::size_t count) {
  if (count == 0 || pfn >= frames_ || count > frames_ - pfn) return errc::inval;
  lock_guard g(lock_);
  for (std::size_t i = 0; i < count; ++i)
    if (!used_[pfn + i]) return errc::inval;
  for (std::size_t i = 0; i < count; ++i) {
    used_[pfn + i] = false;
    // release: pairs with the acquire load in frame_generation().
    gen_[pfn + i].fetch_add(1, std::memory_order_release);
  }
  if (pfn < hint_) hint_ = pfn;
  used_hint_.fetch_sub(count, std::memory_order_relaxed);
  return errc::ok;
}

}  // namespace svm::dev
