// Engines and their waves: the scheduler loop of each engine thread, the
// wave fibers, the MMU fast and slow paths, faults (park until replay or
// cancel; park while the fault buffer is full) and the invalidation
// acknowledgement.
#include <signal.h>

#include <algorithm>

#include "device_impl.h"

namespace svm::dev::detail {

thread_local engine* tl_engine = nullptr;

engine::engine(device::impl& d, unsigned i, std::unique_ptr<tlb_model> t)
    : dev(d), index(i), tlb(std::move(t)), fast_tlb(dynamic_cast<set_assoc_tlb*>(tlb.get())) {
  l0.inval_seq = &d.inval_seq_;
  l0.oracle = &d.oracle_;
  l0.hits = &hits;
  const unsigned n = d.cfg_.waves_per_engine;
  wake_words = (n + 63) / 64;
  wake_bits = std::make_unique<std::atomic<std::uint64_t>[]>(wake_words);
  waves.reserve(n);
  for (unsigned w = 0; w < n; ++w) {
    waves.push_back(std::make_unique<wave>());
    waves.back()->e = this;
    waves.back()->index = w;
  }
  // Start waves in index order (free_waves is a stack: lowest on top).
  for (unsigned w = n; w-- > 0;) free_waves.push_back(waves[w].get());
}

engine::~engine() = default;

std::uint64_t item_engine(const engine& e) noexcept { return e.index; }
bool prefetch(engine& e, va_t va) { return e.prefetch(va); }
void boundary(engine& e) {
  if (e.dev.inval_seq_.load(std::memory_order_acquire) != e.seen_inval) e.ack_in_kernel();
  epoch::quiescent();
}
void yield(engine& e) {
  boundary(e);
  e.park(*e.cur_wave, wave_state::yielded);
}

void engine::set_status(std::uint32_t mode) {
  status.store(word(seen_inval, mode), std::memory_order_seq_cst);
  if (dev.inval_sleepers_.load(std::memory_order_seq_cst) != 0) status.notify_all();
}

void engine::go_running() {
  if (running) return;
  epoch::enter();
  running = true;
  set_status(mode_running);
  // The recheck: a stalled or idle engine was counted as acknowledged, so it
  // must look at inval_seq_ (seq_cst, after its seq_cst status store) before
  // it uses its TLB again.
  if (dev.inval_seq_.load(std::memory_order_seq_cst) != seen_inval) process_invalidations();
}

void engine::go_idle(std::uint32_t mode) {
  if (!running) return;
  running = false;
  set_status(mode);
  epoch::leave();
}

void engine::process_invalidations() {
  std::uint64_t s;
  {
    lock_guard g(dev.inval_lock_);
    s = dev.read_invalidations_locked(seen_inval, *tlb);
  }
  seen_inval = s;
  l0.vpn = ~std::uint64_t{0};
  bump(acks);
  epoch::quiescent();  // an invalidation usually follows a zap that retired nodes
  // The acknowledgement: everything this engine accessed so far happens
  // before an invalidator that reads it (seq_cst store in set_status).
  set_status(mode_running);
}

[[noreturn]] void engine::abort_kernel(errc error, va_t va, errc reason, svm::access acc) {
  dev.fail_job(*cur, {error, va, reason, acc});
  throw kernel_abort{};
}

[[noreturn]] void engine::bad_access(va_t va, unsigned size, svm::access acc) {
  if (size > 8 || !std::has_single_bit(size)) abort_kernel(errc::inval, va, errc::inval, acc);
  if (va >= limit) abort_kernel(errc::range, va, errc::range, acc);
  abort_kernel(errc::inval, va, errc::inval, acc);
}

// The hot path: a TLB hit is the two checks, one shared load, a few tag
// compares and the oracle branch.
inline std::byte* engine::do_access(va_t va, unsigned size, svm::access acc) {
  if ((va & (size - 1)) != 0 || va >= limit) [[unlikely]]
    bad_access(va, size, acc);
  // The access boundary: acknowledge pending invalidations before using the TLB.
  if (dev.inval_seq_.load(std::memory_order_acquire) != seen_inval) [[unlikely]]
    ack_in_kernel();
  const tlb_entry* t = fast_tlb ? fast_tlb->lookup(vmid, va) : tlb->lookup(vmid, va);
  if (t && dev_pte::permits(t->pte, acc)) [[likely]] {
    bump(hits);
    return finish(*t, va, acc, true);
  }
  return access_slow(va, size, acc);
}

inline std::byte* engine::finish(const tlb_entry& t, va_t va, svm::access acc, bool hit) {
  std::byte* frame;
  pfn_t pfn;
  if (t.level == 0) [[likely]] {
    frame = t.host;
    pfn = dev_pte::pfn(t.pte);
  } else {
    pfn = dev_pte::pfn(t.pte) + ((va - t.base) >> page_shift);
    frame = t.mem->frame_data(pfn);
    if (!frame) [[unlikely]]
      abort_kernel(errc::io, va, errc::io, acc);
  }
  if (const access_validator* o = dev.oracle_.load(std::memory_order_acquire)) [[unlikely]] {
    (*o)(access_check{vmid, va, acc, index, t.pte, t.level, hit, dev_pte::aperture_of(t.pte), pfn, t.mem});
  } else if (t.level == 0 && fast_tlb) {
    // t is valid as of seen_inval (the caller checked the sequence): so is
    // the micro-TLB copy, until the sequence moves.
    l0.vpn = va >> page_shift;
    l0.host = frame;
    l0.allowed = dev_pte::allows_atomics(t.pte) ? svm::access::atomic
                 : dev_pte::is_writable(t.pte)  ? svm::access::write
                                                : svm::access::read;
    l0.seen_inval = seen_inval;
  }
  return frame + (va & (page_size - 1));
}

tlb_entry engine::make_entry(const pt::translation& tr, va_t va) {
  tlb_entry e;
  e.level = static_cast<std::uint8_t>(tr.level);
  e.base = align_down(va, tr.size());
  e.tag = tlb_entry::make_tag(vmid, va, tr.level);
  e.pte = tr.entry;
  e.mem = dev_pte::aperture_of(tr.entry) == aperture::vram ? dev.vram_mem_ : vm->sysmem;
  const pfn_t pfn = dev_pte::pfn(tr.entry);
  const pfn_t frames = tr.size() >> page_shift;
  if (pfn >= e.mem->frame_count() || frames > e.mem->frame_count() - pfn) [[unlikely]]
    abort_kernel(errc::io, va, errc::io, svm::access::read);
  e.host = tr.level == 0 ? e.mem->frame_data(pfn) : nullptr;
  return e;
}

std::byte* translate(engine& e, va_t va, unsigned size, svm::access acc) { return e.do_access(va, size, acc); }

std::byte* engine::access_slow(va_t va, unsigned, svm::access acc) {
  bump(slow);
  // Faults of this access so far that a replay did not resolve: each next
  // record says so (fault_record::retries).
  std::uint32_t retries = 0;
  for (;;) {
    // A replay after a cancel of the kernel: stop here.
    if (cur->aborted.load(std::memory_order_seq_cst)) throw kernel_abort{};
    // No node pointer is live here: a good point to let reclamation advance.
    epoch::quiescent();
    bump(walks);
    const pt::translation tr = vm->table->translate_in_section(va);  // running: inside the epoch section
    if (dev_pte::is_valid(tr.entry) && dev_pte::permits(tr.entry, acc)) {
      const tlb_entry e = make_entry(tr, va);
      tlb->insert(e);  // replaces a read-only entry of the same page after an upgrade
      return finish(e, va, acc, false);
    }
    const std::uint32_t st = raise_fault(va, acc, retries);
    if (st == f_cancel) {
      bump(cancels);
      abort_kernel(errc::canceled, va, static_cast<errc>(cur_wave->cancel_reason.load(std::memory_order_relaxed)),
                   acc);
    }
    bump(replays);
    ++retries;
    // Replayed: retranslate from the page table (the loop walks again; an
    // access that still misses faults again). Another wave may have run in
    // between: the loop's first steps re-establish everything.
  }
}

bool engine::prefetch(va_t va) {
  if (va >= limit) return false;
  if (dev.inval_seq_.load(std::memory_order_acquire) != seen_inval) ack_in_kernel();
  if (tlb->lookup(vmid, va)) {
    bump(hits);
    return true;
  }
  bump(slow);
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (cur->aborted.load(std::memory_order_seq_cst)) throw kernel_abort{};
    epoch::quiescent();
    bump(walks);
    const pt::translation tr = vm->table->translate_in_section(va);  // running: inside the epoch section
    if (dev_pte::is_valid(tr.entry)) {
      tlb->insert(make_entry(tr, va));
      return true;
    }
    if (attempt == 1) break;
    if (raise_fault(va, svm::access::prefetch) == f_cancel) {
      bump(cancels);
      return false;
    }
    bump(replays);
  }
  return false;
}

// A fault: publish the wave's word, push the record (parking the wave while
// the buffer is full), then park the wave until replay or cancel. The
// engine runs its other waves meanwhile. No translation and no page-table
// node pointer is held across a park: the caller walks again afterwards.
std::uint32_t engine::raise_fault(va_t va, svm::access acc, std::uint32_t retries) {
  wave& w = *cur_wave;
  if (cur->aborted.load(std::memory_order_relaxed)) throw kernel_abort{};  // already failed: no point
  const std::uint64_t token = ++fault_serial;
  const std::uint32_t pending = word(token, f_pending);
  // Published before the record, so a driver that fetched the record finds
  // the word ready for its replay CAS. seq_cst: pairs with the shutdown
  // sweep, which closes the buffer and then reads this word.
  w.fault_word.store(pending, std::memory_order_seq_cst);
  // The cancel recheck: a canceller stores aborted (seq_cst) and then reads
  // this word (seq_cst); we store the word and then read aborted. One side
  // sees the other, so a cancel never misses a parked wave.
  if (cur->aborted.load(std::memory_order_seq_cst)) {
    // Take the word back; a canceller that claimed it first is writing the
    // reason: let it finish, so its store cannot land on a later fault.
    std::uint32_t exp = pending;
    if (!w.fault_word.compare_exchange_strong(exp, word(token, f_cancel), std::memory_order_acquire))
      while ((w.fault_word.load(std::memory_order_acquire) & 3) == f_claimed) SVM_CPU_RELAX();
    throw kernel_abort{};
  }
  bump(faults);
  dev.fault_raised();
  w.fault_gva.store(va, std::memory_order_relaxed);
  const fault_record rec{vmid, va, acc, index, now_ns(), token, w.index, retries};
  for (;;) {
    const push_result r = dev.faults_.try_push(rec);
    if (r == push_result::pushed) break;
    if (r == push_result::closed) {
      // Device shutdown: nobody will answer; cancel ourselves.
      std::uint32_t exp = pending;
      if (w.fault_word.compare_exchange_strong(exp, word(token, f_claimed), std::memory_order_relaxed)) {
        w.cancel_reason.store(static_cast<int>(errc::canceled), std::memory_order_relaxed);
        w.fault_word.store(word(token, f_cancel), std::memory_order_release);
      }
      break;
    }
    // Full: nothing is dropped. Park until a fetch frees space (the buffer
    // calls on_space, which sets `space`), or until a cancel resolves the
    // word (then the record is never pushed).
    bump(full_parks);
    park(w, wave_state::parked_full);
    if ((w.fault_word.load(std::memory_order_acquire) & 3) != f_pending) break;
  }
  // acquire: pairs with the release CAS/store of the replayer or canceller
  // (and orders the cancel reason and the PTEs the driver wrote).
  std::uint32_t st = w.fault_word.load(std::memory_order_acquire);
  while ((st & 3) == f_pending || (st & 3) == f_claimed) {
    if (dev.cfg_.test_hook) [[unlikely]]
      dev.cfg_.test_hook("before_park", index, w.index);
    park(w, wave_state::parked_fault);
    st = w.fault_word.load(std::memory_order_acquire);
  }
  return st & 3;
}

// ---------------------------------------------------------------------------
// Waves

void engine::wake(const wave& w) noexcept {
  set_wake_bits(w.index / 64, std::uint64_t{1} << (w.index % 64));
  poke();
}

void engine::set_wake_bits(std::size_t word, std::uint64_t mask) noexcept {
  wake_bits[word].fetch_or(mask, std::memory_order_seq_cst);
  wake_summary.fetch_or(std::uint64_t{1} << word, std::memory_order_seq_cst);
}

void engine::poke() noexcept {
  wake_word.fetch_add(1, std::memory_order_seq_cst);
  if (sleeping.load(std::memory_order_seq_cst) != 0) wake_word.notify_all();
}

// Park the running wave: switch to the engine's scheduler context. Returns
// when the scheduler resumes it (after a wake, or for a retry). A switch is
// an epoch quiescent point: the wave holds no node pointer here.
void engine::park(wave& w, wave_state why) {
  w.state = why;
  const bool counted = why != wave_state::yielded;
  if (counted) bump(parked_now);
  void* fake = nullptr;
  before_switch(&fake, sched_stack_bottom, sched_stack_size, tsan_sched);
  w.sched = std::move(w.sched).resume();
  after_switch(fake, nullptr, nullptr);
  if (counted) parked_now.store(parked_now.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
}

// The body of every wave: take items from the engine's local claim and run
// them; with none left, go free (suspend until the scheduler hands a new
// one, or the engine exits). Every exception of a kernel ends here, on the
// wave's own stack: none crosses a fiber boundary.
void engine::wave_main(wave& w) {
  for (;;) {
    while (local && local->next < local->c.end) {
      claim_ctx* ctx = local;
      const std::uint64_t i = ctx->next++;
      if (ctx->next == ctx->c.end) local = nullptr;  // fully handed out
      w.ctx = ctx;
      w.cur = ctx->c.j;
      w.vm = w.cur->vm;
      adopt(w);
      if (!cur->aborted.load(std::memory_order_relaxed)) {
        w.job_pub.store(cur, std::memory_order_seq_cst);
        epoch::quiescent();
        try {
          work_item wi(*this, fast_tlb ? &l0 : nullptr, i);
          cur->fn(wi);
        } catch (const kernel_abort&) {
          // The failing access recorded the status (fail_job or cancel) before throwing.
        } catch (...) {
          dev.fail_job(*cur, {errc::io, 0, errc::io, svm::access::read});
        }
        w.job_pub.store(nullptr, std::memory_order_seq_cst);
      }
      finish_item(w);
    }
    w.state = wave_state::free;
    void* fake = nullptr;
    before_switch(&fake, sched_stack_bottom, sched_stack_size, tsan_sched);
    w.sched = std::move(w.sched).resume();
    after_switch(fake, nullptr, nullptr);
    if (w.exiting) return;
  }
}

void engine::finish_item(wave& w) {
  claim_ctx* ctx = w.ctx;
  w.ctx = nullptr;
  if (++ctx->finished == ctx->c.end - ctx->c.begin) {
    // The last item of the claim: report it (the kernel may be freed now;
    // w.cur and cur are not used again before the next item sets them).
    dev.complete_chunk(ctx->c, ctx->finished);
    if (local == ctx) local = nullptr;
    w.cur = nullptr;
    w.vm = nullptr;
    delete ctx;
  }
}

// The wave's kernel context becomes the engine's (the access path reads the
// engine's copy).
void engine::adopt(const wave& w) noexcept {
  cur = w.cur;
  if (vm != w.vm) l0.vpn = ~std::uint64_t{0};  // another VM: the micro-TLB has no VM tag
  vm = w.vm;
  vmid = vm->id;
  limit = vm->limit;
}

// Resume wave w from the scheduler context (the engine thread's own stack).
void engine::resume(wave& w) {
  cur_wave = &w;
  const bool first = w.state == wave_state::unborn;
  if (first) {
    const std::size_t size = stacks.usable();
    void* top = stacks.top(w.index);
    boost::context::preallocated pre(top, size, boost::context::stack_context{size, top});
    struct no_alloc {  // the stack belongs to `stacks`; nothing to free
      boost::context::stack_context allocate() { return {}; }
      void deallocate(boost::context::stack_context&) noexcept {}
    };
    w.tsan_fiber = tsan_create_fiber();
    w.fib = boost::context::fiber(std::allocator_arg, pre, no_alloc{}, [this, &w](boost::context::fiber&& s) {
      // First entry: learn the scheduler's stack for the switches back.
      after_switch(nullptr, &sched_stack_bottom, &sched_stack_size);
      w.sched = std::move(s);
      wave_main(w);
      // Exit: the last switch away from this stack (no fake stack to keep).
      before_switch(nullptr, sched_stack_bottom, sched_stack_size, tsan_sched);
      return std::move(w.sched);
    });
  }
  w.state = wave_state::running;
  if (w.cur) adopt(w);
  bump(switches);
  epoch::quiescent();
  void* fake = nullptr;
  before_switch(&fake, stacks.bottom(w.index), stacks.usable(), w.tsan_fiber);
  w.fib = std::move(w.fib).resume();
  after_switch(fake, nullptr, nullptr);
  cur_wave = nullptr;
  switch (w.state) {
    case wave_state::free:
      --busy;
      free_waves.push_back(&w);
      break;
    case wave_state::parked_full:
      full.push_back(&w);
      break;
    case wave_state::yielded:
      w.state = wave_state::ready;
      ready.push_back(&w);
      break;
    default:  // parked_fault: its wake bit brings it back
      break;
  }
}

void engine::collect_wakes() {
  if (wake_summary.load(std::memory_order_relaxed) == 0) return;
  std::uint64_t words = wake_summary.exchange(0, std::memory_order_seq_cst);
  while (words) {
    const std::size_t i = static_cast<std::size_t>(std::countr_zero(words));
    words &= words - 1;
    std::uint64_t bits = wake_bits[i].exchange(0, std::memory_order_seq_cst);
    while (bits) {
      const unsigned b = static_cast<unsigned>(std::countr_zero(bits));
      bits &= bits - 1;
      wave& w = *waves[i * 64 + b];
      // Only a parked wave is made ready; a wake that raced the wave's own
      // check of its word is spurious, and the wave re-checks on resume.
      if (w.state == wave_state::parked_fault || w.state == wave_state::parked_full) {
        w.state = wave_state::ready;
        ready.push_back(&w);
      }
    }
  }
}

// Hand the next item to a free wave: claim more work if the local claim is
// used up. Returns false when there is no free wave or no work.
bool engine::start_wave() {
  if (free_waves.empty()) return false;
  if (!local) {
    bool stop = false;
    const claim c = dev.claim_work(*this, stop);
    if (!c.j) return false;
    local = new claim_ctx{c, c.begin, 0};
    l0.vpn = ~std::uint64_t{0};  // a new claim may be of a VM attached at a reused address
  }
  go_running();
  wave* w = free_waves.back();
  free_waves.pop_back();
  ++busy;
  resume(*w);
  return true;
}

void engine::sleep(std::uint32_t seen) {
  for (unsigned i = 0; i < dev.cfg_.fault_spin && wake_word.load(std::memory_order_relaxed) == seen; ++i)
    SVM_CPU_RELAX();
  if (dev.cfg_.wait_spin_ns != 0 && wake_word.load(std::memory_order_relaxed) == seen) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(dev.cfg_.wait_spin_ns);
    for (unsigned i = 1; wake_word.load(std::memory_order_relaxed) == seen; ++i) {
      SVM_CPU_RELAX();
      if (i % 32 == 0 && std::chrono::steady_clock::now() >= end) break;
    }
  }
  sleeping.fetch_add(1, std::memory_order_seq_cst);
  wake_word.wait(seen, std::memory_order_seq_cst);
  sleeping.fetch_sub(1, std::memory_order_seq_cst);
}

// The engine thread: the scheduler of its waves. Order of preference: a
// woken wave, a wave parked on a full buffer when space appeared, a new
// item on a free wave. It sleeps only when none of these exists.
void engine::run() {
  tl_engine = this;
  // An alternate signal stack, so the overflow report can run when a wave
  // stack is exhausted (fiber.cpp).
  stack_t old{};
  std::unique_ptr<char[]> alt;
  if (::sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE)) {
    constexpr std::size_t alt_size = 64 * 1024;
    alt = std::make_unique<char[]>(alt_size);
    stack_t ss{};
    ss.ss_sp = alt.get();
    ss.ss_size = alt_size;
    (void)::sigaltstack(&ss, nullptr);
  }
  tsan_sched = tsan_current_fiber();
  for (;;) {
    // Read the futex word before looking (see wake_word).
    const std::uint32_t seen = wake_word.load(std::memory_order_seq_cst);
    collect_wakes();
    if (!ready.empty()) {
      if (dev.cfg_.test_hook) [[unlikely]] {
        // A test may hold the woken wave here. The engine is stalled
        // meanwhile, so a shootdown does not wait for it (go_running
        // rechecks the invalidations before the wave touches the TLB).
        go_idle(mode_stalled);
        dev.cfg_.test_hook("before_resume", index, ready.front()->index);
      }
      go_running();
      wave* w = ready.front();
      ready.pop_front();
      resume(*w);
      continue;
    }
    if (!full.empty() && space.exchange(false, std::memory_order_seq_cst)) {
      // Retry the parked pushes FIFO until one finds the buffer full again
      // (it re-parks at the back; the rest wait for the next fetch).
      go_running();
      for (std::size_t n = full.size(); n-- > 0 && !full.empty();) {
        wave* w = full.front();
        full.pop_front();
        if (w->state != wave_state::parked_full) continue;  // resumed by a cancel meanwhile
        const std::uint64_t before = full_parks.load(std::memory_order_relaxed);
        resume(*w);
        if (full_parks.load(std::memory_order_relaxed) != before) break;  // full again
      }
      continue;
    }
    if (start_wave()) continue;
    bool stop;
    {
      lock_guard g(dev.sched_lock_);
      stop = dev.stopping_;
    }
    if (stop && busy == 0) break;
    go_idle(busy ? mode_stalled : mode_idle);
    // Space may have come while we looked: recheck before sleeping.
    if (!full.empty() && space.load(std::memory_order_seq_cst)) continue;
    sleep(seen);
  }
  go_idle(mode_idle);
  exit_waves();
  if (alt) {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    (void)::sigaltstack(&ss, nullptr);
  }
  tl_engine = nullptr;
}

// Let every started wave return from wave_main (all are free by now), so
// that their stacks unwind normally and their TSan fibers are destroyed.
void engine::exit_waves() {
  for (auto& w : waves) {
    if (w->state == wave_state::unborn) continue;
    w->exiting = true;
    void* fake = nullptr;
    before_switch(&fake, stacks.bottom(w->index), stacks.usable(), w->tsan_fiber);
    w->fib = std::move(w->fib).resume();
    after_switch(fake, nullptr, nullptr);
    tsan_destroy_fiber(w->tsan_fiber);
    w->tsan_fiber = nullptr;
    w->state = wave_state::unborn;
  }
}

}  // namespace svm::dev::detail

namespace svm::dev {

// ---------------------------------------------------------------------------
// work_item out-of-line members

std::uint64_t work_item::load_bytes(va_t va, unsigned size) {
  switch (size) {
    case 1: return load<std::uint8_t>(va);
    case 2: return load<std::uint16_t>(va);
    case 4: return load<std::uint32_t>(va);
    case 8: return load<std::uint64_t>(va);
    default: e_->bad_access(va, size, access::read);
  }
}

void work_item::store_bytes(va_t va, unsigned size, std::uint64_t v) {
  switch (size) {
    case 1: return store<std::uint8_t>(va, static_cast<std::uint8_t>(v));
    case 2: return store<std::uint16_t>(va, static_cast<std::uint16_t>(v));
    case 4: return store<std::uint32_t>(va, static_cast<std::uint32_t>(v));
    case 8: return store<std::uint64_t>(va, v);
    default: e_->bad_access(va, size, access::write);
  }
}

}  // namespace svm::dev
