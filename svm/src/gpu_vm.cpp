// The driver: fault handler, page-centric SVM mirror, BO mappings.
#include "svm/svm/gpu_vm.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <ostream>
#include <optional>
#include <sstream>

#include "check.h"
#include "vm_internal.h"
#include "svm/base/epoch.h"

namespace svm {

using dev::dev_pte;
using clock_type = std::chrono::steady_clock;

namespace {

std::uint64_t now_ns() { return trace_now_ns(); }

// A trace span around a scope, when a sink is installed.
class span_scope {
 public:
  span_scope(trace_sink* t, const char* name, std::uint64_t arg = 0) noexcept
      : t_(t), name_(name), arg_(arg), start_(t ? now_ns() : 0) {}
  ~span_scope() {
    if (t_) t_->span(name_, start_, now_ns() - start_, arg_);
  }
  span_scope(const span_scope&) = delete;
  span_scope& operator=(const span_scope&) = delete;

 private:
  trace_sink* t_;
  const char* name_;
  std::uint64_t arg_;
  std::uint64_t start_;
};

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

va_range intersect(va_range a, va_range b) noexcept {
  va_range r{std::max(a.start, b.start), std::min(a.end, b.end)};
  if (r.end < r.start) r.end = r.start;
  return r;
}

}  // namespace

std::uint64_t trace_now_ns() noexcept {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count());
}

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

/// The VM's counters: relaxed atomics, statistics only.
struct gpu_vm::counters {
  std::atomic<std::uint64_t> faults_raised{0}, faults_serviced{0}, faults_cancelled{0}, valid_faults{0},
      batches{0}, hmm_calls{0}, retries_busy{0}, retries_seq{0}, false_retries{0}, invalidations{0},
      ptes_written{0}, ptes_zapped{0}, tlb_invalidations{0}, huge_leaves{0}, bo_faults{0}, evictions{0},
      preemptions{0};
  std::array<std::atomic<std::uint64_t>, latency_histogram::buckets> latency{};
};
namespace {
void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }
}  // namespace

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

// ---- the device and its fault handler -----------------------------------------

std::uint32_t device_config::effective_wait_spin_ns() const noexcept {
  if (wait_spin_ns) return *wait_spin_ns;
  const unsigned hw_threads = std::max(1u, std::thread::hardware_concurrency());
  return hw.engines + handler_threads <= hw_threads ? 20'000u : 0u;
}

namespace {
dev::device_config hw_config(const device_config& c) {
  dev::device_config h = c.hw;
  h.wait_spin_ns = c.effective_wait_spin_ns();
  return h;
}
}  // namespace

device::device(device_config c) : cfg_(c), hw_(hw_config(c)) {
  SVM_CHECK(cfg_.batch >= 1 && cfg_.batch <= 256, "device_config::batch must be 1..256");
  SVM_CHECK(cfg_.handler_threads >= 1, "device_config::handler_threads must be >= 1");
  for (unsigned i = 0; i < cfg_.handler_threads; ++i)
    handlers_.emplace_back([this](std::stop_token st) { handler_loop(st); });
}

device::~device() {
  for (auto& h : handlers_) h.request_stop();
  hw_.faults().wake_fetchers();
  handlers_.clear();  // joins
  shared_lock_guard g(reg_lock_);
  SVM_CHECK(vms_.empty(), "svm::device destroyed while a gpu_vm still uses it");
}

result<dev::completion> device::submit(gpu_vm& vm, std::uint64_t items, dev::kernel_fn fn) {
  return hw_.submit(vm.queue(), items, std::move(fn));
}

handler_stats device::stats() const noexcept {
  return {batches_.load(std::memory_order_relaxed), records_.load(std::memory_order_relaxed),
          coalesced_.load(std::memory_order_relaxed), unknown_.load(std::memory_order_relaxed),
          busy_ns_.load(std::memory_order_relaxed)};
}

result<dev::vm_id> device::register_vm(gpu_vm* vm) {
  lock_guard g(reg_lock_);
  for (dev::vm_id tries = 0; tries <= dev::max_vm_id; ++tries) {
    dev::vm_id id = next_id_;
    next_id_ = next_id_ >= dev::max_vm_id ? 1 : next_id_ + 1;
    if (!vms_.contains(id)) {
      vms_.emplace(id, vm);
      return id;
    }
  }
  return errc::nospc;
}

void device::unregister_vm(dev::vm_id id) {
  lock_guard g(reg_lock_);
  vms_.erase(id);
}

void device::handler_loop(std::stop_token st) {
  std::vector<dev::fault_record> buf(cfg_.batch);
  while (!st.stop_requested()) {
    const std::size_t n = hw_.faults().fetch_wait(buf, std::chrono::milliseconds(5));
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

void device::gc_all() {
  for (auto& [id, vm] : vms_) vm->gc_notifiers();
}

void device::process(std::span<dev::fault_record> recs) {
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
      hw_.cancel(run, errc::fault);
    } else {
      it->second->service(run);
    }
    if (trace_sink* t = trace()) {
      const std::uint64_t done = now_ns();
      for (const dev::fault_record& r : run) t->fault(r.engine, r.gva, r.time_ns, done);
    }
    i = j;
  }
}

// ---- per-chunk notifiers --------------------------------------------------------

class gpu_vm::chunk_ops final : public interval_notifier_ops {
 public:
  chunk_ops(gpu_vm& vm, chunk& c) : vm_(vm), c_(c) {}
  bool invalidate(interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq) override {
    return vm_.invalidate(c_, sub, r, cur_seq);
  }

 private:
  gpu_vm& vm_;
  chunk& c_;
};

/// One lazily inserted interval notifier over an aligned CPU chunk.
struct gpu_vm::chunk {
  static constexpr lock_class mirror_class{"gpu_vm.chunk.mirror", lockdep::rank::mirror};
  chunk(gpu_vm& vm, std::uint64_t idx, va_range r) : index(idx), cpu(r), ops(vm, *this) {}
  const std::uint64_t index;
  const va_range cpu;
  interval_notifier sub;
  chunk_ops ops;
  /// The notifier-wide mode's driver lock: the callback holds it exclusive
  /// around set_seq() and the PTE clear; a fault holds it shared around
  /// read_retry() and the PTE write.
  shared_mutex mirror_lock{mirror_class};
  /// 0 inserting, 1 inserted, 2 insert failed. Written once by the
  /// inserting thread (release); others wait on it (acquire).
  std::atomic<std::uint32_t> state{0};
  errc insert_error = errc::ok;  // written before state is released
  /// Faults using this chunk; guarded by gpu_vm::chunks_lock_.
  unsigned users = 0;
};

gpu_vm::chunk* gpu_vm::get_chunk(va_t cpu_va) {
  const std::uint64_t idx = cpu_va / cfg_.chunk_size;
  chunk* c;
  bool creator = false;
  {
    lock_guard g(chunks_lock_);
    auto& slot = chunks_[idx];
    if (!slot) {
      slot = std::make_unique<chunk>(*this, idx, va_range{idx * cfg_.chunk_size, (idx + 1) * cfg_.chunk_size});
      creator = true;
    }
    c = slot.get();
    ++c->users;
  }
  if (creator) {
    // Outside chunks_lock_: insert takes the mm's notifier lock (outer to it).
    c->insert_error = c->sub.insert(mm_, c->cpu.start, c->cpu.size(), c->ops);
    c->state.store(c->insert_error == errc::ok ? 1 : 2, std::memory_order_release);
    c->state.notify_all();
  }
  while (c->state.load(std::memory_order_acquire) == 0) c->state.wait(0, std::memory_order_acquire);
  if (c->state.load(std::memory_order_acquire) == 2) {
    put_chunk(c);
    return nullptr;
  }
  return c;
}

void gpu_vm::put_chunk(chunk* c) {
  std::unique_ptr<chunk> dead;
  {
    lock_guard g(chunks_lock_);
    if (--c->users == 0 && c->state.load(std::memory_order_acquire) == 2) {
      auto it = chunks_.find(c->index);
      dead = std::move(it->second);
      chunks_.erase(it);
    }
  }
}

std::size_t gpu_vm::gc_notifiers() {
  std::vector<std::unique_ptr<chunk>> dead;
  std::vector<window> windows;
  if (cfg_.mirror == mirror_kind::windows) {
    lock_guard lg(log_lock_);  // not under chunks_lock_: both are leaves
    windows = windows_snapshot_;
  }
  {
    lock_guard g(chunks_lock_);
    for (auto it = chunks_.begin(); it != chunks_.end();) {
      chunk& c = *it->second;
      bool idle = c.users == 0 && c.state.load(std::memory_order_acquire) == 1;
      if (idle) {
        // The GPU ranges this chunk's notifier guards (no users: no fault
        // can be adding PTEs there now; a new fault creates a new chunk).
        if (cfg_.mirror == mirror_kind::full_mm) {
          idle = !pt_.any_leaf(c.cpu.start, c.cpu.end);
        } else {
          for (const window& w : windows) {
            const va_range o = intersect(c.cpu, {w.cpu, w.cpu + w.size});
            if (!o.empty() && pt_.any_leaf(w.gpu + (o.start - w.cpu), w.gpu + (o.end - w.cpu))) idle = false;
          }
        }
      }
      if (idle) {
        dead.push_back(std::move(it->second));
        it = chunks_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : dead) c->sub.remove();  // waits out a running invalidation
  return dead.size();
}

// ---- construction ------------------------------------------------------------

gpu_vm::gpu_vm(device& d, svm::mm& m, vm_config cfg)
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
  auto id = dev_.register_vm(this);
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
  dev_.unregister_vm(id_);  // no handler is inside this VM after this
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

// ---- the fault path -----------------------------------------------------------

void gpu_vm::service(std::span<dev::fault_record> recs) {
  bump(ctr_->batches);
  bump(ctr_->faults_raised, recs.size());
  // Coalesce records of one page into one service with the strongest access
  // (recs are sorted by address); remember each page's outcome.
  std::vector<dev::fault_record> ok;
  std::vector<std::pair<errc, dev::fault_record>> bad;
  ok.reserve(recs.size());
  std::uint64_t coalesced = 0;
  for (std::size_t i = 0; i < recs.size();) {
    const va_t page = recs[i].page();
    access acc = recs[i].acc;
    std::size_t j = i + 1;
    for (; j < recs.size() && recs[j].page() == page; ++j) acc = std::max(acc, recs[j].acc);
    coalesced += j - i - 1;
    const errc e = service_page(page, acc, nullptr);
    for (std::size_t k = i; k < j; ++k) {
      if (e == errc::ok) ok.push_back(recs[k]);
      else bad.emplace_back(e, recs[k]);
    }
    i = j;
  }
  dev_.coalesced_.fetch_add(coalesced, std::memory_order_relaxed);
  const std::uint64_t t = now_ns();
  for (const auto& r : ok) {
    const std::uint64_t lat = t > r.time_ns ? t - r.time_ns : 1;
    const unsigned b = std::min<unsigned>(latency_histogram::buckets - 1, static_cast<unsigned>(std::bit_width(lat)) - 1);
    bump(ctr_->latency[b]);
  }
  if (!ok.empty()) {
    bump(ctr_->faults_serviced, ok.size());
    dev_.hw().replay(ok);
  }
  if (!bad.empty()) {
    bump(ctr_->faults_cancelled, bad.size());
    std::sort(bad.begin(), bad.end(), [](auto& a, auto& b) { return a.first < b.first; });
    std::vector<dev::fault_record> group;
    for (std::size_t i = 0; i < bad.size();) {
      group.clear();
      std::size_t j = i;
      for (; j < bad.size() && bad[j].first == bad[i].first; ++j) group.push_back(bad[j].second);
      dev_.hw().cancel(group, bad[i].first);
      i = j;
    }
  }
}

errc gpu_vm::service_page(va_t gva, access acc, std::uint64_t*) {
  if (cfg_.impl == mirror_impl::range) {
    // The baseline is VM-locked: its faults hold the VM-wide lock
    // exclusively across the whole service (lookup, hmm_range_fault,
    // commit), as the range-based drivers hold their VM or svms lock, so
    // handler threads of one VM take turns. Its invalidations take the
    // other VM-wide lock, baseline_lock_, never this one: a callback may run
    // inside this very fault's hmm_range_fault (a copy-on-write break).
    lock_guard g(lock_);
    return service_page_locked(gva, acc);
  }
  shared_lock_guard g(lock_);
  return service_page_locked(gva, acc);
}

errc gpu_vm::service_page_locked(va_t gva, access acc) {
  if (const gpuva* m = tree_.find(gva)) return service_bo_locked(*m, gva, acc);
  if (cfg_.mode == vm_mode::long_running) return errc::fault;
  va_t cpu;
  va_range allowed;
  if (!to_cpu_locked(gva, cpu, allowed)) return errc::fault;
  // The valid-fault short cut: another fault already mapped it.
  const pt::translation tr = pt_.translate(gva);
  if (dev_pte::is_valid(tr.entry) && !(tr.entry & bo_pte_bit) &&
      (!needs_write(acc) || dev_pte::is_writable(tr.entry))) {
    bump(ctr_->valid_faults);
    return errc::ok;
  }
  // The window must avoid every BO mapping: trim `allowed` to the hole
  // between the BO mappings around gva.
  if (const gpuva* next = tree_.first_overlap({gva, allowed.end})) allowed.end = std::min(allowed.end, next->start());
  for (const gpuva* m = tree_.first_overlap({allowed.start, gva}); m && m->start() < gva; m = tree_.next(*m))
    allowed.start = std::max(allowed.start, m->end());
  return service_svm_locked(gva, cpu, acc, allowed);
}

namespace {

// Do the hmm entries of a 2M window describe one CPU huge page that a 2M
// device leaf can map? (order 9 everywhere, one pool, consecutive frames
// starting 2M aligned, one write permission.)
bool huge_mappable(std::span<const hmm_pfn> p) {
  if (p.size() != huge_size / page_size) return false;
  const hmm_pfn first = p[0];
  if (!(first & hmm_pfn_valid) || hmm_pfn_to_map_order(first) != order_2m) return false;
  if (hmm_pfn_to_pfn(first) % (huge_size / page_size) != 0) return false;
  for (std::size_t i = 1; i < p.size(); ++i) {
    if ((p[i] & (hmm_pfn_valid | hmm_pfn_write | hmm_pfn_pool_mask | hmm_pfn_order_mask)) !=
            (first & (hmm_pfn_valid | hmm_pfn_write | hmm_pfn_pool_mask | hmm_pfn_order_mask)) ||
        hmm_pfn_to_pfn(p[i]) != hmm_pfn_to_pfn(first) + i)
      return false;
  }
  return true;
}

std::uint64_t pte_of(hmm_pfn e) {
  return dev_pte::make(aperture::system, mm_device_pfn(hmm_pfn_to_pool(e), hmm_pfn_to_pfn(e)),
                       (e & hmm_pfn_write) != 0);
}

}  // namespace

errc gpu_vm::service_svm_locked(va_t gva, va_t cpu, access acc, va_range allowed) {
  const std::int64_t delta = static_cast<std::int64_t>(cpu - gva);  // cpu = gva + delta
  chunk* c = get_chunk(cpu);
  if (!c) return errc::fault;
  struct chunk_ref {
    gpu_vm* vm;
    chunk* c;
    ~chunk_ref() { vm->put_chunk(c); }
  } ref{this, c};
  // A window never leaves the chunk whose notifier guards it.
  const va_range chunk_gpu{c->cpu.start - static_cast<va_t>(delta), c->cpu.end - static_cast<va_t>(delta)};
  allowed = intersect(allowed, chunk_gpu);

  // The baseline always uses the notifier-wide sequence.
  const bool pgtable = cfg_.seq == seq_mode::pgtable && cfg_.impl == mirror_impl::page;
  const auto deadline = clock_type::now() + cfg_.fault_timeout;
  bool allow_huge = cfg_.huge_leaves && (delta % static_cast<std::int64_t>(huge_size)) == 0;
  bool shrink = false;
  std::array<hmm_pfn, huge_size / page_size> pfns;
  std::uint64_t since = inval_stamp_.load(std::memory_order_acquire);

  for (;;) {
    if (clock_type::now() > deadline) return errc::busy;
    // Choose the window inside the CPU VMA, and whether to aim for a 2M
    // leaf: only where the CPU maps (or, on first touch, will map) a 2M
    // huge page, since a 2M fault pins the 1G-level node and takes its
    // sequence, which invalidations of other 2M blocks there also advance.
    va_range win;
    bool aim_huge = false;
    {
      mm::read_guard rd(mm_);
      auto vma = mm_.find_vma(cpu);
      if (!vma || cpu < vma->start) return errc::fault;
      const va_range vma_gpu{vma->start - static_cast<va_t>(delta), vma->end - static_cast<va_t>(delta)};
      const va_range ok = intersect(allowed, vma_gpu);
      const va_range page{align_down(gva, page_size), align_down(gva, page_size) + page_size};
      win = shrink ? page : policy_->choose(gva, ok);
      // A policy that breaks its contract (a window that is not a power of
      // two from 4K to 2M, aligned to its size, holding the fault, inside
      // `allowed`) gets the fault's page alone: one window must fit one
      // leaf node and the pfn array.
      const std::uint64_t wsize = win.size();
      if (wsize < page_size || wsize > huge_size || (wsize & (wsize - 1)) != 0 || win.start % wsize != 0 ||
          gva < win.start || gva >= win.end || win.start < ok.start || win.end > ok.end)
        win = page;
      if (allow_huge && win.size() == huge_size) {
        const cpu_translation ct = mm_.cpu_translate(win.start + static_cast<va_t>(delta));
        aim_huge = ct.present ? ct.order == order_2m : vma->advice == huge_advice::hugepage;
      }
    }
    const unsigned level = aim_huge ? 1u : 0u;
    auto pinned = pt_.pin(win.start, level, &dev::dev_page_table::split_entry);
    if (!pinned) return pinned.error();
    pt::node* n = *pinned;
    struct pin_ref {
      dev::dev_page_table& pt;
      pt::node* n;
      ~pin_ref() { pt.unpin(n); }
    } pin{pt_, n};

    const va_range cwin{win.start + static_cast<va_t>(delta), win.end + static_cast<va_t>(delta)};
    std::uint64_t snap;
    if (pgtable) {
      snap = n->read_seq();
      mm_.read_begin_range(cwin.start, cwin.end);
    } else {
      snap = c->sub.read_begin();
    }
    if (hooks_.after_snapshot) hooks_.after_snapshot(win);

    const std::size_t npages = win.size() / page_size;
    auto span = std::span(pfns).first(npages);
    const bool write = needs_write(acc);
    for (std::size_t i = 0; i < npages; ++i)
      span[i] = (write && win.start + i * page_size == align_down(gva, page_size)) ? hmm_req::write : 0;
    hmm_range range;
    range.notifier = &c->sub;
    range.notifier_seq = snap;
    range.start = cwin.start;
    range.end = cwin.end;
    range.hmm_pfns = span;
    range.default_flags = acc == access::prefetch ? 0 : hmm_req::fault;
    range.pfn_flags_mask = hmm_req::write;
    range.dev_private_owner = owner();
    // The window's entries in its node: an advance of the node's sequence
    // for other entries of the node (a disjoint invalidation in the same 2M
    // block) does not make this fault retry.
    const unsigned first = pt::entry_index(win.start, level), last = pt::entry_index(win.end - 1, level);
    if (pgtable) range.is_valid = [n, snap, first, last] { return n->unchanged_since(snap, first, last); };
    errc err;
    {
      mm::read_guard rd(mm_);
      bump(ctr_->hmm_calls);
      span_scope sp(dev_.trace(), "hmm_range_fault", npages);
      err = hmm_range_fault(range);
    }
    if (err == errc::busy) {
      bump(ctr_->retries_busy);
      if (!overlapped_since(win, since)) bump(ctr_->false_retries);
      since = inval_stamp_.load(std::memory_order_acquire);
      continue;
    }
    if (err == errc::fault && npages > 1) {
      shrink = true;  // another page of the window went away: retry on the faulting page alone
      continue;
    }
    if (err != errc::ok) return err;
    if (hooks_.before_commit) hooks_.before_commit(win);

    const bool huge = level == 1 && huge_mappable(span);
    if (level == 1 && !huge) {
      allow_huge = false;  // not one CPU huge page: map it with 4K entries
      continue;
    }
    bool stale = false, relink = false;
    std::uint64_t written = 0;
    {
      // The commit's driver lock: none (pgtable: the node lock), the chunk's
      // mirror lock shared (notifier), or the VM-wide lock (baseline).
      std::optional<shared_lock_guard<shared_mutex>> ml;
      std::optional<lock_guard<mutex>> bl;
      if (cfg_.impl == mirror_impl::range) bl.emplace(baseline_lock_);
      else if (!pgtable) ml.emplace(c->mirror_lock);
      lock_guard ln(n->lock);
      stale = pgtable ? !n->unchanged_since(snap, first, last) : c->sub.read_retry(snap);
      if (!stale && cfg_.impl == mirror_impl::range) {
        // The baseline's bookkeeping: the window becomes one range object
        // holding its page array, replacing what overlapped it.
        baseline_lock_.assert_held();
        baseline_cut_locked(win);
        ranges_.emplace(win.start, svm_range{win.end, std::vector<hmm_pfn>(span.begin(), span.end())});
      }
      if (!stale) {
        if (huge) {
          const unsigned idx = pt::entry_index(win.start, 1);
          if (pt::is_link(n->entries[idx].load(std::memory_order_relaxed))) {
            relink = true;  // a 4K table appeared there: map with 4K entries
          } else {
            pt_.set_leaf_locked(*n, idx, pte_of(span[0]));
            written = npages;
          }
        } else {
          for (std::size_t i = 0; i < npages; ++i) {
            if (!(span[i] & hmm_pfn_valid)) continue;
            const unsigned idx = pt::entry_index(win.start + i * page_size, 0);
            const std::uint64_t e = pte_of(span[i]);
            if (n->entries[idx].load(std::memory_order_relaxed) != e) {
              pt_.set_leaf_locked(*n, idx, e);
              ++written;
            }
          }
        }
      }
    }
    if (relink) {
      allow_huge = false;
      continue;
    }
    if (stale) {
      bump(ctr_->retries_seq);
      if (!overlapped_since(win, since)) bump(ctr_->false_retries);
      since = inval_stamp_.load(std::memory_order_acquire);
      continue;
    }
    bump(ctr_->ptes_written, written);
    if (huge) bump(ctr_->huge_leaves);
    return errc::ok;
  }
}

errc gpu_vm::service_bo_locked(const gpuva& m, va_t gva, access) {
  bump(ctr_->bo_faults);
  auto it = bos_.find(m.bo());
  if (it == bos_.end()) return errc::fault;
  const bo& b = *it->second;
  // Map the 2M block around the fault that this mapping covers.
  const va_range blk = intersect({align_down(gva, huge_size), align_down(gva, huge_size) + huge_size}, m.range());
  const aperture ap = b.where == placement::vram ? aperture::vram : aperture::system;
  const errc e = pt_.populate(blk.start, blk.end, 0, [&](va_t va) {
    const pfn_t f = b.frames[m.bo_offset_at(va) / page_size];
    return dev_pte::make(ap, ap == aperture::system ? mm_device_pfn(0, f) : f, true) | bo_pte_bit;
  });
  if (e == errc::ok) bump(ctr_->ptes_written, blk.size() / page_size);
  return e;
}

// ---- invalidation ---------------------------------------------------------------

void gpu_vm::note_invalidation(va_range gpu) {
  lock_guard g(log_lock_);
  const std::uint64_t stamp = inval_stamp_.load(std::memory_order_relaxed) + 1;
  log_[log_next_++ % log_.size()] = {gpu, stamp};
  // release: a fault that loads the new stamp (acquire) finds the entry.
  inval_stamp_.store(stamp, std::memory_order_release);
}

bool gpu_vm::overlapped_since(va_range win, std::uint64_t since) const {
  lock_guard g(log_lock_);
  const std::uint64_t now = inval_stamp_.load(std::memory_order_relaxed);
  if (now - since > log_.size()) return true;  // the log wrapped: assume it was real
  for (const logged& l : log_)
    if (l.stamp > since && l.stamp <= now && l.r.overlaps(win)) return true;
  return false;
}

void gpu_vm::zap_gpu(va_range r, bool bo_entries, std::vector<va_range>& flush) {
  pt::zap_options o;
  o.bump_seq = cfg_.seq == seq_mode::pgtable && cfg_.impl == mirror_impl::page;
  o.split_huge = true;
  o.match_mask = bo_pte_bit;
  o.match_value = bo_entries ? bo_pte_bit : 0;
  std::uint64_t pages = 0;
  auto count = [&](va_t, std::uint64_t, unsigned level) { pages += std::uint64_t{1} << (9 * level); };
  if (pt_.zap(r.start, r.end, flush, count, o) == errc::nomem) {
    o.split_huge = false;  // no memory to split: clear whole huge leaves instead
    (void)pt_.zap(r.start, r.end, flush, count, o);
  }
  bump(ctr_->ptes_zapped, pages);
}

void gpu_vm::ctr_add_ptes_written(std::uint64_t n) noexcept { bump(ctr_->ptes_written, n); }
void gpu_vm::ctr_add_evictions() noexcept { bump(ctr_->evictions); }
void gpu_vm::ctr_add_preemptions() noexcept { bump(ctr_->preemptions); }

void gpu_vm::flush_tlb(const std::vector<va_range>& flush) {
  for (const va_range& r : flush) {
    span_scope sp(dev_.trace(), "tlb_invalidate", r.size() / page_size);
    (void)dev_.hw().invalidate_tlb(id_, r);
    bump(ctr_->tlb_invalidations);
  }
}

void gpu_vm::baseline_cut_locked(va_range r) {
  auto it = ranges_.lower_bound(r.start);
  if (it != ranges_.begin() && std::prev(it)->second.end > r.start) --it;
  while (it != ranges_.end() && it->first < r.end) {
    const va_t start = it->first;
    svm_range old = std::move(it->second);
    it = ranges_.erase(it);
    // Keep the pieces outside r, each with its own slice of the page array.
    if (start < r.start)
      ranges_.emplace(start, svm_range{r.start, std::vector<hmm_pfn>(old.pages.begin(),
                                                                     old.pages.begin() + (r.start - start) / page_size)});
    if (old.end > r.end) {
      it = ranges_.emplace(r.end, svm_range{old.end, std::vector<hmm_pfn>(old.pages.begin() + (r.end - start) / page_size,
                                                                           old.pages.end())})
               .first;
      ++it;
    }
  }
}

std::size_t gpu_vm::baseline_ranges() const {
  lock_guard g(baseline_lock_);
  return ranges_.size();
}

bool gpu_vm::invalidate(chunk& c, interval_notifier& sub, const mmu_notifier_range& r, std::uint64_t cur_seq) {
  span_scope sp(dev_.trace(), "invalidate", (r.end - r.start) / page_size);
  const bool notifier_mode = cfg_.seq == seq_mode::notifier;
  if ((r.event == mmu_notifier_event::migrate || r.event == mmu_notifier_event::exclusive) && r.owner == owner()) {
    // Our own migration: nothing of ours goes stale. Still advance the
    // notifier sequence, as the kernel's drivers do.
    if (cfg_.impl == mirror_impl::range) {
      lock_guard g(baseline_lock_);
      sub.set_seq(cur_seq);
    } else if (notifier_mode) {
      lock_guard g(c.mirror_lock);
      sub.set_seq(cur_seq);
    }
    return true;
  }
  // The GPU ranges that mirror the invalidated CPU range of this chunk.
  const va_range cr = intersect({r.start, r.end}, c.cpu);
  std::vector<va_range> gpu;
  if (cfg_.mirror == mirror_kind::full_mm) {
    gpu.push_back(cr);
  } else {
    // windows_ is guarded by vm.lock, which a callback must not take: read
    // the copy kept under the callback-side lock.
    lock_guard g(log_lock_);
    for (const window& w : windows_snapshot_) {
      const va_range o = intersect(cr, {w.cpu, w.cpu + w.size});
      if (!o.empty()) gpu.push_back({w.gpu + (o.start - w.cpu), w.gpu + (o.end - w.cpu)});
    }
  }
  if (!r.blockable) {
    // Non-blockable: no lock may be waited for and no TLB shootdown waited
    // on. Succeed only if nothing of ours is mapped there.
    if (cfg_.impl == mirror_impl::range) {
      if (!baseline_lock_.try_lock()) return false;
      sub.set_seq(cur_seq);
      baseline_lock_.unlock();
    } else if (notifier_mode) {
      if (!c.mirror_lock.try_lock()) return false;
      sub.set_seq(cur_seq);
      c.mirror_lock.unlock();
    }
    for (const va_range& g : gpu)
      if (pt_.any_leaf(g.start, g.end)) return false;
    return true;
  }
  bump(ctr_->invalidations);
  std::vector<va_range> flush;
  if (cfg_.impl == mirror_impl::range) {
    lock_guard g(baseline_lock_);
    sub.set_seq(cur_seq);
    for (const va_range& g2 : gpu) {
      baseline_cut_locked(g2);
      zap_gpu(g2, false, flush);
    }
  } else if (notifier_mode) {
    lock_guard g(c.mirror_lock);
    sub.set_seq(cur_seq);
    for (const va_range& g2 : gpu) zap_gpu(g2, false, flush);
  } else {
    for (const va_range& g2 : gpu) zap_gpu(g2, false, flush);
  }
  for (const va_range& g2 : gpu) note_invalidation(g2);
  flush_tlb(flush);
  return true;
}

}  // namespace svm
