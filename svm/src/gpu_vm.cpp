// gpu_vm: construction and teardown, the mirror windows, statistics. The
// fault path is in fault.cpp, the notifier callbacks in invalidate.cpp, the
// mirror implementations in mirror_page.cpp and mirror_range.cpp, BOs in
// bo.cpp, the driver in driver.cpp (vm_internal.h lists them).
#include "svm/svm/gpu_vm.h"

#include <algorithm>
#include <bit>
#include <ostream>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "check.h"
#include "vm_internal.h"

namespace svm {

// The device's system aperture over all of the mm's frame pools: a device
// pfn is (pool << 32) | pool pfn, so migrated pages (pool 1..) are
// reachable. It holds the pools themselves (shared ownership), never the
// mm, so the device can still reach a system BO's frames once the mm is
// gone. Slots are filled by ensure() before any PTE naming that pool is
// written (the fault path, and pool 0 at construction); engines read them
// lock-free.
class gpu_vm::sys_aperture final : public phys_mem {
 public:
  static constexpr unsigned pool_shift = mm_pool_shift;
  /// Make pool `i` of `m` reachable (idempotent). Called with the mm alive.
  void ensure(const svm::mm& m, unsigned i) {
    if (i >= cpu_pte::max_pools || slots_[i].load(std::memory_order_acquire)) return;
    lock_guard g(lock_);
    if (slots_[i].load(std::memory_order_relaxed)) return;
    owned_[i] = m.pool_ptr(i);
    // release: publishes the pool object to the engines' acquire loads.
    slots_[i].store(owned_[i].get(), std::memory_order_release);
  }
  [[nodiscard]] const std::shared_ptr<frame_pool>& pool0() const noexcept { return owned_[0]; }
  std::byte* frame_data(pfn_t pfn) noexcept override {
    frame_pool* p = slot(pfn);
    return p ? p->frame_data(pfn & ((pfn_t{1} << pool_shift) - 1)) : nullptr;
  }
  std::uint64_t frame_generation(pfn_t pfn) const noexcept override {
    frame_pool* p = slot(pfn);
    return p ? p->frame_generation(pfn & ((pfn_t{1} << pool_shift) - 1)) : 0;
  }
  pfn_t frame_count() const noexcept override { return pfn_t{cpu_pte::max_pools} << pool_shift; }

 private:
  frame_pool* slot(pfn_t pfn) const noexcept {
    const auto i = static_cast<std::size_t>(pfn >> pool_shift);
    return i < slots_.size() ? slots_[i].load(std::memory_order_acquire) : nullptr;
  }
  static constexpr lock_class aperture_class{"gpu_vm.aperture", lockdep::rank::leaf};
  /// Serialises ensure(); the slots are written once each under it.
  mutex lock_{aperture_class};
  std::array<std::atomic<frame_pool*>, cpu_pte::max_pools> slots_{};
  std::array<std::shared_ptr<frame_pool>, cpu_pte::max_pools> owned_{};  // written once per slot under lock_
};

/// The VM's subscription to its mm's teardown.
class gpu_vm::release_ops final : public mm_release_ops {
 public:
  explicit release_ops(gpu_vm& vm) noexcept : vm_(vm) {}
  void release(svm::mm&) noexcept override { vm_.on_mm_release(); }

 private:
  gpu_vm& vm_;
};

void gpu_vm::ensure_pool(unsigned pool) { sysmem_->ensure(mm_, pool); }
frame_pool& gpu_vm::pool0() const noexcept { return *sysmem_->pool0(); }

const char* to_string(seq_mode m) noexcept { return m == seq_mode::notifier ? "notifier" : "pgtable"; }
const char* to_string(mirror_impl m) noexcept { return m == mirror_impl::page ? "page" : "range"; }

// ---- window policies --------------------------------------------------------

va_range largest_window_policy::choose(va_t fault, va_range allowed) const noexcept {
  for (std::uint64_t size : {huge_size, std::uint64_t{64} << 10, page_size}) {
    const va_range w{align_down(fault, size), align_down(fault, size) + size};
    if (w.start >= allowed.start && w.end <= allowed.end) return w;
  }
  return {align_down(fault, page_size), align_down(fault, page_size) + page_size};
}

va_range fixed_window_policy::choose(va_t fault, va_range allowed) const noexcept {
  const va_range w{align_down(fault, size_), align_down(fault, size_) + size_};
  if (w.start >= allowed.start && w.end <= allowed.end) return w;
  return {align_down(fault, page_size), align_down(fault, page_size) + page_size};
}

// ---- statistics ---------------------------------------------------------------

std::uint64_t latency_histogram::total() const noexcept {
  std::uint64_t t = 0;
  for (auto c : count) t += c;
  return t;
}
std::uint64_t latency_histogram::quantile(double q) const noexcept {
  const std::uint64_t t = total();
  if (t == 0) return 0;
  const auto target = static_cast<std::uint64_t>(q * static_cast<double>(t - 1)) + 1;
  std::uint64_t seen = 0;
  for (unsigned i = 0; i < buckets; ++i) {
    seen += count[i];
    if (seen >= target) return std::uint64_t{2} << i;
  }
  return std::uint64_t{2} << (buckets - 1);
}
std::uint64_t latency_histogram::max_ns() const noexcept {
  for (unsigned i = buckets; i-- > 0;)
    if (count[i]) return std::uint64_t{2} << i;
  return 0;
}

std::string vm_stats::to_string() const {
  std::ostringstream os;
  os << *this;
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const vm_stats& s) {
  os << "faults raised " << s.faults_raised << ", serviced " << s.faults_serviced << ", cancelled "
     << s.faults_cancelled << ", valid " << s.valid_faults << "; batches " << s.batches << "; hmm calls "
     << s.hmm_calls << "; retries busy " << s.retries_busy << ", seq " << s.retries_seq << ", false "
     << s.false_retries << ", shrink " << s.retries_shrink << ", huge " << s.retries_huge << "; timeouts "
     << s.fault_timeouts << "; invalidations " << s.invalidations << "; ptes written " << s.ptes_written
     << ", zapped " << s.ptes_zapped << "; tlb invalidations " << s.tlb_invalidations << "; fault latency p50 "
     << s.latency.quantile(0.5) << " ns, p99 " << s.latency.quantile(0.99) << " ns";
  return os;
}


vm_stats gpu_vm::stats() const noexcept {
  vm_stats s;
  auto ld = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  const counters& c = *ctr_;
  s.faults_raised = ld(c.faults_raised);
  s.faults_serviced = ld(c.faults_serviced);
  s.faults_cancelled = ld(c.faults_cancelled);
  s.valid_faults = ld(c.valid_faults);
  s.batches = ld(c.batches);
  s.hmm_calls = ld(c.hmm_calls);
  s.retries_busy = ld(c.retries_busy);
  s.retries_seq = ld(c.retries_seq);
  s.false_retries = ld(c.false_retries);
  s.retries_shrink = ld(c.retries_shrink);
  s.retries_huge = ld(c.retries_huge);
  s.fault_timeouts = ld(c.fault_timeouts);
  s.invalidations = ld(c.invalidations);
  s.ptes_written = ld(c.ptes_written);
  s.ptes_zapped = ld(c.ptes_zapped);
  s.tlb_invalidations = ld(c.tlb_invalidations);
  s.huge_leaves = ld(c.huge_leaves);
  s.groups = ld(c.groups);
  s.grouped_pages = ld(c.grouped_pages);
  s.group_fallbacks = ld(c.group_fallbacks);
  s.bo_faults = ld(c.bo_faults);
  s.evictions = ld(c.evictions);
  s.preemptions = ld(c.preemptions);
  s.bo_restores = ld(c.bo_restores);
  s.migrations_to_vram = ld(c.migrations_to_vram);
  s.migrations_to_ram = ld(c.migrations_to_ram);
  s.pages_to_vram = ld(c.pages_to_vram);
  s.pages_to_ram = ld(c.pages_to_ram);
  s.svm_evictions = ld(c.svm_evictions);
  s.migrate_fallbacks = ld(c.migrate_fallbacks);
  s.retries_in_place = ld(c.retries_in_place);
  s.timeslice_waits = ld(c.timeslice_waits);
  for (unsigned i = 0; i < latency_histogram::buckets; ++i) s.latency.count[i] = ld(c.latency[i]);
  return s;
}

void gpu_vm::reset_stats() noexcept {
  counters& c = *ctr_;
  for (auto* a : {&c.faults_raised, &c.faults_serviced, &c.faults_cancelled, &c.valid_faults, &c.batches,
                  &c.hmm_calls, &c.retries_busy, &c.retries_seq, &c.false_retries, &c.retries_shrink, &c.retries_huge, &c.fault_timeouts, &c.invalidations,
                  &c.ptes_written, &c.ptes_zapped, &c.tlb_invalidations, &c.huge_leaves, &c.groups, &c.grouped_pages, &c.group_fallbacks, &c.bo_faults,
                  &c.evictions, &c.preemptions, &c.bo_restores, &c.migrations_to_vram, &c.migrations_to_ram,
                  &c.pages_to_vram, &c.pages_to_ram, &c.svm_evictions, &c.migrate_fallbacks, &c.retries_in_place, &c.timeslice_waits})
    a->store(0, std::memory_order_relaxed);
  for (auto& a : c.latency) a.store(0, std::memory_order_relaxed);
}

// ---- construction ------------------------------------------------------------

errc gpu_vm::validate(const vm_config& c) noexcept {
  if (c.chunk_size < huge_size || !std::has_single_bit(c.chunk_size)) return errc::inval;
  if (c.mode == vm_mode::long_running && c.mirror != mirror_kind::none) return errc::inval;
  if (c.fault_timeout <= std::chrono::nanoseconds::zero() || c.fault_retry_floor < 1) return errc::inval;
  if (c.mode != vm_mode::fault && c.mode != vm_mode::long_running) return errc::inval;
  if (c.mirror != mirror_kind::none && c.mirror != mirror_kind::full_mm && c.mirror != mirror_kind::windows)
    return errc::inval;
  if (c.seq != seq_mode::notifier && c.seq != seq_mode::pgtable) return errc::inval;
  if (c.impl != mirror_impl::page && c.impl != mirror_impl::range) return errc::inval;
  if (c.migrate_timeslice < std::chrono::nanoseconds::zero()) return errc::inval;
  return errc::ok;
}

result<std::unique_ptr<gpu_vm>> gpu_vm::create(driver& d, svm::mm& m, vm_config cfg) {
  errc e = validate(cfg);
  if (e != errc::ok) return e;
  std::unique_ptr<gpu_vm> vm(new gpu_vm(key{}, d, m, std::move(cfg), e));
  if (e != errc::ok) return e;  // the destructor undoes what was done
  return vm;
}

gpu_vm::gpu_vm(key, driver& d, svm::mm& m, vm_config cfg, errc& err)
    : dev_(d),
      mm_(m),
      mm_va_limit_(m.va_limit()),
      cfg_(std::move(cfg)),
      policy_(cfg_.window ? cfg_.window : std::make_shared<largest_window_policy>()),
      tree_(lock_),
      ctr_(std::make_unique<counters>()) {
  err = validate(cfg_);
  if (err != errc::ok) return;
  sysmem_ = std::make_unique<sys_aperture>();
  sysmem_->ensure(mm_, 0);
  mirror_ = cfg_.impl == mirror_impl::range ? std::unique_ptr<mirror>(std::make_unique<range_mirror>(*this))
                                             : std::make_unique<page_mirror>(*this, cfg_.seq);
  release_ = std::make_unique<release_ops>(*this);
  if ((err = mm_.add_release(*release_)) != errc::ok) {
    release_.reset();  // a torn-down mm: nothing to mirror
    return;
  }
  if (cfg_.mode == vm_mode::fault && cfg_.mirror != mirror_kind::none) {
    // The device's VRAM as a device-private pool of the mm, owned by this
    // device, with its pgmap ops (kept alive by the mm family; reused when
    // the family has it already). A full pool table only disables
    // migration: the VM works in system memory.
    pagemap_ = dev_.pagemap(driver::vm_key{});
    if (auto idx = mm_.attach_pool(dev_.vram().pool(), owner(), pagemap_); idx.ok()) vram_pool_ = *idx;
  }
  auto id = dev_.register_vm(driver::vm_key{}, this);
  if (!id) {
    err = id.error();  // ENOSPC: every VM id of the device is in use
    return;
  }
  id_ = *id;
  registered_ = true;
  if ((err = dev_.hw().attach_vm(id_, pt_, *sysmem_)) != errc::ok) return;
  attached_ = true;
  auto q = dev_.hw().create_queue(id_);
  if (!q) {
    err = q.error();
    return;
  }
  queue_ = *q;
  has_queue_ = true;
  if (cfg_.mode == vm_mode::long_running) {
    lock_guard g(lock_);
    preempt_ = fence::create("preempt");
  }
}

fence_ptr gpu_vm::preempt_fence() const {
  shared_lock_guard g(lock_);
  return preempt_;
}

bool gpu_vm::mm_released() const {
  shared_lock_guard g(lock_);
  return released_;
}

void gpu_vm::drop_chunks() {
  std::unordered_map<std::uint64_t, std::unique_ptr<chunk>> chunks;
  {
    lock_guard g(chunks_lock_);
    chunks.swap(chunks_);
  }
  for (auto& [idx, c] : chunks) c->sub.remove();  // no callback runs after this
}

void gpu_vm::on_mm_release() {
  // Runs at the start of the mm's teardown, without mmap_lock. Taking
  // vm.lock exclusive waits out every fault in service (they hold it
  // shared) and the idle handler's gc_notifiers; later ones see released_
  // and leave the mm alone.
  lock_guard g(lock_);
  released_ = true;
  // The mm frees its pages itself: only the records go.
  drop_vram_chunks(false);
  drop_chunks();
  // The mirror's PTEs go (the BO mappings stay: their frames are the
  // aperture's, not the mm's).
  std::vector<va_range> flush;
  zap_gpu({0, pt_.va_limit()}, false, flush);
  flush_tlb(flush);
}

gpu_vm::~gpu_vm() {
  // The mm first. A release that ran left released_ set, and then the mm
  // may be gone: do not touch it. Otherwise unsubscribe; once
  // remove_release() returns no release runs here (one running on another
  // thread, in an explicit mm::teardown(), is waited for).
  bool released;
  {
    shared_lock_guard g(lock_);
    released = released_;
  }
  if (release_ && !released) mm_.remove_release(*release_);
  if (has_queue_) {
    // Never free what running engines use: cancel the VM's kernels and
    // wait for their waves to leave. The VM stays registered meanwhile, so
    // faults of waves still draining are serviced or cancelled.
    errc e = dev_.hw().destroy_queue(queue_);
    if (e == errc::busy) {
      (void)dev_.hw().cancel_vm(id_, destroy_reason);
      const auto start = std::chrono::steady_clock::now();
      bool reported = false;
      while ((e = dev_.hw().destroy_queue(queue_)) == errc::busy) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (!reported && std::chrono::steady_clock::now() - start > std::chrono::seconds(10)) {
          // A work item that never touches device memory cannot be
          // stopped: say what is stuck, and keep waiting (never free under
          // it).
          reported = true;
          std::fprintf(stderr, "svm: ~gpu_vm (vm %u): a kernel still runs 10 s after its cancel; waiting:\n%s\n",
                       static_cast<unsigned>(id_), dev_.hw().describe().c_str());
        }
      }
    }
  }
  if (registered_) dev_.unregister_vm(driver::vm_key{}, id_);  // no handler is inside this VM after this
  {
    // Out of the device's eviction list before the page table goes: no
    // other VM's allocation may evict (zap, shoot down, copy) these BOs
    // from now on; remove() waits out an eviction already running.
    lock_guard g(lock_);
    for (auto& [id, b] : bos_)
      if (b->where == placement::vram) dev_.vram().remove(*b);
  }
  {
    shared_lock_guard g(lock_);
    released = released_;
  }
  // While the mm lives, this VM's VRAM chunks go back to system memory
  // (before the notifiers go: the MIGRATE zaps every VM's PTEs of them).
  if (!released) drop_vram_chunks(true);
  if (!released) drop_chunks();  // (released: the release dropped them, and the mm may be gone)
  if (attached_) (void)dev_.hw().detach_vm(id_);
  lock_guard g(lock_);
  for (auto& [id, b] : bos_) free_bo_frames(*b);
}

errc gpu_vm::add_window(va_t cpu_va, va_t gpu_va, std::uint64_t size) {
  if (cfg_.mirror != mirror_kind::windows) return errc::inval;
  if (size == 0 || !is_aligned(cpu_va | gpu_va | size, page_size)) return errc::inval;
  if (cpu_va + size < cpu_va || gpu_va + size < gpu_va) return errc::overflow;
  if (gpu_va + size > pt_.va_limit() || cpu_va + size > mm_va_limit_) return errc::inval;
  lock_guard g(lock_);
  if (released_) return errc::noent;  // the mm is gone
  const va_range gr{gpu_va, gpu_va + size}, cr{cpu_va, cpu_va + size};
  for (const window& w : windows_)
    if (gr.overlaps({w.gpu, w.gpu + w.size}) || cr.overlaps({w.cpu, w.cpu + w.size})) return errc::exist;
  windows_.push_back({cpu_va, gpu_va, size});
  lock_guard lg(log_lock_);
  windows_snapshot_ = windows_;
  return errc::ok;
}

bool gpu_vm::to_cpu_locked(va_t gva, va_t& cpu, va_range& allowed) const {
  switch (cfg_.mirror) {
    case mirror_kind::none: return false;
    case mirror_kind::full_mm:
      cpu = gva;
      allowed = {0, std::min<va_t>(pt_.va_limit(), mm_va_limit_)};
      return gva < allowed.end && trim_unbound_locked(gva, allowed);
    case mirror_kind::windows:
      for (const window& w : windows_) {
        if (gva >= w.gpu && gva < w.gpu + w.size) {
          cpu = w.cpu + (gva - w.gpu);
          allowed = {w.gpu, w.gpu + w.size};
          return trim_unbound_locked(gva, allowed);  // never into a range mirror_unbind() took out
        }
      }
      return false;
  }
  return false;
}

std::size_t gpu_vm::baseline_ranges() const { return mirror_->ranges(); }

}  // namespace svm
