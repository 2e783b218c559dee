#include "svm/notifier/frame_pool.h"

#include <bit>
#include <cassert>
#include <cstring>
#include <new>

namespace svm {

namespace {
constexpr std::size_t words_per_block = frame_pool::huge_frames / 64;  // 8
}

frame_pool::frame_pool(pfn_t frames, aperture ap)
    : count_(align_up(std::max<pfn_t>(frames, 2 * huge_frames), huge_frames)), aperture_(ap) {
  // Fresh anonymous memory from the allocator; frames are zeroed on alloc().
  bytes_ = static_cast<std::byte*>(::operator new(count_ * page_size, std::align_val_t{page_size}));
  meta_ = std::make_unique<frame_meta[]>(count_);
  lock_guard g(lock_);
  free_bits_.assign(count_ / 64, ~std::uint64_t{0});
  block_free_.assign(count_ / huge_frames, static_cast<std::uint16_t>(huge_frames));
  folio_dead_.assign(count_ / huge_frames, 0);
  // Frame 0 is the zero page: permanently allocated, contents zero.
  free_bits_[0] &= ~std::uint64_t{1};
  block_free_[0] -= 1;
  std::memset(bytes_, 0, page_size);
  meta_[0].refs.store(1, std::memory_order_relaxed);
  free_count_.store(count_ - 1, std::memory_order_relaxed);
  capacity_ = count_ - 1;
}

frame_pool::frame_pool(exact_t, pfn_t frames, aperture ap) : frame_pool(std::max<pfn_t>(frames, 1), ap) {
  frames = std::max<pfn_t>(frames, 1);
  lock_guard g(lock_);
  for (pfn_t p = frames; p < count_; ++p) {
    take_frame_locked(p);
    meta_[p].refs.store(1, std::memory_order_relaxed);
  }
  free_count_.store(frames - 1, std::memory_order_relaxed);
  capacity_ = frames - 1;
}

frame_pool::~frame_pool() { ::operator delete(bytes_, std::align_val_t{page_size}); }

bool frame_pool::take_frame_locked(pfn_t pfn) {
  std::uint64_t& w = free_bits_[pfn / 64];
  const std::uint64_t bit = std::uint64_t{1} << (pfn % 64);
  if (!(w & bit)) return false;
  w &= ~bit;
  block_free_[pfn / huge_frames] -= 1;
  return true;
}

void frame_pool::release_frame_locked(pfn_t pfn) {
  std::uint64_t& w = free_bits_[pfn / 64];
  const std::uint64_t bit = std::uint64_t{1} << (pfn % 64);
  assert(!(w & bit) && "double free of a frame");
  w |= bit;
  block_free_[pfn / huge_frames] += 1;
}

result<pfn_t> frame_pool::alloc() {
  if (alloc_fail_ && alloc_fail_(false)) return errc::nomem;
  pfn_t pfn = 0;
  {
    lock_guard g(lock_);
    const std::size_t words = free_bits_.size();
    std::size_t i = cursor_;
    std::size_t n = 0;
    for (; n < words; ++n, i = (i + 1 == words ? 0 : i + 1)) {
      if (free_bits_[i] != 0) break;
    }
    if (n == words) return errc::nomem;
    cursor_ = i;
    pfn = i * 64 + static_cast<pfn_t>(std::countr_zero(free_bits_[i]));
    take_frame_locked(pfn);
    meta_[pfn].refs.store(1, std::memory_order_relaxed);
  }
  free_count_.fetch_sub(1, std::memory_order_relaxed);
  // Nobody else can reach the frame until the caller publishes it (a PTE
  // store with release order, or under a node lock).
  zero_frame(frame_data(pfn));
  return pfn;
}

result<pfn_t> frame_pool::alloc_huge() {
  if (alloc_fail_ && alloc_fail_(true)) return errc::nomem;
  pfn_t base = 0;
  {
    lock_guard g(lock_);
    std::size_t b = 0;
    for (; b < block_free_.size(); ++b)
      if (block_free_[b] == huge_frames) break;
    if (b == block_free_.size()) return errc::nomem;
    base = b * huge_frames;
    for (std::size_t w = 0; w < words_per_block; ++w) free_bits_[b * words_per_block + w] = 0;
    block_free_[b] = 0;
    for (pfn_t i = 0; i < huge_frames; ++i) {
      meta_[base + i].refs.store(1, std::memory_order_relaxed);
      meta_[base + i].order.store(9, std::memory_order_relaxed);
    }
    folio_dead_[b] = 0;
  }
  free_count_.fetch_sub(huge_frames, std::memory_order_relaxed);
  for (pfn_t i = 0; i < huge_frames; ++i) zero_frame(frame_data(base + i));
  return base;
}

void frame_pool::get(pfn_t pfn) noexcept {
  assert(pfn < count_);
  if (pfn == zero_pfn()) return;
  [[maybe_unused]] auto old = meta_[pfn].refs.fetch_add(1, std::memory_order_relaxed);
  assert(old != 0 && "get() of a free frame");
}

void frame_pool::put(pfn_t pfn) noexcept {
  assert(pfn < count_);
  if (pfn == zero_pfn()) return;
  // acq_rel: the release half publishes this holder's byte writes; the
  // acquire half (for the last put) sees every other holder's.
  const auto old = meta_[pfn].refs.fetch_sub(1, std::memory_order_acq_rel);
  assert(old != 0 && "put() of a free frame");
  if (old != 1) return;
  // release: pairs with the acquire load in frame_generation().
  meta_[pfn].gen.fetch_add(1, std::memory_order_release);
  meta_[pfn].cache.store(0, std::memory_order_relaxed);
  pfn_t freed = 1;
  {
    lock_guard g(lock_);
    if (meta_[pfn].order.load(std::memory_order_relaxed) != 0) {
      // A frame of a THP folio: the folio is freed whole with its last frame.
      const std::size_t b = pfn / huge_frames;
      if (++folio_dead_[b] < huge_frames) return;
      folio_dead_[b] = 0;
      freed = huge_frames;
      for (pfn_t i = 0; i < huge_frames; ++i) {
        meta_[b * huge_frames + i].order.store(0, std::memory_order_relaxed);
        release_frame_locked(b * huge_frames + i);
      }
    } else {
      release_frame_locked(pfn);
    }
  }
  free_count_.fetch_add(freed, std::memory_order_relaxed);
}

std::uint32_t frame_pool::cache_refs(pfn_t pfn) const noexcept {
  if (pfn >= count_) return 0;
  return meta_[pfn].cache.load(std::memory_order_relaxed);
}

unsigned frame_pool::folio_order(pfn_t pfn) const noexcept {
  if (pfn >= count_) return 0;
  return meta_[pfn].order.load(std::memory_order_relaxed);
}

void frame_pool::set_cache_ref(pfn_t pfn, bool held) noexcept {
  if (pfn >= count_ || pfn == zero_pfn()) return;
  meta_[pfn].cache.store(held ? 1 : 0, std::memory_order_relaxed);
}

std::uint32_t frame_pool::refcount(pfn_t pfn) const noexcept {
  if (pfn >= count_) return 0;
  return meta_[pfn].refs.load(std::memory_order_acquire);
}

std::byte* frame_pool::frame_data(pfn_t pfn) noexcept {
  if (pfn >= count_) return nullptr;
  return bytes_ + pfn * page_size;
}

std::uint64_t frame_pool::frame_generation(pfn_t pfn) const noexcept {
  if (pfn >= count_) return 0;
  // acquire: pairs with the release RMW in put().
  return meta_[pfn].gen.load(std::memory_order_acquire);
}

pfn_t frame_pool::free_frames() const noexcept { return free_count_.load(std::memory_order_relaxed); }

// Whole-frame copies and fills. Under ThreadSanitizer they go through
// relaxed atomic_ref units like every other byte access, so that a device
// access racing with them (a stale translation in a broken driver) is a
// race TSan can reason about. In the other builds they are memcpy/memset:
// the frame being filled is not reachable by a correct driver (a new frame
// is published only afterwards, by a release store or under a node lock),
// and a racing stale access still reads whole old-or-new 8-byte units on
// the machines svm runs on, which the access oracle reports as stale
// anyway. The fill is a quarter of the handler's time on a first-touch
// storm with per-unit atomic stores.
#if defined(__SANITIZE_THREAD__)
#define SVM_FRAME_ATOMIC_FILL 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SVM_FRAME_ATOMIC_FILL 1
#endif
#endif

void frame_pool::copy_frame(std::byte* dst, const std::byte* src) noexcept {
#ifndef SVM_FRAME_ATOMIC_FILL
  std::memcpy(dst, src, page_size);
#else
  auto* d = reinterpret_cast<std::uint64_t*>(dst);
  auto* s = reinterpret_cast<std::uint64_t*>(const_cast<std::byte*>(src));
  for (std::size_t i = 0; i < page_size / 8; ++i)
    std::atomic_ref<std::uint64_t>(d[i]).store(std::atomic_ref<std::uint64_t>(s[i]).load(std::memory_order_relaxed),
                                               std::memory_order_relaxed);
#endif
}

void frame_pool::zero_frame(std::byte* dst) noexcept {
#ifndef SVM_FRAME_ATOMIC_FILL
  std::memset(dst, 0, page_size);
#else
  auto* d = reinterpret_cast<std::uint64_t*>(dst);
  for (std::size_t i = 0; i < page_size / 8; ++i) std::atomic_ref<std::uint64_t>(d[i]).store(0, std::memory_order_relaxed);
#endif
}

void frame_pool::load_bytes(const std::byte* p, std::byte* out, std::size_t n) noexcept {
  auto* src = const_cast<std::byte*>(p);
  std::size_t i = 0;
  // Byte-wise up to 8-byte alignment, then 8-byte units, then the tail.
  while (i < n && (reinterpret_cast<std::uintptr_t>(src + i) & 7) != 0) {
    out[i] = std::atomic_ref<std::byte>(src[i]).load(std::memory_order_relaxed);
    ++i;
  }
  for (; i + 8 <= n; i += 8) {
    std::uint64_t v = std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(src + i)).load(std::memory_order_relaxed);
    std::memcpy(out + i, &v, 8);
  }
  for (; i < n; ++i) out[i] = std::atomic_ref<std::byte>(src[i]).load(std::memory_order_relaxed);
}

void frame_pool::store_bytes(std::byte* p, const std::byte* in, std::size_t n) noexcept {
  std::size_t i = 0;
  while (i < n && (reinterpret_cast<std::uintptr_t>(p + i) & 7) != 0) {
    std::atomic_ref<std::byte>(p[i]).store(in[i], std::memory_order_relaxed);
    ++i;
  }
  for (; i + 8 <= n; i += 8) {
    std::uint64_t v;
    std::memcpy(&v, in + i, 8);
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(p + i)).store(v, std::memory_order_relaxed);
  }
  for (; i < n; ++i) std::atomic_ref<std::byte>(p[i]).store(in[i], std::memory_order_relaxed);
}

}  // namespace svm
