// Helpers for the device_sim tests: a test phys_mem, a trivial map-on-fault
// driver, a watchdog, and a few shorthands.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "svm/device_sim/device.h"

namespace svm::dev::test {

using namespace std::chrono_literals;

/// System memory for tests: `frames` zeroed 4K frames with generations.
/// With `virtual_frames` > frames, pfns [0, virtual_frames) are valid and
/// alias real frame pfn % frames (so a 1G leaf needs no 1 GiB of memory).
class test_mem final : public phys_mem {
 public:
  explicit test_mem(std::size_t frames, std::size_t virtual_frames = 0)
      : frames_(frames), virtual_(std::max(frames, virtual_frames)),
        bytes_(new std::uint64_t[frames * page_size / 8]()), gen_(new std::atomic<std::uint64_t>[frames]()) {}
  std::byte* frame_data(pfn_t pfn) noexcept override {
    return pfn < virtual_ ? reinterpret_cast<std::byte*>(bytes_.get()) + (pfn % frames_) * page_size : nullptr;
  }
  std::uint64_t frame_generation(pfn_t pfn) const noexcept override {
    return pfn < virtual_ ? gen_[pfn % frames_].load(std::memory_order_acquire) : 0;
  }
  pfn_t frame_count() const noexcept override { return virtual_; }
  void retire(pfn_t pfn) { gen_[pfn].fetch_add(1, std::memory_order_release); }

  /// Host-side access to a frame's 8-byte words (atomic_ref, as phys_mem.h asks).
  std::uint64_t word(pfn_t pfn, std::size_t off) {
    return std::atomic_ref<std::uint64_t>(bytes_[(pfn * page_size + off) / 8]).load(std::memory_order_relaxed);
  }
  void set_word(pfn_t pfn, std::size_t off, std::uint64_t v) {
    std::atomic_ref<std::uint64_t>(bytes_[(pfn * page_size + off) / 8]).store(v, std::memory_order_relaxed);
  }

 private:
  std::size_t frames_;
  std::size_t virtual_;
  std::unique_ptr<std::uint64_t[]> bytes_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> gen_;
};

/// Aborts the process if a test runs longer than `limit`: a hang becomes a
/// failure with a message, not a stuck CI job.
class watchdog {
 public:
  explicit watchdog(std::chrono::seconds limit = 60s)
      : t_([limit](std::stop_token st) {
          const auto deadline = std::chrono::steady_clock::now() + limit;
          while (!st.stop_requested()) {
            if (std::chrono::steady_clock::now() > deadline) {
              std::fprintf(stderr, "device_sim test watchdog: %s.%s exceeded its time limit\n",
                           ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name(),
                           ::testing::UnitTest::GetInstance()->current_test_info()->name());
              std::abort();
            }
            std::this_thread::sleep_for(10ms);
          }
        }) {}

 private:
  std::jthread t_;
};

/// The trivial map-on-fault driver: a thread that fetches fault batches,
/// writes one 4K PTE per record as `policy` says (nullopt: cancel the record
/// with `cancel_reason`), then replays the serviced records.
class map_on_fault_driver {
 public:
  using policy = std::function<std::optional<std::uint64_t>(const fault_record&)>;

  map_on_fault_driver(device& d, std::map<vm_id, dev_page_table*> tables, policy p, std::size_t batch = 256)
      : dev_(d), tables_(std::move(tables)), policy_(std::move(p)), batch_(batch),
        thread_([this](std::stop_token st) { loop(st); }) {}
  ~map_on_fault_driver() { stop(); }

  void stop() {
    if (!thread_.joinable()) return;
    thread_.request_stop();
    dev_.faults().wake_fetchers();
    thread_.join();
  }

  /// Called with each batch before it is serviced (a test can pause here).
  std::function<void(std::span<const fault_record>)> on_batch;
  errc cancel_reason = errc::fault;

  std::atomic<std::uint64_t> records{0}, batches{0}, replayed{0}, cancelled{0};
  std::atomic<std::size_t> largest_batch{0};

 private:
  void loop(std::stop_token st) {
    std::vector<fault_record> buf(batch_);
    while (!st.stop_requested()) {
      const std::size_t n = dev_.faults().fetch_wait(buf, 20ms);
      if (n == 0) continue;
      std::span<const fault_record> batch(buf.data(), n);
      records += n;
      ++batches;
      if (n > largest_batch) largest_batch = n;
      if (on_batch) on_batch(batch);
      std::vector<fault_record> ok, bad;
      for (const fault_record& r : batch) {
        auto pte = policy_(r);
        if (!pte) {
          bad.push_back(r);
          continue;
        }
        const va_t page = r.page();
        EXPECT_EQ(tables_.at(r.vm)->populate(page, page + page_size, 0, [&](va_t) { return *pte; }), errc::ok);
        ok.push_back(r);
      }
      replayed += dev_.replay(ok);
      cancelled += dev_.cancel(bad, cancel_reason);
    }
  }

  device& dev_;
  std::map<vm_id, dev_page_table*> tables_;
  policy policy_;
  std::size_t batch_;
  std::jthread thread_;  // last
};

/// Identity-like policy: page p of the VA maps frame (p >> 12) % frames, writable.
inline map_on_fault_driver::policy modulo_policy(pfn_t frames, bool writable = true) {
  return [frames, writable](const fault_record& r) -> std::optional<std::uint64_t> {
    return dev_pte::make(aperture::system, (r.gva >> page_shift) % frames, writable);
  };
}

/// Submit and wait (bounded); a timeout fails the test.
inline kernel_status run_kernel(device& d, queue_id q, std::uint64_t n, kernel_fn fn,
                                std::chrono::seconds limit = 10s) {
  auto c = d.submit(q, n, std::move(fn));
  EXPECT_TRUE(c.ok()) << errc_name(c.error());
  if (!c.ok()) return {c.error()};
  auto s = c->wait(limit);
  EXPECT_NE(s.error, errc::timedout) << "kernel did not complete";
  return s;
}

/// Map [va, va + size) with leaves of `level` to consecutive frames from `pfn`.
inline void map_range(dev_page_table& t, va_t va, std::uint64_t size, unsigned level, aperture ap, pfn_t pfn,
                      bool writable = true) {
  ASSERT_EQ(t.populate(va, va + size, level,
                       [&](va_t v) { return dev_pte::make(ap, pfn + ((v - va) >> page_shift), writable); }),
            errc::ok);
}

}  // namespace svm::dev::test
