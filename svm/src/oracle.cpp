// The access oracle. The header explains the rule and why checking
// cpu_translate first, then range_is_invalidating only on a mismatch, never
// reports a legitimate access.
#include "svm/svm/oracle.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "svm/notifier/cpu_pte.h"
#include "svm/svm/gpu_vm.h"

namespace svm {

namespace {

/// One VM's registration. Immutable after publication (the release store
/// into its registry slot); never freed before the oracle's state.
struct vm_entry {
  /// The mm the VM mirrors; null once that mm was torn down (its release
  /// replaced the entry): every SVM access is then stale (mm_released).
  svm::mm* m = nullptr;
  mirror_kind kind = mirror_kind::full_mm;
  std::vector<oracle_window> windows;  ///< sorted by gpu, disjoint

  /// GPU VA -> CPU VA of the mirror; false if `gva` is not mirrored.
  bool to_cpu(va_t gva, va_t& cpu) const noexcept {
    switch (kind) {
      case mirror_kind::full_mm:
        cpu = gva;
        return true;
      case mirror_kind::none:
        return false;
      case mirror_kind::windows: {
        auto it = std::upper_bound(windows.begin(), windows.end(), gva,
                                   [](va_t v, const oracle_window& w) { return v < w.gpu; });
        if (it == windows.begin()) return false;
        --it;
        if (gva - it->gpu >= it->size) return false;
        cpu = it->cpu + (gva - it->gpu);
        return true;
      }
    }
    return false;
  }
};

/// Per-engine counters, one cache line each so engines do not share lines
/// on the hot path. atomic, relaxed: statistics. Their totals are exact for
/// kernels that completed: an engine's increments happen before the
/// kernel's completion fence is signalled (release), which wait() acquires.
struct alignas(64) engine_counters {
  std::atomic<std::uint64_t> svm{0}, not_svm{0}, unwatched{0}, excused{0};
};

constexpr unsigned slot_bits = 8;
constexpr std::size_t slots = std::size_t{1} << slot_bits;
static_assert(dev::max_vm_id < slots * slots, "the two-level registry must cover every vm id");
using slot_block = std::array<std::atomic<const vm_entry*>, slots>;

void bump(std::atomic<std::uint64_t>& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }

}  // namespace

/// The oracle's subscription to the teardown of one mm it watches (one per
/// mm, made by the first watch() of it). Owned by the state; the mm points
/// at it until its release ran or ~access_oracle unsubscribed it.
struct access_oracle::mm_sub final : mm_release_ops {
  mm_sub(state& s, driver& d, svm::mm& mm) : st(s), dev(d), m(&mm) {}
  state& st;
  driver& dev;
  svm::mm* const m;  ///< identity only once `gone`: never dereferenced then
  void release(svm::mm&) noexcept override;
};

struct access_oracle::state {
  explicit state(oracle_options o) : opts(o) {}

  const oracle_options opts;  // immutable

  /// Indexed by engine (the device has at most 256).
  std::array<engine_counters, 256> ctr{};
  /// atomic, relaxed: statistics, as the engine counters.
  std::atomic<std::uint64_t> stale{0};

  /// The registry: a two-level table indexed by vm id (high byte, low
  /// byte). Blocks and entries are published with release stores under
  /// reg_lock; check() reads them with acquire loads (pairs with those
  /// stores), so an entry's fields are visible once its pointer is. Slots
  /// are cleared (release) by unwatch; blocks and entries are freed only
  /// with the state, so a check racing with unwatch reads live memory.
  std::array<std::atomic<slot_block*>, slots> top{};

  static constexpr lock_class reg_class{"access_oracle.registry", lockdep::rank::leaf};
  mutable mutex reg_lock{reg_class};
  std::vector<std::unique_ptr<slot_block>> blocks SVM_GUARDED_BY(reg_lock);
  std::vector<std::unique_ptr<vm_entry>> entries SVM_GUARDED_BY(reg_lock);
  bool attached SVM_GUARDED_BY(reg_lock) = false;
  /// One subscription per watched mm, and whether its release ran (`gone`:
  /// the mm may be freed, so the entry's pointer is only an identity).
  struct sub_slot {
    std::unique_ptr<mm_sub> sub;
    bool gone = false;
  };
  std::vector<sub_slot> subs SVM_GUARDED_BY(reg_lock);

  sub_slot* find_sub_locked(const svm::mm* m) SVM_REQUIRES(reg_lock) {
    for (sub_slot& s : subs)
      if (!s.gone && s.sub->m == m) return &s;
    return nullptr;
  }

  static constexpr lock_class reports_class{"access_oracle.reports", lockdep::rank::leaf};
  mutable mutex reports_lock{reports_class};
  std::vector<stale_report> reports SVM_GUARDED_BY(reports_lock);

  const vm_entry* lookup(dev::vm_id id) const noexcept {
    if (id > dev::max_vm_id) return nullptr;
    // acquire: pairs with the release stores in publish_locked().
    const slot_block* b = top[id >> slot_bits].load(std::memory_order_acquire);
    if (!b) return nullptr;
    return (*b)[id & (slots - 1)].load(std::memory_order_acquire);
  }

  /// Locking: requires reg_lock.
  errc publish_locked(dev::vm_id id, std::unique_ptr<vm_entry> e) SVM_REQUIRES(reg_lock) {
    slot_block* b = top[id >> slot_bits].load(std::memory_order_relaxed);  // written under reg_lock only
    if (!b) {
      auto nb = std::make_unique<slot_block>();
      for (auto& s : *nb) s.store(nullptr, std::memory_order_relaxed);
      b = nb.get();
      blocks.push_back(std::move(nb));
      // release: pairs with the acquire load in lookup().
      top[id >> slot_bits].store(b, std::memory_order_release);
    }
    const vm_entry* raw = e.get();
    entries.push_back(std::move(e));
    // release: pairs with the acquire load in lookup().
    (*b)[id & (slots - 1)].store(raw, std::memory_order_release);
    return errc::ok;
  }

  void record(const dev::access_check& c, stale_reason why, va_t cpu, const cpu_translation& t)
      SVM_EXCLUDES(reports_lock) {
    stale.fetch_add(1, std::memory_order_relaxed);
    stale_report r;
    r.vm = c.vm;
    r.engine = c.engine;
    r.acc = c.acc;
    r.reason = why;
    r.gva = c.gva;
    r.cpu_va = cpu;
    r.pte = c.pte;
    r.level = c.level;
    r.tlb_hit = c.tlb_hit;
    r.dev_pool = static_cast<unsigned>(c.pfn >> mm_pool_shift);
    r.dev_pfn = c.pfn & ((pfn_t{1} << mm_pool_shift) - 1);
    r.dev_generation = c.mem ? c.mem->frame_generation(c.pfn) : 0;
    r.cpu = t;
    lock_guard g(reports_lock);
    if (reports.size() < opts.max_reports) reports.push_back(r);
  }

  void check(const dev::access_check& c) SVM_EXCLUDES(reports_lock, reg_lock) {
    // Every access lands in exactly one of svm, not_svm, unwatched; checked()
    // is their sum (one RMW per access on the engine's own line).
    engine_counters& k = ctr[c.engine % ctr.size()];
    if ((c.pte & gpu_vm::bo_pte_bit) != 0) {
      bump(k.not_svm);
      return;
    }
    const vm_entry* e = lookup(c.vm);
    if (!e) {
      bump(k.unwatched);
      return;
    }
    bump(k.svm);
    va_t cpu = 0;
    if (!e->to_cpu(c.gva, cpu)) {
      record(c, stale_reason::not_mirrored, 0, {});
      return;
    }
    if (!e->m) {  // the mm is gone: the CPU maps nothing anywhere
      record(c, stale_reason::mm_released, cpu, {});
      return;
    }
    unsigned dpool = static_cast<unsigned>(c.pfn >> mm_pool_shift);
    pfn_t dpfn = c.pfn & ((pfn_t{1} << mm_pool_shift) - 1);
    const bool write = needs_write(c.acc);
    if (c.ap == aperture::vram) {
      // An SVM page migrated to VRAM: the device frame is a frame of the
      // VRAM pool, which the mm has attached as a device-private pool. The
      // rule is the same, with that pool's index.
      dpfn = c.pfn;
      dpool = 0;
      for (unsigned i = 1, n = e->m->pool_count(); i < n; ++i) {
        if (e->m->kind_of_pool(i) == pool_kind::device_private &&
            static_cast<const phys_mem*>(&e->m->pool(i)) == c.mem) {
          dpool = i;
          break;
        }
      }
    }

    // 1. What the CPU maps now (acquire loads of the CPU PTEs).
    const cpu_translation t = e->m->cpu_translate(cpu);
    stale_reason why;
    if (c.ap == aperture::vram && dpool == 0) {
      why = stale_reason::frame_mismatch;  // VRAM that is no pool of this mm
    } else if (t.present) {
      if (t.pool == dpool && t.pfn == dpfn) {
        if (!write || t.writable) return;
        why = stale_reason::cpu_read_only;
      } else {
        why = stale_reason::frame_mismatch;
      }
    } else {
      // A device-private entry is not present to the CPU, but it names the
      // frame the device legitimately maps (hmm_range_fault hands it to its
      // owner). Read after cpu_translate, so it is still "now".
      const pt::translation raw = e->m->raw_pte(cpu);
      if (raw.level == 0 && cpu_pte::is_devpriv(raw.entry) && cpu_pte::pool(raw.entry) == dpool &&
          cpu_pte::pfn(raw.entry) == dpfn) {
        if (!write || cpu_pte::is_writable(raw.entry)) return;
        why = stale_reason::cpu_read_only;
      } else {
        why = stale_reason::cpu_not_present;
      }
    }
    // 2. Only on a mismatch: is an invalidation of the page still active?
    // (after step 1: see the header's interleaving).
    const va_t page = align_down(cpu, page_size);
    if (e->m->notifiers().range_is_invalidating(page, page + page_size)) {
      bump(k.excused);
      return;
    }
    record(c, why, cpu, t);
  }

  std::uint64_t sum(std::atomic<std::uint64_t> engine_counters::*f) const noexcept {
    std::uint64_t s = 0;
    for (const auto& k : ctr) s += (k.*f).load(std::memory_order_relaxed);
    return s;
  }
};

const char* to_string(stale_reason r) noexcept {
  switch (r) {
    case stale_reason::not_mirrored: return "not_mirrored";
    case stale_reason::cpu_not_present: return "cpu_not_present";
    case stale_reason::frame_mismatch: return "frame_mismatch";
    case stale_reason::cpu_read_only: return "cpu_read_only";
    case stale_reason::mm_released: return "mm_released";
  }
  return "?";
}

std::string describe(const stale_report& r) {
  char buf[512];
  char cpu[160];
  if (r.cpu.present)
    std::snprintf(cpu, sizeof cpu, "cpu maps pool %u pfn 0x%" PRIx64 " gen %" PRIu64 " %s%s", r.cpu.pool,
                  static_cast<std::uint64_t>(r.cpu.pfn), r.cpu.generation, r.cpu.writable ? "rw" : "ro",
                  r.cpu.zero_page ? " (zero page)" : "");
  else
    std::snprintf(cpu, sizeof cpu, "cpu maps nothing");
  std::snprintf(buf, sizeof buf,
                "stale %s vm %u gva 0x%" PRIx64 " cpu 0x%" PRIx64 " engine %u (tlb %s, %s pte 0x%" PRIx64
                "): device frame pool %u pfn 0x%" PRIx64 " gen %" PRIu64 "; %s (%s)",
                to_string(r.acc), r.vm, r.gva, r.cpu_va, r.engine, r.tlb_hit ? "hit" : "miss",
                r.level == 0 ? "4K" : r.level == 1 ? "2M" : "1G", r.pte, r.dev_pool,
                static_cast<std::uint64_t>(r.dev_pfn), r.dev_generation, cpu, to_string(r.reason));
  return buf;
}

// ---- the teardown of a watched mm ------------------------------------------------

void access_oracle::mm_sub::release(svm::mm&) noexcept {
  // Runs at the start of the mm's teardown, before anything of it is freed,
  // holding the mm's release lock (rank driver); takes the registry lock
  // (leaf) inside it.
  bool attached;
  {
    lock_guard g(st.reg_lock);
    for (auto& s : st.subs)
      if (s.sub.get() == this) s.gone = true;
    attached = st.attached;
    // Every registration of this mm becomes an mm-less copy (published
    // like any registration, so a check sees either the old entry, whose
    // mm is still alive until the barrier below returns, or the new one).
    for (std::size_t hi = 0; hi < slots; ++hi) {
      slot_block* b = st.top[hi].load(std::memory_order_relaxed);  // written under reg_lock only
      if (!b) continue;
      for (std::size_t lo = 0; lo < slots; ++lo) {
        const vm_entry* e = (*b)[lo].load(std::memory_order_relaxed);
        if (!e || e->m != m) continue;
        auto dead = std::make_unique<vm_entry>(*e);
        dead->m = nullptr;
        (void)st.publish_locked(static_cast<dev::vm_id>((hi << slot_bits) | lo), std::move(dead));
      }
    }
  }
  // The barrier: a check that read the old entry runs inside its access;
  // a TLB invalidation returns only once every access that began before it
  // completed, on every engine. Not from an engine thread (EINVAL: it
  // cannot wait for itself, and its own check is not running). A detached
  // oracle has no check in flight that could still start.
  if (attached) (void)dev.hw().invalidate_tlb(0, {0, page_size});
}

// ---- access_oracle ------------------------------------------------------------

access_oracle::access_oracle(driver& dev, oracle_options o)
    : dev_(dev), st_(std::make_shared<state>(o)) {
  // The validator shares the state: a racing access after our destruction
  // still finds it alive (the device keeps the callable).
  dev_.hw().set_oracle([st = st_](const dev::access_check& c) { st->check(c); });
  lock_guard g(st_->reg_lock);
  st_->attached = true;
}

access_oracle::~access_oracle() {
  detach();
  // Unsubscribe from every mm still alive (a torn-down one already dropped
  // its subscription). Outside the registry lock: remove_release takes the
  // mm's release lock (rank driver) and waits for a release in progress.
  std::vector<mm_sub*> live;
  {
    lock_guard g(st_->reg_lock);
    for (auto& s : st_->subs)
      if (!s.gone) live.push_back(s.sub.get());
  }
  for (mm_sub* s : live) s->m->remove_release(*s);
}

void access_oracle::detach() {
  bool was;
  {
    lock_guard g(st_->reg_lock);
    was = st_->attached;
    st_->attached = false;
  }
  // Outside the registry lock: set_oracle may take the device's oracle lock.
  if (was) dev_.hw().set_oracle(nullptr);
}

bool access_oracle::attached() const {
  lock_guard g(st_->reg_lock);
  return st_->attached;
}

errc access_oracle::watch(const gpu_vm& vm, mm& m) {
  if (vm.config().mirror == mirror_kind::windows) return errc::inval;
  return watch(vm.id(), m, vm.config().mirror);
}

errc access_oracle::watch(const gpu_vm& vm, mm& m, std::vector<oracle_window> windows) {
  if (vm.config().mirror != mirror_kind::windows) return errc::inval;
  return watch(vm.id(), m, mirror_kind::windows, std::move(windows));
}

errc access_oracle::watch(dev::vm_id id, mm& m, mirror_kind kind, std::vector<oracle_window> windows) {
  if (id > dev::max_vm_id) return errc::inval;
  auto e = std::make_unique<vm_entry>();
  e->m = &m;
  e->kind = kind;
  if (kind == mirror_kind::windows) {
    for (const oracle_window& w : windows) {
      if (w.size == 0 || !is_aligned(w.cpu | w.gpu | w.size, page_size)) return errc::inval;
      if (w.cpu + w.size < w.cpu || w.gpu + w.size < w.gpu) return errc::inval;
    }
    std::sort(windows.begin(), windows.end(),
              [](const oracle_window& a, const oracle_window& b) { return a.gpu < b.gpu; });
    for (std::size_t i = 1; i < windows.size(); ++i)
      if (windows[i - 1].gpu + windows[i - 1].size > windows[i].gpu) return errc::inval;
    e->windows = std::move(windows);
  }
  // Subscribe to the mm's teardown on its first watch (outside the registry
  // lock: add_release takes the mm's release lock, rank driver).
  std::unique_ptr<mm_sub> fresh;
  {
    lock_guard g(st_->reg_lock);
    if (!st_->find_sub_locked(&m)) fresh = std::make_unique<mm_sub>(*st_, dev_, m);
  }
  if (fresh) {
    if (m.add_release(*fresh) != errc::ok) return errc::inval;  // the mm is torn down
    lock_guard g(st_->reg_lock);
    st_->subs.push_back({std::move(fresh), false});
  }
  lock_guard g(st_->reg_lock);
  // A teardown that ran since (it marked the subscription gone under this
  // lock) would never see this entry: refuse it instead.
  if (!st_->find_sub_locked(&m)) return errc::inval;
  return st_->publish_locked(id, std::move(e));
}

errc access_oracle::unwatch(dev::vm_id id) {
  if (id > dev::max_vm_id) return errc::noent;
  lock_guard g(st_->reg_lock);
  slot_block* b = st_->top[id >> slot_bits].load(std::memory_order_relaxed);  // written under reg_lock only
  if (!b || !(*b)[id & (slots - 1)].load(std::memory_order_relaxed)) return errc::noent;
  // release: pairs with the acquire load in lookup(), like every store to
  // a slot (a null publishes nothing, but costs nothing either).
  (*b)[id & (slots - 1)].store(nullptr, std::memory_order_release);
  return errc::ok;
}

std::uint64_t access_oracle::checked() const noexcept {
  return st_->sum(&engine_counters::svm) + st_->sum(&engine_counters::not_svm) +
         st_->sum(&engine_counters::unwatched);
}
std::uint64_t access_oracle::svm_checked() const noexcept { return st_->sum(&engine_counters::svm); }
std::uint64_t access_oracle::not_svm() const noexcept { return st_->sum(&engine_counters::not_svm); }
std::uint64_t access_oracle::unwatched() const noexcept { return st_->sum(&engine_counters::unwatched); }
std::uint64_t access_oracle::excused() const noexcept { return st_->sum(&engine_counters::excused); }
std::uint64_t access_oracle::stale() const noexcept { return st_->stale.load(std::memory_order_relaxed); }

oracle_counts access_oracle::counts() const noexcept {
  return {checked(), svm_checked(), not_svm(), unwatched(), excused(), stale()};
}

std::vector<stale_report> access_oracle::reports() const {
  lock_guard g(st_->reports_lock);
  return st_->reports;
}

void access_oracle::reset() {
  for (auto& k : st_->ctr)
    for (auto* f : {&k.svm, &k.not_svm, &k.unwatched, &k.excused}) f->store(0, std::memory_order_relaxed);
  st_->stale.store(0, std::memory_order_relaxed);
  lock_guard g(st_->reports_lock);
  st_->reports.clear();
}

void access_oracle::check(const dev::access_check& c) { st_->check(c); }

}  // namespace svm
