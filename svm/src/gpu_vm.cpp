// gpu_vm: construction and teardown, the mirror windows, statistics. The
// fault path is in fault.cpp, the notifier callbacks in invalidate.cpp, the
// mirror implementations in mirror_page.cpp and mirror_range.cpp, BOs in
// bo.cpp, the driver in driver.cpp (vm_internal.h lists them).
#include "svm/svm/gpu_vm.h"

#include <algorithm>
#include <bit>
#include <ostream>
#include <sstream>

#include "check.h"
#include "vm_internal.h"

namespace svm {

namespace {

// The device's system aperture over all of the mm's frame pools: a device
// pfn is (pool << 32) | pool pfn, so migrated pages (pool 1..) are reachable.
class mm_memory final : public phys_mem {
 public:
  explicit mm_memory(mm& m) : mm_(m) {}
  static constexpr unsigned pool_shift = mm_pool_shift;
  std::byte* frame_data(pfn_t pfn) noexcept override {
    const unsigned pool = static_cast<unsigned>(pfn >> pool_shift);
    if (pool >= mm_.pool_count()) return nullptr;
    return mm_.pool(pool).frame_data(pfn & ((pfn_t{1} << pool_shift) - 1));
  }
  std::uint64_t frame_generation(pfn_t pfn) const noexcept override {
    const unsigned pool = static_cast<unsigned>(pfn >> pool_shift);
    if (pool >= mm_.pool_count()) return 0;
    return mm_.pool(pool).frame_generation(pfn & ((pfn_t{1} << pool_shift) - 1));
  }
  pfn_t frame_count() const noexcept override { return pfn_t{mm_.pool_count()} << pool_shift; }

 private:
  mm& mm_;
};

}  // namespace

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
     << s.false_retries << "; invalidations " << s.invalidations << "; ptes written " << s.ptes_written
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
  s.invalidations = ld(c.invalidations);
  s.ptes_written = ld(c.ptes_written);
  s.ptes_zapped = ld(c.ptes_zapped);
  s.tlb_invalidations = ld(c.tlb_invalidations);
  s.huge_leaves = ld(c.huge_leaves);
  s.bo_faults = ld(c.bo_faults);
  s.evictions = ld(c.evictions);
  s.preemptions = ld(c.preemptions);
  for (unsigned i = 0; i < latency_histogram::buckets; ++i) s.latency.count[i] = ld(c.latency[i]);
  return s;
}

void gpu_vm::reset_stats() noexcept {
  counters& c = *ctr_;
  for (auto* a : {&c.faults_raised, &c.faults_serviced, &c.faults_cancelled, &c.valid_faults, &c.batches,
                  &c.hmm_calls, &c.retries_busy, &c.retries_seq, &c.false_retries, &c.invalidations,
                  &c.ptes_written, &c.ptes_zapped, &c.tlb_invalidations, &c.huge_leaves, &c.bo_faults,
                  &c.evictions, &c.preemptions})
    a->store(0, std::memory_order_relaxed);
  for (auto& a : c.latency) a.store(0, std::memory_order_relaxed);
}

// ---- construction ------------------------------------------------------------

gpu_vm::gpu_vm(driver& d, svm::mm& m, vm_config cfg)
    : dev_(d),
      mm_(m),
      cfg_(cfg),
      policy_(cfg.window ? cfg.window : std::make_shared<largest_window_policy>()),
      tree_(lock_),
      ctr_(std::make_unique<counters>()) {
  SVM_CHECK(cfg_.chunk_size >= huge_size && std::has_single_bit(cfg_.chunk_size),
            "vm_config::chunk_size must be a power of two >= 2M");
  SVM_CHECK(cfg_.mode == vm_mode::fault || cfg_.mirror == mirror_kind::none,
            "a long-running VM has no SVM mirror (it takes no faults)");
  sysmem_ = std::make_unique<mm_memory>(mm_);
  mirror_ = cfg_.impl == mirror_impl::range ? std::unique_ptr<mirror>(std::make_unique<range_mirror>(*this))
                                             : std::make_unique<page_mirror>(*this, cfg_.seq);
  auto id = dev_.register_vm(driver::vm_key{}, this);
  SVM_CHECK(id.ok(), "no free VM id on the device");
  id_ = *id;
  SVM_CHECK(dev_.hw().attach_vm(id_, pt_, *sysmem_) == errc::ok, "attach_vm failed");
  auto q = dev_.hw().create_queue(id_);
  SVM_CHECK(q.ok(), "create_queue failed");
  queue_ = *q;
  if (cfg_.mode == vm_mode::long_running) {
    lock_guard g(lock_);
    preempt_ = fence::create("preempt");
  }
}

fence_ptr gpu_vm::preempt_fence() const {
  shared_lock_guard g(lock_);
  return preempt_;
}

gpu_vm::~gpu_vm() {
  (void)dev_.hw().destroy_queue(queue_);
  dev_.unregister_vm(driver::vm_key{}, id_);  // no handler is inside this VM after this
  std::unordered_map<std::uint64_t, std::unique_ptr<chunk>> chunks;
  {
    lock_guard g(chunks_lock_);
    chunks.swap(chunks_);
  }
  for (auto& [idx, c] : chunks) c->sub.remove();  // no callback runs after this
  (void)dev_.hw().detach_vm(id_);
  lock_guard g(lock_);
  for (auto& [id, b] : bos_) free_bo_frames(*b);
}

errc gpu_vm::add_window(va_t cpu_va, va_t gpu_va, std::uint64_t size) {
  if (cfg_.mirror != mirror_kind::windows) return errc::inval;
  if (size == 0 || !is_aligned(cpu_va | gpu_va | size, page_size)) return errc::inval;
  if (cpu_va + size < cpu_va || gpu_va + size < gpu_va) return errc::overflow;
  if (gpu_va + size > pt_.va_limit() || cpu_va + size > mm_.va_limit()) return errc::inval;
  lock_guard g(lock_);
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
      allowed = {0, std::min<va_t>(pt_.va_limit(), mm_.va_limit())};
      return gva < allowed.end;
    case mirror_kind::windows:
      for (const window& w : windows_) {
        if (gva >= w.gpu && gva < w.gpu + w.size) {
          cpu = w.cpu + (gva - w.gpu);
          allowed = {w.gpu, w.gpu + w.size};
          return true;
        }
      }
      return false;
  }
  return false;
}

std::size_t gpu_vm::baseline_ranges() const { return mirror_->ranges(); }

}  // namespace svm
