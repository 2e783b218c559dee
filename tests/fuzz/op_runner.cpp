#include "fuzz/op_runner.h"

#include "svm/notifier/migrate.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>

#include "fuzz/range_kernel.h"
#include "fuzz/ref_model.h"
#include "svm/svm/gpu_vm.h"
#include "svm/svm/oracle.h"

namespace svm::fuzz {

namespace {

constexpr va_t cpu_base = universe_base;                  // 2M aligned: THP fits
constexpr va_t window_gpu_base = cpu_base + (va_t{256} << 20);  // delta a 2M multiple
constexpr std::uint64_t file_pages[2] = {64, 600};

// Totals over all runs; relaxed: statistics, read after the runs.
std::atomic<std::uint64_t> g_runs{0}, g_ops{0}, g_accesses{0}, g_kernels{0}, g_exhausted{0}, g_faults{0},
    g_replays{0}, g_cancels{0}, g_checked{0}, g_concurrent{0}, g_to_vram{0}, g_to_ram{0}, g_vram_enomem{0};

constexpr std::array<std::uint8_t, op_count> arg_bytes = {
    4,  // mmap_anon: fl pg pg n
    5,  // mmap_file: fl pg pg n off
    3,  // munmap
    4,  // mprotect
    4,  // madvise
    7,  // mremap: pg pg n n2 fl pg2 pg2
    0,  // fork
    4,  // child_store
    3,  // child_load
    3,  // reclaim
    4,  // migrate
    5,  // cpu_store
    4,  // cpu_load
    4,  // cpu_fetch_add
    4,  // file_pwrite: f off off v
    2,  // bo_create
    1,  // bo_destroy
    5,  // bo_bind: b gpg gpg boff n
    3,  // bo_unbind
    1,  // bo_evict
    4,  // bo_write
    3,  // bo_read
    1,  // kernel: k (+ accesses)
    0,  // child_exit
    0,  // gc_notifiers
    6,  // kernel_range: k pg pg n s v
    11, // kernel_during: c cpg cpg cn x, k pg pg n s v
    7,  // kernel_cancel: k pg pg n s v r
};

class reader {
 public:
  explicit reader(std::span<const std::uint8_t> d) : d_(d) {}
  std::uint8_t u8() { return pos_ < d_.size() ? d_[pos_++] : 0; }
  [[nodiscard]] bool done() const { return pos_ >= d_.size(); }

 private:
  std::span<const std::uint8_t> d_;
  std::size_t pos_ = 0;
};

std::uint64_t decode_pages(std::uint8_t n) {
  static constexpr std::array<std::uint64_t, 16> big = {32, 64, 128, 256, 511, 512, 513, 1024,
                                                        2,  3,  4,   8,   17,  100, 1000, 0};
  return n < 240 ? 1 + n % 16 : big[(n - 240) % 16];
}
std::uint16_t u16(const std::vector<std::uint8_t>& a, std::size_t i) {
  return static_cast<std::uint16_t>(a[i] | (a[i + 1] << 8));
}
va_t page_va(va_t base, std::uint16_t pg) { return base + (pg % address_pages) * page_size; }
std::uint64_t pattern(std::uint8_t v, std::size_t op) { return v * 0x0101010101010101ull + op; }

std::string hex(std::uint64_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}
template <class T>
std::string show(const result<T>& r) {
  return r.ok() ? "ok " + hex(static_cast<std::uint64_t>(*r)) : errc_name(r.error());
}
std::string bytes_hex(std::span<const std::uint8_t> b) {
  std::ostringstream os;
  os << std::hex;
  for (auto x : b) os << (x < 16 ? "0" : "") << static_cast<unsigned>(x);
  return os.str();
}

// The state of one run: svm's objects and the model.
class runner {
 public:
  explicit runner(const program& p, const run_hooks* h);
  ~runner();
  run_result run();

 private:
  bool step(std::size_t i, const op_desc& op);  // false: mismatch (msg_ set)
  bool fail(std::size_t i, const op_desc& op, const std::string& what);
  bool kernel(std::size_t i, const op_desc& op);
  bool kernel_range(std::size_t i, const op_desc& op);
  bool kernel_during(std::size_t i, const op_desc& op);
  bool kernel_cancel(std::size_t i, const op_desc& op);
  /// The accesses and work items of a range kernel from args [at, at+6),
  /// steered over the pages reachable in `m`.
  std::vector<range_access> range_accesses(std::size_t i, const op_desc& op, std::size_t at, const ref_model& m,
                                           unsigned* items) const;
  /// Read every completed store of `acc` back through the CPU and compare
  /// with the model (the data check).
  bool read_back(std::size_t i, const op_desc& op, const std::vector<range_access>& acc, const range_outcome& o);
  bool check_oracle(std::size_t i, const op_desc& op);
  void migrate_in_three_steps(va_t va, std::uint64_t len, unsigned target);
  std::string show_status(const dev::kernel_status& st) const;
  std::uint64_t pick_bo(std::uint8_t b) const;

  const program& prog_;
  const run_hooks* hooks_;
  va_t gpu_base_;
  ref_model model_;
  std::unique_ptr<mm> m_;
  std::unique_ptr<mm> child_;
  std::shared_ptr<svm::file> files_[2];
  std::unique_ptr<driver> dev_;
  std::unique_ptr<gpu_vm> vm_;
  std::unique_ptr<access_oracle> oracle_;
  bool to_vram_ = false;  ///< the SVM placement mode (op_runner.h, byte 1)
  std::string msg_;
  std::uint64_t accesses_ = 0;
  static constexpr int foreign_owner_ = 0;
  /// System frames (4096 in all: a small pool keeps a run cheap) below which
  /// an ENOMEM from svm ends the run instead of failing it.
  static constexpr pfn_t low_frames = 1024;  // the device-private pool's owner (not the VM)
};

// A driver's device migration of [va, va + len) to pool `target` (1: a
// second system pool, 2: the device-private pool): setup, copy every
// collected page into a new frame of the target, pages, finalize. Its error
// codes follow migrate_vma's contract (one VMA only), not mm::migrate's, so
// they are not compared; the bytes are, by every later CPU and device read.
void runner::migrate_in_three_steps(va_t va, std::uint64_t len, unsigned target) {
  migrate_vma mv;
  mv.start = va;
  mv.end = va + len;
  mv.pgmap_owner = &foreign_owner_;
  mv.select = migrate_select::system | migrate_select::device_private;
  {
    mm::read_guard rd(*m_);
    if (migrate_vma_setup(*m_, mv) != errc::ok) return;
  }
  frame_pool& to = m_->pool(target);
  for (std::size_t i = 0; i < mv.npages; ++i) {
    const migrate_page& s = mv.src[i];
    if (!s.has(migrate_pfn::valid | migrate_pfn::migrate) || s.pool == target) continue;
    auto f = to.alloc();
    if (!f) continue;  // out of frames: this page stays
    frame_pool::copy_frame(to.frame_data(*f), m_->pool(s.pool).frame_data(s.pfn));
    mv.dst[i] = {migrate_pfn::valid, target, *f};
  }
  {
    mm::read_guard rd(*m_);
    (void)migrate_vma_pages(*m_, mv);
  }
  (void)migrate_vma_finalize(*m_, mv);
}

runner::runner(const program& p, const run_hooks* h) : prog_(p), hooks_(h), model_(cpu_base, mm_options{}.mmap_limit) {
  const std::uint8_t c = p.config;
  mm_options mo;
  mo.frames = 4096;
  mo.thp = (c & 0x20) ? thp_mode::always : thp_mode::madvise;
  mo.mmap_base = cpu_base;
  m_ = std::make_unique<mm>(mo);
  (void)m_->attach_pool(std::make_shared<frame_pool>(1024), pool_kind::numa);
  (void)m_->attach_pool(std::make_shared<frame_pool>(1024), pool_kind::device_private, &foreign_owner_);
  for (int f = 0; f < 2; ++f) {
    files_[f] = std::make_shared<svm::file>(m_->pool_ptr(0), file_pages[f] * page_size);
    const int obj = model_.add_file(file_pages[f]);
    for (std::uint64_t pg = 0; pg < 4; ++pg) {
      const std::uint64_t v = 0xf11e0000ull + static_cast<std::uint64_t>(f) * 0x100 + pg;
      std::uint8_t b[8];
      std::memcpy(b, &v, 8);
      (void)files_[f]->pwrite(pg * page_size + 8, std::as_bytes(std::span{b}));
      (void)model_.file_pwrite(obj, pg * page_size + 8, b);
    }
  }
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
  vc.huge_leaves = !(c & 0x80);
  to_vram_ = p.vram >= 192;
  const bool to_vram = to_vram_;
  if (to_vram) vc.migrate_timeslice = std::chrono::nanoseconds(0);  // CPU accesses bring pages back at once
  const bool windows = (c & 0x40) != 0;
  vc.mirror = windows ? mirror_kind::windows : mirror_kind::full_mm;
  vm_ = gpu_vm::create(*dev_, *m_, vc).value();
  oracle_ = std::make_unique<access_oracle>(*dev_);
  gpu_base_ = cpu_base;
  if (windows) {
    gpu_base_ = window_gpu_base;
    if (vm_->add_window(cpu_base, gpu_base_, universe_pages * page_size) != errc::ok) {
      std::fprintf(stderr, "svm_fuzz: add_window failed\n");
      std::abort();
    }
    model_.set_window(cpu_base, gpu_base_, universe_pages * page_size);
    (void)oracle_->watch(*vm_, *m_, {oracle_window{cpu_base, gpu_base_, universe_pages * page_size}});
  } else {
    (void)oracle_->watch(*vm_, *m_);
  }
  if (to_vram) {
    const svm_attrs at{.preferred = mem_location::vram,
                       .atomics = (p.vram & 1) ? atomic_mode::device : atomic_mode::any,
                       .granularity = (p.vram & 2) ? page_size : std::uint64_t{64} << 10};
    if (vm_->set_attrs(gpu_base_, universe_pages * page_size, at) != errc::ok) {
      std::fprintf(stderr, "svm_fuzz: set_attrs failed\n");
      std::abort();
    }
  }
}

runner::~runner() {
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

bool runner::fail(std::size_t i, const op_desc& op, const std::string& what) {
  std::ostringstream os;
  os << "op #" << i << " " << to_string(op.kind) << " args [" << bytes_hex(op.args) << "]: " << what
     << "\n  config 0x" << std::hex << unsigned{prog_.config} << std::dec << " (seq "
     << to_string(vm_->config().seq) << ", impl " << to_string(vm_->config().impl) << ", "
     << dev_->hw().engine_count() << " engines" << (vm_->config().mirror == mirror_kind::windows ? ", window" : "")
     << ")\n  model vmas: " << model_.describe(model_.parent);
  msg_ = os.str();
  return false;
}

std::uint64_t runner::pick_bo(std::uint8_t b) const {
  const auto& live = model_.live_bos();
  if (b == 255 || live.empty()) return 100000;
  return live[b % live.size()];
}

bool runner::step(std::size_t i, const op_desc& op) {
  const auto& a = op.args;
  auto cmp = [&](auto got, auto want, const char* what) {
    if (show(got) == show(want)) return true;
    return fail(i, op, std::string(what) + ": svm " + show(got) + ", model " + show(want));
  };
  auto cmp_e = [&](errc got, errc want) {
    if (got == want) return true;
    return fail(i, op, std::string("svm ") + errc_name(got) + ", model " + errc_name(want));
  };
  switch (op.kind) {
    case op_kind::mmap_anon:
    case op_kind::mmap_file: {
      const bool shared = a[0] & 1;
      const prot p = prot((a[0] >> 1) & 7);
      const va_t va = page_va(cpu_base, u16(a, 1));
      const std::uint64_t len = decode_pages(a[3]) * page_size;
      const map fl = (shared ? map::shared : map::private_) | map::fixed;
      if (op.kind == op_kind::mmap_anon) {
        auto got = m_->mmap(va, len, p, fl | map::anonymous);
        auto want = model_.mmap_fixed(model_.parent, va, len, p, shared, -1, 0);
        return cmp(got, want, "mmap");
      }
      const int f = (a[0] >> 4) & 1;
      const std::uint64_t off = (a[4] % 80) * page_size;
      auto got = m_->mmap(va, len, p, fl, files_[f], off);
      auto want = model_.mmap_fixed(model_.parent, va, len, p, shared, f, off);
      return cmp(got, want, "mmap file");
    }
    case op_kind::munmap: {
      const va_t va = page_va(cpu_base, u16(a, 0));
      const std::uint64_t len = decode_pages(a[2]) * page_size;
      return cmp_e(m_->munmap(va, len), model_.munmap(model_.parent, va, len));
    }
    case op_kind::mprotect: {
      const va_t va = page_va(cpu_base, u16(a, 0));
      const std::uint64_t len = decode_pages(a[2]) * page_size;
      const prot p = prot(a[3] & 7);
      return cmp_e(m_->mprotect(va, len, p), model_.mprotect(model_.parent, va, len, p));
    }
    case op_kind::madvise: {
      const va_t va = page_va(cpu_base, u16(a, 0));
      const std::uint64_t len = decode_pages(a[2]) * page_size;
      const madvice adv = madvice(a[3] % 3);
      return cmp_e(m_->madvise(va, len, adv), model_.madvise(model_.parent, va, len, adv));
    }
    case op_kind::mremap: {
      const va_t va = page_va(cpu_base, u16(a, 0));
      const std::uint64_t ol = decode_pages(a[2]) * page_size, nl = decode_pages(a[3]) * page_size;
      const mremap_flags fl = mremap_flags(a[4] & 7);
      const va_t na = page_va(cpu_base, u16(a, 5));
      auto got = m_->mremap(va, ol, nl, fl, na);
      auto want = model_.mremap(model_.parent, va, ol, nl, fl, na);
      return cmp(got, want, "mremap");
    }
    case op_kind::fork: {
      child_.reset();
      auto c = m_->fork();
      if (!c.ok()) return fail(i, op, std::string("fork failed: ") + errc_name(c.error()));
      child_ = std::move(*c);
      model_.fork();
      return true;
    }
    case op_kind::child_exit:
      child_.reset();
      model_.child.reset();
      return true;
    case op_kind::child_store:
    case op_kind::child_load: {
      if (!child_) return true;
      const va_t va = page_va(cpu_base, u16(a, 0)) + (a[2] % 256) * 16;
      if (op.kind == op_kind::child_store) {
        const std::uint64_t v = pattern(a[3], i);
        std::uint8_t b[8];
        std::memcpy(b, &v, 8);
        return cmp_e(child_->write(va, std::as_bytes(std::span{b})), model_.cpu_write(*model_.child, va, b));
      }
      std::uint8_t got[8] = {}, want[8] = {};
      const errc ge = child_->read(va, std::as_writable_bytes(std::span{got}));
      const errc we = model_.cpu_read(*model_.child, va, want);
      if (!cmp_e(ge, we)) return false;
      if (ge == errc::ok && std::memcmp(got, want, 8) != 0)
        return fail(i, op, "child load at " + hex(va) + ": svm " + bytes_hex(got) + ", model " + bytes_hex(want));
      return true;
    }
    case op_kind::reclaim:
    case op_kind::migrate: {
      const va_t va = page_va(cpu_base, u16(a, 0));
      const std::uint64_t len = decode_pages(a[2]) * page_size;
      if (op.kind == op_kind::migrate && (a[3] & 2)) {
        migrate_in_three_steps(va, len, 1 + (a[3] & 1));
        return true;  // bytes are checked by the later loads against the model, which migration keeps
      }
      auto got = op.kind == op_kind::reclaim ? m_->reclaim(va, len)
                                             : m_->migrate(va, len, 1 + (a[3] & 1), (a[3] & 1) ? &foreign_owner_ : nullptr);
      const errc want = model_.reclaim_or_migrate_check(va, len);
      return cmp_e(got.ok() ? errc::ok : got.error(), want);
    }
    case op_kind::cpu_store:
    case op_kind::cpu_load: {
      static constexpr std::array<std::size_t, 8> sizes = {1, 2, 4, 8, 16, 24, 3, 5};
      const std::size_t n = sizes[a[3] % 8];
      const va_t va = page_va(cpu_base, u16(a, 0)) + (a[2] % 256) * 16 + (a[3] >> 4);
      if (op.kind == op_kind::cpu_store) {
        std::vector<std::uint8_t> b(n);
        for (std::size_t k = 0; k < n; ++k) b[k] = static_cast<std::uint8_t>(a[4] + k + i);
        return cmp_e(m_->write(va, std::as_bytes(std::span{b})), model_.cpu_write(model_.parent, va, b));
      }
      std::vector<std::uint8_t> got(n), want(n);
      const errc ge = m_->read(va, std::as_writable_bytes(std::span{got}));
      const errc we = model_.cpu_read(model_.parent, va, want);
      if (!cmp_e(ge, we)) return false;
      if (ge == errc::ok && got != want)
        return fail(i, op, "cpu load at " + hex(va) + ": svm " + bytes_hex(got) + ", model " + bytes_hex(want));
      return true;
    }
    case op_kind::cpu_fetch_add: {
      const va_t va = page_va(cpu_base, u16(a, 0)) + (a[2] % 256) * 16 + ((a[3] & 0x80) ? 4 : 0);
      const std::uint64_t v = pattern(a[3], i);
      return cmp(m_->atomic_fetch_add(va, v), model_.cpu_fetch_add(model_.parent, va, v), "fetch_add");
    }
    case op_kind::file_pwrite: {
      const int f = a[0] & 1;
      const std::uint64_t off = std::uint64_t{u16(a, 1)} * 8 % (file_pages[f] * page_size + 2 * page_size);
      const std::uint64_t v = pattern(a[3], i);
      std::uint8_t b[8];
      std::memcpy(b, &v, 8);
      return cmp_e(files_[f]->pwrite(off, std::as_bytes(std::span{b})), model_.file_pwrite(f, off, b));
    }
    case op_kind::bo_create: {
      const std::uint64_t pages = 1 + a[0] % 12;
      const placement where = (a[1] & 1) ? placement::system : placement::vram;
      const std::uint64_t vram_used = dev_->vram().stats().used_frames;
      auto got = vm_->create_bo(pages * page_size, where);
      if (!got.ok() && got.error() == errc::nomem && to_vram_ && where == placement::vram) {
        // Placement mode: device pages that eviction cannot reach (a fork
        // child's, or pages mremap moved out of their chunk: no per-frame
        // reverse map, docs/migration.md) may hold the VRAM. ENOMEM is then
        // the answer, and it must change nothing.
        g_vram_enomem.fetch_add(1, std::memory_order_relaxed);
        if (dev_->vram().stats().used_frames != vram_used)
          return fail(i, op, "create_bo: ENOMEM changed the VRAM in use");
        return true;
      }
      if (!got.ok()) return fail(i, op, std::string("create_bo failed: ") + errc_name(got.error()));
      const std::uint64_t want = model_.create_bo(pages);
      if (*got != want) return fail(i, op, "create_bo id: svm " + hex(*got) + ", model " + hex(want));
      return true;
    }
    case op_kind::bo_destroy: {
      const std::uint64_t id = pick_bo(a[0]);
      return cmp_e(vm_->destroy_bo(id), model_.destroy_bo(id));
    }
    case op_kind::bo_bind: {
      const std::uint64_t id = pick_bo(a[0]);
      const va_t gva = page_va(gpu_base_, u16(a, 1));
      const std::uint64_t off = (a[3] % 16) * page_size, size = (1 + a[4] % 16) * page_size;
      return cmp_e(vm_->bind(id, gva, off, size), model_.bind(id, gva, off, size));
    }
    case op_kind::bo_unbind: {
      const va_t gva = page_va(gpu_base_, u16(a, 0));
      const std::uint64_t size = decode_pages(a[2]) * page_size;
      return cmp_e(vm_->unbind(gva, size), model_.unbind(gva, size));
    }
    case op_kind::bo_evict: {
      const std::uint64_t id = pick_bo(a[0]);
      errc want = errc::noent;
      if (model_.bo_exists(id)) {
        auto where = vm_->bo_placement(id);
        want = where.ok() && *where == placement::vram ? errc::ok : errc::inval;
      }
      return cmp_e(vm_->evict(id), want);
    }
    case op_kind::bo_write:
    case op_kind::bo_read: {
      const std::uint64_t id = pick_bo(a[0]);
      const std::uint64_t off = (a[1] % 16) * page_size + (a[2] % 256) * 16;
      if (op.kind == op_kind::bo_write) {
        const std::uint64_t v = pattern(a[3], i);
        std::uint8_t b[8];
        std::memcpy(b, &v, 8);
        return cmp_e(vm_->bo_write(id, off, std::as_bytes(std::span{b})), model_.bo_write(id, off, b));
      }
      std::uint8_t got[8] = {}, want[8] = {};
      const errc ge = vm_->bo_read(id, off, std::as_writable_bytes(std::span{got}));
      const errc we = model_.bo_read(id, off, want);
      if (!cmp_e(ge, we)) return false;
      if (ge == errc::ok && std::memcmp(got, want, 8) != 0)
        return fail(i, op, "bo_read: svm " + bytes_hex(got) + ", model " + bytes_hex(want));
      return true;
    }
    case op_kind::kernel: return kernel(i, op);
    case op_kind::gc_notifiers: (void)vm_->gc_notifiers(); return true;
    case op_kind::kernel_range: return kernel_range(i, op);
    case op_kind::kernel_during: return kernel_during(i, op);
    case op_kind::kernel_cancel: return kernel_cancel(i, op);
    case op_kind::count: break;
  }
  return true;
}

// One work item runs the accesses in order; the kernel ends at the first
// failing access, so the model's outcome is defined.
bool runner::kernel(std::size_t i, const op_desc& op) {
  struct item {
    va_t va;
    unsigned size;
    dev_op dop;
    std::uint64_t v, desired;
  };
  std::vector<item> items;
  // Steering: a page index of the decoder's range (< address_pages, as the
  // seeds write them) is taken as it is; a larger one (almost every random
  // u16) picks among the pages the device can reach now, so that kernels
  // mostly get past their first access. Decided before the kernel runs,
  // from the model alone: the run stays a function of the input.
  const std::vector<va_t> reachable = model_.reachable_gpu_pages(cpu_base, gpu_base_, address_pages);
  for (const access_desc& d : op.accesses) {
    item it{};
    it.size = 1u << ((d.kind >> 3) & 3);
    const std::uint8_t k = d.kind % 8;
    it.dop = k == 1 ? dev_op::store : k == 2 ? dev_op::add : k == 3 ? dev_op::cmpxchg : k == 4 ? dev_op::xchg : dev_op::load;
    std::uint64_t off = (d.off % 256) * 16 + ((d.kind >> 6) & 3) * 4;
    off = align_down(off, it.size);
    // Unaligned (EINVAL) when kind bit5 says so; for a steered access only
    // one time in eight of those, or most kernels would stop there.
    const bool steered = d.page >= address_pages && !reachable.empty();
    if ((d.kind & 0x20) && (!steered || (d.v & 7) == 0)) off += 1;
    it.va = (steered ? reachable[(d.page - address_pages) % reachable.size()] : page_va(gpu_base_, d.page)) + off;
    it.v = pattern(d.v, i);
    it.desired = pattern(static_cast<std::uint8_t>(d.v + 1), i);
    items.push_back(it);
  }
  // Written by the work item, read after completion::wait() (acquire).
  struct outcome {
    std::vector<std::uint64_t> vals;
    std::size_t done = 0;
  } out;
  out.vals.assign(items.size(), 0);
  auto fn = [&items, &out](dev::work_item& wi) {
    for (std::size_t k = 0; k < items.size(); ++k) {
      const item& it = items[k];
      std::uint64_t r = 0;
      switch (it.dop) {
        case dev_op::load: r = wi.load_bytes(it.va, it.size); break;
        case dev_op::store: wi.store_bytes(it.va, it.size, it.v); break;
        default: {
          auto rmw = [&]<class T>(T) -> std::uint64_t {
            const T v = static_cast<T>(it.v), d = static_cast<T>(it.desired);
            if (it.dop == dev_op::add) return wi.atomic_add<T>(it.va, v);
            if (it.dop == dev_op::cmpxchg) return wi.atomic_cmpxchg<T>(it.va, v, d);
            return wi.atomic_exchange<T>(it.va, v);
          };
          switch (it.size) {
            case 1: r = rmw(std::uint8_t{}); break;
            case 2: r = rmw(std::uint16_t{}); break;
            case 4: r = rmw(std::uint32_t{}); break;
            default: r = rmw(std::uint64_t{}); break;
          }
        }
      }
      out.vals[k] = r;
      out.done = k + 1;
    }
  };
  auto c = dev_->submit(*vm_, 1, fn);
  if (!c.ok()) return fail(i, op, std::string("submit failed: ") + errc_name(c.error()));
  const dev::kernel_status st = c->wait(std::chrono::seconds(30));
  if (st.error == errc::timedout) {
    // The kernel still runs on `items` and `out`: nothing safe to return to.
    std::fprintf(stderr, "svm_fuzz: op #%zu: kernel did not finish in 30 s\n", i);
    std::abort();
  }
  accesses_ += out.done;
  g_kernels.fetch_add(1, std::memory_order_relaxed);
  // The model, in order, up to the first failure.
  ref_dev_result fail_r{};
  std::size_t want_done = items.size();
  for (std::size_t k = 0; k < items.size(); ++k) {
    const item& it = items[k];
    ref_dev_result r = model_.dev_access(it.va, it.size, it.dop, it.v, it.desired);
    if (r.error != errc::ok) {
      fail_r = r;
      want_done = k;
      break;
    }
    if (k < out.done && it.dop != dev_op::store && r.value != out.vals[k]) {
      return fail(i, op, "access " + std::to_string(k) + " at " + hex(it.va) + " size " + std::to_string(it.size) +
                             ": svm returned " + hex(out.vals[k]) + ", model " + hex(r.value));
    }
  }
  const bool want_ok = want_done == items.size();
  if (st.error != fail_r.error || out.done != want_done ||
      (!want_ok && (st.reason != fail_r.reason || st.address != items[want_done].va))) {
    return fail(i, op, std::string("kernel: svm ") + errc_name(st.error) + "/" + errc_name(st.reason) + " at " +
                           hex(st.address) + " after " + std::to_string(out.done) + " accesses; model " +
                           errc_name(fail_r.error) + "/" + errc_name(fail_r.reason) + " at " +
                           (want_ok ? std::string("-") : hex(items[want_done].va)) + " after " +
                           std::to_string(want_done));
  }
  return check_oracle(i, op);
}

bool runner::check_oracle(std::size_t i, const op_desc& op) {
  if (oracle_->stale() != 0) {
    std::string r;
    for (const auto& rep : oracle_->reports()) r += "\n  " + describe(rep);
    return fail(i, op, "access oracle saw " + std::to_string(oracle_->stale()) + " stale accesses:" + r);
  }
  return true;
}

std::string runner::show_status(const dev::kernel_status& st) const {
  return std::string(errc_name(st.error)) + "/" + errc_name(st.reason) + " at " + hex(st.address);
}

std::vector<range_access> runner::range_accesses(std::size_t i, const op_desc& op, std::size_t at, const ref_model& m,
                                                 unsigned* items) const {
  const auto& a = op.args;
  const std::uint8_t k = a[at], n = a[at + 3], s = a[at + 4], v = a[at + 5];
  const std::uint16_t pg = u16(a, at + 1);
  std::uint64_t start = pg;
  if (pg >= address_pages) {
    const std::vector<va_t> reach = m.reachable_gpu_pages(cpu_base, gpu_base_, address_pages);
    start = reach.empty() ? 0 : (reach[(pg - address_pages) % reach.size()] - gpu_base_) / page_size;
  }
  const std::uint64_t stride = (1 + (s & 3)) * ((k & 0x20) ? 16 : 1);
  *items = 1 + ((s >> 2) & 7);
  const std::uint64_t count = std::min<std::uint64_t>(decode_pages(n), max_range_accesses);
  const unsigned size = 1u << ((k >> 3) & 3);
  std::vector<range_access> out;
  for (std::uint64_t j = 0; j < count; ++j) {
    const std::uint64_t page = start + j * stride;
    if (page >= address_pages) break;
    range_access r;
    unsigned kind = k % 8;
    if (kind >= 6) kind = static_cast<unsigned>((j + v) % 6);
    r.prefetch = kind == 5;
    r.op = kind == 1 ? dev_op::store : kind == 2 ? dev_op::add : kind == 3 ? dev_op::cmpxchg : kind == 4 ? dev_op::xchg
                                                                                                    : dev_op::load;
    r.size = size;
    const std::uint64_t off = align_down(((v + 7 * j) % 256) * 16 + ((k >> 6) & 3) * 4, size);
    r.va = gpu_base_ + page * page_size + off;
    r.v = pattern(static_cast<std::uint8_t>(v + j), i);
    r.desired = pattern(static_cast<std::uint8_t>(v + j + 1), i);
    out.push_back(r);
  }
  return out;
}

bool runner::read_back(std::size_t i, const op_desc& op, const std::vector<range_access>& acc, const range_outcome& o) {
  unsigned checked = 0;
  for (std::size_t j = 0; j < acc.size() && checked < 64; ++j) {
    if (!acc[j].writes() || !o.completed(j)) continue;
    ++checked;
    const va_t cpu = align_down(acc[j].va, 8) - gpu_base_ + cpu_base;
    std::uint8_t got[8] = {}, want[8] = {};
    const errc ge = m_->read(cpu, std::as_writable_bytes(std::span{got}));
    const errc we = model_.cpu_read(model_.parent, cpu, want);
    if (ge != we || (ge == errc::ok && std::memcmp(got, want, 8) != 0))
      return fail(i, op, "read back of the device's store " + std::to_string(j) + " at cpu " + hex(cpu) + ": svm " +
                             errc_name(ge) + " " + bytes_hex(got) + ", model " + errc_name(we) + " " + bytes_hex(want));
  }
  return true;
}

// A kernel over many pages, several work items; exact against the model.
bool runner::kernel_range(std::size_t i, const op_desc& op) {
  unsigned items = 1;
  const std::vector<range_access> acc = range_accesses(i, op, 0, model_, &items);
  // The model's outcome, in order, up to its first failure (each access is
  // on its own page: the order among items does not change any value).
  ref_model probe = model_;
  std::vector<ref_dev_result> want(acc.size());
  std::size_t first_fail = acc.size();
  for (std::size_t j = 0; j < acc.size(); ++j) {
    const range_access& r = acc[j];
    if (r.prefetch) {
      const ref_dev_result rd = probe.dev_access(align_down(r.va, 8), 1, dev_op::load, 0, 0);
      want[j] = {errc::ok, errc::ok, rd.error == errc::ok ? 1u : 0u};
      continue;
    }
    want[j] = probe.dev_access(r.va, r.size, r.op, r.v, r.desired);
    if (want[j].error != errc::ok) {
      first_fail = j;
      break;
    }
  }
  if (first_fail < acc.size()) items = 1;  // the first failure in order is then the status
  const range_outcome o = run_range_kernel(*dev_, *vm_, acc, items, false, [] {});
  g_kernels.fetch_add(1, std::memory_order_relaxed);
  std::size_t done = 0;
  for (std::size_t d : o.done) done += d;
  accesses_ += done;
  if (first_fail < acc.size()) {
    const ref_dev_result& f = want[first_fail];
    if (o.st.error != f.error || o.st.reason != f.reason || o.st.address != acc[first_fail].va || o.done[0] != first_fail)
      return fail(i, op, "range kernel: svm " + show_status(o.st) + " after " + std::to_string(o.done[0]) +
                             " accesses; model " + errc_name(f.error) + "/" + errc_name(f.reason) + " at " +
                             hex(acc[first_fail].va) + " after " + std::to_string(first_fail));
  } else if (!o.st.ok() || done != acc.size()) {
    return fail(i, op, "range kernel: svm " + show_status(o.st) + " after " + std::to_string(done) + " of " +
                           std::to_string(acc.size()) + " accesses; model ok");
  }
  for (std::size_t j = 0; j < acc.size(); ++j) {
    if (!o.completed(j)) continue;
    const range_access& r = acc[j];
    if (r.prefetch) {
      // Residency is invisible to the model: a prefetch may leave a
      // readable page unmapped, but never map one the device may not read.
      if (o.vals[j] == 1 && want[j].value == 0)
        return fail(i, op, "prefetch " + std::to_string(j) + " at " + hex(r.va) + " mapped a page the model cannot read");
      continue;
    }
    if (r.op != dev_op::store && o.vals[j] != want[j].value)
      return fail(i, op, "range access " + std::to_string(j) + " at " + hex(r.va) + " size " + std::to_string(r.size) +
                             ": svm returned " + hex(o.vals[j]) + ", model " + hex(want[j].value));
  }
  model_ = std::move(probe);
  if (!check_oracle(i, op)) return false;
  return read_back(i, op, acc, o);
}

// A range kernel cancelled from the host at its items' midpoint.
bool runner::kernel_cancel(std::size_t i, const op_desc& op) {
  unsigned items = 1;
  const std::vector<range_access> acc = range_accesses(i, op, 0, model_, &items);
  const errc reason = (op.args[6] & 1) ? errc::timedout : errc::canceled;
  // Does any access fail? Then one item, in order: the failure comes first
  // if it lies before the midpoint.
  std::size_t first_fail = acc.size();
  {
    ref_model probe = model_;
    for (std::size_t j = 0; j < acc.size() && first_fail == acc.size(); ++j)
      if (!acc[j].prefetch && probe.dev_access(acc[j].va, acc[j].size, acc[j].op, acc[j].v, acc[j].desired).error != errc::ok)
        first_fail = j;
  }
  if (first_fail < acc.size()) items = 1;
  errc cancel_e = errc::ok;
  const range_outcome o = run_range_kernel(*dev_, *vm_, acc, items, true, [] {},
                                           [&](const dev::completion& c) { cancel_e = c.cancel(reason); });
  g_kernels.fetch_add(1, std::memory_order_relaxed);
  std::size_t done = 0;
  for (std::size_t d : o.done) done += d;
  accesses_ += done;
  if (cancel_e != errc::ok) return fail(i, op, std::string("completion::cancel: ") + errc_name(cancel_e));
  auto mid = [&](unsigned w) {
    const std::size_t mine = acc.size() > w ? (acc.size() - w + o.items - 1) / o.items : 0;
    return mine / 2;
  };
  const bool fails_first = first_fail < acc.size() && first_fail < mid(0);
  if (acc.empty()) {
    // The item signals the midpoint as it returns, so the cancel may land
    // before the device completes the kernel: ok and {ECANCELED, reason}
    // are both right; anything else is not.
    const bool cancelled = o.st.error == errc::canceled && o.st.reason == reason && o.st.address == 0;
    if (!o.st.ok() && !cancelled)
      return fail(i, op, "an empty kernel ended neither ok nor cancelled with its reason: " + show_status(o.st));
  } else if (fails_first) {
    const ref_dev_result f = ref_model(model_).dev_access(acc[first_fail].va, acc[first_fail].size, acc[first_fail].op,
                                                          acc[first_fail].v, acc[first_fail].desired);
    if (o.st.error != f.error || o.st.reason != f.reason || o.st.address != acc[first_fail].va || o.done[0] != first_fail)
      return fail(i, op, "cancelled kernel: svm " + show_status(o.st) + " after " + std::to_string(o.done[0]) +
                             "; model " + errc_name(f.error) + "/" + errc_name(f.reason) + " at " +
                             hex(acc[first_fail].va) + " first");
  } else if (o.st.error != errc::canceled || o.st.reason != reason) {
    return fail(i, op, "cancelled kernel: svm " + show_status(o.st) + ", want ECANCELED/" + errc_name(reason));
  }
  for (unsigned w = 0; w < o.items; ++w)
    if (o.done[w] > mid(w))
      return fail(i, op, "item " + std::to_string(w) + " completed " + std::to_string(o.done[w]) +
                             " accesses after the cancel at its midpoint " + std::to_string(mid(w)));
  for (std::size_t j = 0; j < acc.size(); ++j) {
    if (!o.completed(j)) continue;
    const range_access& r = acc[j];
    if (r.prefetch) {
      const ref_dev_result rd = ref_model(model_).dev_access(align_down(r.va, 8), 1, dev_op::load, 0, 0);
      if (o.vals[j] == 1 && rd.error != errc::ok)
        return fail(i, op, "prefetch " + std::to_string(j) + " at " + hex(r.va) + " mapped a page the model cannot read");
      continue;
    }
    const ref_dev_result rr = model_.dev_access(r.va, r.size, r.op, r.v, r.desired);
    if (rr.error != errc::ok)
      return fail(i, op, "access " + std::to_string(j) + " at " + hex(r.va) + " completed; model " + errc_name(rr.error));
    if (r.op != dev_op::store && rr.value != o.vals[j])
      return fail(i, op, "access " + std::to_string(j) + " at " + hex(r.va) + ": svm " + hex(o.vals[j]) + ", model " +
                             hex(rr.value));
  }
  if (!check_oracle(i, op)) return false;
  return read_back(i, op, acc, o);
}

// A range kernel with a CPU operation beside it; invariants, not an
// interleaving (op_runner.h).
bool runner::kernel_during(std::size_t i, const op_desc& op) {
  const auto& a = op.args;
  const unsigned c = a[0] % 8;
  const bool dontunmap = (a[0] & 8) != 0;
  const va_t cva = page_va(cpu_base, u16(a, 1));
  const std::uint64_t clen = decode_pages(a[3]) * page_size;
  const std::uint8_t x = a[4];
  const va_t dst = page_va(cpu_base, static_cast<std::uint16_t>(x * 4));
  // The pages the operation may change (CPU VA ranges); fork: every page.
  std::vector<va_range> touched;
  switch (c) {
    case 0: case 1: case 2: touched.push_back({cva, cva + clen}); break;
    case 3: touched.push_back({cva, cva + clen}); touched.push_back({dst, dst + clen}); break;
    case 4: touched.push_back({0, ~va_t{0}}); break;
    default: break;  // reclaim, migrate, madvise advice other than DONTNEED keep every byte
  }
  if (c == 7 && madvice(x % 3) == madvice::dontneed) touched.push_back({cva, cva + clen});
  auto is_touched = [&](va_t gva) {
    const va_t cpu = align_down(gva, page_size) - gpu_base_ + cpu_base;
    for (const va_range& r : touched)
      if (cpu + page_size > r.start && cpu < r.end) return true;
    return false;
  };
  unsigned items = 1;
  std::vector<range_access> acc = range_accesses(i, op, 5, model_, &items);
  for (range_access& r : acc)
    if (r.writes() && is_touched(r.va)) r.op = dev_op::load;  // only loads where the outcome is racy

  // The model before and after the operation.
  const ref_model pre = model_;
  errc want_e = errc::ok;
  std::uint64_t want_va = 0;
  switch (c) {
    case 0: want_e = model_.munmap(model_.parent, cva, clen); break;
    case 1: want_e = model_.mprotect(model_.parent, cva, clen, prot(x & 7)); break;
    case 2: want_e = model_.madvise(model_.parent, cva, clen, madvice::dontneed); break;
    case 3: {
      auto r = model_.mremap(model_.parent, cva, clen, clen, mremap_flags(dontunmap ? 7 : 3), dst);
      want_e = r.ok() ? errc::ok : r.error();
      want_va = r.ok() ? *r : 0;
      break;
    }
    case 4: model_.fork(); break;
    case 5: case 6: want_e = model_.reclaim_or_migrate_check(cva, clen); break;
    default: want_e = model_.madvise(model_.parent, cva, clen, madvice(x % 3)); break;
  }
  // Each access's outcome in either state (probes: the writes of a probe
  // stay in it).
  ref_model pre_probe = pre, post_probe = model_;
  std::vector<ref_dev_result> rpre(acc.size()), rpost(acc.size());
  for (std::size_t j = 0; j < acc.size(); ++j) {
    const range_access& r = acc[j];
    if (r.prefetch) {
      rpre[j] = pre_probe.dev_access(align_down(r.va, 8), 1, dev_op::load, 0, 0);
      rpost[j] = post_probe.dev_access(align_down(r.va, 8), 1, dev_op::load, 0, 0);
      continue;
    }
    rpre[j] = pre_probe.dev_access(r.va, r.size, r.op, r.v, r.desired);
    rpost[j] = post_probe.dev_access(r.va, r.size, r.op, r.v, r.desired);
  }

  if (c == 4) child_.reset();
  errc got_e = errc::ok;
  std::uint64_t got_va = 0;
  auto beside = [&] {
    switch (c) {
      case 0: got_e = m_->munmap(cva, clen); break;
      case 1: got_e = m_->mprotect(cva, clen, prot(x & 7)); break;
      case 2: got_e = m_->madvise(cva, clen, madvice::dontneed); break;
      case 3: {
        auto r = m_->mremap(cva, clen, clen, mremap_flags(dontunmap ? 7 : 3), dst);
        got_e = r.ok() ? errc::ok : r.error();
        got_va = r.ok() ? *r : 0;
        break;
      }
      case 4: {
        auto ch = m_->fork();
        got_e = ch.ok() ? errc::ok : ch.error();
        if (ch.ok()) child_ = std::move(*ch);
        break;
      }
      case 5: {
        auto r = m_->reclaim(cva, clen);
        got_e = r.ok() ? errc::ok : r.error();
        break;
      }
      case 6: {
        auto r = m_->migrate(cva, clen, 1 + (x & 1), (x & 1) ? &foreign_owner_ : nullptr);
        got_e = r.ok() ? errc::ok : r.error();
        break;
      }
      default: got_e = m_->madvise(cva, clen, madvice(x % 3)); break;
    }
  };
  const range_outcome o = run_range_kernel(*dev_, *vm_, acc, items, true, beside);
  g_kernels.fetch_add(1, std::memory_order_relaxed);
  g_concurrent.fetch_add(1, std::memory_order_relaxed);
  std::size_t done = 0;
  for (std::size_t d : o.done) done += d;
  accesses_ += done;
  if (got_e != want_e || got_va != want_va)
    return fail(i, op, std::string("operation beside the kernel: svm ") + errc_name(got_e) + " " + hex(got_va) +
                           ", model " + errc_name(want_e) + " " + hex(want_va));

  auto same = [](const ref_dev_result& r, const dev::kernel_status& st) {
    return r.error == st.error && r.reason == st.reason;
  };
  // The kernel's end: ok with every access done, or the failure of an
  // access some item stopped at, explained by one of the two states.
  if (o.st.ok()) {
    if (done != acc.size())
      return fail(i, op, "kernel beside the operation: ok after " + std::to_string(done) + " of " +
                             std::to_string(acc.size()) + " accesses");
  } else {
    bool explained = false;
    for (unsigned w = 0; w < o.items && !explained; ++w) {
      const std::size_t j = o.next_of(w);
      explained = j < acc.size() && acc[j].va == o.st.address && (same(rpre[j], o.st) || same(rpost[j], o.st));
    }
    if (!explained) return fail(i, op, "kernel beside the operation: " + show_status(o.st) + " explained by neither state");
  }
  // Completed accesses: racy pages return what either state holds; the
  // others are exact and their writes go into the model.
  for (std::size_t j = 0; j < acc.size(); ++j) {
    if (!o.completed(j)) continue;
    const range_access& r = acc[j];
    const std::string where = "access " + std::to_string(j) + " at " + hex(r.va) + ": svm ";
    if (r.prefetch) {
      if (o.vals[j] == 1 && rpre[j].error != errc::ok && rpost[j].error != errc::ok)
        return fail(i, op, "prefetch " + std::to_string(j) + " at " + hex(r.va) + " mapped a page neither state maps");
      continue;
    }
    if (is_touched(r.va)) {
      const bool ok_pre = rpre[j].error == errc::ok && rpre[j].value == o.vals[j];
      const bool ok_post = rpost[j].error == errc::ok && rpost[j].value == o.vals[j];
      if (!ok_pre && !ok_post)
        return fail(i, op, where + hex(o.vals[j]) + "; before " + errc_name(rpre[j].error) + " " + hex(rpre[j].value) +
                               ", after " + errc_name(rpost[j].error) + " " + hex(rpost[j].value));
      continue;
    }
    const ref_dev_result rr = model_.dev_access(r.va, r.size, r.op, r.v, r.desired);
    if (rr.error != errc::ok)
      return fail(i, op, where + "completed, model " + errc_name(rr.error) + "/" + errc_name(rr.reason));
    if (r.op != dev_op::store && rr.value != o.vals[j])
      return fail(i, op, where + hex(o.vals[j]) + ", model " + hex(rr.value));
  }
  if (!check_oracle(i, op)) return false;
  return read_back(i, op, acc, o);
}

run_result runner::run() {
  run_result res;
  // SVM_FUZZ_VERBOSE: print each operation before it runs (replaying a failure).
  static const bool verbose = std::getenv("SVM_FUZZ_VERBOSE") != nullptr;
  for (std::size_t i = 0; i < prog_.ops.size(); ++i) {
    ++res.ops;
    if (verbose) {
      std::fprintf(stderr, "svm_fuzz: op #%zu %s args", i, to_string(prog_.ops[i].kind));
      for (std::uint8_t b : prog_.ops[i].args) std::fprintf(stderr, " %u", static_cast<unsigned>(b));
      std::fprintf(stderr, " (%zu accesses)\n", prog_.ops[i].accesses.size());
    }
    if (!step(i, prog_.ops[i])) {
      // Running out of system frames is not a disagreement: the model has
      // no memory limit. End the run there.
      if (msg_.find("ENOMEM") != std::string::npos && m_->pool(0).free_frames() < low_frames) {
        res.exhausted = true;
        break;
      }
      res.ok = false;
      res.message = msg_;
      break;
    }
    if (hooks_ && hooks_->after_op) hooks_->after_op(i, *m_);
  }
  res.accesses = accesses_;
  return res;
}

}  // namespace

const char* to_string(op_kind k) noexcept {
  static constexpr const char* names[] = {
      "mmap_anon", "mmap_file", "munmap", "mprotect", "madvise", "mremap", "fork", "child_store", "child_load",
      "reclaim", "migrate", "cpu_store", "cpu_load", "cpu_fetch_add", "file_pwrite", "bo_create", "bo_destroy",
      "bo_bind", "bo_unbind", "bo_evict", "bo_write", "bo_read", "kernel", "child_exit", "gc_notifiers",
      "kernel_range", "kernel_during", "kernel_cancel"};
  const auto i = static_cast<unsigned>(k);
  return i < op_count ? names[i] : "?";
}

program decode(std::span<const std::uint8_t> data) {
  reader r(data);
  program p;
  p.config = r.u8();
  p.vram = r.u8();
  while (!r.done() && p.ops.size() < max_ops) {
    op_desc op;
    op.kind = op_kind(r.u8() % op_count);
    for (unsigned k = 0; k < arg_bytes[static_cast<unsigned>(op.kind)]; ++k) op.args.push_back(r.u8());
    if (op.kind == op_kind::kernel) {
      const unsigned n = 1 + op.args[0] % max_kernel_accesses;
      for (unsigned k = 0; k < n; ++k) {
        access_desc d;
        d.kind = r.u8();
        d.page = static_cast<std::uint16_t>(r.u8() | (r.u8() << 8));
        d.off = r.u8();
        d.v = r.u8();
        op.accesses.push_back(d);
      }
    }
    p.ops.push_back(std::move(op));
  }
  return p;
}

std::vector<std::uint8_t> encode(const program& p) {
  std::vector<std::uint8_t> out{p.config, p.vram};
  for (const op_desc& op : p.ops) {
    out.push_back(static_cast<std::uint8_t>(op.kind));
    std::vector<std::uint8_t> args = op.args;
    args.resize(arg_bytes[static_cast<unsigned>(op.kind)], 0);
    if (op.kind == op_kind::kernel) args[0] = static_cast<std::uint8_t>(op.accesses.empty() ? 0 : op.accesses.size() - 1);
    out.insert(out.end(), args.begin(), args.end());
    for (const access_desc& d : op.accesses) {
      out.push_back(d.kind);
      out.push_back(static_cast<std::uint8_t>(d.page & 0xff));
      out.push_back(static_cast<std::uint8_t>(d.page >> 8));
      out.push_back(d.off);
      out.push_back(d.v);
    }
  }
  return out;
}

run_result run_input(std::span<const std::uint8_t> data, const run_hooks* hooks) {
  const program p = decode(data);
  run_result res;
  {
    runner r(p, hooks);
    res = r.run();
  }
  g_runs.fetch_add(1, std::memory_order_relaxed);
  g_ops.fetch_add(res.ops, std::memory_order_relaxed);
  g_accesses.fetch_add(res.accesses, std::memory_order_relaxed);
  if (res.exhausted) g_exhausted.fetch_add(1, std::memory_order_relaxed);
  return res;
}

run_totals totals() noexcept {
  run_totals t;
  t.runs = g_runs.load(std::memory_order_relaxed);
  t.ops = g_ops.load(std::memory_order_relaxed);
  t.accesses = g_accesses.load(std::memory_order_relaxed);
  t.kernels = g_kernels.load(std::memory_order_relaxed);
  t.exhausted = g_exhausted.load(std::memory_order_relaxed);
  t.faults = g_faults.load(std::memory_order_relaxed);
  t.replays = g_replays.load(std::memory_order_relaxed);
  t.cancels = g_cancels.load(std::memory_order_relaxed);
  t.oracle_checked = g_checked.load(std::memory_order_relaxed);
  t.concurrent = g_concurrent.load(std::memory_order_relaxed);
  t.migrations_to_vram = g_to_vram.load(std::memory_order_relaxed);
  t.migrations_to_ram = g_to_ram.load(std::memory_order_relaxed);
  t.vram_bo_enomem = g_vram_enomem.load(std::memory_order_relaxed);
  return t;
}

std::string describe(const run_totals& t, const char* prefix) {
  char b[512];
  const double runs = t.runs ? static_cast<double>(t.runs) : 1.0, kernels = t.kernels ? static_cast<double>(t.kernels) : 1.0;
  std::snprintf(b, sizeof b,
                "%s: runs %llu ops %llu kernels %llu (%llu beside a CPU operation) device accesses %llu "
                "(%.1f per execution, %.1f per kernel) faults %llu replays %llu cancels %llu oracle-checked %llu "
                "out-of-frames %llu migrations to VRAM %llu to system %llu VRAM BOs refused %llu",
                prefix, static_cast<unsigned long long>(t.runs), static_cast<unsigned long long>(t.ops),
                static_cast<unsigned long long>(t.kernels), static_cast<unsigned long long>(t.concurrent),
                static_cast<unsigned long long>(t.accesses), static_cast<double>(t.accesses) / runs,
                static_cast<double>(t.accesses) / kernels, static_cast<unsigned long long>(t.faults),
                static_cast<unsigned long long>(t.replays), static_cast<unsigned long long>(t.cancels),
                static_cast<unsigned long long>(t.oracle_checked), static_cast<unsigned long long>(t.exhausted),
                static_cast<unsigned long long>(t.migrations_to_vram),
                static_cast<unsigned long long>(t.migrations_to_ram),
                static_cast<unsigned long long>(t.vram_bo_enomem));
  return b;
}

}  // namespace svm::fuzz

// ---- the seed corpus -------------------------------------------------------------

namespace svm::fuzz {
namespace {

// A small builder over the encoding (op_runner.h), for readable seeds.
class seed {
 public:
  explicit seed(std::uint8_t config, std::uint8_t vram = 48) { p_.config = config; p_.vram = vram; }
  static std::uint8_t lo(std::uint16_t v) { return static_cast<std::uint8_t>(v & 0xff); }
  static std::uint8_t hi(std::uint16_t v) { return static_cast<std::uint8_t>(v >> 8); }
  /// n: an encoded page count (< 240: 1 + n%16 pages).
  seed& mmap_anon(std::uint16_t pg, std::uint8_t n, bool shared = false, unsigned prot_bits = 3) {
    return add(op_kind::mmap_anon, {static_cast<std::uint8_t>((shared ? 1 : 0) | (prot_bits << 1)), lo(pg), hi(pg), n});
  }
  seed& mmap_file(std::uint16_t pg, std::uint8_t n, int file, bool shared, std::uint8_t off, unsigned prot_bits = 3) {
    return add(op_kind::mmap_file,
               {static_cast<std::uint8_t>((shared ? 1 : 0) | (prot_bits << 1) | (file << 4)), lo(pg), hi(pg), n, off});
  }
  seed& munmap(std::uint16_t pg, std::uint8_t n) { return add(op_kind::munmap, {lo(pg), hi(pg), n}); }
  seed& mprotect(std::uint16_t pg, std::uint8_t n, unsigned p) {
    return add(op_kind::mprotect, {lo(pg), hi(pg), n, static_cast<std::uint8_t>(p)});
  }
  seed& madvise(std::uint16_t pg, std::uint8_t n, unsigned a) {
    return add(op_kind::madvise, {lo(pg), hi(pg), n, static_cast<std::uint8_t>(a)});
  }
  seed& mremap(std::uint16_t pg, std::uint8_t n, std::uint8_t n2, unsigned fl, std::uint16_t pg2 = 0) {
    return add(op_kind::mremap, {lo(pg), hi(pg), n, n2, static_cast<std::uint8_t>(fl), lo(pg2), hi(pg2)});
  }
  seed& fork() { return add(op_kind::fork, {}); }
  seed& child_exit() { return add(op_kind::child_exit, {}); }
  seed& child_store(std::uint16_t pg, std::uint8_t off, std::uint8_t v) {
    return add(op_kind::child_store, {lo(pg), hi(pg), off, v});
  }
  seed& child_load(std::uint16_t pg, std::uint8_t off) { return add(op_kind::child_load, {lo(pg), hi(pg), off}); }
  seed& reclaim(std::uint16_t pg, std::uint8_t n) { return add(op_kind::reclaim, {lo(pg), hi(pg), n}); }
  seed& migrate(std::uint16_t pg, std::uint8_t n, std::uint8_t t) { return add(op_kind::migrate, {lo(pg), hi(pg), n, t}); }
  seed& cpu_store(std::uint16_t pg, std::uint8_t off, std::uint8_t sz, std::uint8_t v) {
    return add(op_kind::cpu_store, {lo(pg), hi(pg), off, sz, v});
  }
  seed& cpu_load(std::uint16_t pg, std::uint8_t off, std::uint8_t sz) {
    return add(op_kind::cpu_load, {lo(pg), hi(pg), off, sz});
  }
  seed& cpu_fetch_add(std::uint16_t pg, std::uint8_t off, std::uint8_t v) {
    return add(op_kind::cpu_fetch_add, {lo(pg), hi(pg), off, v});
  }
  seed& file_pwrite(int f, std::uint16_t off8, std::uint8_t v) {
    return add(op_kind::file_pwrite, {static_cast<std::uint8_t>(f), lo(off8), hi(off8), v});
  }
  seed& bo_create(std::uint8_t n, bool system = false) {
    return add(op_kind::bo_create, {n, static_cast<std::uint8_t>(system ? 1 : 0)});
  }
  seed& bo_destroy(std::uint8_t b) { return add(op_kind::bo_destroy, {b}); }
  seed& bo_bind(std::uint8_t b, std::uint16_t gpg, std::uint8_t boff, std::uint8_t n) {
    return add(op_kind::bo_bind, {b, lo(gpg), hi(gpg), boff, n});
  }
  seed& bo_unbind(std::uint16_t gpg, std::uint8_t n) { return add(op_kind::bo_unbind, {lo(gpg), hi(gpg), n}); }
  seed& bo_evict(std::uint8_t b) { return add(op_kind::bo_evict, {b}); }
  seed& bo_write(std::uint8_t b, std::uint8_t boff, std::uint8_t off, std::uint8_t v) {
    return add(op_kind::bo_write, {b, boff, off, v});
  }
  seed& bo_read(std::uint8_t b, std::uint8_t boff, std::uint8_t off) { return add(op_kind::bo_read, {b, boff, off}); }
  seed& gc() { return add(op_kind::gc_notifiers, {}); }
  /// A range kernel (op_runner.h): kind k, first page pg, encoded count n,
  /// s: stride-1 in bits 0-1, items-1 in bits 2-4; v the value byte.
  seed& kernel_range(std::uint8_t k, std::uint16_t pg, std::uint8_t n, std::uint8_t s, std::uint8_t v) {
    return add(op_kind::kernel_range, {k, lo(pg), hi(pg), n, s, v});
  }
  /// A range kernel beside CPU operation c on [cpg, cpg + cn pages), x its parameter.
  /// A range kernel cancelled at its midpoint (r odd: reason ETIMEDOUT).
  seed& kernel_cancel(std::uint8_t k, std::uint16_t pg, std::uint8_t n, std::uint8_t s, std::uint8_t v, std::uint8_t r) {
    return add(op_kind::kernel_cancel, {k, lo(pg), hi(pg), n, s, v, r});
  }
  seed& kernel_during(std::uint8_t c, std::uint16_t cpg, std::uint8_t cn, std::uint8_t x, std::uint8_t k,
                      std::uint16_t pg, std::uint8_t n, std::uint8_t s, std::uint8_t v) {
    return add(op_kind::kernel_during, {c, lo(cpg), hi(cpg), cn, x, k, lo(pg), hi(pg), n, s, v});
  }
  /// A kernel; each access {kind, page, off, v} (kind: op%8 | log2(size)<<3 | unaligned<<5 | sub<<6).
  seed& kernel(std::vector<access_desc> acc) {
    op_desc op;
    op.kind = op_kind::kernel;
    op.accesses = std::move(acc);
    p_.ops.push_back(std::move(op));
    return *this;
  }
  [[nodiscard]] std::vector<std::uint8_t> bytes() const { return encode(p_); }

 private:
  seed& add(op_kind k, std::vector<std::uint8_t> args) {
    p_.ops.push_back(op_desc{k, std::move(args), {}});
    return *this;
  }
  program p_;
};

// Access kinds: op | size << 3.
constexpr std::uint8_t ld8 = 0 | 3 << 3, st8 = 1 | 3 << 3, add8 = 2 | 3 << 3, cas8 = 3 | 3 << 3, xchg8 = 4 | 3 << 3;
constexpr std::uint8_t ld1 = 0, st2 = 1 | 1 << 3, add4 = 2 | 2 << 3, cas2 = 3 | 1 << 3, xchg1 = 4;
constexpr std::uint8_t unaligned = 0x20;
// Range kernel kinds (op_runner.h): 5 prefetch, 6 mixed; bit5 strides by 16.
constexpr std::uint8_t pf = 5, mixed8 = 6 | 3 << 3, mixed4 = 6 | 2 << 3, mixed2 = 6 | 1 << 3, mixed1 = 6, stride16 = 0x20;
// Range work items: s = (items - 1) << 2 | (stride - 1).
constexpr std::uint8_t items(unsigned n, unsigned stride = 1) { return static_cast<std::uint8_t>((n - 1) << 2 | (stride - 1)); }
// Encoded page counts past 16 (decode_pages).
constexpr std::uint8_t n32 = 240, n64 = 241, n128 = 242, n256 = 243, n511 = 244, n512 = 245, n1024 = 247;
// kernel_during operations.
constexpr std::uint8_t c_munmap = 0, c_mprotect = 1, c_dontneed = 2, c_mremap = 3, c_fork = 4, c_reclaim = 5,
                       c_migrate = 6, c_madvise = 7, c_dontunmap = 8;

}  // namespace

std::vector<std::pair<std::string, std::vector<std::uint8_t>>> seed_corpus() {
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> out;
  auto put = [&](const char* name, const seed& s) { out.emplace_back(name, s.bytes()); };
  // Config bits: 1 notifier, 2 range, 4/8/12 fixed 4K/64K/2M windows, 16 two
  // engines, 32 THP always, 64 one window, 128 no huge device leaves.
  put("anon_rw_kernel", seed(0x00)
                            .mmap_anon(0, 15)
                            .kernel({{st8, 0, 0, 1}, {st8, 1, 4, 2}, {ld8, 0, 0, 0}, {ld8, 1, 4, 0}, {ld8, 15, 9, 0}})
                            .cpu_load(0, 0, 3)
                            .cpu_load(1, 4, 3)
                            .cpu_store(2, 0, 3, 7)
                            .kernel({{ld8, 2, 0, 0}}));
  put("shared_anon_fork", seed(0x10)
                              .mmap_anon(8, 3, true)
                              .kernel({{st8, 8, 0, 3}, {st8, 9, 0, 4}})
                              .fork()
                              .child_load(8, 0)
                              .child_store(9, 0, 5)
                              .kernel({{ld8, 9, 0, 0}})
                              .cpu_load(9, 0, 3)
                              .child_exit());
  put("private_fork_cow", seed(0x01)
                              .mmap_anon(0, 7)
                              .cpu_store(0, 0, 3, 11)
                              .kernel({{ld8, 0, 0, 0}})
                              .fork()
                              .child_store(0, 0, 22)
                              .kernel({{ld8, 0, 0, 0}, {st8, 0, 0, 33}})
                              .cpu_load(0, 0, 3)
                              .child_load(0, 0)
                              .kernel({{add8, 1, 0, 1}})
                              .child_load(1, 0));
  put("mprotect_faults", seed(0x02)
                             .mmap_anon(0, 1)
                             .kernel({{st8, 0, 0, 5}})
                             .mprotect(0, 1, 1)
                             .kernel({{ld8, 0, 0, 0}, {st8, 0, 0, 6}})
                             .mprotect(1, 0, 0)
                             .kernel({{ld8, 1, 0, 0}})
                             .mprotect(0, 1, 2)
                             .kernel({{st8, 0, 0, 7}})
                             .cpu_load(0, 0, 3)
                             .mprotect(0, 1, 3)
                             .mprotect(1, 3, 3)
                             .kernel({{ld8, 0, 0, 0}, {xchg8, 1, 0, 9}})
                             .cpu_store(0, 0, 3, 1)
                             .cpu_load(0, 0, 3));
  put("munmap_refault", seed(0x04)
                            .mmap_anon(0, 7)
                            .kernel({{st8, 3, 0, 1}, {st8, 4, 0, 2}})
                            .munmap(3, 0)
                            .kernel({{ld8, 4, 0, 0}, {ld8, 3, 0, 0}})
                            .mmap_anon(3, 0)
                            .kernel({{ld8, 3, 0, 0}, {ld8, 4, 0, 0}})
                            .munmap(0, 255)
                            .kernel({{ld8, 4, 0, 0}}));
  put("dontneed", seed(0x08)
                      .mmap_anon(16, 15)
                      .kernel({{st8, 16, 0, 1}, {st8, 20, 0, 2}, {st8, 31, 255, 3}})
                      .madvise(18, 3, 0)
                      .kernel({{ld8, 16, 0, 0}, {ld8, 20, 0, 0}})
                      .madvise(16, 15, 0)
                      .kernel({{ld8, 16, 0, 0}, {ld8, 31, 255, 0}})
                      .madvise(40, 1, 0));
  put("mremap_moves", seed(0x00)
                          .mmap_anon(0, 3)
                          .kernel({{st8, 0, 0, 1}, {st8, 3, 0, 4}})
                          .mremap(0, 3, 7, 3, 200)
                          .kernel({{ld8, 200, 0, 0}, {ld8, 203, 0, 0}, {ld8, 206, 0, 0}, {ld8, 0, 0, 0}})
                          .mremap(200, 7, 11, 0)
                          .mremap(200, 11, 1, 0)
                          .kernel({{ld8, 200, 0, 0}, {ld8, 203, 0, 0}})
                          .mremap(200, 1, 1, 5, 0)
                          .kernel({{ld8, 200, 0, 0}, {ld8, 0, 0, 0}})
                          .mmap_anon(300, 1, true)
                          .kernel({{st8, 301, 0, 9}})
                          .mremap(300, 1, 3, 1)
                          .kernel({{ld8, 0, 0, 0}})
                          .cpu_load(0, 0, 3)
                          .mremap(500, 1, 2, 0));
  put("thp_madvise", seed(0x00)
                         .mmap_anon(0, 247)
                         .madvise(0, 245, 1)
                         .cpu_store(0, 0, 3, 1)
                         .kernel({{ld8, 5, 0, 0}, {st8, 7, 0, 2}, {ld8, 511, 255, 0}})
                         .mprotect(100, 1, 1)
                         .kernel({{ld8, 100, 0, 0}, {st8, 100, 0, 3}})
                         .madvise(512, 245, 1)
                         .kernel({{st8, 600, 0, 4}})
                         .munmap(700, 0)
                         .kernel({{ld8, 600, 0, 0}, {ld8, 700, 0, 0}})
                         .madvise(0, 247, 2));
  put("thp_always_2m_windows", seed(0x2c)
                                   .mmap_anon(0, 247)
                                   .kernel({{st8, 1, 0, 1}, {ld8, 300, 0, 0}})
                                   .mprotect(512, 1, 1)
                                   .kernel({{ld8, 513, 0, 0}, {st8, 512, 0, 1}})
                                   .reclaim(0, 247)
                                   .kernel({{ld8, 1, 0, 0}})
                                   .mremap(0, 245, 245, 3, 0x1000));
  put("reclaim_swapin", seed(0x00)
                            .mmap_anon(0, 7)
                            .cpu_store(1, 0, 3, 0x5e)
                            .kernel({{ld8, 1, 0, 0}, {st8, 2, 0, 1}})
                            .reclaim(0, 7)
                            .kernel({{ld8, 1, 0, 0}, {ld8, 2, 0, 0}})
                            .reclaim(0, 7)
                            .cpu_load(2, 0, 3)
                            .reclaim(900, 1));
  put("migrate_pools", seed(0x11)
                           .mmap_anon(0, 7)
                           .kernel({{st8, 0, 0, 1}, {st8, 1, 0, 2}})
                           .migrate(0, 7, 0)
                           .kernel({{ld8, 0, 0, 0}, {st8, 1, 0, 3}})
                           .migrate(0, 7, 1)
                           .kernel({{ld8, 0, 0, 0}, {ld8, 1, 0, 0}})
                           .migrate(0, 7, 1)
                           .cpu_load(1, 0, 3)
                           .cpu_store(0, 0, 3, 4)
                           .kernel({{ld8, 0, 0, 0}}));
  // migrate_vma in three steps (t & 2): to the device-private pool and
  // back, to the second system pool, and a range across two VMAs (refused).
  put("migrate_vma_steps", seed(0x11)
                               .mmap_anon(0, 7)
                               .kernel({{st8, 0, 0, 1}, {st8, 1, 0, 2}})
                               .migrate(0, 7, 3)
                               .kernel({{ld8, 0, 0, 0}, {st8, 1, 0, 3}})
                               .cpu_load(1, 0, 3)
                               .migrate(0, 7, 3)
                               .migrate(0, 7, 2)
                               .cpu_store(0, 0, 3, 4)
                               .kernel({{ld8, 0, 0, 0}, {ld8, 1, 0, 0}})
                               .mmap_anon(8, 3)
                               .migrate(0, 12, 3)
                               .cpu_load(0, 0, 3));
  put("file_mappings", seed(0x00)
                           .mmap_file(0, 3, 0, true, 0)
                           .mmap_file(8, 3, 1, false, 2)
                           .kernel({{ld8, 0, 0, 0}, {ld8, 8, 0, 0}, {ld8, 9, 0, 0}})
                           .kernel({{st8, 1, 0, 1}, {st8, 9, 0, 2}})
                           .file_pwrite(0, 512, 7)
                           .file_pwrite(1, 1536, 8)
                           .kernel({{ld8, 1, 0, 0}, {ld8, 8, 0, 0}, {ld8, 9, 0, 0}})
                           .madvise(8, 3, 0)
                           .kernel({{ld8, 9, 0, 0}})
                           .mmap_file(20, 15, 0, false, 60)
                           .kernel({{ld8, 23, 0, 0}, {ld8, 24, 0, 0}})
                           .cpu_load(24, 0, 3)
                           .file_pwrite(0, 40000, 1)
                           .mremap(0, 3, 7, 0)
                           .kernel({{ld8, 5, 0, 0}}));
  put("bo_basic", seed(0x00)
                      .bo_create(3)
                      .bo_write(0, 0, 0, 0x42)
                      .bo_bind(0, 1030, 0, 3)
                      .kernel({{ld8, 1030, 0, 0}, {st8, 1031, 0, 1}})
                      .bo_read(0, 1, 0)
                      .bo_evict(0)
                      .kernel({{ld8, 1030, 0, 0}, {add8, 1031, 0, 1}})
                      .bo_evict(0)
                      .bo_read(0, 1, 0)
                      .bo_unbind(1030, 3)
                      .kernel({{ld8, 1030, 0, 0}})
                      .bo_destroy(0)
                      .bo_destroy(255)
                      .bo_bind(0, 1030, 0, 0));
  put("bo_over_mirror", seed(0x01)
                            .mmap_anon(0, 3)
                            .cpu_store(0, 0, 3, 0x11)
                            .kernel({{ld8, 0, 0, 0}})
                            .bo_create(1, true)
                            .bo_write(0, 0, 0, 0x22)
                            .bo_bind(0, 0, 0, 1)
                            .kernel({{ld8, 0, 0, 0}, {ld8, 1, 0, 0}})
                            .munmap(0, 0)
                            .kernel({{ld8, 0, 0, 0}})
                            .cpu_store(1, 0, 3, 0x33)
                            .bo_unbind(0, 1)
                            .kernel({{ld8, 1, 0, 0}, {ld8, 0, 0, 0}})
                            .bo_bind(0, 1, 0, 1)
                            .bo_destroy(0)
                            .kernel({{ld8, 1, 0, 0}}));
  put("bo_eviction_pressure", seed(0x10, 0)
                                  .bo_create(7)
                                  .bo_write(0, 3, 1, 1)
                                  .bo_bind(0, 1040, 0, 7)
                                  .bo_create(7)
                                  .bo_bind(1, 1050, 0, 7)
                                  .kernel({{ld8, 1043, 1, 0}, {st8, 1050, 0, 2}})
                                  .bo_create(7)
                                  .bo_create(11, true)
                                  .kernel({{ld8, 1043, 1, 0}, {ld8, 1050, 0, 0}})
                                  .bo_read(1, 0, 0)
                                  .bo_evict(2)
                                  .bo_evict(3)
                                  .bo_destroy(1)
                                  .kernel({{ld8, 1050, 0, 0}}));
  put("window_mirror", seed(0x40)
                           .mmap_anon(0, 7)
                           .kernel({{st8, 0, 0, 1}, {ld8, 0, 0, 0}})
                           .cpu_load(0, 0, 3)
                           .kernel({{ld8, 1050, 0, 0}})
                           .bo_create(1)
                           .bo_bind(0, 1050, 0, 0)
                           .kernel({{ld8, 1050, 0, 0}})
                           .mmap_anon(1023, 0)
                           .kernel({{st8, 1023, 255, 2}, {ld8, 1024, 0, 0}}));
  put("device_atomics", seed(0x00)
                            .mmap_anon(0, 1)
                            .kernel({{add8, 0, 0, 1}, {add4, 0, 1, 2}, {cas8, 0, 2, 0}, {cas2, 0, 3, 5},
                                     {xchg8, 0, 4, 6}, {xchg1, 0, 5, 7}, {ld1, 0, 5, 0}, {st2, 0, 6, 8}})
                            .cpu_load(0, 0, 5)
                            .kernel({{ld8, 0, 0, 0}, {static_cast<std::uint8_t>(ld8 | unaligned), 0, 0, 0}})
                            .kernel({{static_cast<std::uint8_t>(st2 | 0xc0), 1, 255, 1}, {ld8, 1, 255, 0}}));
  put("notifier_range_mixed", seed(0x13)
                                  .mmap_anon(0, 15)
                                  .kernel({{st8, 0, 0, 1}, {st8, 8, 0, 2}})
                                  .mprotect(4, 3, 1)
                                  .madvise(8, 1, 0)
                                  .kernel({{ld8, 0, 0, 0}, {ld8, 8, 0, 0}, {st8, 5, 0, 1}})
                                  .mremap(0, 3, 3, 3, 64)
                                  .kernel({{ld8, 64, 0, 0}, {ld8, 0, 0, 0}})
                                  .fork()
                                  .kernel({{st8, 64, 0, 3}})
                                  .child_load(64, 0));
  put("cpu_access_edges", seed(0x00)
                              .mmap_anon(0, 1)
                              .cpu_store(0, 255, 0xf5, 1)
                              .cpu_load(0, 255, 0xf5)
                              .cpu_load(1, 255, 0xf4)
                              .cpu_fetch_add(0, 3, 1)
                              .cpu_fetch_add(0, 3, 0x81)
                              .cpu_fetch_add(5, 0, 1)
                              .mprotect(1, 0, 1)
                              .cpu_store(0, 255, 0xf5, 2)
                              .cpu_load(0, 255, 0xf5)
                              .mprotect(0, 0, 2)
                              .cpu_load(0, 0, 3)
                              .cpu_store(0, 0, 3, 3)
                              .kernel({{ld8, 0, 0, 0}}));
  put("bad_arguments", seed(0x00)
                           .munmap(0, 255)
                           .mprotect(0, 255, 3)
                           .madvise(0, 255, 0)
                           .mmap_anon(0, 255)
                           .mremap(0, 1, 1, 2)
                           .mremap(0, 1, 1, 4)
                           .mmap_anon(0, 1)
                           .mremap(0, 1, 1, 3, 1)
                           .mremap(0, 1, 2, 5)
                           .mremap(0, 3, 3, 1)
                           .mmap_file(4, 1, 0, true, 0)
                           .mremap(4, 1, 1, 5)
                           .bo_bind(255, 0, 0, 1)
                           .bo_evict(255)
                           .bo_read(255, 0, 0)
                           .gc());
  put("gc_and_child_exit", seed(0x15)
                               .mmap_anon(0, 3)
                               .kernel({{st8, 0, 0, 1}})
                               .munmap(0, 3)
                               .gc()
                               .mmap_anon(0, 3, true)
                               .fork()
                               .child_store(0, 0, 2)
                               .child_exit()
                               .kernel({{ld8, 0, 0, 0}})
                               .child_load(0, 0)
                               .gc());
  put("fork_swap_devpriv", seed(0x20)
                               .mmap_anon(0, 7)
                               .cpu_store(0, 0, 3, 1)
                               .cpu_store(1, 0, 3, 2)
                               .reclaim(0, 0)
                               .migrate(1, 0, 1)
                               .fork()
                               .kernel({{ld8, 0, 0, 0}, {ld8, 1, 0, 0}, {st8, 1, 0, 3}})
                               .child_load(0, 0)
                               .child_load(1, 0)
                               .child_store(0, 0, 4)
                               .cpu_load(0, 0, 3));
  // ---- the device, at scale: range kernels and kernels beside CPU operations ----
  put("range_many_pages", seed(0x10)
                              .mmap_anon(0, n1024)
                              .kernel_range(st8, 0, n256, items(4), 1)
                              .kernel_range(ld8, 0, n256, items(8), 1)
                              .kernel_range(mixed8, 0, n512, items(8, 2), 3)
                              .kernel_range(mixed4, 1, n511, items(5, 2), 4)
                              .kernel_range(mixed1 | 0x40, 256, n128, items(3, 3), 9)
                              .cpu_load(0, 16, 3)
                              .reclaim(0, n256)
                              .kernel_range(ld8, 0, n256, items(8), 1));
  put("range_faults_cancels", seed(0x01)
                                  .mmap_anon(0, 15)
                                  .mprotect(8, 3, 1)
                                  .munmap(12, 3)
                                  .kernel_range(st8, 0, 15, items(4), 2)
                                  .kernel_range(ld8, 0, n511, items(8), 2)
                                  .kernel_range(mixed2, 0, 7, items(2), 5)
                                  .mprotect(0, 3, 0)
                                  .kernel_range(add4, 0, 7, items(4), 6)
                                  .kernel_range(static_cast<std::uint8_t>(ld8 | stride16), 0, n64, items(8), 7)
                                  .kernel_range(cas2, 4, 3, items(2), 8)
                                  .kernel_range(xchg1, 4, 3, items(1), 8));
  put("range_prefetch_strides", seed(0x30)
                                    .mmap_anon(0, 15)
                                    .mmap_anon(512, 15)
                                    .madvise(512, 15, 1)
                                    .kernel_range(static_cast<std::uint8_t>(pf | stride16), 0, n64, items(6), 1)
                                    .kernel_range(st8, 512, 15, items(2), 2)
                                    .kernel_range(pf, 0, n32, items(7), 3)
                                    .kernel_range(static_cast<std::uint8_t>(mixed8 | stride16), 0, n64, items(8, 2), 4)
                                    .kernel_range(pf, 512, 15, items(3), 5)
                                    .cpu_load(513, 0, 3));
  put("range_bo_window", seed(0x44)
                             .mmap_anon(0, 15)
                             .bo_create(7)
                             .bo_bind(0, 1030, 0, 7)
                             .bo_create(3, true)
                             .bo_bind(1, 1040, 0, 3)
                             .kernel_range(mixed8, 1088, n32, items(4), 1)
                             .kernel_range(st8, 1030, n32, items(4), 2)
                             .bo_evict(0)
                             .kernel_range(ld8, 1030, n32, items(4), 2)
                             .bo_read(0, 2, 0)
                             .kernel_range(mixed8, 0, n32, items(4), 3));
  put("range_file_private", seed(0x00)
                                .mmap_file(0, 15, 1, false, 0)
                                .mmap_file(32, 15, 0, true, 0)
                                .kernel_range(ld8, 0, 15, items(4), 1)
                                .kernel_range(st8, 0, 7, items(4), 1)
                                .kernel_range(add8, 32, 7, items(4), 1)
                                .file_pwrite(1, 0, 9)
                                .file_pwrite(0, 0, 9)
                                .kernel_range(ld8, 0, 15, items(4), 1)
                                .kernel_range(ld8, 32, 15, items(4), 1)
                                .cpu_load(8, 0, 3));
  put("during_munmap", seed(0x10)
                           .mmap_anon(0, n64)
                           .kernel_range(st8, 0, n64, items(4), 1)
                           .kernel_during(c_munmap, 16, 15, 0, mixed8, 0, n64, items(4), 1)
                           .kernel_during(c_munmap, 40, 3, 0, ld8, 0, n64, items(8), 1)
                           .kernel_range(ld8, 0, n64, items(1), 1));
  put("during_mprotect", seed(0x11)
                             .mmap_anon(0, n32)
                             .kernel_during(c_mprotect, 0, 15, 1, st8, 0, n32, items(4), 2)
                             .kernel_during(c_mprotect, 8, 7, 0, mixed8, 0, n32, items(4), 3)
                             .kernel_during(c_mprotect, 0, n32, 3, add8, 0, n32, items(8), 4)
                             .kernel_range(ld8, 0, n32, items(1), 1));
  put("during_dontneed", seed(0x12)
                             .mmap_anon(0, n64)
                             .kernel_range(st8, 0, n64, items(4), 1)
                             .kernel_during(c_dontneed, 0, 15, 0, ld8, 0, n64, items(4), 1)
                             .kernel_during(c_madvise, 16, 15, 0, mixed4, 0, n64, items(8), 2)
                             .kernel_range(ld8, 0, n64, items(2), 1));
  put("during_mremap", seed(0x13)
                           .mmap_anon(0, 15)
                           .kernel_range(st8, 0, 15, items(2), 1)
                           .kernel_during(c_mremap, 0, 7, 50, mixed8, 0, n32, items(4), 1)
                           .kernel_during(c_mremap | c_dontunmap, 200, 7, 100, ld8, 200, 15, items(4), 1)
                           .kernel_range(ld8, 400, 15, items(2), 1));
  put("during_fork", seed(0x10)
                         .mmap_anon(0, n32)
                         .kernel_range(st8, 0, n32, items(4), 1)
                         .kernel_during(c_fork, 0, 0, 0, mixed8, 0, n32, items(4), 2)
                         .kernel_range(st8, 0, n32, items(4), 3)
                         .child_load(0, 0)
                         .child_load(5, 0)
                         .cpu_load(5, 0, 3));
  put("during_reclaim_migrate", seed(0x15)
                                    .mmap_anon(0, n64)
                                    .kernel_during(c_reclaim, 0, n64, 0, mixed8, 0, n64, items(4), 1)
                                    .kernel_during(c_migrate, 0, n32, 0, st8, 0, n64, items(8), 2)
                                    .kernel_during(c_migrate, 0, n64, 1, mixed8, 0, n64, items(4), 3)
                                    .kernel_during(c_reclaim, 16, n32, 0, add8, 0, n64, items(2), 4)
                                    .kernel_range(ld8, 0, n64, items(4), 1)
                                    .cpu_load(3, 0, 3));
  put("cancel_from_host", seed(0x10)
                              .mmap_anon(0, n64)
                              .kernel_range(st8, 0, n64, items(4), 1)
                              .kernel_cancel(mixed8, 0, n64, items(4), 2, 0)
                              .kernel_range(ld8, 0, n64, items(4), 1)
                              .kernel_cancel(st8, 0, n64, items(1), 3, 1)
                              .kernel_cancel(ld8, 0, n128, items(8), 4, 0)
                              .munmap(8, 0)
                              .kernel_cancel(ld8, 0, 15, items(4), 5, 0)
                              .kernel_cancel(ld8, 4, 15, items(2), 5, 1)
                              .kernel_range(mixed8, 16, n32, items(4), 6));
  put("during_thp_madvise", seed(0x20)
                                .mmap_anon(0, n1024)
                                .kernel_range(st8, 0, n512, items(8), 1)
                                .kernel_during(c_madvise, 0, n512, 2, mixed8, 0, n512, items(8), 2)
                                .kernel_during(c_madvise, 100, 15, 1, mixed8, 90, n32, items(4), 3)
                                .kernel_during(c_munmap, 256, 3, 0, ld8, 250, 15, items(4), 1));
  // The SVM placement mode (byte 1 >= 192: op_runner.h) over seeds that
  // fork, remap, swap, migrate between pools, press VRAM BOs against SVM
  // chunks, use device atomics and run kernels beside CPU operations.
  const std::pair<const char*, std::uint8_t> vram_modes[] = {
      {"private_fork_cow", 192}, {"mremap_moves", 193},      {"reclaim_swapin", 194},
      {"migrate_vma_steps", 195}, {"bo_eviction_pressure", 194}, {"device_atomics", 193},
      {"fork_swap_devpriv", 195}, {"range_many_pages", 192},    {"range_bo_window", 194},
      {"during_munmap", 194},     {"during_fork", 193},         {"during_mremap", 192}};
  for (const auto& [name, mode] : vram_modes) {
    for (std::size_t k = 0, n = out.size(); k < n; ++k) {
      if (out[k].first != name) continue;
      std::vector<std::uint8_t> bytes = out[k].second;
      bytes[1] = mode;
      out.emplace_back(std::string("vram_") + name, std::move(bytes));
      break;
    }
  }
  return out;
}

void write_seed_corpus(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  for (const auto& [name, bytes] : seed_corpus()) {
    std::ofstream f(dir / (name + ".bin"), std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
}

}  // namespace svm::fuzz
