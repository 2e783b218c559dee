// Randomized storms: engines run kernels over a set of buffers while
// CPU threads munmap/mmap, mprotect, madvise DONTNEED, mremap, fork, reclaim
// and migrate at random, and (in some variants) BOs are created, bound,
// unbound and evicted. Every run is checked by
//  - the access oracle: 0 stale device accesses (and it must have checked);
//  - the data oracle: on the stable buffer (which no CPU operation changes
//    during a kernel) the device reads exactly what the CPU wrote and the CPU
//    reads back exactly what the device wrote, atomics included; on the
//    churned buffers a value read back is the one stored or zero (dropped or
//    remapped memory), never anything else; BO contents survive evictions;
//  - kernel outcomes: each kernel completes, or fails with a fault
//    cancelled for a reason a CPU operation can explain (EFAULT, EPERM, or
//    EBUSY at the fault timeout) at an address inside the churned buffers or
//    the BO slots;
//  - progress: kernels complete and faults are serviced; a watchdog turns a
//    hang into a failure that names the stuck threads.
// Each run is seeded (SVM_STRESS_SEED overrides the per-test default) and
// prints its seed on failure; SVM_STRESS_SCALE multiplies the operation
// counts (sanitizer builds divide them by 4 by default).
// The *Soak* test runs for SVM_SOAK_SECONDS (default 600) and is kept out of
// the default run by its label; `ctest --preset soak` runs it, under a ctest
// TIMEOUT of 1500 s (tests/CMakeLists.txt) that its default fits with margin.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/e2e_fixture.h"
#include "common/watchdog.h"
#include "svm/notifier/frame_pool.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr double sanitizer_scale = 0.25;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
constexpr double sanitizer_scale = 0.25;
#else
constexpr double sanitizer_scale = 1.0;
#endif
#else
constexpr double sanitizer_scale = 1.0;
#endif

double env_double(const char* name, double dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : dflt;
}

std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  std::uint64_t x = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull);
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  return x ^ (x >> 29);
}

/// Which CPU-side operations a variant runs.
enum op_bits : unsigned {
  op_remap = 1,     ///< munmap + mmap(MAP_FIXED)
  op_protect = 2,   ///< mprotect read-only / none, then back
  op_dontneed = 4,
  op_mremap = 8,    ///< move a buffer away and back
  op_fork = 16,     ///< fork, the child writes, the child exits
  op_reclaim = 32,
  op_migrate = 64,  ///< to a second (NUMA) pool, another owner
  op_bo = 128,      ///< BO create/bind/unbind/evict/destroy
  op_all = 255,
};

struct variant {
  const char* name;
  unsigned ops;
  unsigned engines;
  unsigned handlers;
  bool windows;  ///< a windows mirror at a GPU offset instead of full-mm
  bool huge;     ///< MADV_HUGEPAGE on the stable buffer (2M CPU pages, 2M leaves)
};

const variant variants[] = {
    {"mapchurn", op_remap | op_protect | op_dontneed | op_mremap, 2, 1, false, false},
    {"forkreclaim", op_fork | op_reclaim | op_migrate | op_dontneed, 2, 2, false, false},
    {"bos", op_bo | op_dontneed | op_protect | op_reclaim, 2, 1, false, false},
    {"everything", op_all, 3, 2, true, true},
};

struct storm_param {
  e2e_param mode;
  unsigned v;  ///< index into variants
};

std::string storm_name(const ::testing::TestParamInfo<storm_param>& p) {
  return std::string(to_string(p.param.mode.seq)) + "_" + to_string(p.param.mode.impl) + "_" + variants[p.param.v].name;
}

constexpr std::uint64_t stable_pages = 512;  // 2M
constexpr unsigned churn_bufs = 4;
constexpr std::uint64_t churn_pages = 32;
constexpr std::uint64_t bo_slots = 4, bo_pages = 8;
constexpr va_t gpu_delta = va_t{1} << 40;       // windows mirror: GPU = CPU + delta
constexpr va_t bo_base = va_t{0x7e00'0000'0000};  // BO slots (GPU VA; no CPU mapping there)

/// The storm: one instance per test run.
class storm {
 public:
  storm(const variant& v, const e2e_param& mode, std::uint64_t seed, double scale, double seconds)
      : v_(v), seed_(seed), rounds_target_(static_cast<std::uint64_t>(std::max(4.0, 30 * scale))),
        seconds_(seconds) {
    m_ = std::make_unique<mm>(mm_options{.frames = 16384, .thp = thp_mode::madvise});
    numa_ = std::make_shared<frame_pool>(4096);
    auto p = m_->attach_pool(numa_, pool_kind::numa);
    EXPECT_TRUE(p.ok());
    numa_index_ = p.ok() ? *p : 0;
    dev_ = driver::create(driver_config{
        .hw = {.engines = v.engines, .fault_buffer_entries = 64, .vram_bytes = 3 * bo_pages * page_size},
        .handler_threads = v.handlers}).value();
    vm_config c;
    c.seq = mode.seq;
    c.impl = mode.impl;
    c.mirror = v.windows ? mirror_kind::windows : mirror_kind::full_mm;
    c.fault_timeout = 200ms;
    vm_ = gpu_vm::create(*dev_, *m_, c).value();
    oracle_ = std::make_unique<access_oracle>(*dev_);
    // Buffers: the stable one 2M-aligned, the churned ones after it, and a
    // spare area for mremap, all at fixed addresses.
    base_ = va_t{1} << 38;
    stable_ = base_;
    for (unsigned i = 0; i < churn_bufs; ++i) churn_[i] = base_ + huge_size + i * 2 * churn_pages * page_size;
    spare_ = base_ + 2 * huge_size;
    auto s = m_->mmap(stable_, stable_pages * page_size, prot::read | prot::write, map::private_ | map::anonymous | map::fixed);
    EXPECT_TRUE(s.ok());
    if (v.huge) {
      EXPECT_EQ(m_->madvise(stable_, stable_pages * page_size, madvice::hugepage), errc::ok);
    }
    for (va_t c0 : churn_) {
      auto r = m_->mmap(c0, churn_pages * page_size, prot::read | prot::write, map::private_ | map::anonymous | map::fixed);
      EXPECT_TRUE(r.ok());
    }
    if (v.windows) {
      // One window over everything the storm touches (the spare area too).
      EXPECT_EQ(vm_->add_window(base_, base_ + gpu_delta, 4 * huge_size), errc::ok);
      EXPECT_EQ(oracle_->watch(*vm_, *m_, {{base_, base_ + gpu_delta, 4 * huge_size}}), errc::ok);
    } else {
      EXPECT_EQ(oracle_->watch(*vm_, *m_), errc::ok);
    }
  }

  ~storm() {
    oracle_.reset();
    vm_.reset();
    dev_.reset();
    m_.reset();
  }

  void run() {
    watchdog wd("storm " + std::string(v_.name), std::chrono::milliseconds(static_cast<long>(seconds_ * 1000) + 240'000));
    // The CPU threads (and the BO thread) run until the kernels are done.
    std::atomic<unsigned> cpu_running{2};
    std::vector<std::jthread> threads;
    for (unsigned t = 0; t < 2; ++t) {
      threads.emplace_back([this, t, &cpu_running, b = wd.enroll("cpu" + std::to_string(t))]() mutable {
        cpu_thread(t, b);
        cpu_running.fetch_sub(1);
      });
    }
    std::jthread bo_thread;
    if (v_.ops & op_bo) {
      bo_thread = std::jthread([this, b = wd.enroll("bo")]() mutable { bo_loop(b); });
    }
    watchdog::beat kb = wd.enroll("kernels");
    const auto start = std::chrono::steady_clock::now();
    std::uint64_t round = 0;
    for (;;) {
      const bool time_up = seconds_ > 0 && std::chrono::steady_clock::now() - start > std::chrono::duration<double>(seconds_);
      // (and not before both CPU threads have done something, however the
      // scheduler treated them)
      if ((seconds_ > 0 ? time_up : round >= rounds_target_) && cpu_ops_.load() >= 2) break;
      stable_round(round, kb);
      churn_round(round, kb);
      if (v_.ops & op_bo) bo_round(kb);
      ++round;
      if (::testing::Test::HasFatalFailure()) break;
    }
    stop_.store(true);
    threads.clear();
    bo_thread = {};
    rounds_ = round;
  }

  void check() {
    EXPECT_EQ(oracle_->stale(), 0u) << stale_text();
    EXPECT_GT(oracle_->svm_checked(), 0u);
    EXPECT_EQ(data_errors_.load(), 0u) << first_error();
    EXPECT_EQ(bad_outcomes_.load(), 0u) << first_error();
    EXPECT_GT(kernels_ok_.load(), 0u);
    EXPECT_GT(vm_->stats().faults_serviced, 0u);
    EXPECT_GT(cpu_ops_.load(), 0u);
    std::printf("[ storm    ] %s seed %llu: %llu rounds, %llu kernels ok, %llu failed (explained), %llu CPU ops, "
                "%llu BO ops, %llu accesses checked, %llu faults serviced\n",
                v_.name, static_cast<unsigned long long>(seed_), static_cast<unsigned long long>(rounds_),
                static_cast<unsigned long long>(kernels_ok_.load()), static_cast<unsigned long long>(kernels_failed_.load()),
                static_cast<unsigned long long>(cpu_ops_.load()), static_cast<unsigned long long>(bo_ops_.load()),
                static_cast<unsigned long long>(oracle_->checked()),
                static_cast<unsigned long long>(vm_->stats().faults_serviced));
  }

 private:
  va_t gpu(va_t cpu) const { return v_.windows ? cpu + gpu_delta : cpu; }

  void error(std::atomic<std::uint64_t>& ctr, std::string what) {
    ctr.fetch_add(1);
    std::lock_guard g(err_lock_);
    if (first_error_.empty()) first_error_ = std::move(what);
  }
  std::string first_error() {
    std::lock_guard g(err_lock_);
    return first_error_;
  }
  std::string stale_text() const {
    std::string out;
    for (const auto& r : oracle_->reports()) out += describe(r) + "\n";
    return out;
  }

  /// A kernel failed: fine only for a cancelled fault a CPU operation or a
  /// BO unbind explains, at an address of the churned buffers or BO slots.
  void judge(const dev::kernel_status& st, const char* what) {
    if (st.ok()) {
      kernels_ok_.fetch_add(1);
      return;
    }
    const bool reason_ok = st.error == errc::canceled &&
                           (st.reason == errc::fault || st.reason == errc::perm || st.reason == errc::busy);
    bool where_ok = st.address >= gpu(churn_[0]) && st.address < gpu(spare_ + churn_bufs * churn_pages * page_size);
    where_ok |= st.address >= bo_base && st.address < bo_base + bo_slots * bo_pages * page_size;
    if (reason_ok && where_ok) {
      kernels_failed_.fetch_add(1);
      return;
    }
    error(bad_outcomes_, std::string(what) + ": kernel failed with " + errc_name(st.error) + " reason " +
                             errc_name(st.reason) + " at 0x" + to_hex(st.address));
  }
  static std::string to_hex(std::uint64_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(v));
    return b;
  }

  dev::kernel_status run_kernel(std::uint64_t items, dev::kernel_fn fn) {
    auto c = dev_->submit(*vm_, items, std::move(fn));
    if (!c.ok()) return {c.error()};
    return c->wait(120s);
  }

  // The stable buffer: the CPU writes, the device reads and writes, the CPU
  // reads back; one counter is bumped atomically by every item.
  void stable_round(std::uint64_t round, watchdog::beat& b) {
    b.progress("stable: CPU writes");
    for (std::uint64_t i = 0; i < stable_pages; i += 3)
      ASSERT_EQ(m_->store<std::uint64_t>(stable_ + i * page_size, mix(seed_, round * 1000 + i)), errc::ok);
    ASSERT_EQ(m_->store<std::uint64_t>(stable_ + 16, 0), errc::ok);
    const std::uint64_t seed = seed_;
    const va_t g = gpu(stable_);
    std::atomic<std::uint64_t> bad{0};
    b.progress("stable: kernel");
    const dev::kernel_status st = run_kernel(stable_pages / 3 + 1, [&, g, seed, round](dev::work_item& wi) {
      const std::uint64_t i = wi.id() * 3;
      if (i >= stable_pages) return;
      if (wi.load<std::uint64_t>(g + i * page_size) != mix(seed, round * 1000 + i)) bad.fetch_add(1);
      wi.store<std::uint64_t>(g + i * page_size + 8, mix(seed ^ 1, round * 1000 + i));
      wi.atomic_add<std::uint64_t>(g + 16, 1);
    });
    if (!st.ok()) {
      error(bad_outcomes_, std::string("stable kernel failed: ") + errc_name(st.error) + " reason " +
                               errc_name(st.reason) + " at 0x" + to_hex(st.address));
      return;
    }
    kernels_ok_.fetch_add(1);
    if (bad.load()) error(data_errors_, "the device read a value the CPU did not write (stable buffer)");
    b.progress("stable: CPU reads back");
    for (std::uint64_t i = 0; i < stable_pages; i += 3) {
      auto v = m_->load<std::uint64_t>(stable_ + i * page_size + 8);
      if (!v.ok() || *v != mix(seed_ ^ 1, round * 1000 + i)) {
        error(data_errors_, "the CPU read back a value the device did not write (stable page " + std::to_string(i) + ")");
        break;
      }
    }
    auto n = m_->load<std::uint64_t>(stable_ + 16);
    if (!n.ok() || *n != stable_pages / 3 + 1) error(data_errors_, "atomic counter on the stable buffer lost updates");
  }

  // The churned buffers: each item stores a value and reads it back; the
  // CPU may drop or remap the page in between (then zero is right), or make
  // the access fail (judge()).
  void churn_round(std::uint64_t round, watchdog::beat& b) {
    b.progress("churn: kernel");
    std::vector<va_t> pages;
    for (va_t c0 : churn_)
      for (std::uint64_t i = 0; i < churn_pages; ++i) pages.push_back(gpu(c0 + i * page_size));
    const std::uint64_t seed = seed_;
    std::atomic<std::uint64_t> bad{0};
    const dev::kernel_status st = run_kernel(pages.size(), [&, seed, round](dev::work_item& wi) {
      const va_t p = pages[wi.id()] + 8 * (1 + (round % 64));
      const std::uint64_t v = mix(seed, round * 7919 + wi.id()) | 1;
      switch (wi.id() % 3) {
        case 0: {
          wi.store<std::uint64_t>(p, v);
          const std::uint64_t got = wi.load<std::uint64_t>(p);
          if (got != v && got != 0) bad.fetch_add(1);
          break;
        }
        case 1: {
          const std::uint32_t old = wi.atomic_add<std::uint32_t>(p, 2);
          const std::uint32_t now = wi.load<std::uint32_t>(p);
          if (now != old + 2 && now != 0) bad.fetch_add(1);
          break;
        }
        default:
          (void)wi.load<std::uint16_t>(p + 2);
      }
    });
    judge(st, "churn kernel");
    if (bad.load()) error(data_errors_, "a churned page read back neither the value stored nor zero");
  }

  // BO slots: whatever BO is bound at a slot holds the slot's pattern.
  static std::uint64_t bo_pattern(std::uint64_t slot, std::uint64_t page) { return 0xb0b0'0000'0000'0000ull | slot << 16 | page; }
  void bo_round(watchdog::beat& b) {
    b.progress("bo: kernel");
    std::atomic<std::uint64_t> bad{0};
    const dev::kernel_status st = run_kernel(bo_slots * bo_pages, [&](dev::work_item& wi) {
      const std::uint64_t slot = wi.id() / bo_pages, page = wi.id() % bo_pages;
      const std::uint64_t got = wi.load<std::uint64_t>(bo_base + (slot * bo_pages + page) * page_size);
      if (got != bo_pattern(slot, page)) bad.fetch_add(1);
    });
    judge(st, "BO kernel");
    if (bad.load()) error(data_errors_, "a BO read did not return its slot's pattern (lost across an eviction?)");
  }

  void bo_loop(watchdog::beat& b) {
    std::mt19937_64 rng(seed_ ^ 0xb0);
    std::vector<std::optional<bo_id>> slot(bo_slots);
    auto fill = [&](bo_id id, std::uint64_t s) {
      std::vector<std::uint64_t> words(bo_pages * page_size / 8, 0);
      for (std::uint64_t p = 0; p < bo_pages; ++p) words[p * page_size / 8] = bo_pattern(s, p);
      return vm_->bo_write(id, 0, std::as_bytes(std::span(words)));
    };
    // Start with every slot bound, so BO kernels mostly find them.
    for (std::uint64_t s = 0; s < bo_slots; ++s) {
      auto id = vm_->create_bo(bo_pages * page_size, s % 2 ? placement::system : placement::vram);
      if (!id.ok()) continue;
      EXPECT_EQ(fill(*id, s), errc::ok);
      EXPECT_EQ(vm_->bind(*id, bo_base + s * bo_pages * page_size, 0, bo_pages * page_size), errc::ok);
      slot[s] = *id;
    }
    while (!stop_.load()) {
      const std::uint64_t s = rng() % bo_slots;
      const va_t va = bo_base + s * bo_pages * page_size;
      switch (rng() % 4) {
        case 0:  // evict (VRAM BOs only; others say EINVAL)
          b.progress("bo: evict");
          if (slot[s]) {
            const errc e = vm_->evict(*slot[s]);
            if (e != errc::ok && e != errc::inval) error(bad_outcomes_, std::string("evict: ") + errc_name(e));
          }
          break;
        case 1:  // unbind and destroy, then a fresh BO in its place
        case 2: {
          b.progress("bo: replace");
          if (slot[s]) {
            EXPECT_EQ(vm_->unbind(va, bo_pages * page_size), errc::ok);
            EXPECT_EQ(vm_->destroy_bo(*slot[s]), errc::ok);
            slot[s].reset();
          }
          auto id = vm_->create_bo(bo_pages * page_size, rng() % 2 ? placement::vram : placement::system);
          if (!id.ok()) {
            if (id.error() != errc::nomem) error(bad_outcomes_, std::string("create_bo: ") + errc_name(id.error()));
            break;
          }
          EXPECT_EQ(fill(*id, s), errc::ok);
          EXPECT_EQ(vm_->bind(*id, va, 0, bo_pages * page_size), errc::ok);
          slot[s] = *id;
          break;
        }
        default: {  // check the contents from the CPU side
          b.progress("bo: read");
          if (!slot[s]) break;
          std::uint64_t w = 0;
          const std::uint64_t p = rng() % bo_pages;
          EXPECT_EQ(vm_->bo_read(*slot[s], p * page_size, std::as_writable_bytes(std::span(&w, 1))), errc::ok);
          if (w != bo_pattern(s, p)) error(data_errors_, "bo_read returned the wrong pattern");
        }
      }
      bo_ops_.fetch_add(1);
      std::this_thread::sleep_for(200us);
    }
    for (auto& id : slot)
      if (id) {
        (void)vm_->unbind(bo_base + (&id - slot.data()) * bo_pages * page_size, bo_pages * page_size);
        (void)vm_->destroy_bo(*id);
      }
  }

  // CPU thread t churns buffers t and t + 2.
  void cpu_thread(unsigned t, watchdog::beat& b) {
    std::mt19937_64 rng(mix(seed_, 100 + t));
    const unsigned mine[2] = {t, t + 2};
    const unsigned cpu_ops = v_.ops & ~op_bo;
    if (cpu_ops == 0) return;
    for (std::uint64_t n = 0; !stop_.load(); ++n) {
      // A short random pause, so faults get the mmap lock between operations.
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 100));
      const unsigned bi = mine[rng() % 2];
      const va_t c0 = churn_[bi];
      const std::uint64_t first = rng() % churn_pages, count = 1 + rng() % (churn_pages - first);
      const va_t a = c0 + first * page_size;
      const std::uint64_t len = count * page_size;
      unsigned op;
      do op = 1u << (rng() % 7); while (!(cpu_ops & op));
      switch (op) {
        case op_remap:
          b.progress("munmap+mmap");
          expect_ok(m_->munmap(a, len), "munmap");
          expect_ok(m_->mmap(a, len, prot::read | prot::write, map::private_ | map::anonymous | map::fixed), "mmap");
          break;
        case op_protect:
          b.progress("mprotect");
          expect_ok(m_->mprotect(a, len, rng() % 2 ? prot::read : prot::none), "mprotect");
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
          expect_ok(m_->mprotect(a, len, prot::read | prot::write), "mprotect back");
          break;
        case op_dontneed:
          b.progress("madvise");
          expect_ok(m_->madvise(a, len, madvice::dontneed), "madvise(DONTNEED)");
          break;
        case op_mremap: {
          b.progress("mremap");
          const va_t away = spare_ + bi * churn_pages * page_size;
          auto r = m_->mremap(c0, churn_pages * page_size, churn_pages * page_size,
                              mremap_flags::maymove | mremap_flags::fixed, away);
          // EFAULT: the buffer is split into several VMAs (mremap moves one).
          if (!r.ok() && r.error() != errc::fault) expect_ok(r, "mremap away");
          if (r.ok()) {
            std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
            expect_ok(m_->mremap(away, churn_pages * page_size, churn_pages * page_size,
                                 mremap_flags::maymove | mremap_flags::fixed, c0),
                      "mremap back");
          }
          break;
        }
        case op_fork: {
          b.progress("fork");
          auto child = m_->fork();
          if (!child.ok()) {
            if (child.error() != errc::nomem) error(bad_outcomes_, std::string("fork: ") + errc_name(child.error()));
            break;
          }
          // The child writes its copy (COW break in the child; the
          // parent's device mappings must not see it).
          const errc e = (*child)->store<std::uint64_t>(a + 8, 0xc41dull);
          if (e != errc::ok && e != errc::fault && e != errc::perm) error(bad_outcomes_, std::string("child store: ") + errc_name(e));
          b.progress("fork: child exit");
          child->reset();
          break;
        }
        case op_reclaim: {
          b.progress("reclaim");
          auto r = m_->reclaim(a, len);
          if (!r.ok() && r.error() != errc::nomem) error(bad_outcomes_, std::string("reclaim: ") + errc_name(r.error()));
          break;
        }
        case op_migrate: {
          b.progress("migrate");
          static const int other_owner = 0;
          auto r = m_->migrate(a, len, numa_index_, &other_owner);
          if (!r.ok() && r.error() != errc::nomem) error(bad_outcomes_, std::string("migrate: ") + errc_name(r.error()));
          break;
        }
        default:
          break;
      }
      // Sometimes the CPU writes the page too (a CPU fault, maybe a COW break).
      // (at an offset the kernels never use).
      if (rng() % 4 == 0) (void)m_->store<std::uint64_t>(a + 2048, n);
      cpu_ops_.fetch_add(1);
    }
  }

  void expect_ok(errc e, const char* what) {
    if (e != errc::ok) error(bad_outcomes_, std::string(what) + ": " + errc_name(e));
  }
  template <class T>
  void expect_ok(const result<T>& r, const char* what) {
    if (!r.ok()) error(bad_outcomes_, std::string(what) + ": " + errc_name(r.error()));
  }

  const variant& v_;
  const std::uint64_t seed_;
  const std::uint64_t rounds_target_;  ///< kernel rounds of a default run
  const double seconds_;  ///< 0: run the op budget; else run this long (soak)
  std::unique_ptr<mm> m_;
  std::shared_ptr<frame_pool> numa_;
  unsigned numa_index_ = 0;
  std::unique_ptr<driver> dev_;
  std::unique_ptr<gpu_vm> vm_;
  std::unique_ptr<access_oracle> oracle_;
  va_t base_ = 0, stable_ = 0, spare_ = 0;
  std::array<va_t, churn_bufs> churn_{};
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> data_errors_{0}, bad_outcomes_{0}, kernels_ok_{0}, kernels_failed_{0}, cpu_ops_{0}, bo_ops_{0};
  std::uint64_t rounds_ = 0;
  std::mutex err_lock_;  ///< guards first_error_ (leaf, test-only)
  std::string first_error_;
};

class StormStress : public ::testing::TestWithParam<storm_param> {};

TEST_P(StormStress, RandomCpuOperationsBesideKernelsStayCoherent) {
  const std::uint64_t dflt = 1000 + GetParam().v * 10 + static_cast<unsigned>(GetParam().mode.seq) * 3 +
                             static_cast<unsigned>(GetParam().mode.impl);
  const auto seed = static_cast<std::uint64_t>(env_double("SVM_STRESS_SEED", static_cast<double>(dflt)));
  SCOPED_TRACE("reproduce with SVM_STRESS_SEED=" + std::to_string(seed));
  storm s(variants[GetParam().v], GetParam().mode, seed, env_double("SVM_STRESS_SCALE", sanitizer_scale), 0);
  ASSERT_FALSE(HasFailure());
  s.run();
  s.check();
}

#define SVM_STORM_PARAMS(mode)                                                                   \
  storm_param{mode, 0}, storm_param{mode, 1}, storm_param{mode, 2}, storm_param{mode, 3}
INSTANTIATE_TEST_SUITE_P(
    Modes, StormStress,
    ::testing::Values(SVM_STORM_PARAMS((e2e_param{seq_mode::pgtable, mirror_impl::page})),
                      SVM_STORM_PARAMS((e2e_param{seq_mode::notifier, mirror_impl::page})),
                      SVM_STORM_PARAMS((e2e_param{seq_mode::notifier, mirror_impl::range}))),
    storm_name);

// The long run (label soak, not in the default set): every operation, both
// sequence modes, for SVM_SOAK_SECONDS each.
TEST(StormSoak, EverythingForMinutes) {
  const double secs = env_double("SVM_SOAK_SECONDS", 600);
  const auto seed = static_cast<std::uint64_t>(env_double("SVM_STRESS_SEED", 4242));
  SCOPED_TRACE("reproduce with SVM_STRESS_SEED=" + std::to_string(seed));
  for (const e2e_param mode : {e2e_param{seq_mode::pgtable, mirror_impl::page}, e2e_param{seq_mode::notifier, mirror_impl::page},
                               e2e_param{seq_mode::notifier, mirror_impl::range}}) {
    storm s(variants[3], mode, seed, 1.0, secs / 3);
    s.run();
    s.check();
  }
}

// No livelock: a CPU thread drops the very page a kernel faults on, nonstop.
// Every kernel ends, either completing or failing with EBUSY at the fault
// timeout; once the storm stops, the next kernel completes.
class ProgressStress : public ::testing::TestWithParam<e2e_param> {};

TEST_P(ProgressStress, NonstopInvalidationOfTheFaultedPageNeverHangs) {
  mm m(mm_options{.frames = 4096});
  auto dev_owner = driver::create(driver_config{.hw = {.engines = 2}}).value();
  driver& dev = *dev_owner;
  vm_config c;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  c.fault_timeout = 30ms;
  auto vm_owner = gpu_vm::create(dev, m, c).value();
  gpu_vm& vm = *vm_owner;
  access_oracle oracle(dev);
  ASSERT_EQ(oracle.watch(vm, m), errc::ok);
  auto va = m.mmap(0, page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  const va_t p = *va;
  watchdog wd("no-livelock", 120s);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> drops{0};
  std::jthread cpu([&, b = wd.enroll("cpu: dontneed storm")]() mutable {
    while (!stop.load()) {
      b.progress("madvise(DONTNEED)");
      ASSERT_EQ(m.madvise(p, page_size, madvice::dontneed), errc::ok);
      ASSERT_EQ(m.store<std::uint64_t>(p, 7), errc::ok);
      drops.fetch_add(1);
    }
  });
  watchdog::beat kb = wd.enroll("kernels");
  while (drops.load() == 0) std::this_thread::yield();  // the storm is on before the first kernel
  std::uint64_t ok = 0, busy = 0;
  const int kernels = static_cast<int>(std::max(4.0, 40 * sanitizer_scale));
  for (int k = 0; k < kernels; ++k) {
    kb.progress("kernel under the storm");
    auto h = dev.submit(vm, 4, [p](dev::work_item& wi) {
      const std::uint64_t v = wi.load<std::uint64_t>(p);
      if (v != 0 && v != 7) throw std::runtime_error("impossible value");
    });
    ASSERT_TRUE(h.ok());
    const dev::kernel_status st = h->wait(60s);
    ASSERT_NE(st.error, errc::timedout) << "a kernel hung under the invalidation storm";
    if (st.ok()) {
      ++ok;
    } else {
      EXPECT_EQ(st.error, errc::canceled);
      EXPECT_EQ(st.reason, errc::busy) << "a fault under a nonstop storm may only time out";
      EXPECT_EQ(st.address, p);
      ++busy;
    }
  }
  stop = true;
  cpu.join();
  EXPECT_GT(drops.load(), 0u);
  kb.progress("kernel after the storm");
  std::atomic<std::uint64_t> seen{0};
  auto h = dev.submit(vm, 1, [&, p](dev::work_item& wi) { seen = wi.load<std::uint64_t>(p); });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(h->wait(60s).ok()) << "no progress once the storm stopped";
  EXPECT_EQ(seen.load(), 7u);
  EXPECT_EQ(oracle.stale(), 0u);
  std::printf("[ progress ] %llu kernels completed, %llu timed out (EBUSY), %llu drops\n",
              static_cast<unsigned long long>(ok), static_cast<unsigned long long>(busy),
              static_cast<unsigned long long>(drops.load()));
}

// The timeout path, deterministically: every attempt of the fault sees its
// own window invalidated (a hook after the sequence snapshot), so it can
// never commit; the kernel fails with EBUSY at the fault timeout, and once
// the hook is gone the same access completes.
TEST_P(ProgressStress, AFaultThatCanNeverCommitTimesOutWithEbusy) {
  mm m(mm_options{.frames = 4096});
  auto dev_owner = driver::create(driver_config{.hw = {.engines = 1}}).value();
  driver& dev = *dev_owner;
  vm_config c;
  c.seq = GetParam().seq;
  c.impl = GetParam().impl;
  c.fault_timeout = 20ms;
  auto vm_owner = gpu_vm::create(dev, m, c).value();
  gpu_vm& vm = *vm_owner;
  auto va = m.mmap(0, page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  const va_t p = *va;
  ASSERT_EQ(m.store<std::uint64_t>(p, 9), errc::ok);
  watchdog wd("timeout path", 60s);
  std::atomic<std::uint64_t> attempts{0};
  vm.set_test_hooks({.after_snapshot = [&](va_range w) {
    if (!w.contains(p)) return;
    attempts.fetch_add(1);
    // Read-only and back: two real protection changes (an mprotect to the
    // protection a range already has changes nothing, as in Linux), and
    // the page stays.
    ASSERT_EQ(m.mprotect(p, page_size, prot::read), errc::ok);
    ASSERT_EQ(m.mprotect(p, page_size, prot::read | prot::write), errc::ok);
  }});
  auto h = dev.submit(vm, 1, [p](dev::work_item& wi) { (void)wi.load<std::uint64_t>(p); });
  ASSERT_TRUE(h.ok());
  const dev::kernel_status st = h->wait(30s);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::busy);
  EXPECT_EQ(st.address, p);
  EXPECT_GE(attempts.load(), 2u) << "the fault should have retried until its timeout";
  vm.set_test_hooks({});
  std::atomic<std::uint64_t> seen{0};
  auto h2 = dev.submit(vm, 1, [&, p](dev::work_item& wi) { seen = wi.load<std::uint64_t>(p); });
  ASSERT_TRUE(h2.ok());
  ASSERT_TRUE(h2->wait(30s).ok());
  EXPECT_EQ(seen.load(), 9u);
}

INSTANTIATE_TEST_SUITE_P(Modes, ProgressStress, SVM_E2E_MODES, param_name);

}  // namespace
}  // namespace svm::test
