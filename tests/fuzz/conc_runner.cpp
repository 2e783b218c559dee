#include "fuzz/conc_runner.h"

#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "fuzz/range_kernel.h"
#include "fuzz/ref_model.h"
#include "svm/svm/gpu_vm.h"
#include "svm/svm/oracle.h"

namespace svm::fuzz {

namespace {

constexpr va_t cpu_base = universe_base;
constexpr std::uint64_t s_pages = 64, c_first = 256, c_span = 240, c_end = 512, b_first = 1024, b_end = 1088;
constexpr std::uint64_t half = page_size / 2;  // S: device bytes below, CPU bytes above
constexpr std::uint64_t cpu_tag = 0xc5c5ull << 48;
constexpr unsigned cpu_ops = 11, dev_ops = 8;
constexpr std::size_t cpu_rec_bytes = 4, dev_rec_bytes = 5;  // argument bytes after the op byte

// Totals over all runs; relaxed: statistics, read after the runs.
std::atomic<std::uint64_t> g_runs{0}, g_ops{0}, g_accesses{0}, g_kernels{0}, g_faults{0}, g_replays{0},
    g_cancels{0}, g_checked{0}, g_concurrent{0}, g_to_vram{0}, g_to_ram{0};

struct rec {
  std::uint8_t op = 0;
  std::array<std::uint8_t, 5> a{};
};
struct phase {
  std::uint8_t sched = 0;
  std::vector<rec> cpu, dev;
};
struct conc_program {
  std::uint8_t config = 0, vram = 0;
  std::vector<phase> phases;
};

conc_program decode_conc(std::span<const std::uint8_t> d) {
  std::size_t pos = 0;
  auto u8 = [&]() -> std::uint8_t { return pos < d.size() ? d[pos++] : 0; };
  conc_program p;
  p.config = u8();
  p.vram = u8();
  while (pos < d.size() && p.phases.size() < max_phases) {
    phase ph;
    ph.sched = u8();
    for (unsigned k = 0; k < (ph.sched & 7u); ++k) {
      rec r;
      r.op = u8();
      for (std::size_t b = 0; b < cpu_rec_bytes; ++b) r.a[b] = u8();
      ph.cpu.push_back(r);
    }
    for (unsigned k = 0; k < ((ph.sched >> 3) & 7u); ++k) {
      rec r;
      r.op = u8();
      for (std::size_t b = 0; b < dev_rec_bytes; ++b) r.a[b] = u8();
      ph.dev.push_back(r);
    }
    p.phases.push_back(std::move(ph));
  }
  return p;
}

std::vector<std::uint8_t> encode_conc(const conc_program& p) {
  std::vector<std::uint8_t> out{p.config, p.vram};
  for (const phase& ph : p.phases) {
    out.push_back(static_cast<std::uint8_t>((ph.sched & 0xc0) | (ph.cpu.size() & 7) | (ph.dev.size() & 7) << 3));
    for (const rec& r : ph.cpu) {
      out.push_back(r.op);
      out.insert(out.end(), r.a.begin(), r.a.begin() + cpu_rec_bytes);
    }
    for (const rec& r : ph.dev) {
      out.push_back(r.op);
      out.insert(out.end(), r.a.begin(), r.a.begin() + dev_rec_bytes);
    }
  }
  return out;
}

std::uint64_t pattern(std::uint8_t v, std::size_t salt) { return v * 0x0101010101010101ull + salt; }
va_t page_at(std::uint64_t pg) { return cpu_base + pg * page_size; }
va_t c_page(std::uint16_t pg) { return page_at(c_first + pg % c_span); }

std::string hex(std::uint64_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}
std::string bytes_hex(std::span<const std::uint8_t> b) {
  std::ostringstream os;
  os << std::hex;
  for (auto x : b) os << (x < 16 ? "0" : "") << static_cast<unsigned>(x);
  return os.str();
}
template <class T>
std::string show(const result<T>& r) {
  return r.ok() ? "ok " + hex(static_cast<std::uint64_t>(*r)) : errc_name(r.error());
}

enum class region : std::uint8_t { s, c, b };

class conc_runner {
 public:
  conc_runner(const conc_program& p, const run_hooks* h);
  ~conc_runner();
  run_result run();

 private:
  // The CPU stream (one thread at a time): m_, child_, cm_.
  bool cpu_step(std::size_t ph, std::size_t k, const rec& r);
  // The device stream (one thread at a time): vm_'s BOs, dm_, accesses_.
  bool dev_step(std::size_t ph, std::size_t k, const rec& r);
  bool kernel(std::size_t ph, std::size_t k, const rec& r, region g);
  // Between phases (no stream running).
  bool check_phase(std::size_t ph);
  std::uint64_t pick_bo(std::uint8_t b) const {
    const auto& live = dm_.live_bos();
    return live.empty() ? 100000 : live[b % live.size()];
  }
  static std::string where(const char* stream, std::size_t ph, std::size_t k, const rec& r) {
    std::ostringstream os;
    os << stream << " phase " << ph << " record " << k << " op " << unsigned{r.op} << " args [" << bytes_hex(r.a)
       << "]: ";
    return os.str();
  }

  const conc_program& prog_;
  const run_hooks* hooks_;
  ref_model cm_;  ///< the CPU stream's model: S (its half) and C
  ref_model dm_;  ///< the device stream's model: S (its half) and the BOs
  std::unique_ptr<mm> m_;
  std::unique_ptr<mm> child_;
  std::unique_ptr<driver> dev_;
  std::unique_ptr<gpu_vm> vm_;
  std::unique_ptr<access_oracle> oracle_;
  std::string cpu_err_, dev_err_, err_;  ///< owned by their stream's thread; read after the join
  std::uint64_t accesses_ = 0, kernels_ = 0, kernels_beside_ = 0;
  bool beside_ = false;  ///< the phase runs its two streams at once (set between phases)
  bool to_vram_ = false;  ///< the SVM placement mode (conc_runner.h, byte 1); immutable
  static constexpr int foreign_owner_ = 0;  // the device-private pool's owner (not the VM)
};

conc_runner::conc_runner(const conc_program& p, const run_hooks* h)
    : prog_(p), hooks_(h), cm_(cpu_base, mm_options{}.mmap_limit), dm_(cpu_base, mm_options{}.mmap_limit) {
  const std::uint8_t c = p.config;
  mm_options mo;
  mo.frames = 4096;
  mo.thp = (c & 0x20) ? thp_mode::always : thp_mode::madvise;
  mo.mmap_base = cpu_base;
  m_ = std::make_unique<mm>(mo);
  (void)m_->attach_pool(std::make_shared<frame_pool>(1024), pool_kind::numa);
  (void)m_->attach_pool(std::make_shared<frame_pool>(1024), pool_kind::device_private, &foreign_owner_);
  driver_config dc;
  dc.hw.engines = (c & 0x10) ? 2 : 1;
  dc.hw.vram_bytes = (16 + p.vram % 48) * page_size;
  dc.handler_threads = 1;
  dev_ = driver::create(dc).value();
  vm_config vc;
  vc.seq = (c & 1) ? seq_mode::notifier : seq_mode::pgtable;
  vc.impl = (c & 2) ? mirror_impl::range : mirror_impl::page;
  switch ((c >> 2) & 3) {
    case 0: break;
    case 1: vc.window = std::make_shared<fixed_window_policy>(page_size); break;
    case 2: vc.window = std::make_shared<fixed_window_policy>(std::uint64_t{64} << 10); break;
    case 3: vc.window = std::make_shared<fixed_window_policy>(huge_size); break;
  }
  // A fault on S must never fail; a generous bound keeps a loaded machine
  // (sanitizers, parallel builds) from turning descheduling into EBUSY.
  vc.fault_timeout = std::chrono::seconds(10);
  to_vram_ = p.vram >= 192;
  if (to_vram_) vc.migrate_timeslice = std::chrono::nanoseconds(0);
  vm_ = gpu_vm::create(*dev_, *m_, vc).value();
  oracle_ = std::make_unique<access_oracle>(*dev_);
  (void)oracle_->watch(*vm_, *m_);
  const prot rw = prot::read | prot::write;
  const map fl = map::private_ | map::anonymous | map::fixed;
  auto ms = m_->mmap(page_at(0), s_pages * page_size, rw, fl);
  auto mc = m_->mmap(page_at(c_first), 64 * page_size, rw, fl);
  if (!ms.ok() || !mc.ok()) {
    std::fprintf(stderr, "svm_fuzz_conc: setup mmap failed\n");
    std::abort();
  }
  (void)cm_.mmap_fixed(cm_.parent, page_at(0), s_pages * page_size, rw, false, -1, 0);
  (void)cm_.mmap_fixed(cm_.parent, page_at(c_first), 64 * page_size, rw, false, -1, 0);
  (void)dm_.mmap_fixed(dm_.parent, page_at(0), s_pages * page_size, rw, false, -1, 0);
  if (to_vram_) {
    // S and C prefer VRAM: both streams then race against migrations.
    const svm_attrs at{.preferred = mem_location::vram,
                       .atomics = (p.vram & 1) ? atomic_mode::device : atomic_mode::any,
                       .granularity = (p.vram & 2) ? page_size : std::uint64_t{64} << 10};
    if (vm_->set_attrs(page_at(0), page_at(512) - page_at(0), at) != errc::ok) {
      std::fprintf(stderr, "svm_fuzz_conc: set_attrs failed\n");
      std::abort();
    }
  }
}

conc_runner::~conc_runner() {
  const dev::device_stats ds = dev_->hw().stats();
  g_faults.fetch_add(ds.faults, std::memory_order_relaxed);
  g_replays.fetch_add(ds.replays, std::memory_order_relaxed);
  g_cancels.fetch_add(ds.cancels, std::memory_order_relaxed);
  g_checked.fetch_add(oracle_->svm_checked(), std::memory_order_relaxed);
  const vm_stats vs = vm_->stats();
  g_to_vram.fetch_add(vs.migrations_to_vram, std::memory_order_relaxed);
  g_to_ram.fetch_add(vs.migrations_to_ram, std::memory_order_relaxed);
  oracle_.reset();
  vm_.reset();
  dev_.reset();
  child_.reset();
  m_.reset();
}

bool conc_runner::cpu_step(std::size_t ph, std::size_t k, const rec& r) {
  const auto& a = r.a;
  const std::uint16_t pg = static_cast<std::uint16_t>(a[0] | (a[1] << 8));
  const std::uint64_t len = (1 + a[2] % 16) * page_size;
  auto bad = [&](const std::string& what) {
    cpu_err_ = where("cpu", ph, k, r) + what;
    return false;
  };
  auto cmp_e = [&](errc got, errc want) {
    return got == want || bad(std::string("svm ") + errc_name(got) + ", model " + errc_name(want));
  };
  const va_t va = c_page(pg);
  switch (r.op % cpu_ops) {
    case 0: {
      const bool shared = a[3] & 1;
      const prot p = prot((a[3] >> 1) & 7);
      auto got = m_->mmap(va, len, p, (shared ? map::shared : map::private_) | map::anonymous | map::fixed);
      auto want = cm_.mmap_fixed(cm_.parent, va, len, p, shared, -1, 0);
      return show(got) == show(want) || bad("mmap: svm " + show(got) + ", model " + show(want));
    }
    case 1: return cmp_e(m_->munmap(va, len), cm_.munmap(cm_.parent, va, len));
    case 2: return cmp_e(m_->mprotect(va, len, prot(a[3] & 7)), cm_.mprotect(cm_.parent, va, len, prot(a[3] & 7)));
    case 3: return cmp_e(m_->madvise(va, len, madvice::dontneed), cm_.madvise(cm_.parent, va, len, madvice::dontneed));
    case 4: {
      const std::uint64_t nl = (1 + a[3] % 16) * page_size;
      const va_t na = c_page(static_cast<std::uint16_t>(a[3] * 7));
      const auto fl = mremap_flags::maymove | mremap_flags::fixed;
      auto got = m_->mremap(va, len, nl, fl, na);
      auto want = cm_.mremap(cm_.parent, va, len, nl, fl, na);
      return show(got) == show(want) || bad("mremap: svm " + show(got) + ", model " + show(want));
    }
    case 5: {
      const va_t at = va + (a[2] % 256) * 16;
      const std::uint64_t v = cpu_tag | (std::uint64_t{ph} << 16) | (std::uint64_t{k} << 8) | a[3];
      std::uint8_t b[8];
      std::memcpy(b, &v, 8);
      return cmp_e(m_->write(at, std::as_bytes(std::span{b})), cm_.cpu_write(cm_.parent, at, b));
    }
    case 6: {
      const va_t at = va + (a[2] % 256) * 16;
      std::uint8_t got[8] = {}, want[8] = {};
      const errc ge = m_->read(at, std::as_writable_bytes(std::span{got}));
      const errc we = cm_.cpu_read(cm_.parent, at, want);
      if (!cmp_e(ge, we)) return false;
      return ge != errc::ok || std::memcmp(got, want, 8) == 0 ||
             bad("cpu load at " + hex(at) + ": svm " + bytes_hex(got) + ", model " + bytes_hex(want));
    }
    case 7: {
      const va_t s = page_at(a[0] % s_pages);
      const std::uint64_t sl = (1 + a[2] % 16) * page_size;
      const unsigned t = a[3] % 3;
      auto got = t == 0 ? m_->reclaim(s, sl) : m_->migrate(s, sl, t, t == 2 ? &foreign_owner_ : nullptr);
      return cmp_e(got.ok() ? errc::ok : got.error(), cm_.reclaim_or_migrate_check(s, sl));
    }
    case 8:
      if (a[3] & 1) {
        child_.reset();
        cm_.child.reset();
        return true;
      } else {
        child_.reset();
        auto ch = m_->fork();
        if (!ch.ok()) return bad(std::string("fork: ") + errc_name(ch.error()));
        child_ = std::move(*ch);
        cm_.fork();
        return true;
      }
    case 9: {
      const va_t at = page_at(a[0] % s_pages) + half + (a[2] % 256) * 8;
      auto got = m_->atomic_fetch_add(at, std::uint64_t{a[3]} + 1);
      auto want = cm_.cpu_fetch_add(cm_.parent, at, std::uint64_t{a[3]} + 1);
      return show(got) == show(want) || bad("fetch_add: svm " + show(got) + ", model " + show(want));
    }
    default: {
      const va_t s = page_at(a[0] % s_pages);
      const std::uint64_t sl = (1 + a[2] % 16) * page_size;
      const madvice adv = (a[3] & 1) ? madvice::nohugepage : madvice::hugepage;
      return cmp_e(m_->madvise(s, sl, adv), cm_.madvise(cm_.parent, s, sl, adv));
    }
  }
}

bool conc_runner::kernel(std::size_t ph, std::size_t k, const rec& r, region g) {
  const auto& a = r.a;
  const std::uint8_t count = a[1], s = a[2], kk = a[3], v = a[4];
  const std::uint64_t first = g == region::s ? a[0] % s_pages : g == region::c ? c_first + a[0] % 256 : b_first + a[0] % 64;
  const std::uint64_t end = g == region::s ? s_pages : g == region::c ? c_end : b_end;
  const std::uint64_t stride = 1 + (s & 3);
  unsigned items = 1 + ((s >> 2) & 7);
  const std::size_t salt = ph * 64 + k;
  std::vector<range_access> acc;
  for (std::uint64_t j = 0; j <= count % 64; ++j) {
    const std::uint64_t page = first + j * stride;
    if (page >= end) break;
    range_access x;
    unsigned kind = kk % 8;
    if (kind >= 6) kind = static_cast<unsigned>((j + v) % 6);
    x.prefetch = kind == 5;
    if (g == region::c) {
      x.op = dev_op::load;
      x.size = 8;
      x.va = page_at(page) + ((v + 7 * j) % 256) * 16;
    } else {
      x.op = kind == 1 ? dev_op::store : kind == 2 ? dev_op::add : kind == 3 ? dev_op::cmpxchg : kind == 4 ? dev_op::xchg
                                                                                                   : dev_op::load;
      x.size = 1u << ((kk >> 3) & 3);
      const std::uint64_t slots = g == region::s ? half / 16 : page_size / 16;
      x.va = page_at(page) + align_down(((v + 7 * j) % slots) * 16 + ((kk >> 6) & 3) * 4, x.size);
    }
    x.v = pattern(static_cast<std::uint8_t>(v + j), salt);
    x.desired = pattern(static_cast<std::uint8_t>(v + j + 1), salt);
    acc.push_back(x);
  }
  auto bad = [&](const std::string& what) {
    dev_err_ = where("device", ph, k, r) + what;
    return false;
  };
  ++kernels_;
  if (beside_) ++kernels_beside_;
  if (g == region::c) {
    // Racing the CPU stream: each load is 0 or a CPU-tagged value; a failure
    // is a cancelled fault the churn explains, at an access an item stopped at.
    const range_outcome o = run_range_kernel(*dev_, *vm_, acc, items, false, [] {});
    for (std::size_t d : o.done) accesses_ += d;
    for (std::size_t j = 0; j < acc.size(); ++j)
      if (o.completed(j) && !acc[j].prefetch && o.vals[j] != 0 && (o.vals[j] & (0xffffull << 48)) != cpu_tag)
        return bad("load " + std::to_string(j) + " at " + hex(acc[j].va) + " read " + hex(o.vals[j]) +
                   ": neither zero nor a CPU-written value");
    if (o.st.ok()) return true;
    bool at_access = false;
    for (unsigned w = 0; w < o.items; ++w)
      at_access = at_access || (o.next_of(w) < acc.size() && acc[o.next_of(w)].va == o.st.address);
    const bool reason = o.st.reason == errc::fault || o.st.reason == errc::perm || o.st.reason == errc::busy;
    if (o.st.error == errc::canceled && reason && at_access) return true;
    return bad(std::string("kernel on the churned buffer: ") + errc_name(o.st.error) + "/" + errc_name(o.st.reason) +
               " at " + hex(o.st.address));
  }
  // S and B: exact against the device model.
  ref_model probe = dm_;
  std::vector<ref_dev_result> want(acc.size());
  std::size_t first_fail = acc.size();
  for (std::size_t j = 0; j < acc.size(); ++j) {
    if (acc[j].prefetch) {
      const ref_dev_result rd = probe.dev_access(align_down(acc[j].va, 8), 1, dev_op::load, 0, 0);
      want[j] = {errc::ok, errc::ok, rd.error == errc::ok ? 1u : 0u};
      continue;
    }
    want[j] = probe.dev_access(acc[j].va, acc[j].size, acc[j].op, acc[j].v, acc[j].desired);
    if (want[j].error != errc::ok) {
      first_fail = j;
      break;
    }
  }
  if (first_fail < acc.size()) items = 1;
  const range_outcome o = run_range_kernel(*dev_, *vm_, acc, items, false, [] {});
  std::size_t done = 0;
  for (std::size_t d : o.done) done += d;
  accesses_ += done;
  if (first_fail < acc.size()) {
    const ref_dev_result& f = want[first_fail];
    if (o.st.error != f.error || o.st.reason != f.reason || o.st.address != acc[first_fail].va || o.done[0] != first_fail)
      return bad(std::string("kernel: svm ") + errc_name(o.st.error) + "/" + errc_name(o.st.reason) + " at " +
                 hex(o.st.address) + " after " + std::to_string(o.done[0]) + "; model " + errc_name(f.error) + "/" +
                 errc_name(f.reason) + " at " + hex(acc[first_fail].va) + " after " + std::to_string(first_fail));
  } else if (!o.st.ok() || done != acc.size()) {
    return bad(std::string(g == region::s ? "kernel on the stable buffer" : "kernel on BOs") + ": " +
               errc_name(o.st.error) + "/" + errc_name(o.st.reason) + " at " + hex(o.st.address) + " after " +
               std::to_string(done) + " of " + std::to_string(acc.size()) + "; model ok");
  }
  for (std::size_t j = 0; j < acc.size(); ++j) {
    if (!o.completed(j)) continue;
    if (acc[j].prefetch) {
      if (o.vals[j] == 1 && want[j].value == 0) return bad("prefetch at " + hex(acc[j].va) + " mapped an unreadable page");
      continue;
    }
    if (acc[j].op != dev_op::store && o.vals[j] != want[j].value)
      return bad("access " + std::to_string(j) + " at " + hex(acc[j].va) + ": svm " + hex(o.vals[j]) + ", model " +
                 hex(want[j].value));
  }
  dm_ = std::move(probe);
  return true;
}

bool conc_runner::dev_step(std::size_t ph, std::size_t k, const rec& r) {
  const auto& a = r.a;
  auto cmp_e = [&](errc got, errc want) {
    if (got == want) return true;
    dev_err_ = where("device", ph, k, r) + "svm " + errc_name(got) + ", model " + errc_name(want);
    return false;
  };
  switch (r.op % dev_ops) {
    case 0: return kernel(ph, k, r, region::s);
    case 1: return kernel(ph, k, r, region::c);
    case 2: return kernel(ph, k, r, region::b);
    case 3: {
      const std::uint64_t pages = 1 + a[0] % 8;
      const placement at = (a[1] & 1) ? placement::system : placement::vram;
      auto got = vm_->create_bo(pages * page_size, at);
      // Placement mode: SVM pages hold VRAM too, and those under a CPU
      // migration or out of eviction's reach cannot make room (a fork
      // child's, pages mremap moved): a VRAM BO may be refused.
      if (!got.ok() && got.error() == errc::nomem && to_vram_ && at == placement::vram) return true;
      if (!got.ok()) return cmp_e(got.error(), errc::ok);
      const std::uint64_t want = dm_.create_bo(pages);
      if (*got == want) return true;
      dev_err_ = where("device", ph, k, r) + "create_bo id: svm " + hex(*got) + ", model " + hex(want);
      return false;
    }
    case 4: {
      const std::uint64_t id = pick_bo(a[0]);
      return cmp_e(vm_->destroy_bo(id), dm_.destroy_bo(id));
    }
    case 5: {
      const std::uint64_t id = pick_bo(a[0]);
      const va_t gva = page_at(b_first + a[1] % 64);
      const std::uint64_t off = (a[2] % 16) * page_size, size = (1 + a[3] % 16) * page_size;
      return cmp_e(vm_->bind(id, gva, off, size), dm_.bind(id, gva, off, size));
    }
    case 6: {
      const va_t gva = page_at(b_first + a[0] % 64);
      const std::uint64_t size = (1 + a[1] % 16) * page_size;
      return cmp_e(vm_->unbind(gva, size), dm_.unbind(gva, size));
    }
    default: {
      const std::uint64_t id = pick_bo(a[0]);
      errc want = errc::noent;
      if (dm_.bo_exists(id)) {
        auto at = vm_->bo_placement(id);
        want = at.ok() && *at == placement::vram ? errc::ok : errc::inval;
      }
      return cmp_e(vm_->evict(id), want);
    }
  }
}

bool conc_runner::check_phase(std::size_t ph) {
  if (oracle_->stale() != 0) {
    std::string rs;
    for (const auto& rep : oracle_->reports()) rs += "\n  " + describe(rep);
    err_ = "after phase " + std::to_string(ph) + ": access oracle saw " + std::to_string(oracle_->stale()) +
           " stale accesses:" + rs;
    return false;
  }
  // The stable buffer, every byte: the device's half as the device model
  // says, the CPU's half as the CPU model says.
  std::vector<std::uint8_t> got(page_size), want(page_size);
  for (std::uint64_t p = 0; p < s_pages; ++p) {
    const va_t va = page_at(p);
    const errc ge = m_->read(va, std::as_writable_bytes(std::span{got}));
    const errc w1 = dm_.cpu_read(dm_.parent, va, std::span{want}.first(half));
    const errc w2 = cm_.cpu_read(cm_.parent, va + half, std::span{want}.subspan(half));
    if (ge != errc::ok || w1 != errc::ok || w2 != errc::ok || got != want) {
      std::size_t at = 0;
      while (at < page_size && got[at] == want[at]) ++at;
      const std::size_t lo = std::min<std::size_t>(align_down(at, 8), page_size - 8);
      err_ = "after phase " + std::to_string(ph) + ": stable page " + std::to_string(p) + " (" + errc_name(ge) +
             ") differs at byte " + std::to_string(at) + " (" + (at < half ? "device" : "CPU") + " half): svm " +
             bytes_hex(std::span{got}.subspan(lo, 8)) + ", model " + bytes_hex(std::span{want}.subspan(lo, 8));
      return false;
    }
  }
  return true;
}

run_result conc_runner::run() {
  run_result res;
  for (std::size_t ph = 0; ph < prog_.phases.size(); ++ph) {
    const phase& p = prog_.phases[ph];
    auto cpu_chunk = [&] {
      for (std::size_t k = 0; k < p.cpu.size(); ++k)
        if (!cpu_step(ph, k, p.cpu[k])) return;
    };
    auto dev_chunk = [&] {
      for (std::size_t k = 0; k < p.dev.size(); ++k)
        if (!dev_step(ph, k, p.dev[k])) return;
    };
    beside_ = !(p.sched & 0x40);
    if (p.sched & 0x40) {
      if (p.sched & 0x80) {
        dev_chunk();
        cpu_chunk();
      } else {
        cpu_chunk();
        dev_chunk();
      }
    } else {
      std::thread cpu(cpu_chunk);  // joined below: the phase's barrier
      dev_chunk();
      cpu.join();
    }
    res.ops += p.cpu.size() + p.dev.size();
    if (hooks_ && hooks_->after_op) hooks_->after_op(ph, *m_);
    if (!cpu_err_.empty() || !dev_err_.empty() || !check_phase(ph)) {
      res.ok = false;
      res.message = !cpu_err_.empty() ? cpu_err_ : !dev_err_.empty() ? dev_err_ : err_;
      break;
    }
  }
  res.accesses = accesses_;
  g_kernels.fetch_add(kernels_, std::memory_order_relaxed);
  g_concurrent.fetch_add(kernels_beside_, std::memory_order_relaxed);
  return res;
}

}  // namespace

run_result run_concurrent(std::span<const std::uint8_t> data, const run_hooks* hooks) {
  const conc_program p = decode_conc(data);
  run_result res;
  {
    conc_runner r(p, hooks);
    res = r.run();
  }
  g_runs.fetch_add(1, std::memory_order_relaxed);
  g_ops.fetch_add(res.ops, std::memory_order_relaxed);
  g_accesses.fetch_add(res.accesses, std::memory_order_relaxed);
  return res;
}

run_totals concurrent_totals() noexcept {
  run_totals t;
  t.runs = g_runs.load(std::memory_order_relaxed);
  t.ops = g_ops.load(std::memory_order_relaxed);
  t.accesses = g_accesses.load(std::memory_order_relaxed);
  t.kernels = g_kernels.load(std::memory_order_relaxed);
  t.faults = g_faults.load(std::memory_order_relaxed);
  t.replays = g_replays.load(std::memory_order_relaxed);
  t.cancels = g_cancels.load(std::memory_order_relaxed);
  t.oracle_checked = g_checked.load(std::memory_order_relaxed);
  t.concurrent = g_concurrent.load(std::memory_order_relaxed);
  t.migrations_to_vram = g_to_vram.load(std::memory_order_relaxed);
  t.migrations_to_ram = g_to_ram.load(std::memory_order_relaxed);
  return t;
}

// ---- the seed corpus -------------------------------------------------------------

namespace {

// Readable seeds over the encoding (conc_runner.h).
class cseed {
 public:
  explicit cseed(std::uint8_t config, std::uint8_t vram = 48) {
    p_.config = config;
    p_.vram = vram;
  }
  /// CPU records.
  static rec mmap(std::uint16_t pg, std::uint8_t n, std::uint8_t fl = 6) { return c(0, pg, n, fl); }
  static rec munmap(std::uint16_t pg, std::uint8_t n) { return c(1, pg, n, 0); }
  static rec mprotect(std::uint16_t pg, std::uint8_t n, std::uint8_t p) { return c(2, pg, n, p); }
  static rec dontneed(std::uint16_t pg, std::uint8_t n) { return c(3, pg, n, 0); }
  static rec mremap(std::uint16_t pg, std::uint8_t n, std::uint8_t d) { return c(4, pg, n, d); }
  static rec store(std::uint16_t pg, std::uint8_t off, std::uint8_t v) { return c(5, pg, off, v); }
  static rec load(std::uint16_t pg, std::uint8_t off) { return c(6, pg, off, 0); }
  static rec reclaim(std::uint8_t pg, std::uint8_t n, std::uint8_t t = 0) { return c(7, pg, n, t); }
  static rec fork() { return c(8, 0, 0, 0); }
  static rec child_exit() { return c(8, 0, 0, 1); }
  static rec fetch_add(std::uint8_t pg, std::uint8_t slot, std::uint8_t v) { return c(9, pg, slot, v); }
  static rec thp(std::uint8_t pg, std::uint8_t n, bool on) { return c(10, pg, n, on ? 0 : 1); }
  /// Device records: kernels on S, C, B (start, count-1, s = (items-1)<<2 | stride-1, kind, v), BO ops.
  static rec k_s(std::uint8_t start, std::uint8_t cnt, std::uint8_t s, std::uint8_t kind, std::uint8_t v) {
    return d(0, {start, cnt, s, kind, v});
  }
  static rec k_c(std::uint8_t start, std::uint8_t cnt, std::uint8_t s, std::uint8_t kind, std::uint8_t v) {
    return d(1, {start, cnt, s, kind, v});
  }
  static rec k_b(std::uint8_t start, std::uint8_t cnt, std::uint8_t s, std::uint8_t kind, std::uint8_t v) {
    return d(2, {start, cnt, s, kind, v});
  }
  static rec bo_create(std::uint8_t n, bool system = false) { return d(3, {n, static_cast<std::uint8_t>(system), 0, 0, 0}); }
  static rec bo_destroy(std::uint8_t b) { return d(4, {b, 0, 0, 0, 0}); }
  static rec bind(std::uint8_t b, std::uint8_t pg, std::uint8_t boff, std::uint8_t n) { return d(5, {b, pg, boff, n, 0}); }
  static rec unbind(std::uint8_t pg, std::uint8_t n) { return d(6, {pg, n, 0, 0, 0}); }
  static rec evict(std::uint8_t b) { return d(7, {b, 0, 0, 0, 0}); }

  /// A phase run at once on two threads (sequential: one after the other,
  /// the device first if dev_first).
  cseed& phase(std::vector<rec> cpu, std::vector<rec> dev, bool sequential = false, bool dev_first = false) {
    phase_t ph;
    ph.sched = static_cast<std::uint8_t>((sequential ? 0x40 : 0) | (dev_first ? 0x80 : 0));
    ph.cpu = std::move(cpu);
    ph.dev = std::move(dev);
    p_.phases.push_back(std::move(ph));
    return *this;
  }
  [[nodiscard]] std::vector<std::uint8_t> bytes() const { return encode_conc(p_); }

 private:
  using phase_t = fuzz::phase;
  static rec c(std::uint8_t op, std::uint16_t pg, std::uint8_t b2, std::uint8_t b3) {
    return rec{op, {static_cast<std::uint8_t>(pg & 0xff), static_cast<std::uint8_t>(pg >> 8), b2, b3, 0}};
  }
  static rec d(std::uint8_t op, std::array<std::uint8_t, 5> a) { return rec{op, a}; }
  conc_program p_;
};

// Kernel kinds as in op_runner.h.
constexpr std::uint8_t ld8 = 0 | 3 << 3, st8 = 1 | 3 << 3, add8 = 2 | 3 << 3, mix8 = 6 | 3 << 3, mix4 = 6 | 2 << 3,
                       mix1 = 6, pf = 5;
constexpr std::uint8_t its(unsigned n, unsigned stride = 1) { return static_cast<std::uint8_t>((n - 1) << 2 | (stride - 1)); }

}  // namespace

std::vector<std::pair<std::string, std::vector<std::uint8_t>>> conc_seed_corpus() {
  using s = cseed;
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> out;
  auto put = [&](const char* name, const cseed& c) { out.emplace_back(name, c.bytes()); };
  put("stable_beside_reclaim_migrate",
      cseed(0x10)
          .phase({s::fetch_add(0, 0, 1)}, {s::k_s(0, 63, its(4), st8, 1)}, true)
          .phase({s::reclaim(0, 15), s::reclaim(16, 15, 1), s::reclaim(32, 15, 2), s::fetch_add(3, 5, 2)},
                 {s::k_s(0, 63, its(4), mix8, 2), s::k_s(0, 63, its(8), ld8, 3)})
          .phase({s::reclaim(0, 15, 2), s::reclaim(48, 15), s::fetch_add(50, 9, 3)},
                 {s::k_s(1, 63, its(4, 2), mix4, 4), s::k_s(0, 63, its(2), add8, 5)})
          .phase({s::reclaim(0, 15, 1), s::reclaim(16, 15, 1), s::reclaim(32, 15, 1), s::reclaim(48, 15, 1)},
                 {s::k_s(0, 63, its(8), mix8, 6)}));
  put("stable_beside_fork_cow",
      cseed(0x11)
          .phase({}, {s::k_s(0, 63, its(4), st8, 1)})
          .phase({s::fork(), s::fetch_add(0, 0, 1), s::fetch_add(7, 1, 1)}, {s::k_s(0, 63, its(4), mix8, 2)})
          .phase({s::fork(), s::fetch_add(9, 2, 1), s::child_exit(), s::fork()},
                 {s::k_s(0, 63, its(8), st8, 3), s::k_s(0, 63, its(3), mix1, 4)})
          .phase({s::thp(0, 15, true), s::thp(8, 3, false), s::fork()}, {s::k_s(0, 63, its(4), mix8, 5)}));
  put("churn_loads_beside_cpu",
      cseed(0x12)
          .phase({s::store(0, 0, 1), s::store(1, 1, 2), s::store(2, 2, 3)}, {}, true)
          .phase({s::dontneed(0, 7), s::mprotect(8, 7, 1), s::munmap(20, 3), s::store(30, 5, 4)},
                 {s::k_c(0, 63, its(4), ld8, 0), s::k_c(0, 63, its(2), pf, 3)})
          .phase({s::mmap(20, 3), s::mremap(0, 3, 20), s::mprotect(8, 7, 3), s::load(1, 1)},
                 {s::k_c(0, 63, its(8), ld8, 1), s::k_c(8, 31, its(3, 2), mix8, 5)})
          .phase({s::mmap(100, 15, 7), s::store(100, 3, 9), s::munmap(0, 15), s::load(100, 3)},
                 {s::k_c(90, 63, its(4), ld8, 3)}));
  put("bos_beside_cpu",
      cseed(0x14, 8)
          .phase({s::store(0, 0, 1)}, {s::bo_create(7), s::bind(0, 0, 0, 7), s::k_b(0, 7, its(2), st8, 1)})
          .phase({s::munmap(0, 15), s::mmap(0, 15), s::reclaim(0, 15)},
                 {s::bo_create(7), s::bind(1, 10, 0, 7), s::k_b(0, 20, its(4), mix8, 2), s::evict(0),
                  s::k_b(0, 7, its(2), ld8, 1), s::k_b(10, 7, its(4), mix8, 2)})
          .phase({s::dontneed(0, 15), s::fork()},
                 {s::unbind(0, 3), s::k_b(0, 15, its(1), ld8, 1), s::bo_create(7, true), s::bind(2, 30, 0, 7),
                  s::k_b(30, 7, its(4), mix8, 3), s::bo_destroy(0)})
          .phase({s::mprotect(0, 15, 1)},
                 {s::evict(1), s::k_b(10, 7, its(2), add8, 4), s::unbind(0, 15), s::k_b(0, 63, its(8), ld8, 4)}));
  put("everything_mixed",
      cseed(0x31)
          .phase({s::store(0, 0, 1), s::fetch_add(0, 0, 1)}, {s::k_s(0, 63, its(4), st8, 1), s::bo_create(2)}, true, true)
          .phase({s::fork(), s::dontneed(0, 15), s::reclaim(0, 15), s::mremap(0, 7, 60), s::store(60, 1, 2)},
                 {s::k_s(0, 63, its(8, 2), mix8, 2), s::k_c(0, 63, its(4), mix8, 1), s::bind(0, 0, 0, 1),
                  s::k_b(0, 3, its(2), mix8, 2)})
          .phase({s::thp(0, 15, true), s::reclaim(0, 15, 2), s::munmap(60, 7), s::fetch_add(1, 1, 1)},
                 {s::k_s(0, 63, its(4), mix4, 3), s::k_c(50, 63, its(3), ld8, 2), s::evict(0)})
          .phase({s::child_exit(), s::reclaim(0, 15, 1)}, {s::k_s(0, 63, its(8), ld8, 4)}, true));
  put("window_policies_2m",
      cseed(0x2c)
          .phase({s::thp(0, 15, true)}, {s::k_s(0, 63, its(4), st8, 1)}, true)
          .phase({s::reclaim(0, 15), s::reclaim(16, 15)}, {s::k_s(0, 63, its(4), mix8, 2)})
          .phase({s::fork(), s::reclaim(0, 15, 1)}, {s::k_s(0, 63, its(8), mix8, 3)}));
  // The same seeds in the SVM placement mode (byte 1 >= 192: conc_runner.h).
  for (std::size_t k = 0, n = out.size(); k < n; ++k) {
    std::vector<std::uint8_t> bytes = out[k].second;
    bytes[1] = static_cast<std::uint8_t>(192 + k % 4);
    out.emplace_back("vram_" + out[k].first, std::move(bytes));
  }
  return out;
}

void write_conc_seed_corpus(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  for (const auto& [name, bytes] : conc_seed_corpus()) {
    std::ofstream f(dir / (name + ".bin"), std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
}

}  // namespace svm::fuzz
