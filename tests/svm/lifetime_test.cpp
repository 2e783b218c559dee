// Object lifetimes and construction errors of the driver: destroying a VM
// while its kernels run, destroying the mm before the VM, configurations
// and resource limits that must come back as error codes, and the fault
// retry bound (by progress, not by the clock alone).
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "svm/notifier/hmm.h"
#include "svm/svm/driver.h"
#include "svm/svm/gpu_vm.h"

namespace svm::test {
namespace {

using namespace std::chrono_literals;

struct env {
  std::unique_ptr<mm> m = std::make_unique<mm>(mm_options{.frames = 4096});
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm;
  explicit env(vm_config c = {}, dev::device_config hw = {.engines = 2}) {
    dev = driver::create(driver_config{.hw = hw}).value();
    auto v = gpu_vm::create(*dev, *m, std::move(c));
    EXPECT_TRUE(v.ok());
    if (v.ok()) vm = std::move(*v);
  }
  ~env() {
    vm.reset();
    dev.reset();
    m.reset();
  }
  /// Map `bytes` (4K pages only) and store `value` in every `stride`-th page.
  va_t populate(std::uint64_t bytes, std::uint64_t value, std::uint64_t stride = page_size) {
    auto va = m->mmap(0, bytes, prot::read | prot::write, map::private_ | map::anonymous);
    EXPECT_TRUE(va.ok());
    EXPECT_EQ(m->madvise(*va, bytes, madvice::nohugepage), errc::ok);
    for (va_t a = *va; a < *va + bytes; a += stride) EXPECT_EQ(m->store<std::uint64_t>(a, value), errc::ok);
    return *va;
  }
  dev::kernel_status read(va_t va, std::uint64_t* out) {
    std::atomic<std::uint64_t> v{~0ull};
    auto c = dev->submit(*vm, 1, [&v, va](dev::work_item& wi) { v = wi.load<std::uint64_t>(va); });
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {c.error()};
    auto st = c->wait(60s);
    if (out) *out = v.load();
    return st;
  }
};

template <class F>
vm_config cfg(F f) {
  vm_config c;
  f(c);
  return c;
}

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
  return v;
}

// ---- teardown ------------------------------------------------------------------

// A kernel that never ends by itself (it loops over mapped SVM and BO
// memory) runs while its VM is destroyed: the destructor cancels it with
// gpu_vm::destroy_reason and waits for its waves to leave before the page
// table and the BO frames go (ASan sees any access after the free).
TEST(Lifetime, DestroyVmWhileKernelRunsCancelsAndWaits) {
  env e;
  const va_t va = e.populate(4 * page_size, 5);
  auto bo = e.vm->create_bo(4 * page_size, placement::vram);
  ASSERT_TRUE(bo.ok());
  const va_t bo_va = 0x40000000;
  ASSERT_EQ(e.vm->bind(*bo, bo_va, 0, 4 * page_size), errc::ok);
  std::atomic<unsigned> running{0};
  auto c = e.dev->submit(*e.vm, 2, [&](dev::work_item& wi) {
    running.fetch_add(1);
    const va_t a = wi.id() == 0 ? va : bo_va;
    for (std::uint64_t i = 0;; ++i) (void)wi.load<std::uint64_t>(a + (i % 4) * page_size);
  });
  ASSERT_TRUE(c.ok());
  while (running.load() < 2) std::this_thread::sleep_for(1ms);
  e.vm.reset();  // cancels, waits, then frees
  const dev::kernel_status st = c->wait(60s);
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, gpu_vm::destroy_reason);
  // The device is still usable: a new VM on it runs kernels.
  auto v2 = gpu_vm::create(*e.dev, *e.m);
  ASSERT_TRUE(v2.ok());
  e.vm = std::move(*v2);
  std::uint64_t got = 0;
  EXPECT_TRUE(e.read(va, &got).ok());
  EXPECT_EQ(got, 5u);
}

// A VM whose kernels finished is destroyed without a cancel: nothing is
// cancelled that did not need it.
TEST(Lifetime, DestroyIdleVmCancelsNothing) {
  env e;
  const va_t va = e.populate(page_size, 9);
  auto c = e.dev->submit(*e.vm, 1, [va](dev::work_item& wi) { (void)wi.load<std::uint64_t>(va); });
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->wait(60s).ok());
  e.vm.reset();
  EXPECT_TRUE(c->wait(1s).ok());  // its status stays
}

// The mm goes first while the VM holds a system BO, SVM mappings and
// notifiers: the mm's release drops what the VM holds of it; the BO keeps
// its frames (the VM holds their pool) and works; SVM faults fail cleanly.
TEST(Lifetime, MmDestroyedBeforeVmWithSystemBo) {
  for (auto [seq_b, impl_b] : {std::pair{seq_mode::pgtable, mirror_impl::page}, std::pair{seq_mode::notifier, mirror_impl::page},
                           std::pair{seq_mode::notifier, mirror_impl::range}}) {
    // Plain copies: clang 14 cannot capture structured bindings in lambdas.
    const seq_mode seq = seq_b;
    const mirror_impl impl = impl_b;
    SCOPED_TRACE(std::string(to_string(seq)) + "_" + to_string(impl));
    env e(cfg([&](vm_config& k) { k.seq = seq; k.impl = impl; }));
    const va_t va = e.populate(4 * page_size, 11);
    std::uint64_t got = 0;
    ASSERT_TRUE(e.read(va, &got).ok());
    ASSERT_EQ(got, 11u);
    auto bo = e.vm->create_bo(2 * page_size, placement::system);
    ASSERT_TRUE(bo.ok());
    const auto pat = pattern(2 * page_size, 3);
    ASSERT_EQ(e.vm->bo_write(*bo, 0, pat), errc::ok);
    const va_t bo_va = 0x40000000;
    ASSERT_EQ(e.vm->bind(*bo, bo_va, 0, 2 * page_size), errc::ok);
    ASSERT_TRUE(e.read(bo_va, &got).ok());
    EXPECT_FALSE(e.vm->mm_released());

    e.m.reset();  // the mm goes first

    EXPECT_TRUE(e.vm->mm_released());
    EXPECT_EQ(e.vm->page_table().translate(va).entry & 1, 0u) << "an SVM PTE survived the release";
    // The BO still works from the device and the CPU side.
    std::uint64_t want;
    std::memcpy(&want, pat.data(), sizeof want);
    ASSERT_TRUE(e.read(bo_va, &got).ok());
    EXPECT_EQ(got, want);
    std::vector<std::byte> back(2 * page_size);
    ASSERT_EQ(e.vm->bo_read(*bo, 0, back), errc::ok);
    EXPECT_EQ(back, pat);
    // SVM accesses fail cleanly; so do mirror operations.
    const dev::kernel_status st = e.read(va, nullptr);
    EXPECT_EQ(st.error, errc::canceled);
    EXPECT_EQ(st.reason, errc::fault);
    EXPECT_EQ(e.vm->gc_notifiers(), 0u);
    EXPECT_EQ(e.vm->unbind(bo_va, page_size), errc::ok);
    EXPECT_EQ(e.vm->destroy_bo(*bo), errc::ok);
    auto bo2 = e.vm->create_bo(page_size, placement::system);
    EXPECT_TRUE(bo2.ok());
    // ~env destroys the VM with its mm gone.
  }
}

// The mm's release races a fault in flight, deterministically: the fault
// stops between its sequence snapshot and hmm_range_fault while another
// thread destroys the mm. A release subscriber placed before the VM's tells
// the fault that the teardown has begun; the VM's release then waits for
// vm.lock, which the fault holds, so the fault's walk and commit still see
// a live mm. Afterwards the release zaps the mapping and the kernel's next
// fault fails cleanly (ECANCELED, reason EFAULT) without touching the dead
// mm (ASan sees any access to it).
TEST(Lifetime, MmReleaseRacingAnInFlightFaultWaitsForItThenFailsLaterFaults) {
  for (auto [seq_b, impl_b] : {std::pair{seq_mode::pgtable, mirror_impl::page}, std::pair{seq_mode::notifier, mirror_impl::page},
                           std::pair{seq_mode::notifier, mirror_impl::range}}) {
    // Plain copies: clang 14 cannot capture structured bindings in lambdas.
    const seq_mode seq = seq_b;
    const mirror_impl impl = impl_b;
    SCOPED_TRACE(std::string(to_string(seq)) + "_" + to_string(impl));
    auto m = std::make_unique<mm>(mm_options{.frames = 1024});
    struct probe final : mm_release_ops {
      std::atomic<bool> started{false};
      void release(mm&) noexcept override { started.store(true); }
    } first, last;
    ASSERT_EQ(m->add_release(first), errc::ok);  // runs before the VM's release
    auto dev = driver::create(driver_config{.hw = {.engines = 1}}).value();
    auto v = gpu_vm::create(*dev, *m, cfg([&](vm_config& k) { k.seq = seq; k.impl = impl; }));
    ASSERT_TRUE(v.ok());
    std::unique_ptr<gpu_vm> vm = std::move(*v);
    ASSERT_EQ(m->add_release(last), errc::ok);  // ... and this one after it
    auto va = m->mmap(0, 4 * page_size, prot::read | prot::write, map::private_ | map::anonymous);
    ASSERT_TRUE(va.ok());
    // b in a VMA of its own (read-only, so it never merges with a's): no
    // fault window of a can reach it, so its load must fault after the
    // release instead of hitting a mapping a's window made.
    auto vb = m->mmap(0, 4 * page_size, prot::read, map::private_ | map::anonymous);
    ASSERT_TRUE(vb.ok());
    const va_t a = *va, b = *vb + 2 * page_size;
    ASSERT_EQ(m->store<std::uint64_t>(a, 41), errc::ok);
    std::thread killer;
    std::atomic<int> calls{0};
    std::atomic<bool> raced{false};
    vm->set_test_hooks({.after_snapshot = [&](va_range) {
      if (calls.fetch_add(1) != 0) return;
      killer = std::thread([&m] { m.reset(); });
      const auto end = std::chrono::steady_clock::now() + 20s;
      while (!first.started.load() && std::chrono::steady_clock::now() < end) std::this_thread::yield();
      // The teardown has begun, and the VM's release (before `last`) waits
      // for this fault.
      raced.store(first.started.load() && !last.started.load());
    }});
    std::atomic<std::uint64_t> got{0};
    auto c = dev->submit(*vm, 1, [&got, &last, a, b](dev::work_item& wi) {
      got = wi.load<std::uint64_t>(a);
      // Wait until the VM's release is over (`last` runs after it): a fault
      // serviced between the start of the teardown and the VM's release may
      // still succeed on the intact mm, so only then is the next one's
      // failure certain.
      const auto end = std::chrono::steady_clock::now() + 20s;
      while (!last.started.load() && std::chrono::steady_clock::now() < end) wi.yield();
      (void)wi.load<std::uint64_t>(b);  // faults after the release
    });
    ASSERT_TRUE(c.ok());
    const dev::kernel_status st = c->wait(60s);
    if (killer.joinable()) killer.join();
    EXPECT_TRUE(raced.load()) << "the teardown did not start while the fault was in flight";
    EXPECT_EQ(st.error, errc::canceled);
    EXPECT_EQ(st.reason, errc::fault);
    EXPECT_TRUE(vm->mm_released());
    EXPECT_TRUE(last.started.load());
    EXPECT_EQ(vm->page_table().translate(a).entry & 1, 0u) << "an SVM PTE survived the release";
    EXPECT_EQ(vm->page_table().translate(b).entry & 1, 0u);
    // The fault in flight finished on the live mm: the first load either
    // read the CPU's value or was itself cancelled after the zap.
    EXPECT_TRUE(got.load() == 41 || got.load() == 0) << got.load();
    EXPECT_GE(vm->stats().faults_serviced, 1u);
    vm->set_test_hooks({});
    vm.reset();
    dev.reset();
  }
}

TEST(Lifetime, MmTornDownBeforeVmCreationIsEinval) {
  mm m(mm_options{.frames = 256});
  auto d_owner = driver::create(driver_config{.hw = {.engines = 1}}).value();
  driver& d = *d_owner;
  m.teardown();
  auto v = gpu_vm::create(d, m);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error(), errc::inval);
}

TEST(Lifetime, DestroyDriverWithLiveVmRefusesLoudlyNamingIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        auto m = std::make_unique<mm>(mm_options{.frames = 256});
        auto d = driver::create(driver_config{.hw = {.engines = 1}}).value();
        auto v = gpu_vm::create(*d, *m);
        if (!v.ok()) std::abort();
        (void)v->release();  // leaked on purpose: the VM outlives its driver
        d.reset();
      },
      "svm::driver destroyed while gpu_vm 1");
}

// ---- construction errors and resource limits ---------------------------------------

TEST(Lifetime, InvalidVmConfigIsEinval) {
  mm m(mm_options{.frames = 256});
  auto d_owner = driver::create(driver_config{.hw = {.engines = 1}}).value();
  driver& d = *d_owner;
  std::vector<vm_config> bad;
  bad.push_back(cfg([&](vm_config& k) { k.chunk_size = 3; }));
  bad.push_back(cfg([&](vm_config& k) { k.chunk_size = huge_size + page_size; }));
  bad.push_back(cfg([&](vm_config& k) { k.mode = vm_mode::long_running; }));  // the default mirror: full_mm
  bad.push_back(cfg([&](vm_config& k) { k.fault_timeout = 0ns; }));
  bad.push_back(cfg([&](vm_config& k) { k.fault_timeout = -1s; }));
  bad.push_back(cfg([&](vm_config& k) { k.fault_retry_floor = 0; }));
  bad.push_back(cfg([&](vm_config& k) { k.mirror = static_cast<mirror_kind>(7); }));
  for (const vm_config& c : bad) {
    EXPECT_EQ(gpu_vm::validate(c), errc::inval);
    auto v = gpu_vm::create(d, m, c);
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.error(), errc::inval);
  }
  // Nothing was left registered: a valid VM gets the first id.
  auto ok = gpu_vm::create(d, m, cfg([&](vm_config& k) { k.mode = vm_mode::long_running; k.mirror = mirror_kind::none; }));
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ((*ok)->id(), 1u);
}

// The factories are the only way in: no constructor takes an unvalidated
// configuration from outside the classes.
static_assert(!std::is_default_constructible_v<driver>);
static_assert(!std::is_constructible_v<driver, driver_config>);
static_assert(!std::is_constructible_v<gpu_vm, driver&, mm&>);
static_assert(!std::is_constructible_v<gpu_vm, driver&, mm&, vm_config>);

TEST(Lifetime, DriverBatchZeroIsEinval) {
  for (driver_config c : {driver_config{.batch = 0}, driver_config{.batch = 257}, driver_config{.handler_threads = 0},
                          driver_config{.hw = {.engines = 0}}}) {
    EXPECT_EQ(driver::validate(c), errc::inval);
    auto d = driver::create(c);
    ASSERT_FALSE(d.ok());
    EXPECT_EQ(d.error(), errc::inval);
  }
  auto d = driver::create(driver_config{.hw = {.engines = 1}, .batch = 1});
  ASSERT_TRUE(d.ok());
}

// Every VM id in use: the next VM is ENOSPC (no abort), and a freed id is
// reused. The driver's id space is cut to a few ids (max_vms); the
// default, the device's whole id space, takes the same path.
TEST(Lifetime, VmIdsExhaustedIsEnospc) {
  mm m(mm_options{.frames = 64});
  auto d_owner = driver::create(driver_config{.hw = {.engines = 1}, .max_vms = 200}).value();
  driver& d = *d_owner;
  std::vector<std::unique_ptr<gpu_vm>> vms;
  const vm_config c = cfg([](vm_config& k) { k.mode = vm_mode::long_running; k.mirror = mirror_kind::none; });
  for (;;) {
    auto v = gpu_vm::create(d, m, c);
    if (!v.ok()) {
      EXPECT_EQ(v.error(), errc::nospc);
      break;
    }
    vms.push_back(std::move(*v));
    ASSERT_LE(vms.size(), 200u);
  }
  EXPECT_EQ(vms.size(), 200u);  // ids 1..200
  const dev::vm_id freed = vms[100]->id();
  vms[100].reset();
  auto again = gpu_vm::create(d, m, c);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->id(), freed);
  again->reset();
  vms.clear();
}

TEST(Lifetime, CreateBoHugeIsEnomemWithoutException) {
  env e;
  for (placement p : {placement::vram, placement::system}) {
    result<bo_id> r = errc::ok;
    EXPECT_NO_THROW(r = e.vm->create_bo(std::uint64_t{1} << 62, p));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error(), errc::nomem);
  }
  auto r = e.vm->create_bo(page_size, static_cast<placement>(9));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error(), errc::inval);
}

// A VRAM BO larger than VRAM, or larger than free VRAM plus what evicting
// every other VRAM user of the device could free, fails before anything is
// evicted; one that fits after eviction evicts in LRU order, and only as
// much as it needs.
TEST(Lifetime, VramBoLargerThanVramFailsBeforeEvicting) {
  env e({}, {.engines = 1, .vram_bytes = 64 * page_size});
  auto a = e.vm->create_bo(16 * page_size, placement::vram);
  auto b = e.vm->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(a.ok() && b.ok());
  const auto pa = pattern(16 * page_size, 1), pb = pattern(16 * page_size, 2);
  ASSERT_EQ(e.vm->bo_write(*a, 0, pa), errc::ok);
  ASSERT_EQ(e.vm->bo_write(*b, 0, pb), errc::ok);
  // Another VM on the device holds 16 VRAM pages too.
  auto other = gpu_vm::create(*e.dev, *e.m);
  ASSERT_TRUE(other.ok());
  auto o = (*other)->create_bo(16 * page_size, placement::vram);
  ASSERT_TRUE(o.ok());

  for (std::uint64_t pages : {65u, 100u}) {  // > VRAM (= free 16 + evictable 48)
    auto r = e.vm->create_bo(pages * page_size, placement::vram);
    ASSERT_FALSE(r.ok()) << pages;
    EXPECT_EQ(r.error(), errc::nomem);
    EXPECT_EQ(e.vm->stats().evictions, 0u) << pages;
    EXPECT_EQ((*other)->stats().evictions, 0u) << pages;
    EXPECT_EQ(*e.vm->bo_placement(*a), placement::vram);
    EXPECT_EQ(*e.vm->bo_placement(*b), placement::vram);
  }
  EXPECT_EQ(e.dev->vram().stats().used_frames, 48u);
  // What fits after evicting succeeds and evicts the least recently used
  // (a, then b), not the other VM's newer BO.
  auto fits = e.vm->create_bo(48 * page_size, placement::vram);
  ASSERT_TRUE(fits.ok());
  EXPECT_EQ(e.vm->stats().evictions, 2u);
  EXPECT_EQ((*other)->stats().evictions, 0u);
  EXPECT_EQ(*e.vm->bo_placement(*a), placement::system);
  EXPECT_EQ(*(*other)->bo_placement(*o), placement::vram);
  std::vector<std::byte> back(16 * page_size);
  ASSERT_EQ(e.vm->bo_read(*a, 0, back), errc::ok);
  EXPECT_EQ(back, pa);
  ASSERT_EQ(e.vm->bo_read(*b, 0, back), errc::ok);
  EXPECT_EQ(back, pb);
  (*other).reset();
}

// ---- retries bounded by progress ---------------------------------------------------

// A fault whose threads were descheduled past fault_timeout, and whose
// window saw no invalidation (the ones it saw hit another block of its
// chunk), completes: the clock alone does not end it, and neither do more
// than fault_retry_floor retries that no invalidation of the window
// explains. In the notifier-wide modes each of its first 12 attempts is
// made stale by another block: 6 times by one invalidation (a false retry
// the VM's log proves), 6 times by 70 (the 64-entry log wraps: unknown).
TEST(Lifetime, DescheduledFaultWithoutInvalidationOfItsWindowCompletes) {
  for (auto [seq_b, impl_b] : {std::pair{seq_mode::notifier, mirror_impl::page}, std::pair{seq_mode::notifier, mirror_impl::range},
                           std::pair{seq_mode::pgtable, mirror_impl::page}}) {
    // Plain copies: clang 14 cannot capture structured bindings in lambdas.
    const seq_mode seq = seq_b;
    const mirror_impl impl = impl_b;
    SCOPED_TRACE(std::string(to_string(seq)) + "_" + to_string(impl));
    env e(cfg([&](vm_config& k) { k.seq = seq; k.impl = impl; k.fault_timeout = 1ms; }));
    const va_t va = e.populate(8 * huge_size, 21, huge_size / 4);
    const va_t target = align_up(va, huge_size);
    const va_t elsewhere = target + 2 * huge_size;  // another 2M block, same chunk
    std::atomic<int> calls{0};
    e.vm->set_test_hooks({.after_snapshot = [&](va_range) {
      const int call = calls.fetch_add(1);
      if (call >= 12) return;
      if (call == 0) std::this_thread::sleep_for(20ms);  // descheduled, 20x the timeout
      for (int k = 0; k < (call < 6 ? 1 : 70); ++k) {
        EXPECT_EQ(e.m->store<std::uint64_t>(elsewhere, 1), errc::ok);
        EXPECT_EQ(e.m->madvise(elsewhere, page_size, madvice::dontneed), errc::ok);
      }
    }});
    std::uint64_t got = 0;
    const dev::kernel_status st = e.read(target, &got);
    EXPECT_TRUE(st.ok()) << errc_name(st.error) << " reason " << errc_name(st.reason);
    EXPECT_EQ(got, 21u);
    const vm_stats s = e.vm->stats();
    EXPECT_EQ(s.fault_timeouts, 0u);
    if (seq == seq_mode::notifier) {
      EXPECT_GE(s.retries_busy + s.retries_seq, 12u) << "the chunk-wide sequence must have made it retry";
      EXPECT_GE(s.false_retries, 6u);
      EXPECT_GE(calls.load(), 13);
    }
  }
}

// A genuine retry storm (every attempt's window is invalidated) still ends:
// EBUSY once fault_timeout has passed and the floor of retries is reached.
TEST(Lifetime, RetryStormOnTheWindowStillTimesOut) {
  for (auto impl : {mirror_impl::page, mirror_impl::range}) {
    SCOPED_TRACE(to_string(impl));
    env e(cfg([&](vm_config& k) { k.seq = seq_mode::notifier; k.impl = impl; k.fault_timeout = 2ms; k.fault_retry_floor = 8; }));
    const va_t va = e.populate(huge_size, 31);
    e.vm->set_test_hooks({.after_snapshot = [&](va_range w) {
      EXPECT_EQ(e.m->madvise(w.start, page_size, madvice::dontneed), errc::ok);  // the window itself
    }});
    const dev::kernel_status st = e.read(va, nullptr);
    EXPECT_EQ(st.error, errc::canceled);
    EXPECT_EQ(st.reason, errc::busy);
    const vm_stats s = e.vm->stats();
    EXPECT_EQ(s.fault_timeouts, 1u);
    EXPECT_GE(s.retries_busy + s.retries_seq, 8u);
    EXPECT_EQ(s.false_retries, 0u) << "each retry's window was invalidated";
  }
}

// The opposite bug: a driver's retry loop that never refreshes its notifier
// sequence spins until its timeout. hmm_range_fault reports it.
TEST(Lifetime, RetryLoopReusingStaleSequenceIsReported) {
  mm m(mm_options{.frames = 256});
  auto va = m.mmap(0, 4 * page_size, prot::read | prot::write, map::private_ | map::anonymous);
  ASSERT_TRUE(va.ok());
  struct ops final : interval_notifier_ops {
    bool invalidate(interval_notifier& sub, const mmu_notifier_range&, std::uint64_t cur) override {
      sub.set_seq(cur);
      return true;
    }
  } o;
  interval_notifier sub;
  ASSERT_EQ(sub.insert(m, *va, 4 * page_size, o), errc::ok);
  std::array<hmm_pfn, 4> pfns{};
  auto attempt = [&](std::uint64_t seq) {
    hmm_range r;
    r.notifier = &sub;
    r.notifier_seq = seq;
    r.start = *va;
    r.end = *va + 4 * page_size;
    r.hmm_pfns = pfns;
    r.default_flags = hmm_req::fault;
    mm::read_guard g(m);
    return hmm_range_fault(r);
  };
  // A correct loop: EBUSY, then a fresh sequence.
  const std::uint64_t before = hmm_stale_sequence_reuses();
  std::uint64_t seq = sub.read_begin();
  ASSERT_EQ(m.madvise(*va, page_size, madvice::dontneed), errc::ok);
  EXPECT_EQ(attempt(seq), errc::busy);
  seq = sub.read_begin();
  EXPECT_EQ(attempt(seq), errc::ok);
  EXPECT_EQ(hmm_stale_sequence_reuses(), before);
  // The buggy loop: the same stale sequence again.
  ASSERT_EQ(m.madvise(*va, page_size, madvice::dontneed), errc::ok);
  EXPECT_EQ(attempt(seq), errc::busy);
  EXPECT_EQ(attempt(seq), errc::busy);
  EXPECT_EQ(attempt(seq), errc::busy);
  EXPECT_EQ(hmm_stale_sequence_reuses(), before + 2);
  sub.remove();
}

}  // namespace
}  // namespace svm::test
