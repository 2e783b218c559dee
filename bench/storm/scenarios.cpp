// The svm-storm scenarios. Page layout used by every SVM scenario: word 0
// (offset 0) is written by the CPU, word 1 (offset 8) by the device, word 2
// (offset 16) is a counter the device adds to atomically.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <iostream>
#include <thread>

#include "data.h"
#include "scenario.h"
#include "trace.h"

namespace svm::storm {

// ---- storm_env -----------------------------------------------------------------

void storm_env::data_error(const std::string& what) {
  if (data_errors.fetch_add(1, std::memory_order_relaxed) == 0) {
    std::lock_guard g(err_mu_);
    if (first_error_.empty()) first_error_ = "data: " + what;
  }
}

void storm_env::op_error(const std::string& what) {
  op_errors.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard g(err_mu_);
  if (first_error_.empty()) first_error_ = what;
}

std::string storm_env::first_error() const {
  std::lock_guard g(err_mu_);
  return first_error_;
}

namespace {

std::string hex(std::uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%" PRIx64, v);
  return b;
}

std::string mismatch(const char* what, va_t va, std::uint64_t got, std::uint64_t want) {
  return std::string(what) + " at " + hex(va) + ": read " + hex(got) + ", expected " + hex(want);
}

}  // namespace

dev::kernel_status storm_env::run_kernel(std::uint64_t items, dev::kernel_fn fn) {
  auto c = dev.submit(vm, items, std::move(fn));
  if (!c.ok()) return {c.error()};
  const auto limit = std::chrono::seconds(120);
  dev::kernel_status st = c->wait(limit);
  if (st.error == errc::timedout) {
    const vm_stats s = vm.stats();
    const dev::device_stats d = dev.hw().stats();
    std::fprintf(stderr,
                 "svm-storm: scenario %s: a kernel of %" PRIu64 " items did not finish in %lld s; giving up.\n"
                 "  vm: %s\n  device: accesses %" PRIu64 " faults %" PRIu64 " replays %" PRIu64 " cancels %" PRIu64
                 " fault-buffer-full stalls %" PRIu64 "\n",
                 cfg.scenario.c_str(), items, static_cast<long long>(limit.count()), s.to_string().c_str(),
                 d.accesses, d.faults, d.replays, d.cancels, d.fault_buffer_full_stalls);
    std::fflush(stderr);
    std::_Exit(4);
  }
  return st;
}

mm_options scenario::mm_opts(const run_config& c) const {
  mm_options o;
  const std::uint64_t pages = c.size / page_size;
  o.frames = static_cast<pfn_t>(2 * pages + 4096);
  o.swap_slots = static_cast<std::size_t>(pages + 4096);
  return o;
}

dev::device_config scenario::hw(const run_config& c) const {
  dev::device_config h;
  h.vram_bytes = std::max<std::uint64_t>(std::uint64_t{64} << 20, c.size);
  return h;
}

namespace {

constexpr std::uint64_t w_cpu = 0, w_dev = 8, w_ctr = 16;
constexpr va_t bo_base = va_t{0x7000'0000'0000};

bool check(storm_env& env, errc e, const char* what) {
  if (e == errc::ok) return true;
  env.op_error(std::string(what) + ": " + errc_name(e));
  return false;
}

// ---- the common shape: a CPU-populated region ---------------------------------

/// A region of private anonymous memory; each round the CPU stores word 0
/// of every page, the device reads it (checked in the kernel) and stores
/// word 1, and the CPU reads word 1 back. The device's mappings are reset
/// between rounds by taking write permission away and giving it back (two
/// invalidations that keep the CPU pages).
class region_scenario : public scenario {
 public:
  void setup(storm_env& env) override {
    pages_ = env.cfg.size / page_size;
    auto va = env.m.mmap(0, env.cfg.size, prot::read | prot::write, map::private_ | map::anonymous);
    if (!va.ok()) return (void)check(env, va.error(), "mmap");
    base_ = *va;
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    if (!base_) return;
    if (round > 0) reset(env);
    populate(env, round);
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed;
    const bool zero_ok = zero_ok_;
    storm_env* e = &env;
    return env.run_kernel(pages_, [=](dev::work_item& wi) {
      const va_t p = base + wi.id() * page_size;
      e->cursor.store(wi.id(), std::memory_order_relaxed);
      const std::uint64_t want = value_of(seed, p, round, by_cpu);
      const std::uint64_t got = wi.load<std::uint64_t>(p + w_cpu);
      if (got != want && !(zero_ok && got == 0)) e->data_error(mismatch("device read of a CPU word", p, got, want));
      wi.store<std::uint64_t>(p + w_dev, value_of(seed, p, round, by_device));
    });
  }
  void verify(storm_env& env, std::uint64_t round) override {
    for (std::uint64_t i = 0; i < pages_; ++i) {
      const va_t p = base_ + i * page_size;
      const std::uint64_t want = value_of(env.cfg.seed, p, round, by_device);
      auto got = env.m.load<std::uint64_t>(p + w_dev);
      if (!got.ok()) {
        env.op_error("CPU load: " + std::string(errc_name(got.error())));
        return;
      }
      if (*got != want && !(zero_ok_ && *got == 0)) env.data_error(mismatch("CPU read of a device word", p, *got, want));
    }
  }

 protected:
  /// Drop the device's mappings of the region, keeping the CPU's: two real
  /// protection changes (read-only, then read-write again). One mprotect to
  /// the protection the region already has changes nothing and invalidates
  /// nothing, as on Linux, so every round after the first would run on the
  /// device's old mappings without a single fault.
  void reset(storm_env& env) {
    trace_scope t(env.trace, "reset_mappings", pages_);
    if (!check(env, env.m.mprotect(base_, pages_ * page_size, prot::read), "mprotect")) return;
    if (!check(env, env.m.mprotect(base_, pages_ * page_size, prot::read | prot::write), "mprotect")) return;
    // The figures count on it: a round whose pages are still mapped on the
    // device measures TLB hits, not faults.
    for (const va_t p : {base_, base_ + (pages_ - 1) * page_size}) {
      const auto tr = env.vm.page_table().translate(p);
      if (dev::dev_pte::is_valid(tr.entry) && dev::dev_pte::is_writable(tr.entry)) {
        env.op_error("reset_mappings left the device's writable mapping of the region in place");
        return;
      }
    }
  }
  void populate(storm_env& env, std::uint64_t round) {
    trace_scope t(env.trace, "cpu_populate", pages_);
    for (std::uint64_t i = 0; i < pages_; ++i) {
      const va_t p = base_ + i * page_size;
      if (!check(env, env.m.store<std::uint64_t>(p + w_cpu, value_of(env.cfg.seed, p, round, by_cpu)), "CPU store"))
        return;
    }
  }
  va_t base_ = 0;
  std::uint64_t pages_ = 0;
  bool zero_ok_ = false;  ///< zero is also a right answer (dontneed-churn)
};

// ---- first-touch -----------------------------------------------------------------

class first_touch final : public region_scenario {
 public:
  void setup(storm_env& env) override { pages_ = env.cfg.size / page_size; }
  void prepare(storm_env& env, std::uint64_t) override {
    trace_scope t(env.trace, "fresh_mmap", pages_);
    if (base_) (void)check(env, env.m.munmap(base_, pages_ * page_size), "munmap");
    base_ = 0;
    auto va = env.m.mmap(0, pages_ * page_size, prot::read | prot::write, map::private_ | map::anonymous);
    if (check(env, va.ok() ? errc::ok : va.error(), "mmap")) base_ = *va;
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed;
    storm_env* e = &env;
    return env.run_kernel(pages_, [=](dev::work_item& wi) {
      const va_t p = base + wi.id() * page_size;
      wi.store<std::uint64_t>(p + w_dev, value_of(seed, p, round, by_device));  // one write fault per page
      const std::uint64_t got = wi.load<std::uint64_t>(p + w_cpu);
      if (got != 0) e->data_error(mismatch("device read of fresh memory", p, got, 0));
    });
  }
};

// ---- cpu-populated ---------------------------------------------------------------

class cpu_populated final : public region_scenario {};

// ---- random ----------------------------------------------------------------------

class random_access final : public region_scenario {
 public:
  void prepare(storm_env& env, std::uint64_t round) override {
    region_scenario::prepare(env, round);
    for (std::uint64_t i = 0; i < pages_; ++i)
      if (!check(env, env.m.store<std::uint64_t>(base_ + i * page_size + w_ctr, 0), "CPU store")) return;
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed, pages = pages_;
    storm_env* e = &env;
    return env.run_kernel(pages_, [=](dev::work_item& wi) {
      const va_t p = base + (mix(seed ^ (round << 32), wi.id()) % pages) * page_size;
      const std::uint64_t want = value_of(seed, p, round, by_cpu);
      const std::uint64_t got = wi.load<std::uint64_t>(p + w_cpu);
      if (got != want) e->data_error(mismatch("device read of a CPU word", p, got, want));
      wi.atomic_add<std::uint64_t>(p + w_ctr, 1);
    });
  }
  void verify(storm_env& env, std::uint64_t) override {
    std::uint64_t sum = 0;
    for (std::uint64_t i = 0; i < pages_; ++i) {
      auto v = env.m.load<std::uint64_t>(base_ + i * page_size + w_ctr);
      if (!v.ok()) return env.op_error("CPU load");
      sum += *v;
    }
    if (sum != pages_) env.data_error("random: device atomic adds summed to " + std::to_string(sum) + ", expected " + std::to_string(pages_));
  }
};

// ---- stride ----------------------------------------------------------------------

class stride_access final : public region_scenario {
 public:
  void setup(storm_env& env) override {
    region_scenario::setup(env);
    stride_ = env.cfg.stride;
    n_ = std::max<std::uint64_t>(1, env.cfg.size / stride_);
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    if (!base_) return;
    if (round > 0) reset(env);
    trace_scope t(env.trace, "cpu_populate", n_);
    for (std::uint64_t i = 0; i < n_; ++i) {
      const va_t a = base_ + i * stride_;
      if (!check(env, env.m.store<std::uint64_t>(a, value_of(env.cfg.seed, a, round, by_cpu)), "CPU store")) return;
    }
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed, stride = stride_;
    storm_env* e = &env;
    return env.run_kernel(n_, [=](dev::work_item& wi) {
      const va_t a = base + wi.id() * stride;
      const std::uint64_t want = value_of(seed, a, round, by_cpu);
      const std::uint64_t got = wi.load<std::uint64_t>(a);
      if (got != want) e->data_error(mismatch("device read of a CPU word", a, got, want));
    });
  }
  void verify(storm_env&, std::uint64_t) override {}  // read-only: checked in the kernel

 private:
  std::uint64_t stride_ = page_size, n_ = 0;
};

// ---- thp -------------------------------------------------------------------------

class thp final : public region_scenario {
 public:
  mm_options mm_opts(const run_config& c) const override {
    mm_options o = scenario::mm_opts(c);
    o.thp = thp_mode::madvise;
    return o;
  }
  void setup(storm_env& env) override {
    pages_ = env.cfg.size / page_size;
    auto va = env.m.mmap(0, env.cfg.size + huge_size, prot::read | prot::write, map::private_ | map::anonymous);
    if (!check(env, va.ok() ? errc::ok : va.error(), "mmap")) return;
    (void)check(env, env.m.madvise(*va, env.cfg.size + huge_size, madvice::hugepage), "madvise(HUGEPAGE)");
    base_ = align_up(*va, huge_size);
  }
};

// ---- invalidate-disjoint -----------------------------------------------------------

/// Faults over the region while the CPU unmaps and remaps, nonstop, a 2M
/// block just past it: same 512M chunk, so same notifier, never the same
/// 2M block (nor the same device page-table leaf node).
class invalidate_disjoint final : public region_scenario {
 public:
  void setup(storm_env& env) override {
    pages_ = env.cfg.size / page_size;
    auto va = env.m.mmap(0, env.cfg.size + 2 * huge_size, prot::read | prot::write, map::private_ | map::anonymous);
    if (!check(env, va.ok() ? errc::ok : va.error(), "mmap")) return;
    base_ = align_up(*va, huge_size);
    block_ = base_ + env.cfg.size;
  }
  bool has_storm() const override { return true; }
  void storm(storm_env& env, std::stop_token st) override {
    if (!base_) return;
    std::uint64_t k = 0;
    while (!st.stop_requested()) {
      if (env.cfg.disjoint_dontneed) {
        trace_scope t(env.trace, "cpu_dontneed", 512);
        if (!check(env, env.m.madvise(block_, huge_size, madvice::dontneed), "madvise(DONTNEED)")) return;
      } else {
        trace_scope t(env.trace, "cpu_unmap_remap", 512);
        if (!check(env, env.m.munmap(block_, huge_size), "munmap")) return;
        auto va = env.m.mmap(block_, huge_size, prot::read | prot::write, map::private_ | map::anonymous | map::fixed);
        if (!check(env, va.ok() ? errc::ok : va.error(), "mmap(MAP_FIXED)")) return;
      }
      if (!check(env, env.m.store<std::uint64_t>(block_ + (k++ % 512) * page_size, k), "CPU store")) return;
      env.cpu_ops.fetch_add(1, std::memory_order_relaxed);
    }
  }

 private:
  va_t block_ = 0;
};

// ---- invalidate-overlap ----------------------------------------------------------

/// The CPU swaps out (reclaim: CLEAR, data kept) the pages the device is
/// faulting right now, a few at a time around the kernel's cursor.
class invalidate_overlap final : public region_scenario {
 public:
  bool has_storm() const override { return true; }
  void storm(storm_env& env, std::stop_token st) override {
    if (!base_) return;
    std::uint64_t k = 0;
    while (!st.stop_requested()) {
      const std::uint64_t at = (env.cursor.load(std::memory_order_relaxed) + mix(env.cfg.seed, ++k) % 16) % pages_;
      const std::uint64_t n = std::min<std::uint64_t>(1 + k % 8, pages_ - at);
      trace_scope t(env.trace, "cpu_reclaim", n);
      auto r = env.m.reclaim(base_ + at * page_size, n * page_size);
      if (!r.ok() && r.error() != errc::nomem) return (void)check(env, r.error(), "reclaim");
      env.cpu_ops.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

// ---- dontneed-churn ----------------------------------------------------------------

/// The CPU drops pages with MADV_DONTNEED around the kernel's cursor, nonstop:
/// dropped private pages read zero again, so zero is also a right answer.
class dontneed_churn final : public region_scenario {
 public:
  dontneed_churn() { zero_ok_ = true; }
  bool has_storm() const override { return true; }
  void storm(storm_env& env, std::stop_token st) override {
    if (!base_) return;
    std::uint64_t k = 0;
    while (!st.stop_requested()) {
      const std::uint64_t at = (env.cursor.load(std::memory_order_relaxed) + mix(env.cfg.seed, ++k) % 16) % pages_;
      const std::uint64_t n = std::min<std::uint64_t>(1 + k % 4, pages_ - at);
      trace_scope t(env.trace, "cpu_dontneed", n);
      if (!check(env, env.m.madvise(base_ + at * page_size, n * page_size, madvice::dontneed), "madvise(DONTNEED)"))
        return;
      env.cpu_ops.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

// ---- fork-cow --------------------------------------------------------------------

/// Each round: the CPU stores, then forks (write-protecting every page: the
/// device's mappings go), then the device writes every page, breaking
/// copy-on-write in the parent through hmm_range_fault. The child must still
/// see the pre-fork data; the parent the device's.
class fork_cow final : public region_scenario {
 public:
  mm_options mm_opts(const run_config& c) const override {
    mm_options o = scenario::mm_opts(c);
    o.frames = static_cast<pfn_t>(3 * (c.size / page_size) + 4096);
    return o;
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    if (!base_) return;
    child_.reset();
    populate(env, round);
    trace_scope t(env.trace, "cpu_fork", pages_);
    auto c = env.m.fork();
    if (check(env, c.ok() ? errc::ok : c.error(), "fork")) child_ = std::move(*c);
  }
  void verify(storm_env& env, std::uint64_t round) override {
    region_scenario::verify(env, round);
    if (!child_) return;
    for (std::uint64_t i = 0; i < pages_; ++i) {
      const va_t p = base_ + i * page_size;
      auto c0 = child_->load<std::uint64_t>(p + w_cpu);
      auto c1 = child_->load<std::uint64_t>(p + w_dev);
      if (!c0.ok() || !c1.ok()) return env.op_error("child load");
      const std::uint64_t want0 = value_of(env.cfg.seed, p, round, by_cpu);
      const std::uint64_t want1 = round == 0 ? 0 : value_of(env.cfg.seed, p, round - 1, by_device);
      if (*c0 != want0) env.data_error(mismatch("child read of the pre-fork CPU word", p, *c0, want0));
      if (*c1 != want1) env.data_error(mismatch("child read of the pre-fork device word", p, *c1, want1));
    }
  }
  void teardown(storm_env&) override { child_.reset(); }

 private:
  std::unique_ptr<svm::mm> child_;
};

// ---- BOs -------------------------------------------------------------------------

/// BO word layout matches the SVM pages': word 0 written by bo_write, word 2
/// a device counter.
struct bo_slot {
  bo_id id = 0;
  va_t gva = 0;
  std::uint64_t size = 0;
};

bool bo_fill(storm_env& env, const bo_slot& b, std::uint64_t round) {
  for (std::uint64_t off = 0; off < b.size; off += page_size) {
    const std::uint64_t words[3] = {value_of(env.cfg.seed, b.gva + off, round, by_bo), 0, 0};
    if (!check(env, env.vm.bo_write(b.id, off, std::as_bytes(std::span{words})), "bo_write")) return false;
  }
  return true;
}

/// Every page's counter must equal `per_page(i)`.
template <class F>
void bo_check_counters(storm_env& env, const bo_slot& b, F per_page) {
  for (std::uint64_t off = 0; off < b.size; off += page_size) {
    std::uint64_t v = 0;
    if (!check(env, env.vm.bo_read(b.id, off + w_ctr, std::as_writable_bytes(std::span{&v, 1})), "bo_read")) return;
    const std::uint64_t want = per_page(off / page_size);
    if (v != want) env.data_error(mismatch("BO counter", b.gva + off, v, want));
  }
}

/// One BO in VRAM and one in system memory, bound next to each other, and an
/// SVM region: every work item reads a BO word and an SVM word, adds to the
/// BO's counter and writes the SVM page. Each round rebinds the BOs (BO
/// faults again) and resets the SVM mappings.
class bo_mixed final : public region_scenario {
 public:
  void setup(storm_env& env) override {
    region_scenario::setup(env);
    const std::uint64_t each = std::max<std::uint64_t>(page_size, align_down(env.cfg.size / 4, page_size));
    for (int k = 0; k < 2; ++k) {
      auto id = env.vm.create_bo(each, k == 0 ? placement::vram : placement::system);
      if (!check(env, id.ok() ? errc::ok : id.error(), "create_bo")) return;
      bos_.push_back({*id, bo_base + k * each, each});
    }
    bo_pages_ = 2 * each / page_size;
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    region_scenario::prepare(env, round);
    trace_scope t(env.trace, "bo_rebind", bo_pages_);
    for (const bo_slot& b : bos_) {
      if (round > 0) (void)check(env, env.vm.unbind(b.gva, b.size), "unbind");
      if (!bo_fill(env, b, round)) return;
      (void)check(env, env.vm.bind(b.id, b.gva, 0, b.size), "bind");
    }
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed, bo_pages = bo_pages_;
    storm_env* e = &env;
    return env.run_kernel(pages_, [=](dev::work_item& wi) {
      const va_t p = base + wi.id() * page_size;
      const va_t b = bo_base + (wi.id() % bo_pages) * page_size;
      const std::uint64_t bw = value_of(seed, b, round, by_bo), pw = value_of(seed, p, round, by_cpu);
      const std::uint64_t bg = wi.load<std::uint64_t>(b + w_cpu), pg = wi.load<std::uint64_t>(p + w_cpu);
      if (bg != bw) e->data_error(mismatch("device read of a BO word", b, bg, bw));
      if (pg != pw) e->data_error(mismatch("device read of a CPU word", p, pg, pw));
      wi.atomic_add<std::uint64_t>(b + w_ctr, 1);
      wi.store<std::uint64_t>(p + w_dev, value_of(seed, p, round, by_device));
    });
  }
  void verify(storm_env& env, std::uint64_t round) override {
    region_scenario::verify(env, round);
    std::uint64_t first = 0;
    for (const bo_slot& b : bos_) {
      bo_check_counters(env, b, [&](std::uint64_t i) {
        const std::uint64_t g = first + i;  // global BO page index
        return pages_ / bo_pages_ + (g < pages_ % bo_pages_ ? 1 : 0);
      });
      first += b.size / page_size;
    }
  }

 private:
  std::vector<bo_slot> bos_;
  std::uint64_t bo_pages_ = 1;
};

/// VRAM overcommitted twice over by eight BOs. Each round brings the
/// evicted BOs back into VRAM (create_bo evicts the others), refills every
/// BO and rebinds it; the kernel reads and counts on every BO page and
/// reads an SVM region beside them; the CPU storm evicts BOs while the
/// kernel runs (the device's next access brings each back into VRAM,
/// evicting the least recently used of the others).
class evict_pressure final : public region_scenario {
 public:
  static constexpr int nbo = 8;
  dev::device_config hw(const run_config& c) const override {
    dev::device_config h;
    h.vram_bytes = std::max<std::uint64_t>(page_size * nbo / 2, align_down(c.size / 2, page_size));
    return h;
  }
  void setup(storm_env& env) override {
    pages_ = std::max<std::uint64_t>(1, env.cfg.size / page_size / 4);
    auto va = env.m.mmap(0, pages_ * page_size, prot::read | prot::write, map::private_ | map::anonymous);
    if (!check(env, va.ok() ? errc::ok : va.error(), "mmap")) return;
    base_ = *va;
    each_ = std::max<std::uint64_t>(page_size, align_down(env.cfg.size / nbo, page_size));
    std::lock_guard g(mu_);
    for (int k = 0; k < nbo; ++k) {
      auto id = env.vm.create_bo(each_, placement::vram);
      if (!check(env, id.ok() ? errc::ok : id.error(), "create_bo")) return;
      bos_.push_back({*id, bo_base + k * each_, each_});
      if (!check(env, env.vm.bind(*id, bos_.back().gva, 0, each_), "bind")) return;
    }
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    if (round > 0) reset(env);
    populate(env, round);
    trace_scope t(env.trace, "bo_recreate", bos_.size());
    std::lock_guard g(mu_);
    for (bo_slot& b : bos_) {
      auto where = env.vm.bo_placement(b.id);
      if (where.ok() && *where == placement::system) {
        // Back into VRAM: a new BO there (evicting another), rebound.
        if (!check(env, env.vm.destroy_bo(b.id), "destroy_bo")) return;
        auto id = env.vm.create_bo(each_, placement::vram);
        if (!check(env, id.ok() ? errc::ok : id.error(), "create_bo")) return;
        b.id = *id;
        if (!check(env, env.vm.bind(b.id, b.gva, 0, each_), "bind")) return;
      }
    }
    for (const bo_slot& b : bos_)
      if (!bo_fill(env, b, round)) return;
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed, pages = pages_;
    storm_env* e = &env;
    return env.run_kernel(nbo * each_ / page_size, [=](dev::work_item& wi) {
      const va_t b = bo_base + wi.id() * page_size;
      const va_t p = base + (wi.id() % pages) * page_size;
      e->cursor.store(wi.id(), std::memory_order_relaxed);
      const std::uint64_t bw = value_of(seed, b, round, by_bo), pw = value_of(seed, p, round, by_cpu);
      const std::uint64_t bg = wi.load<std::uint64_t>(b + w_cpu), pg = wi.load<std::uint64_t>(p + w_cpu);
      if (bg != bw) e->data_error(mismatch("device read of a BO word", b, bg, bw));
      if (pg != pw) e->data_error(mismatch("device read of a CPU word", p, pg, pw));
      wi.atomic_add<std::uint64_t>(b + w_ctr, 1);
    });
  }
  void verify(storm_env& env, std::uint64_t) override {
    std::lock_guard g(mu_);
    for (const bo_slot& b : bos_) bo_check_counters(env, b, [](std::uint64_t) { return std::uint64_t{1}; });
  }
  bool has_storm() const override { return true; }
  void storm(storm_env& env, std::stop_token st) override {
    std::uint64_t k = 0;
    while (!st.stop_requested()) {
      bool evicted = false;
      {
        std::lock_guard g(mu_);
        if (bos_.empty()) return;
        const bo_slot& b = bos_[mix(env.cfg.seed, ++k) % bos_.size()];
        auto where = env.vm.bo_placement(b.id);
        if (where.ok() && *where == placement::vram) {
          trace_scope t(env.trace, "cpu_evict", b.size / page_size);
          // EINVAL: no longer in VRAM (a device fault that brought another
          // BO back into VRAM evicted it since the placement query).
          const errc e = env.vm.evict(b.id);
          if (e != errc::ok && e != errc::nomem && e != errc::inval) return (void)check(env, e, "evict");
          evicted = e == errc::ok;
        }
      }
      if (evicted) env.cpu_ops.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::sleep_for(std::chrono::microseconds(evicted ? 500 : 100));
    }
  }

 private:
  std::mutex mu_;  // guards bos_' ids between prepare/verify and the storm
  std::vector<bo_slot> bos_;
  std::uint64_t each_ = page_size;
};

// ---- device memory: migration to VRAM and back ----------------------------------

/// The migration granularity the window knob asks for: 4K or 64K windows
/// migrate 4K or 64K chunks, everything else 2M chunks.
std::uint64_t granularity_of(const run_config& c) {
  switch (c.effective_window()) {
    case window_choice::w4k: return page_size;
    case window_choice::w64k: return std::uint64_t{64} << 10;
    default: return huge_size;
  }
}

/// A region whose preferred location is VRAM (svm_attrs), the rest as
/// region_scenario.
class vram_region : public region_scenario {
 public:
  void setup(storm_env& env) override {
    region_scenario::setup(env);
    if (!base_) return;
    svm_attrs a;
    a.preferred = mem_location::vram;
    a.granularity = granularity_of(env.cfg);
    (void)check(env, env.vm.set_attrs(base_, pages_ * page_size, a), "set_attrs");
  }
};

/// The CPU and the device write the same pages in turn. Each timed round:
/// the CPU reads every page's device word of the last round and stores a
/// new CPU word (each CPU fault migrates its chunk back to system memory),
/// then the device reads the CPU word and stores a device word (each device
/// fault migrates its chunk to VRAM). No timeslice, so every CPU fault
/// migrates at once. The last round's device words are checked at teardown.
class migrate_ping_pong final : public vram_region {
 public:
  void vm_opts(const run_config&, vm_config& vc) const override { vc.migrate_timeslice = std::chrono::nanoseconds{0}; }
  void prepare(storm_env&, std::uint64_t) override {}
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    {
      trace_scope t(env.trace, "cpu_ping", pages_);
      if (round > 0 && !cpu_check(env, round - 1)) return {};
      populate(env, round);
    }
    last_ = round;
    ran_ = true;
    return region_scenario::kernel(env, round);
  }
  void verify(storm_env&, std::uint64_t) override {}
  void teardown(storm_env& env) override {
    if (ran_) (void)cpu_check(env, last_);
  }

 private:
  bool cpu_check(storm_env& env, std::uint64_t round) {
    for (std::uint64_t i = 0; i < pages_; ++i) {
      const va_t p = base_ + i * page_size;
      auto got = env.m.load<std::uint64_t>(p + w_dev);
      if (!got.ok()) return check(env, got.error(), "CPU load");
      const std::uint64_t want = value_of(env.cfg.seed, p, round, by_device);
      if (*got != want) env.data_error(mismatch("CPU read of a device word", p, *got, want));
    }
    return true;
  }
  std::uint64_t last_ = 0;
  bool ran_ = false;
};

/// An SVM working set twice the VRAM, alongside two VRAM BOs: each round
/// the device reads the word it wrote the round before on every page and
/// writes the next (round 0 reads the CPU's), so every chunk migrates in
/// and evicts the least recently used ones; the BOs take VRAM too and
/// count every access. The data survives every eviction, checked on the
/// device each round and by the CPU at the end.
class vram_overcommit final : public vram_region {
 public:
  dev::device_config hw(const run_config& c) const override {
    dev::device_config h;
    h.vram_bytes = std::max<std::uint64_t>(4 * huge_size, align_down(c.size / 2, page_size));
    return h;
  }
  void setup(storm_env& env) override {
    vram_region::setup(env);
    if (!base_) return;
    populate(env, 0);
    each_ = std::max<std::uint64_t>(page_size, align_down(env.cfg.size / 16, page_size));
    for (int k = 0; k < 2; ++k) {
      auto id = env.vm.create_bo(each_, placement::vram);
      if (!check(env, id.ok() ? errc::ok : id.error(), "create_bo")) return;
      bos_.push_back({*id, bo_base + k * each_, each_});
      if (!check(env, env.vm.bind(*id, bos_.back().gva, 0, each_), "bind")) return;
    }
  }
  void prepare(storm_env& env, std::uint64_t round) override {
    for (const bo_slot& b : bos_)
      if (!bo_fill(env, b, round)) return;
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    const va_t base = base_;
    const std::uint64_t seed = env.cfg.seed, bo_pages = 2 * each_ / page_size;
    storm_env* e = &env;
    last_ = round;
    ran_ = true;
    return env.run_kernel(pages_, [=](dev::work_item& wi) {
      const va_t p = base + wi.id() * page_size;
      const va_t b = bo_base + (wi.id() % bo_pages) * page_size;
      e->cursor.store(wi.id(), std::memory_order_relaxed);
      const std::uint64_t want =
          round == 0 ? value_of(seed, p, 0, by_cpu) : value_of(seed, p, round - 1, by_device);
      const std::uint64_t got = wi.load<std::uint64_t>(p + (round == 0 ? w_cpu : w_dev));
      if (got != want) e->data_error(mismatch("device read of an evicted page", p, got, want));
      wi.store<std::uint64_t>(p + w_dev, value_of(seed, p, round, by_device));
      const std::uint64_t bw = value_of(seed, b, round, by_bo), bg = wi.load<std::uint64_t>(b + w_cpu);
      if (bg != bw) e->data_error(mismatch("device read of a BO word", b, bg, bw));
      wi.atomic_add<std::uint64_t>(b + w_ctr, 1);
    });
  }
  void verify(storm_env& env, std::uint64_t) override {
    const std::uint64_t bo_pages = 2 * each_ / page_size;
    std::uint64_t first = 0;
    for (const bo_slot& b : bos_) {
      bo_check_counters(env, b, [&](std::uint64_t i) {
        const std::uint64_t g = first + i;
        return pages_ / bo_pages + (g < pages_ % bo_pages ? 1 : 0);
      });
      first += b.size / page_size;
    }
  }
  void teardown(storm_env& env) override {
    if (!ran_) return;
    for (std::uint64_t i = 0; i < pages_; ++i) {
      const va_t p = base_ + i * page_size;
      auto got = env.m.load<std::uint64_t>(p + w_dev);
      if (!got.ok()) return (void)check(env, got.error(), "CPU load");
      const std::uint64_t want = value_of(env.cfg.seed, p, last_, by_device);
      if (*got != want) env.data_error(mismatch("CPU read of a device word", p, *got, want));
    }
  }

 private:
  std::vector<bo_slot> bos_;
  std::uint64_t each_ = page_size;
  std::uint64_t last_ = 0;
  bool ran_ = false;
};

/// A VRAM-preferred region that starts each round in system memory (an
/// untimed prefetch back) and is either prefetched to VRAM inside the timed
/// round before the kernel runs (`prefetch`), or migrated by the kernel's
/// own faults (`vram-fault`): `--compare prefetch` puts them side by side.
class prefetch_or_fault final : public vram_region {
 public:
  explicit prefetch_or_fault(bool prefetch) : prefetch_(prefetch) {}
  void prepare(storm_env& env, std::uint64_t round) override {
    {
      trace_scope t(env.trace, "prefetch_system", pages_);
      if (!check(env, env.vm.prefetch(base_, pages_ * page_size, mem_location::system), "prefetch to system")) return;
    }
    populate(env, round);
  }
  dev::kernel_status kernel(storm_env& env, std::uint64_t round) override {
    if (prefetch_) {
      trace_scope t(env.trace, "prefetch_vram", pages_);
      if (!check(env, env.vm.prefetch(base_, pages_ * page_size, mem_location::vram), "prefetch to VRAM")) return {};
    }
    return region_scenario::kernel(env, round);
  }

 private:
  bool prefetch_;
};

}  // namespace

const std::vector<scenario_info>& scenarios() {
  static const std::vector<scenario_info> list = {
      {"first-touch", "the device touches memory the CPU never touched (one write fault per page)", window_choice::largest},
      {"cpu-populated", "the CPU stores every page, the device reads and writes each", window_choice::largest},
      {"random", "the device reads and atomically adds at random pages of CPU-populated memory", window_choice::largest},
      {"stride", "the device reads every --stride bytes: a new page per access at the default 4K", window_choice::largest},
      {"thp", "as cpu-populated over 2M CPU huge pages (madvise HUGEPAGE), mirrored with 2M leaves", window_choice::largest},
      {"invalidate-disjoint", "faults in one region while the CPU unmaps and remaps, nonstop, another 2M block of the same notifier", window_choice::w4k},
      {"invalidate-overlap", "the CPU swaps out (reclaim) the very pages being faulted, nonstop", window_choice::w4k},
      {"dontneed-churn", "the CPU drops pages (MADV_DONTNEED) around the pages being faulted, nonstop", window_choice::w4k},
      {"fork-cow", "the CPU forks each round; the device's writes break copy-on-write in the parent", window_choice::largest},
      {"bo-mixed", "BOs (VRAM and system) and SVM interleaved in one VM, BOs rebound each round", window_choice::largest},
      {"evict-pressure", "eight BOs overcommit VRAM twice over; the CPU evicts while the device runs", window_choice::largest},
      {"migrate-ping-pong", "the CPU and the device write the same VRAM-preferred pages in turn: every round migrates each chunk both ways", window_choice::largest},
      {"vram-overcommit", "a VRAM-preferred working set twice the VRAM, beside two VRAM BOs: chunks migrate in and evict each other", window_choice::largest},
      {"prefetch", "a VRAM-preferred region prefetched to VRAM at the start of each timed round, then read and written", window_choice::largest},
      {"vram-fault", "the same region as prefetch, migrated to VRAM by the kernel's own faults (prefetch's baseline)", window_choice::largest},
      {"host-minor-fault", "the same touch pattern on real memory through this machine's kernel (mmap, MADV_NOHUGEPAGE)", window_choice::largest},
  };
  return list;
}

const scenario_info* find_scenario(const std::string& name) {
  for (const scenario_info& s : scenarios())
    if (name == s.name) return &s;
  return nullptr;
}

std::unique_ptr<scenario> make_scenario(const std::string& name) {
  if (name == "first-touch") return std::make_unique<first_touch>();
  if (name == "cpu-populated") return std::make_unique<cpu_populated>();
  if (name == "random") return std::make_unique<random_access>();
  if (name == "stride") return std::make_unique<stride_access>();
  if (name == "thp") return std::make_unique<thp>();
  if (name == "invalidate-disjoint") return std::make_unique<invalidate_disjoint>();
  if (name == "invalidate-overlap") return std::make_unique<invalidate_overlap>();
  if (name == "dontneed-churn") return std::make_unique<dontneed_churn>();
  if (name == "fork-cow") return std::make_unique<fork_cow>();
  if (name == "bo-mixed") return std::make_unique<bo_mixed>();
  if (name == "evict-pressure") return std::make_unique<evict_pressure>();
  if (name == "migrate-ping-pong") return std::make_unique<migrate_ping_pong>();
  if (name == "vram-overcommit") return std::make_unique<vram_overcommit>();
  if (name == "prefetch") return std::make_unique<prefetch_or_fault>(true);
  if (name == "vram-fault") return std::make_unique<prefetch_or_fault>(false);
  return nullptr;
}

const char* to_string(window_choice w) noexcept {
  switch (w) {
    case window_choice::automatic: return "auto";
    case window_choice::largest: return "largest";
    case window_choice::w4k: return "4k";
    case window_choice::w64k: return "64k";
    case window_choice::w2m: return "2m";
  }
  return "?";
}

window_choice run_config::effective_window() const noexcept {
  if (window != window_choice::automatic) return window;
  const scenario_info* s = find_scenario(scenario);
  return s ? s->auto_window : window_choice::largest;
}

}  // namespace svm::storm
