// svm::file (a page cache) and the swap space of a fork family.
// See svm/notifier/mm.h for the contracts and mm_impl.h for the internals.
#include <algorithm>
#include <cassert>
#include <cstring>
#include <new>

#include "mm_impl.h"
#include "svm/base/epoch.h"

namespace svm {

using pt::entry_index;
using pt::entry_span;
using pt::is_link;

// ---- file -----------------------------------------------------------------

result<std::shared_ptr<file>> file::create(std::shared_ptr<frame_pool> pool, std::uint64_t size) {
  if (!pool) return errc::inval;
  if (size > max_size) return errc::overflow;
  try {
    return std::make_shared<file>(std::move(pool), size);
  } catch (const std::bad_alloc&) {
    return errc::nomem;  // the page-cache index of a huge file
  }
}

file::file(std::shared_ptr<frame_pool> pool, std::uint64_t size) : pool_(std::move(pool)) {
  lock_guard g(lock_);
  // Clamp before rounding: align_up of a size near 2^64 would wrap to 0.
  npages_ = align_up(std::min(size, max_size), page_size) / page_size;
}

pfn_t file::lookup(std::uint64_t pgoff) const {
  lock_guard g(lock_);
  auto it = pages_.find(pgoff);
  return it == pages_.end() ? 0 : it->second;
}

file::~file() {
  std::map<std::uint64_t, pfn_t> pages;
  {
    lock_guard g(lock_);
    pages.swap(pages_);
  }
  for (auto [off, p] : pages)
    if (p) {
      pool_->set_cache_ref(p, false);
      pool_->put(p);
    }
}

std::uint64_t file::size() const {
  lock_guard g(lock_);
  return npages_ * page_size;
}

void file::grow(std::uint64_t size) {
  lock_guard g(lock_);
  const std::size_t n = align_up(std::min(size, max_size), page_size) / page_size;
  if (n > npages_) npages_ = n;
}

result<pfn_t> file::get_page(std::uint64_t pgoff) {
  {
    lock_guard g(lock_);
    if (pgoff >= npages_) return errc::fault;
    if (auto it = pages_.find(pgoff); it != pages_.end()) {
      pool_->get(it->second);  // lock-free; nests under the file lock
      return it->second;
    }
  }
  // Allocate outside the file lock (the pool lock has the same rank).
  auto p = pool_->alloc();
  if (!p) return p.error();
  pfn_t spare = 0, out;
  {
    lock_guard g(lock_);
    if (pgoff >= npages_) {
      spare = *p;
      out = 0;
    } else {
      auto [it, fresh] = pages_.try_emplace(pgoff, *p);
      if (fresh) pool_->set_cache_ref(*p, true);
      else spare = *p;
      out = it->second;
      pool_->get(out);
    }
  }
  if (spare) pool_->put(spare);
  if (!out) return errc::fault;
  return out;
}

errc file::pwrite(std::uint64_t off, std::span<const std::byte> data) {
  std::size_t done = 0;
  while (done < data.size()) {
    const std::uint64_t o = off + done;
    auto p = get_page(o / page_size);
    if (!p) return p.error();
    const std::size_t in_page = o % page_size;
    const std::size_t n = std::min<std::size_t>(page_size - in_page, data.size() - done);
    frame_pool::store_bytes(pool_->frame_data(*p) + in_page, data.data() + done, n);
    pool_->put(*p);
    done += n;
  }
  return errc::ok;
}

errc file::pread(std::uint64_t off, std::span<std::byte> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t o = off + done;
    auto p = get_page(o / page_size);
    if (!p) return p.error();
    const std::size_t in_page = o % page_size;
    const std::size_t n = std::min<std::size_t>(page_size - in_page, out.size() - done);
    frame_pool::load_bytes(pool_->frame_data(*p) + in_page, out.data() + done, n);
    pool_->put(*p);
    done += n;
  }
  return errc::ok;
}

// ---- swap -------------------------------------------------------------------

result<std::uint64_t> swap_space::store(const std::byte* frame) {
  lock_guard g(lock_);
  if (used_ >= capacity_) return errc::nomem;
  std::uint64_t idx;
  if (!free_.empty()) {
    idx = free_.back();
    free_.pop_back();
  } else {
    idx = slots_.size();
    slots_.emplace_back();
  }
  slot& s = slots_[idx];
  s.refs = 1;
  if (!s.data) s.data = std::make_unique<std::byte[]>(page_size);
  frame_pool::load_bytes(frame, s.data.get(), page_size);
  ++used_;
  return idx;
}

void swap_space::load(std::uint64_t idx, std::byte* frame) {
  lock_guard g(lock_);
  assert(idx < slots_.size() && slots_[idx].refs > 0);
  frame_pool::store_bytes(frame, slots_[idx].data.get(), page_size);
}

void swap_space::get(std::uint64_t idx) {
  lock_guard g(lock_);
  assert(slots_[idx].refs > 0);
  ++slots_[idx].refs;
}

void swap_space::put(std::uint64_t idx) {
  lock_guard g(lock_);
  assert(slots_[idx].refs > 0);
  if (--slots_[idx].refs == 0) {
    free_.push_back(idx);
    --used_;
  }
}

std::uint32_t swap_space::refs(std::uint64_t idx) const {
  lock_guard g(lock_);
  return idx < slots_.size() ? slots_[idx].refs : 0;
}

std::size_t swap_space::used() const {
  lock_guard g(lock_);
  return used_;
}

}  // namespace svm
