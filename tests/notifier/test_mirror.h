// A minimal device mirror driven only by an interval notifier and
// hmm_range_fault: a "device page table" in a plain map guarded by one mutex.
// Used by the end-to-end tests of the notifier component.
#pragma once

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <span>
#include <vector>

#include "svm/base/mutex.h"
#include "svm/notifier/notifier.h"

namespace svm::test {

class test_mirror : public interval_notifier_ops {
 public:
  static constexpr lock_class lock_cls{"test_mirror", lockdep::rank::pt_node};

  /// Mirror [start, start+len) of `m`.
  test_mirror(svm::mm& m, va_t start, std::uint64_t len) : mm_(m) {
    EXPECT_EQ(sub.insert(m, start, len, *this), errc::ok);
  }
  ~test_mirror() override { sub.remove(); }

  // ---- notifier callback --------------------------------------------------
  bool invalidate(interval_notifier& s, const mmu_notifier_range& r, std::uint64_t cur_seq) override {
    if (r.blockable) {
      lock.lock();
    } else if (!lock.try_lock()) {
      refusals.fetch_add(1);
      return false;
    }
    s.set_seq(cur_seq);
    last_event = r.event;
    last_owner = r.owner;
    if (!(r.event == mmu_notifier_event::migrate && r.owner == this)) {
      auto it = pt.lower_bound(r.start);
      while (it != pt.end() && it->first < r.end) it = pt.erase(it);
    }
    invalidations.fetch_add(1);
    lock.unlock();
    return true;
  }
  void invalidate_end(interval_notifier&, const mmu_notifier_range&) override { ends.fetch_add(1); }

  // ---- device side ----------------------------------------------------------
  /// Populate [start, end) through hmm_range_fault (the pattern of examples/own_mirror.cpp
  /// loop, with the kernel's timeout). Returns the error of the last try.
  errc fault(va_t start, va_t end, bool write, hmm_pfn default_flags = hmm_req::fault) {
    std::vector<hmm_pfn> pfns((end - start) / page_size);
    hmm_range range{.notifier = &sub, .start = start, .end = end, .hmm_pfns = pfns,
                    .default_flags = default_flags | (write ? hmm_req::write : 0), .dev_private_owner = owner};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    for (;;) {
      if (std::chrono::steady_clock::now() > deadline) return errc::busy;
      range.notifier_seq = sub.read_begin();
      errc err;
      {
        auto g = mm_.read_lock();
        err = hmm_range_fault(range);
      }
      if (err == errc::busy) {
        retries.fetch_add(1);
        continue;
      }
      if (err != errc::ok) return err;
      lock.lock();
      if (sub.read_retry(range.notifier_seq)) {
        lock.unlock();
        retries.fetch_add(1);
        continue;
      }
      for (std::size_t i = 0; i < pfns.size(); ++i)
        if (pfns[i] & hmm_pfn_valid) pt[start + i * page_size] = pfns[i];
      last_pfns = pfns;
      lock.unlock();
      return errc::ok;
    }
  }

  /// Device load/store of bytes at `va` through the mirror, faulting missing
  /// or read-only entries in.
  errc read(va_t va, std::span<std::byte> out) { return access(va, out.data(), out.size(), false); }
  errc write(va_t va, std::span<const std::byte> in) {
    return access(va, const_cast<std::byte*>(in.data()), in.size(), true);
  }
  template <class T>
  T load(va_t va) {
    T v{};
    EXPECT_EQ(read(va, std::as_writable_bytes(std::span{&v, 1})), errc::ok);
    return v;
  }

  /// The device entry at `va` (0 if none).
  hmm_pfn entry(va_t va) {
    lock_guard g(lock);
    auto it = pt.find(va);
    return it == pt.end() ? 0 : it->second;
  }
  std::size_t size() {
    lock_guard g(lock);
    return pt.size();
  }
  /// True if every device entry names a frame the CPU still maps at that VA
  /// (or at least an allocated frame): no stale translation survived.
  bool coherent() {
    lock_guard g(lock);
    for (auto& [va, e] : pt) {
      frame_pool& p = mm_.pool(hmm_pfn_to_pool(e));
      if (p.refcount(hmm_pfn_to_pfn(e)) == 0) return false;
    }
    return true;
  }

  interval_notifier sub;
  mutex lock{lock_cls};
  std::map<va_t, hmm_pfn> pt SVM_GUARDED_BY(lock);
  std::vector<hmm_pfn> last_pfns;
  std::atomic<int> invalidations{0}, ends{0}, refusals{0}, retries{0};
  mmu_notifier_event last_event{};
  const void* last_owner = nullptr;
  const void* owner = nullptr;  ///< dev_private_owner for faults

 private:
  errc access(va_t va, std::byte* buf, std::size_t n, bool write) {
    std::size_t done = 0;
    while (done < n) {
      const va_t a = va + done;
      const va_t page = align_down(a, page_size);
      const std::size_t chunk = std::min<std::size_t>(page + page_size - a, n - done);
      bool ok = false;
      {
        lock_guard g(lock);
        auto it = pt.find(page);
        if (it != pt.end() && (!write || (it->second & hmm_pfn_write))) {
          frame_pool& p = mm_.pool(hmm_pfn_to_pool(it->second));
          std::byte* f = p.frame_data(hmm_pfn_to_pfn(it->second)) + (a - page);
          if (write) frame_pool::store_bytes(f, buf + done, chunk);
          else frame_pool::load_bytes(f, buf + done, chunk);
          ok = true;
        }
      }
      if (ok) {
        done += chunk;
        continue;
      }
      if (errc e = fault(page, page + page_size, write); e != errc::ok) return e;
    }
    return errc::ok;
  }

  svm::mm& mm_;
};

inline std::vector<std::byte> bytes_of(std::initializer_list<int> v) {
  std::vector<std::byte> b;
  for (int x : v) b.push_back(static_cast<std::byte>(x));
  return b;
}

/// A notifier that records what it was told.
struct recording_ops : interval_notifier_ops {
  struct call {
    mmu_notifier_event event;
    va_t start, end;
    std::uint64_t cur_seq;
    const void* owner;
    bool blockable;
  };
  std::vector<call> calls;  // touched only by the invalidating thread in tests
  std::atomic<int> end_calls{0};
  bool refuse_nonblock = false;
  bool refuse_always = false;
  bool invalidate(interval_notifier& s, const mmu_notifier_range& r, std::uint64_t cur_seq) override {
    if (refuse_always || (refuse_nonblock && !r.blockable)) return false;
    s.set_seq(cur_seq);
    calls.push_back({r.event, r.start, r.end, cur_seq, r.owner, r.blockable});
    return true;
  }
  void invalidate_end(interval_notifier&, const mmu_notifier_range&) override { end_calls.fetch_add(1); }
};

}  // namespace svm::test
