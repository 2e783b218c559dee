// svm::driver: the hardware plus the fault handler threads that fetch the
// fault buffer and hand each VM its records (svm/svm/driver.h).
#include "svm/svm/driver.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "check.h"
#include "vm_internal.h"

namespace svm {

using detail::now_ns;
using detail::span_scope;

std::uint64_t trace_now_ns() noexcept {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

std::uint32_t driver_config::effective_wait_spin_ns() const noexcept {
  if (wait_spin_ns) return *wait_spin_ns;
  const unsigned hw_threads = std::max(1u, std::thread::hardware_concurrency());
  return hw.engines + handler_threads <= hw_threads ? 20'000u : 0u;
}

namespace {
dev::device_config hw_config(const driver_config& c) {
  dev::device_config h = c.hw;
  h.wait_spin_ns = c.effective_wait_spin_ns();
  return h;
}
}  // namespace

errc driver::validate(const driver_config& c) noexcept {
  if (c.batch < 1 || c.batch > 256) return errc::inval;
  if (c.handler_threads < 1) return errc::inval;
  return c.hw.validate();
}

result<std::unique_ptr<driver>> driver::create(driver_config c) {
  // Validate and start the hardware before the constructor runs, so that
  // its invariant checks below can never fire.
  if (const errc e = validate(c); e != errc::ok) return e;
  // One VRAM for BOs and migrated SVM pages: the device reaches it as its
  // VRAM aperture (svm/svm/vram.h).
  auto vram = std::make_unique<vram_manager>(c.hw.vram_bytes);
  auto hw = dev::device::create(hw_config(c), vram->pool());
  if (!hw) return hw.error();  // the wave stacks could not be mapped
  return std::make_unique<driver>(key{}, std::move(c), std::move(*hw), std::move(vram));
}

driver::driver(key, driver_config c, std::unique_ptr<dev::device> hw, std::unique_ptr<vram_manager> vram)
    : cfg_(c),
      vram_(std::move(vram)),
      pagemap_(std::make_shared<svm_pagemap>(vram_->pool(), this)),
      hw_(std::move(hw)) {
  // Invariants: create() validated cfg_ and created hw_.
  SVM_CHECK(validate(cfg_) == errc::ok, "driver_config not validated (only driver::create() constructs)");
  SVM_CHECK(hw_ != nullptr, "driver constructed without hardware (only driver::create() constructs)");
  for (unsigned i = 0; i < cfg_.handler_threads; ++i)
    handlers_.emplace_back([this](std::stop_token st) { handler_loop(st); });
}

driver::~driver() {
  for (auto& h : handlers_) h.request_stop();
  hw_->faults().wake_fetchers();
  handlers_.clear();  // joins
  shared_lock_guard g(reg_lock_);
  if (!vms_.empty()) {
    // A VM left would point at a dead driver: refuse loudly, naming it.
    std::fprintf(stderr, "svm: svm::driver destroyed while gpu_vm %u (and %zu in all) still uses it\n",
                 static_cast<unsigned>(vms_.begin()->first), vms_.size());
    std::abort();
  }
}

result<dev::completion> driver::submit(gpu_vm& vm, std::uint64_t items, dev::kernel_fn fn) {
  return hw_->submit(vm.queue(), items, std::move(fn));
}

handler_stats driver::stats() const noexcept {
  return {batches_.load(std::memory_order_relaxed), records_.load(std::memory_order_relaxed),
          coalesced_.load(std::memory_order_relaxed), unknown_.load(std::memory_order_relaxed),
          busy_ns_.load(std::memory_order_relaxed)};
}

result<dev::vm_id> driver::register_vm(vm_key, gpu_vm* vm) {
  const dev::vm_id limit = cfg_.max_vms ? std::min(cfg_.max_vms, dev::max_vm_id) : dev::max_vm_id;
  lock_guard g(reg_lock_);
  for (dev::vm_id tries = 0; tries <= limit; ++tries) {
    dev::vm_id id = next_id_;
    next_id_ = next_id_ >= limit ? 1 : next_id_ + 1;
    if (!vms_.contains(id)) {
      vms_.emplace(id, vm);
      return id;
    }
  }
  return errc::nospc;
}

void driver::unregister_vm(vm_key, dev::vm_id id) {
  lock_guard g(reg_lock_);
  vms_.erase(id);
}

void driver::handler_loop(std::stop_token st) {
  std::vector<dev::fault_record> buf(cfg_.batch);
  while (!st.stop_requested()) {
    const std::size_t n = hw_->faults().fetch_wait(buf, std::chrono::milliseconds(5));
    shared_lock_guard g(reg_lock_);
    if (n == 0) {
      gc_all();  // idle: drop the notifiers of chunks with nothing mapped
      continue;
    }
    const std::uint64_t t0 = now_ns();
    process(std::span(buf).first(n));
    busy_ns_.fetch_add(now_ns() - t0, std::memory_order_relaxed);
  }
}

void driver::gc_all() {
  for (auto& [id, vm] : vms_) vm->gc_notifiers();
}

void driver::process(std::span<dev::fault_record> recs) {
  span_scope sp(trace(), "fault_batch", recs.size());
  batches_.fetch_add(1, std::memory_order_relaxed);
  records_.fetch_add(recs.size(), std::memory_order_relaxed);
  // Sort by (vm, address): duplicates become neighbours and each VM's
  // records a run, in address order for per-2M-block grouping.
  std::sort(recs.begin(), recs.end(), [](const dev::fault_record& a, const dev::fault_record& b) {
    return a.vm != b.vm ? a.vm < b.vm : a.gva < b.gva;
  });
  for (std::size_t i = 0; i < recs.size();) {
    std::size_t j = i;
    while (j < recs.size() && recs[j].vm == recs[i].vm) ++j;
    auto run = recs.subspan(i, j - i);
    auto it = vms_.find(recs[i].vm);
    if (it == vms_.end()) {
      unknown_.fetch_add(run.size(), std::memory_order_relaxed);
      hw_->cancel(run, errc::fault);
    } else {
      coalesced_.fetch_add(it->second->service(run), std::memory_order_relaxed);
    }
    if (trace_sink* t = trace()) {
      const std::uint64_t done = now_ns();
      for (const dev::fault_record& r : run) t->fault(r.engine, r.gva, r.time_ns, done);
    }
    i = j;
  }
}

}  // namespace svm
