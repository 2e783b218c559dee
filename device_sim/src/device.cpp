// The device glue: construction and teardown, replay/cancel of fault
// records, completions, the oracle hook, statistics and describe().
#include <algorithm>
#include <bit>
#include <sstream>

#include "device_impl.h"

namespace svm::dev {

// ---------------------------------------------------------------------------
// completion

kernel_status completion::wait(std::chrono::nanoseconds timeout) const {
  if (!state_) return {errc::inval, 0, errc::inval, access::read};
  if (state_->done->wait(timeout) != errc::ok) return {errc::timedout, 0, errc::timedout, access::read};
  // The fence's acquire (wait/is_signaled) pairs with its release in
  // signal(), which follows the status write.
  return state_->status;
}

errc completion::cancel(errc reason) const {
  if (!state_ || reason == errc::ok) return errc::inval;
  if (done()) return errc::ok;
  signal_list sig;
  errc e = errc::ok;
  {
    lock_guard g(state_->anchor->lock);
    if (!state_->anchor->dev) return errc::ok;  // the device cancelled it on its way out
    e = state_->anchor->dev->impl_->cancel_kernel(state_->queue, state_->serial, reason, sig);
  }
  signal_all(sig);  // no lock held: fence callbacks may take theirs
  return e == errc::noent ? errc::ok : e;  // finished meanwhile
}

std::string completion::describe() const {
  if (!state_) return "empty completion";
  std::ostringstream os;
  os << "kernel #" << state_->serial << " on queue " << state_->queue << (done() ? ": done\n" : ": not done\n");
  lock_guard g(state_->anchor->lock);
  if (state_->anchor->dev) os << state_->anchor->dev->describe();
  else os << "device destroyed\n";
  return os.str();
}

// ---------------------------------------------------------------------------
// impl

device::impl::impl(device_config c, std::shared_ptr<phys_mem> vram_memory)
    : cfg_(std::move(c)),
      vram_ext_(std::move(vram_memory)),
      vram_(vram_ext_ ? 0 : cfg_.vram_bytes),
      vram_mem_(vram_ext_ ? vram_ext_.get() : static_cast<phys_mem*>(&vram_)),
      faults_(cfg_.fault_buffer_entries, cfg_.wait_spin_ns) {
  // cfg_ passed validate() (device::create, or the constructor's clamp).
  faults_.set_space_callback(&impl::on_space, this);
  engines_.reserve(cfg_.engines);
  for (unsigned i = 0; i < cfg_.engines; ++i) {
    auto t = cfg_.make_tlb ? cfg_.make_tlb(i) : make_set_assoc_tlb(cfg_.tlb);
    if (!t) t = make_set_assoc_tlb(cfg_.tlb);
    engines_.push_back(std::make_unique<detail::engine>(*this, i, std::move(t)));
  }
}

errc device::impl::start() {
  for (auto& e : engines_)
    if (!e->stacks.init(e->index, cfg_.waves_per_engine, cfg_.wave_stack_bytes)) return errc::nomem;
  for (auto& e : engines_) e->thread = std::jthread([p = e.get()] { p->run(); });
  return errc::ok;
}

device::impl::~impl() {
  {
    // No completion reaches this device from now on (see device_anchor).
    lock_guard a(anchor_->lock);
    anchor_->dev = nullptr;
  }
  {
    // Cancel what runs, so that every wave reaches the end of its item.
    signal_list sig;
    {
      lock_guard g(sched_lock_);
      stopping_ = true;
      for (auto& [id, q] : queues_) cancel_all_locked(*q, errc::canceled, sig);
    }
    kick_engines();
    signal_all(sig);
  }
  // Close the buffer first, then sweep: a wave that publishes f_pending
  // after the sweep looked sees the buffer closed in try_push() and cancels
  // itself (seq_cst on both sides). Waves parked on a full buffer retry
  // (close() calls the space callback) and find it closed.
  faults_.close();
  publish_work();
  for (auto& e : engines_)
    for (auto& w : e->waves) {
      const std::uint32_t x = w->fault_word.load(std::memory_order_seq_cst);
      if ((x & 3) == f_pending) (void)resolve(*w, x, f_cancel, errc::canceled);
    }
  for (auto& e : engines_)
    if (e->thread.joinable()) e->thread.join();
  // Kernels never run to the end: complete them with ECANCELED.
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    for (auto& [id, q] : queues_) {
      for (auto& j : q->jobs) {
        if (j->status.ok()) j->status = {errc::canceled, 0, errc::canceled, access::read};
        j->done->status = j->status;
        sig.push_back(j->done);
      }
      q->jobs.clear();
    }
    runnable_.clear();
  }
  kernels_failed_.fetch_add(sig.size(), std::memory_order_relaxed);
  signal_all(sig);
}

void device::impl::publish_work() noexcept {
  for (auto& e : engines_) e->poke();
}

void device::impl::on_space(void* self) noexcept {
  auto* d = static_cast<impl*>(self);
  for (auto& e : d->engines_) {
    e->space.store(true, std::memory_order_seq_cst);
    e->poke();
  }
}

void device::impl::fault_raised() noexcept {
  const std::int64_t n = outstanding_.fetch_add(1, std::memory_order_relaxed) + 1;
  std::int64_t hw = outstanding_hw_.load(std::memory_order_relaxed);
  while (n > hw && !outstanding_hw_.compare_exchange_weak(hw, n, std::memory_order_relaxed)) {
  }
}

detail::wave* device::impl::wave_of(const fault_record& r) noexcept {
  if (r.engine >= engines_.size()) return nullptr;
  detail::engine& e = *engines_[r.engine];
  return r.wave < e.waves.size() ? e.waves[r.wave].get() : nullptr;
}

bool device::impl::resolve_word(detail::wave& w, std::uint32_t expected, std::uint32_t to, errc reason) noexcept {
  if (to == f_replay) {
    // release: pairs with the wave's acquire load; the PTEs the driver
    // wrote before the replay are visible to its retranslation.
    return w.fault_word.compare_exchange_strong(expected, (expected & ~3u) | f_replay, std::memory_order_release,
                                                std::memory_order_relaxed);
  }
  // Claim first, so that only the winner writes the reason.
  if (!w.fault_word.compare_exchange_strong(expected, (expected & ~3u) | f_claimed, std::memory_order_relaxed))
    return false;
  w.cancel_reason.store(static_cast<int>(reason), std::memory_order_relaxed);
  w.fault_word.store((expected & ~3u) | f_cancel, std::memory_order_release);
  return true;
}

bool device::impl::resolve(detail::wave& w, std::uint32_t expected, std::uint32_t to, errc reason) noexcept {
  if (!resolve_word(w, expected, to, reason)) return false;
  outstanding_.fetch_sub(1, std::memory_order_relaxed);
  w.e->wake(w);
  return true;
}

namespace {
// Wakes the waves of a batch: consecutive waves of one engine bitmap word
// share one fetch_or, and each engine is poked once at the end (after all
// its bits are set, so it cannot sleep past them).
class batch_waker {
 public:
  void add(detail::wave& w) {
    const std::size_t word = w.index / 64;
    if (w.e != e_ || word != word_) flush();
    e_ = w.e;
    word_ = word;
    mask_ |= std::uint64_t{1} << (w.index % 64);
  }
  void finish() {
    flush();
    for (detail::engine* e : poke_) e->poke();
  }

 private:
  void flush() {
    if (!mask_) return;
    e_->set_wake_bits(word_, mask_);
    if (std::find(poke_.begin(), poke_.end(), e_) == poke_.end()) poke_.push_back(e_);
    mask_ = 0;
  }
  detail::engine* e_ = nullptr;
  std::size_t word_ = 0;
  std::uint64_t mask_ = 0;
  std::vector<detail::engine*> poke_;
};
}  // namespace

std::size_t device::impl::resolve_all(std::span<const fault_record> records, std::uint32_t to, errc reason) noexcept {
  std::size_t n = 0;
  batch_waker wk;
  for (const fault_record& r : records) {
    detail::wave* w = wave_of(r);
    if (w && resolve_word(*w, word(r.token, f_pending), to, reason)) {
      ++n;
      wk.add(*w);
    }
  }
  if (n) outstanding_.fetch_sub(static_cast<std::int64_t>(n), std::memory_order_relaxed);
  wk.finish();
  return n;
}

namespace {
const char* mode_name(std::uint32_t m) {
  switch (m) {
    case mode_idle: return "idle";
    case mode_running: return "running";
    case mode_stalled: return "stalled";
    default: return "?";
  }
}
const char* fault_state_name(std::uint32_t f) {
  switch (f) {
    case f_claimed: return "claimed";
    case f_pending: return "pending";
    case f_replay: return "replayed";
    default: return "cancelled";
  }
}
}  // namespace

std::string device::impl::describe() const {
  std::ostringstream os;
  lock_guard g(sched_lock_);
  os << "device: " << engines_.size() << " engines x " << cfg_.waves_per_engine << " waves, fault buffer "
     << faults_.size() << "/" << faults_.capacity() << ", outstanding faults "
     << outstanding_.load(std::memory_order_relaxed) << ", invalidation seq "
     << inval_seq_.load(std::memory_order_relaxed) << (stopping_ ? ", stopping" : "") << "\n";
  std::unordered_map<const job*, std::pair<queue_id, std::uint64_t>> names;
  for (auto& [id, q] : queues_)
    for (auto& j : q->jobs) names[j.get()] = {id, j->serial};
  for (auto& e : engines_) {
    const std::uint32_t st = e->status.load(std::memory_order_relaxed);
    os << "  engine " << e->index << ": " << mode_name(st & 3) << ", ack " << (st >> 2) << ", waves parked "
       << e->parked_now.load(std::memory_order_relaxed);
    // The waves with a published kernel (running an item), at most 8 named.
    unsigned listed = 0, more = 0;
    for (auto& w : e->waves) {
      const job* j = w->job_pub.load(std::memory_order_relaxed);
      if (!j) continue;
      if (listed == 8) {
        ++more;
        continue;
      }
      ++listed;
      const std::uint32_t fw = w->fault_word.load(std::memory_order_relaxed);
      os << "\n    wave " << w->index;
      auto n = names.find(j);
      if (n != names.end()) os << ": kernel #" << n->second.second << " of queue " << n->second.first;
      os << ", fault token " << (fw >> 2) << " " << fault_state_name(fw & 3) << " at 0x" << std::hex
         << w->fault_gva.load(std::memory_order_relaxed) << std::dec;
    }
    if (more) os << "\n    ... and " << more << " more waves in items";
    os << "\n";
  }
  for (auto& [id, q] : queues_) {
    os << "  queue " << id << " (vm " << q->vm->id << "): " << q->jobs.size() << " kernels";
    for (auto& j : q->jobs)
      os << "; #" << j->serial << " items done/claimed/total " << j->completed << "/" << j->next << "/" << j->items
         << (j->aborted.load(std::memory_order_relaxed) ? " aborted" : "");
    os << "\n";
  }
  return os.str();
}

std::size_t device::impl::replay(std::span<const fault_record> records) noexcept {
  return resolve_all(records, f_replay, errc::ok);
}

std::size_t device::impl::cancel(std::span<const fault_record> records, errc reason) noexcept {
  return resolve_all(records, f_cancel, reason);
}

void device::impl::set_oracle(access_validator v) {
  if (!v) {
    oracle_.store(nullptr, std::memory_order_release);
    return;
  }
  auto p = std::make_unique<access_validator>(std::move(v));
  const access_validator* raw = p.get();
  {
    lock_guard g(oracle_lock_);
    oracles_.push_back(std::move(p));
  }
  oracle_.store(raw, std::memory_order_release);
}

device_stats device::impl::stats() const {
  device_stats s;
  for (auto& e : engines_) {
    const auto hits = e->hits.load(std::memory_order_relaxed);
    s.tlb_hits += hits;
    s.accesses += hits + e->slow.load(std::memory_order_relaxed);
    s.tlb_misses += e->walks.load(std::memory_order_relaxed);
    s.faults += e->faults.load(std::memory_order_relaxed);
    s.replays += e->replays.load(std::memory_order_relaxed);
    s.cancels += e->cancels.load(std::memory_order_relaxed);
    s.tlb_acks += e->acks.load(std::memory_order_relaxed);
    s.wave_switches += e->switches.load(std::memory_order_relaxed);
    s.fault_buffer_full_parks += e->full_parks.load(std::memory_order_relaxed);
    s.waves_parked += e->parked_now.load(std::memory_order_relaxed);
  }
  s.outstanding_faults = static_cast<std::uint64_t>(std::max<std::int64_t>(0, outstanding_.load(std::memory_order_relaxed)));
  s.outstanding_high_water = static_cast<std::uint64_t>(outstanding_hw_.load(std::memory_order_relaxed));
  s.tlb_invalidations = invalidations_.load(std::memory_order_relaxed);
  s.kernels_completed = kernels_ok_.load(std::memory_order_relaxed);
  s.kernels_failed = kernels_failed_.load(std::memory_order_relaxed);
  s.fault_buffer_full_stalls = faults_.stats().full_stalls;
  return s;
}

// ---------------------------------------------------------------------------
// device: forwards to impl

errc device_config::validate() const {
  if (engines < 1 || engines > max_engines) return errc::inval;
  if (waves_per_engine < 1 || waves_per_engine > max_waves_per_engine) return errc::inval;
  if (std::uint64_t{engines} * waves_per_engine > max_waves) return errc::inval;
  if (wave_stack_bytes < min_wave_stack_bytes || wave_stack_bytes > max_wave_stack_bytes) return errc::inval;
  if (fault_buffer_entries < 1 || fault_buffer_entries > max_fault_buffer_entries) return errc::inval;
  if (vram_bytes % page_size != 0 || vram_bytes > max_vram_bytes) return errc::inval;
  if (tlb.sets == 0 || tlb.ways == 0 || !std::has_single_bit(tlb.sets)) return errc::inval;
  return errc::ok;
}

result<std::unique_ptr<device>> device::create(device_config cfg) { return create(std::move(cfg), nullptr); }

result<std::unique_ptr<device>> device::create(device_config cfg, std::shared_ptr<phys_mem> vram_memory) {
  if (const errc e = cfg.validate(); e != errc::ok) return e;
  std::unique_ptr<device> d(new device(std::move(cfg), std::move(vram_memory), private_tag{}));
  if (const errc e = d->impl_->start(); e != errc::ok) return e;
  return d;
}

device::device(device_config cfg, std::shared_ptr<phys_mem> vram_memory, private_tag)
    : impl_(std::make_unique<impl>(std::move(cfg), std::move(vram_memory))) {
  lock_guard g(impl_->anchor_->lock);
  impl_->anchor_->dev = this;
}
device::~device() = default;
errc device::cancel_queue(queue_id q, errc reason) { return impl_->cancel_queue(q, reason); }
errc device::cancel_vm(vm_id vm, errc reason) { return impl_->cancel_vm(vm, reason); }
std::string device::describe() const { return impl_->describe(); }
errc device::attach_vm(vm_id id, dev_page_table& t, phys_mem& m) { return impl_->attach_vm(id, t, m); }
errc device::detach_vm(vm_id id) { return impl_->detach_vm(id); }
result<queue_id> device::create_queue(vm_id vm) { return impl_->create_queue(vm); }
errc device::destroy_queue(queue_id q) { return impl_->destroy_queue(q); }
result<completion> device::submit(queue_id q, std::uint64_t items, kernel_fn fn) {
  return impl_->submit(q, items, std::move(fn));
}
fault_buffer& device::faults() noexcept { return impl_->faults_; }
std::size_t device::replay(std::span<const fault_record> r) noexcept { return impl_->replay(r); }
std::size_t device::cancel(std::span<const fault_record> r, errc reason) noexcept { return impl_->cancel(r, reason); }
errc device::invalidate_tlb(vm_id vm, va_range r) { return impl_->invalidate_tlb(vm, r); }
void device::set_oracle(access_validator v) { impl_->set_oracle(std::move(v)); }
vram_pool& device::vram() noexcept { return impl_->vram_; }
phys_mem& device::vram_memory() noexcept { return *impl_->vram_mem_; }
copy_engine& device::copier() noexcept { return impl_->copier_; }
unsigned device::engine_count() const noexcept { return static_cast<unsigned>(impl_->engines_.size()); }
device_stats device::stats() const { return impl_->stats(); }

}  // namespace svm::dev
