#include "svm/device_sim/copy_engine.h"

#include <vector>

namespace svm::dev {
namespace {

bool valid_span(const frame_span& s, std::size_t pages) noexcept {
  if (!s.mem) return false;
  const pfn_t n = s.mem->frame_count();
  return s.pfn < n && pages <= n - s.pfn;
}

}  // namespace

copy_engine::copy_engine() : thread_([this](std::stop_token st) { run(st); }) {}

copy_engine::~copy_engine() {
  {
    lock_guard g(lock_);
    stopping_ = true;
  }
  thread_.request_stop();
  work_seq_.fetch_add(1, std::memory_order_seq_cst);
  work_seq_.notify_all();
  thread_.join();
  // Whatever the thread left (it drains before it exits; this is a guard).
  std::deque<request> left;
  {
    lock_guard g(lock_);
    left.swap(queue_);
  }
  for (auto& r : left) {
    canceled_.fetch_add(1, std::memory_order_relaxed);
    r.done->signal(errc::canceled);
  }
}

result<fence_ptr> copy_engine::copy(frame_span src, frame_span dst, std::size_t pages) {
  if (pages == 0 || !valid_span(src, pages) || !valid_span(dst, pages)) return errc::inval;
  return enqueue({src, dst, pages, 0, nullptr});
}

result<fence_ptr> copy_engine::copy_list(std::span<const frame_span> src, std::span<const frame_span> dst) {
  if (src.empty() || src.size() != dst.size()) return errc::inval;
  request r{{}, {}, src.size(), 0, nullptr};
  r.list.reserve(src.size());
  for (std::size_t i = 0; i < src.size(); ++i) {
    if (!valid_span(src[i], 1) || !valid_span(dst[i], 1)) return errc::inval;
    r.list.emplace_back(src[i], dst[i]);
  }
  return enqueue(std::move(r));
}

result<fence_ptr> copy_engine::fill(frame_span dst, std::size_t pages, std::uint64_t pattern) {
  if (pages == 0 || !valid_span(dst, pages)) return errc::inval;
  return enqueue({{}, dst, pages, pattern, nullptr});
}

result<fence_ptr> copy_engine::enqueue(request r) {
  r.done = fence::create("copy_engine");
  fence_ptr f = r.done;
  {
    lock_guard g(lock_);
    if (stopping_) return errc::canceled;
    queue_.push_back(std::move(r));
  }
  work_seq_.fetch_add(1, std::memory_order_seq_cst);
  work_seq_.notify_one();
  return f;
}

void copy_engine::execute(const request& r) noexcept {
  // Published fence -> signal: a signalling critical section (no fence
  // waits, no reservation locks in here).
  fence_sig::section sec("copy_engine copy");
  auto copy_one = [](std::byte* dst, std::byte* src) {
    auto* d = reinterpret_cast<std::uint64_t*>(dst);
    auto* s = reinterpret_cast<std::uint64_t*>(src);
    for (std::size_t i = 0; i < page_size / 8; ++i)
      std::atomic_ref<std::uint64_t>(d[i]).store(std::atomic_ref<std::uint64_t>(s[i]).load(std::memory_order_relaxed),
                                                 std::memory_order_relaxed);
  };
  if (!r.list.empty()) {
    for (const auto& [s, d] : r.list) copy_one(d.mem->frame_data(d.pfn), s.mem->frame_data(s.pfn));
    return;
  }
  for (std::size_t p = 0; p < r.pages; ++p) {
    auto* d = reinterpret_cast<std::uint64_t*>(r.dst.mem->frame_data(r.dst.pfn + p));
    if (r.src.mem) {
      auto* s = reinterpret_cast<std::uint64_t*>(r.src.mem->frame_data(r.src.pfn + p));
      for (std::size_t i = 0; i < page_size / 8; ++i)
        std::atomic_ref<std::uint64_t>(d[i]).store(std::atomic_ref<std::uint64_t>(s[i]).load(std::memory_order_relaxed),
                                                   std::memory_order_relaxed);
    } else {
      for (std::size_t i = 0; i < page_size / 8; ++i)
        std::atomic_ref<std::uint64_t>(d[i]).store(r.pattern, std::memory_order_relaxed);
    }
  }
}

void copy_engine::run(std::stop_token st) {
  for (;;) {
    const std::uint32_t seen = work_seq_.load(std::memory_order_seq_cst);
    std::vector<request> batch;
    bool stop = false;
    {
      lock_guard g(lock_);
      while (!queue_.empty()) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      stop = stopping_;
    }
    for (auto& r : batch) {
      if (stop || st.stop_requested()) {
        canceled_.fetch_add(1, std::memory_order_relaxed);
        r.done->signal(errc::canceled);
        continue;
      }
      execute(r);
      pages_.fetch_add(r.pages, std::memory_order_relaxed);
      copies_.fetch_add(1, std::memory_order_relaxed);
      // release (inside signal): the copied bytes are visible to whoever
      // observes the fence signalled.
      r.done->signal(errc::ok);
    }
    if (!batch.empty()) continue;
    if (stop) return;
    // Spin briefly (copies often come in bursts), then sleep.
    for (int i = 0; i < 64 && work_seq_.load(std::memory_order_relaxed) == seen; ++i) SVM_CPU_RELAX();
    work_seq_.wait(seen, std::memory_order_seq_cst);
  }
}

copy_engine_stats copy_engine::stats() const noexcept {
  return {copies_.load(std::memory_order_relaxed), pages_.load(std::memory_order_relaxed),
          canceled_.load(std::memory_order_relaxed)};
}

}  // namespace svm::dev
