// Differential tester: the same seeded address-space operation sequences run
// on the host kernel (in a child process, inside a private arena) and on
// svm::mm; every page is compared after every operation. See
// docs/mm-fidelity.md for what is compared and how to read the figures.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "svm/notifier/mm.h"

namespace svm {
namespace {

#if defined(__SANITIZE_THREAD__)
#define SVM_FIDELITY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SVM_FIDELITY_TSAN 1
#endif
#endif
/// The arena: 2M aligned, below the model's 2^47 limit, in application
/// memory of every build. ThreadSanitizer keeps 0x0100'0000'0000 up to the
/// PIE range for its shadow, so under it the arena sits in its low
/// application range (the first 512 GiB); AddressSanitizer's shadow gap
/// covers that low range, so the other builds keep the high address.
#ifdef SVM_FIDELITY_TSAN
constexpr va_t arena = 0x4000000000ull;
#else
constexpr va_t arena = 0x500000000000ull;
#endif
constexpr std::uint64_t arena_pages = 2048;  // 8 MiB: four THP slots
constexpr std::uint64_t arena_size = arena_pages * page_size;
constexpr std::size_t max_vmas = 96;
constexpr std::size_t max_ops = 80;

enum class kind : std::uint8_t { mmap, munmap, mprotect, madvise, mremap, read, write, fork };
const char* kind_name(kind k) {
  static const char* n[] = {"mmap", "munmap", "mprotect", "madvise", "mremap", "read", "write", "fork"};
  return n[static_cast<int>(k)];
}

/// One operation. Addresses are arena offsets in bytes.
struct op {
  kind k = kind::read;
  std::uint64_t a = 0, len = 0, len2 = 0, b = 0;  // addr, length, new length / bytes, target
  unsigned arg = 0;                               // prot / advice / flags / shared
};

// ---- per-page state ------------------------------------------------------------

enum : std::uint8_t { f_present = 1, f_zero = 2, f_excl = 4, f_thp = 8, f_hzero = 16, f_hashed = 32 };
struct page_state {
  std::uint8_t flags = 0;
  std::uint64_t hash = 0;
};
struct vma_rec {
  std::uint64_t start = 0, end = 0;
  char perms[5] = {};
};
/// Everything recorded after one operation (in shared memory for the host).
struct snapshot {
  std::int64_t rc = 0;  // 0, an errno, or for accesses 1000+signal; mremap: 0 in place, 1 moved
  std::uint32_t nvmas = 0;
  vma_rec vmas[max_vmas];
  page_state pages[arena_pages];
};
struct record {
  snapshot after[max_ops];
  snapshot child[max_ops];  // fork: the child after its writes
};

std::uint64_t hash_page(const std::byte* p) {
  // Four independent lanes (fast), mixed at the end; position-dependent.
  std::uint64_t h[4] = {0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full, 0x165667b19e3779f9ull, 0x27d4eb2f165667c5ull};
  const auto* w = reinterpret_cast<const std::uint64_t*>(p);
  for (std::size_t i = 0; i < page_size / 8; i += 4)
    for (std::size_t l = 0; l < 4; ++l) h[l] = (h[l] ^ (w[i + l] + i)) * 0x100000001b3ull;
  return (h[0] * 31 + h[1]) * 31 + (h[2] ^ (h[3] >> 7));
}

// ---- host side ------------------------------------------------------------------

sigjmp_buf* g_jmp = nullptr;
void on_signal(int sig) {
  if (g_jmp) siglongjmp(*g_jmp, sig);
  _exit(99);
}

/// The host's state of the arena (pagemap, kpageflags, maps, contents).
void host_snapshot(snapshot& s, int pagemap, int kflags) {
  s.nvmas = 0;
  // VMAs from /proc/self/maps, clipped to the arena.
  {
    char buf[1 << 16];
    const int fd = ::open("/proc/self/maps", O_RDONLY);
    std::string all;
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) all.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    std::istringstream in(all);
    std::string line;
    while (std::getline(in, line)) {
      unsigned long long lo = 0, hi = 0;
      char perms[5] = {};
      if (std::sscanf(line.c_str(), "%llx-%llx %4s", &lo, &hi, perms) != 3) continue;
      if (hi <= arena || lo >= arena + arena_size) continue;
      if (s.nvmas < max_vmas) {
        vma_rec& v = s.vmas[s.nvmas++];
        v.start = lo - arena;
        v.end = hi - arena;
        std::memcpy(v.perms, perms, 4);
      }
    }
  }
  std::vector<std::uint64_t> pm(arena_pages);
  (void)::pread(pagemap, pm.data(), pm.size() * 8, static_cast<off_t>(arena / page_size * 8));
  auto readable = [&](std::uint64_t off) {
    for (std::uint32_t i = 0; i < s.nvmas; ++i)
      if (s.vmas[i].start <= off && off < s.vmas[i].end) return s.vmas[i].perms[0] == 'r' || s.vmas[i].perms[1] == 'w';
    return false;
  };
  for (std::uint64_t i = 0; i < arena_pages; ++i) {
    page_state& p = s.pages[i];
    p = {};
    const std::uint64_t e = pm[i];
    if (!(e >> 63 & 1)) continue;
    p.flags |= f_present;
    if (e >> 56 & 1) p.flags |= f_excl;
    const std::uint64_t pfn = e & ((1ull << 55) - 1);
    std::uint64_t kf = 0;
    if (pfn && ::pread(kflags, &kf, 8, static_cast<off_t>(pfn * 8)) == 8) {
      if (kf >> 24 & 1) p.flags |= f_zero;
      if (kf >> 22 & 1) p.flags |= (kf >> 24 & 1) ? f_hzero : f_thp;
    }
    if (readable(i * page_size)) {
      p.flags |= f_hashed;
      p.hash = hash_page(reinterpret_cast<const std::byte*>(arena + i * page_size));
    }
  }
}

std::uint8_t pattern(std::uint64_t seed, std::size_t opi) { return static_cast<std::uint8_t>((seed * 131 + opi * 7) | 1); }

/// A CPU access on the host: 0, or 1000 + the signal it raised.
std::int64_t host_access(va_t va, std::uint64_t n, bool write, std::uint8_t pat) {
  sigjmp_buf jb;
  volatile std::int64_t rc = 0;
  g_jmp = &jb;
  if (int sig = sigsetjmp(jb, 1); sig != 0) {
    rc = 1000 + sig;
  } else {
    // Page by page, in order, as the model does.
    for (std::uint64_t d = 0; d < n;) {
      const std::uint64_t chunk = std::min<std::uint64_t>(page_size - (va + d) % page_size, n - d);
      auto* p = reinterpret_cast<volatile std::uint8_t*>(va + d);
      if (write) {
        for (std::uint64_t j = 0; j < chunk; ++j) p[j] = pat;
      } else {
        (void)p[0];
      }
      d += chunk;
    }
  }
  g_jmp = nullptr;
  return rc;
}

std::int64_t host_op(const op& o, std::uint64_t seed, std::size_t i, [[maybe_unused]] int pagemap, int kflags, snapshot& child) {
  const va_t a = arena + o.a;
  auto rc = [](long r) -> std::int64_t { return r == -1 ? errno : 0; };
  switch (o.k) {
    case kind::mmap: {
      const int fl = MAP_FIXED | MAP_ANONYMOUS | ((o.arg & 8) ? MAP_SHARED : MAP_PRIVATE);
      void* r = ::mmap(reinterpret_cast<void*>(a), o.len, static_cast<int>(o.arg & 7), fl, -1, 0);
      return r == MAP_FAILED ? errno : 0;
    }
    case kind::munmap: return rc(::munmap(reinterpret_cast<void*>(a), o.len));
    case kind::mprotect: return rc(::mprotect(reinterpret_cast<void*>(a), o.len, static_cast<int>(o.arg)));
    case kind::madvise: {
      const int adv[] = {MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE};
      return rc(::madvise(reinterpret_cast<void*>(a), o.len, adv[o.arg % 3]));
    }
    case kind::mremap: {
      int fl = 0;
      if (o.arg & 1) fl |= MREMAP_MAYMOVE;
      if (o.arg & 2) fl |= MREMAP_FIXED;
      if (o.arg & 4) fl |= MREMAP_DONTUNMAP;
      void* r = ::mremap(reinterpret_cast<void*>(a), o.len, o.len2, fl, reinterpret_cast<void*>(arena + o.b));
      if (r == MAP_FAILED) return errno;
      return reinterpret_cast<va_t>(r) == a ? 0 : 1;
    }
    case kind::read: return host_access(a, o.len, false, 0);
    case kind::write: return host_access(a, o.len, true, pattern(seed, i));
    case kind::fork: {
      const pid_t pid = ::fork();
      if (pid == 0) {
        child.rc = host_access(a, o.len, true, pattern(seed, i) ^ 0x5a);
        // /proc/self of the parent was resolved when its fd was opened.
        const int own = ::open("/proc/self/pagemap", O_RDONLY);
        host_snapshot(child, own, kflags);
        _exit(0);
      }
      int st = 0;
      ::waitpid(pid, &st, 0);
      return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
    }
  }
  return -1;
}

/// Run `ops` on the host in a child process; the record lands in `rec`.
bool run_host(const std::vector<op>& ops, std::uint64_t seed, record* rec) {
  const pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    const int pagemap = ::open("/proc/self/pagemap", O_RDONLY);
    const int kflags = ::open("/proc/kpageflags", O_RDONLY);
    if (pagemap < 0 || kflags < 0) _exit(3);
    void* r = ::mmap(reinterpret_cast<void*>(arena), arena_size, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (r != reinterpret_cast<void*>(arena)) _exit(4);
    for (std::size_t i = 0; i < ops.size(); ++i) {
      rec->after[i].rc = host_op(ops[i], seed, i, pagemap, kflags, rec->child[i]);
      host_snapshot(rec->after[i], pagemap, kflags);
    }
    _exit(0);
  }
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

// ---- model side -----------------------------------------------------------------

struct host_settings {
  std::string kernel, thp_enabled, use_zero_page, min_addr;
  mm_options opts;
};

std::string read_line(const char* path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

/// Whether a read fault on untouched private anonymous memory maps the zero
/// page on this host (some kernels forbid it: mm_forbids_zeropage).
bool probe_zero_page() {
  auto* p = static_cast<volatile char*>(
      ::mmap(nullptr, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) return true;
  (void)p[0];
  bool zero = true;
  const int pm = ::open("/proc/self/pagemap", O_RDONLY), kf = ::open("/proc/kpageflags", O_RDONLY);
  std::uint64_t e = 0, f = 0;
  if (pm >= 0 && kf >= 0 && ::pread(pm, &e, 8, static_cast<off_t>(reinterpret_cast<va_t>(p) / page_size * 8)) == 8 &&
      ::pread(kf, &f, 8, static_cast<off_t>((e & ((1ull << 55) - 1)) * 8)) == 8)
    zero = (f >> 24 & 1) != 0;
  if (pm >= 0) ::close(pm);
  if (kf >= 0) ::close(kf);
  ::munmap(const_cast<char*>(p), page_size);
  return zero;
}

host_settings probe_host() {
  host_settings h;
  utsname u{};
  ::uname(&u);
  h.kernel = u.release;
  h.thp_enabled = read_line("/sys/kernel/mm/transparent_hugepage/enabled");
  h.use_zero_page = read_line("/sys/kernel/mm/transparent_hugepage/use_zero_page");
  h.min_addr = read_line("/proc/sys/vm/mmap_min_addr");
  h.opts.frames = 4 * arena_pages + 4096;
  h.opts.thp = h.thp_enabled.find("[always]") != std::string::npos    ? thp_mode::always
               : h.thp_enabled.find("[madvise]") != std::string::npos ? thp_mode::madvise
                                                                      : thp_mode::never;
  h.opts.thp_use_zero_page = h.use_zero_page != "0";
  h.opts.mmap_min_addr = h.min_addr.empty() ? 65536 : std::stoull(h.min_addr);
  h.opts.zero_page = probe_zero_page();
  const std::string fab = read_line("/sys/kernel/debug/fault_around_bytes");  // debugfs, if mounted
  if (!fab.empty()) h.opts.fault_around_bytes = std::stoull(fab);
  return h;
}

void model_snapshot(mm& m, snapshot& s) {
  s.nvmas = 0;
  for (const vma_info& v : m.vmas()) {
    if (v.end <= arena || v.start >= arena + arena_size || s.nvmas >= max_vmas) continue;
    vma_rec& r = s.vmas[s.nvmas++];
    r.start = v.start - arena;
    r.end = v.end - arena;
    r.perms[0] = any(v.protection & prot::read) ? 'r' : '-';
    r.perms[1] = any(v.protection & prot::write) ? 'w' : '-';
    r.perms[2] = any(v.protection & prot::exec) ? 'x' : '-';
    r.perms[3] = v.shared ? 's' : 'p';
  }
  auto readable = [&](std::uint64_t off) {
    for (std::uint32_t i = 0; i < s.nvmas; ++i)
      if (s.vmas[i].start <= off && off < s.vmas[i].end) return s.vmas[i].perms[0] == 'r' || s.vmas[i].perms[1] == 'w';
    return false;
  };
  for (std::uint64_t i = 0; i < arena_pages; ++i) {
    page_state& p = s.pages[i];
    p = {};
    const va_t va = arena + i * page_size;
    const pt::translation t = m.raw_pte(va);
    const std::uint64_t e = t.entry;
    if (!(cpu_pte::is_valid(e) || cpu_pte::is_protnone(e))) continue;
    p.flags |= f_present;
    const pfn_t pfn = cpu_pte::pfn(e) + (t.level == 1 ? (va % huge_size) / page_size : 0);
    const unsigned pool = cpu_pte::pool(e);
    if (cpu_pte::is_zero(e)) {
      p.flags |= f_zero;
      if (t.level == 1) p.flags |= f_hzero;
    } else {
      if (m.mapcount(pfn, pool) == 1) p.flags |= f_excl;
      if (m.folio(pfn, pool).order == 9) p.flags |= f_thp;
    }
    if (readable(i * page_size)) {
      p.flags |= f_hashed;
      static const std::byte zeros[page_size] = {};
      p.hash = hash_page(cpu_pte::is_zero(e) ? zeros : m.pool(pool).frame_data(pfn));
    }
  }
}

std::int64_t errno_of(errc e) { return static_cast<std::int64_t>(e); }

/// An access on the model: 0, or 1000 + the signal the host would raise.
std::int64_t model_access(mm& m, va_t va, std::uint64_t n, bool write, std::uint8_t pat) {
  std::vector<std::byte> buf(n, std::byte{pat});
  errc e = errc::ok;
  for (std::uint64_t d = 0; d < n && e == errc::ok;) {
    const std::uint64_t chunk = std::min<std::uint64_t>(page_size - (va + d) % page_size, n - d);
    e = write ? m.write(va + d, std::span(buf.data() + d, chunk)) : m.read(va + d, std::span(buf.data() + d, 1));
    if (e != errc::ok) {
      // SIGBUS when a VMA allowing the access is there (past a shmem end).
      mm::read_guard g(m);
      const va_t at = va + d;
      auto v = m.find_vma(at);
      const bool allowed = v && (write ? any(v->protection & prot::write) : any(v->protection & (prot::read | prot::write)));
      return 1000 + (allowed ? SIGBUS : SIGSEGV);
    }
    d += chunk;
  }
  return 0;
}

struct tallies {
  std::uint64_t sequences = 0, ops = 0, pages = 0;
  std::uint64_t rc = 0, vmas = 0, present = 0, zero = 0, excl = 0, content = 0;  // exact
  std::uint64_t thp = 0, hzero = 0, fault_around = 0, thp_followed = 0;           // counted
  std::uint64_t retried = 0;
  [[nodiscard]] std::uint64_t exact() const { return rc + vmas + present + zero + excl + content; }
};

/// Compare one snapshot pair; returns the first mismatch text ("" if none).
std::string compare(const snapshot& h, const snapshot& m, tallies& t, bool with_rc) {
  std::string first;
  auto note = [&](const std::string& s) {
    if (first.empty()) first = s;
  };
  if (with_rc && h.rc != m.rc) {
    ++t.rc;
    note("rc host " + std::to_string(h.rc) + " model " + std::to_string(m.rc));
  }
  bool vsame = h.nvmas == m.nvmas;
  for (std::uint32_t i = 0; vsame && i < h.nvmas; ++i)
    vsame = h.vmas[i].start == m.vmas[i].start && h.vmas[i].end == m.vmas[i].end &&
            std::memcmp(h.vmas[i].perms, m.vmas[i].perms, 4) == 0;
  if (!vsame) {
    ++t.vmas;
    std::string s = "vmas host";
    for (std::uint32_t i = 0; i < h.nvmas; ++i) {
      char b[64];
      std::snprintf(b, sizeof b, " [%" PRIx64 ",%" PRIx64 " %.4s]", h.vmas[i].start, h.vmas[i].end, h.vmas[i].perms);
      s += b;
    }
    s += " model";
    for (std::uint32_t i = 0; i < m.nvmas; ++i) {
      char b[64];
      std::snprintf(b, sizeof b, " [%" PRIx64 ",%" PRIx64 " %.4s]", m.vmas[i].start, m.vmas[i].end, m.vmas[i].perms);
      s += b;
    }
    note(s);
  }
  auto shared_at = [&](std::uint64_t off) {
    for (std::uint32_t i = 0; i < m.nvmas; ++i)
      if (m.vmas[i].start <= off && off < m.vmas[i].end) return m.vmas[i].perms[3] == 's';
    return false;
  };
  for (std::uint64_t i = 0; i < arena_pages; ++i) {
    const page_state& a = h.pages[i];
    const page_state& b = m.pages[i];
    ++t.pages;
    const std::string where = " at page " + std::to_string(i) + " (flags host " + std::to_string(a.flags) +
                              " model " + std::to_string(b.flags) + ")";
    if ((a.flags ^ b.flags) & f_present) {
      if (shared_at(i * page_size)) {
        ++t.fault_around;  // counted: what a read fault maps around itself
      } else {
        ++t.present;
        note(std::string("present host ") + ((a.flags & f_present) ? "1" : "0") + where);
      }
      continue;
    }
    if (!(a.flags & f_present)) continue;
    if ((a.flags ^ b.flags) & f_zero) {
      ++t.zero;
      note("zero page" + where);
    }
    if ((a.flags ^ b.flags) & f_excl) {
      ++t.excl;
      note(std::string("exclusive host ") + ((a.flags & f_excl) ? "1" : "0") + where);
    }
    if ((a.flags ^ b.flags) & f_thp) ++t.thp;
    if ((a.flags ^ b.flags) & f_hzero) ++t.hzero;
    if ((a.flags & b.flags & f_hashed) && a.hash != b.hash) {
      ++t.content;
      note("content" + where);
    }
  }
  return first;
}

/// Replay on the model and compare. Returns "" or the first mismatch.
std::string replay(const host_settings& hs, const std::vector<op>& ops, std::uint64_t seed, const record& rec,
                   tallies& t, std::size_t* at = nullptr) {
  mm m(hs.opts);
  snapshot* s = new snapshot;
  std::unique_ptr<snapshot> own(s);
  if (!m.mmap(arena, arena_size, prot::none, map::private_ | map::anonymous | map::fixed_noreplace).has_value())
    return "arena mmap failed on the model";
  // The model follows the host where memory availability decides: a THP
  // the host could not allocate is not allocated by the model either.
  bool host_thp = true;
  m.pool().set_alloc_failure([&](bool huge) {
    if (!huge || host_thp) return false;
    ++t.thp_followed;  // the model would have made a THP where the host made none
    return true;
  });
  std::string first;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    const op& o = ops[i];
    const va_t a = arena + o.a;
    const snapshot& hafter = o.k == kind::fork ? rec.child[i] : rec.after[i];
    // Any page the access touches that the host made a THP allows the model one.
    host_thp = false;
    for (std::uint64_t pg = o.a / page_size; pg < arena_pages && pg * page_size < o.a + std::max<std::uint64_t>(o.len, 1);
         ++pg)
      host_thp = host_thp || (hafter.pages[pg].flags & (f_thp | f_hzero)) != 0;
    std::int64_t rc = 0;
    switch (o.k) {
      case kind::mmap: {
        const map fl = map::fixed | map::anonymous | ((o.arg & 8) ? map::shared : map::private_);
        rc = errno_of(m.mmap(a, o.len, prot(o.arg & 7), fl).error());
        break;
      }
      case kind::munmap: rc = errno_of(m.munmap(a, o.len)); break;
      case kind::mprotect: rc = errno_of(m.mprotect(a, o.len, prot(o.arg))); break;
      case kind::madvise: rc = errno_of(m.madvise(a, o.len, madvice(o.arg % 3))); break;
      case kind::mremap: {
        auto r = m.mremap(a, o.len, o.len2, mremap_flags(o.arg), arena + o.b);
        rc = r ? (*r == a ? 0 : 1) : errno_of(r.error());
        break;
      }
      case kind::read: rc = model_access(m, a, o.len, false, 0); break;
      case kind::write: rc = model_access(m, a, o.len, true, pattern(seed, i)); break;
      case kind::fork: {
        auto c = m.fork();
        if (!c) {
          rc = 1;
          break;
        }
        s->rc = model_access(**c, a, o.len, true, pattern(seed, i) ^ 0x5a);
        model_snapshot(**c, *s);
        std::string d = compare(rec.child[i], *s, t, true);
        if (!d.empty() && first.empty()) {
          first = "op " + std::to_string(i) + " (fork child): " + d;
          if (at) *at = i;
        }
        rc = 0;
        break;
      }
    }
    host_thp = true;
    s->rc = rc;
    model_snapshot(m, *s);
    ++t.ops;
    std::string d = compare(rec.after[i], *s, t, true);
    if (!d.empty() && first.empty()) {
      first = "op " + std::to_string(i) + " (" + kind_name(o.k) + "): " + d;
      if (at) *at = i;
    }
  }
  return first;
}

// ---- generation -------------------------------------------------------------------

std::vector<op> generate(std::uint64_t seed, std::size_t n) {
  std::mt19937_64 rng(seed);
  auto r = [&](std::uint64_t k) { return k ? rng() % k : 0; };
  auto addr = [&]() -> std::uint64_t {
    std::uint64_t p = r(2) ? r(arena_pages) : r(arena_pages / 512) * 512 + (r(4) ? 0 : r(8));
    std::uint64_t off = p * page_size;
    if (r(20) == 0) off += 1 + r(page_size - 1);  // unaligned
    return off;
  };
  auto length = [&](std::uint64_t at) -> std::uint64_t {
    std::uint64_t l;
    switch (r(8)) {
      case 0: l = r(6) ? (1 + r(16)) * page_size : 0; break;
      case 1: l = 512 * page_size; break;
      case 2: l = (1 + r(1024)) * page_size; break;
      default: l = (1 + r(16)) * page_size;
    }
    if (r(16) == 0) l += 1 + r(page_size - 1);
    const std::uint64_t room = arena_size - std::min(arena_size, at);
    return std::min(l, room);
  };
  const unsigned prots[] = {0, 1, 3, 3, 3};
  std::vector<op> ops;
  while (ops.size() < n) {
    op o;
    o.a = addr();
    if (o.a >= arena_size) continue;
    if (r(20) == 0 && ops.size() + 2 <= n) {
      // A THP-eligible slot: a 2M aligned private mapping advised HUGEPAGE,
      // then an access inside it (the sequences reach THPs, huge zero
      // pages and their splits this way).
      const std::uint64_t slot = r(arena_pages / 512) * 512 * page_size;
      ops.push_back({kind::mmap, slot, huge_size, 0, 0, 3});
      ops.push_back({kind::madvise, slot, huge_size, 0, 0, 1});
      continue;
    }
    switch (r(16)) {
      case 0:
      case 1:
        o.k = kind::mmap;
        o.a = align_down(o.a, page_size);
        o.len = align_up(length(o.a), page_size);
        o.arg = prots[r(5)] | (r(4) == 0 ? 8u : 0u);
        if (o.len == 0) o.len = page_size;
        break;
      case 2: o.k = kind::munmap; o.len = length(o.a); break;
      case 3:
      case 4: o.k = kind::mprotect; o.len = length(o.a); o.arg = prots[r(5)]; break;
      case 5:
      case 6: o.k = kind::madvise; o.len = length(o.a); o.arg = static_cast<unsigned>(r(3)); break;
      case 7:
      case 8: {
        o.k = kind::mremap;
        o.len = length(o.a);
        const unsigned v = static_cast<unsigned>(r(4));
        o.arg = v == 0 ? 0u : v == 1 ? 1u : v == 2 ? 3u : 7u;  // in place, MAYMOVE, +FIXED, +DONTUNMAP
        o.len2 = v >= 2 && r(2) ? o.len : length(o.a);
        if (o.arg & 2) {
          o.b = align_down(addr(), page_size);
          o.len2 = std::min(o.len2, arena_size - std::min(arena_size, o.b));
          if (o.arg & 4) o.len2 = o.len;
          if (o.b + o.len2 > arena_size) continue;
        }
        if (o.a + o.len2 > arena_size) continue;  // growing in place stays inside the arena
        break;
      }
      case 9:
      case 10:
      case 11: o.k = kind::read; o.len = 1 + r(3 * page_size); break;
      case 12:
      case 13:
      case 14: o.k = kind::write; o.len = 1 + r(3 * page_size); break;
      default: o.k = kind::fork; o.len = 1 + r(2 * page_size); break;
    }
    if (o.k == kind::read || o.k == kind::write || o.k == kind::fork) o.len = std::min(o.len, arena_size - o.a);
    ops.push_back(o);
  }
  return ops;
}

std::string describe(const std::vector<op>& ops) {
  std::string s;
  for (const op& o : ops) {
    char b[128];
    std::snprintf(b, sizeof b, "  %s(+%#" PRIx64 ", %#" PRIx64 ", %#" PRIx64 ", +%#" PRIx64 ", %u)\n",
                  kind_name(o.k), o.a, o.len, o.len2, o.b, o.arg);
    s += b;
  }
  return s;
}

// khugepaged's collapse counter: a change during a host run means it may have
// changed the arena behind the sequence's back.
std::string collapsed() { return read_line("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed"); }

/// Run one sequence on the host (retrying if khugepaged collapsed pages
/// meanwhile) and on the model. "" or a mismatch report with a shrunk
/// reproducer.
std::string check_sequence(const host_settings& hs, std::uint64_t seed, std::size_t n, record* rec, tallies& t) {
  std::vector<op> ops = generate(seed, n);
  auto host = [&](const std::vector<op>& o) {
    for (int tries = 0; tries < 3; ++tries) {
      const std::string c0 = collapsed();
      if (!run_host(o, seed, rec)) return false;
      if (collapsed() == c0) return true;
      ++t.retried;
    }
    return true;
  };
  if (!host(ops)) return "host run failed";
  std::string d = replay(hs, ops, seed, *rec, t);
  ++t.sequences;
  if (d.empty()) return d;
  // Shrink: drop operations while the mismatch persists.
  std::vector<op> best = ops;
  std::string best_d = d;
  for (bool progress = true; progress;) {
    progress = false;
    for (std::size_t i = 0; i < best.size(); ++i) {
      std::vector<op> cand = best;
      cand.erase(cand.begin() + static_cast<std::ptrdiff_t>(i));
      tallies scratch;
      if (!host(cand)) continue;
      std::string cd = replay(hs, cand, seed, *rec, scratch);
      if (!cd.empty()) {
        best = cand;
        best_d = cd;
        progress = true;
        break;
      }
    }
  }
  return "seed " + std::to_string(seed) + ": " + d + "\nshrunk to " + std::to_string(best.size()) + " ops (" + best_d +
         "):\n" + describe(best);
}

std::uint64_t env_or(const char* name, std::uint64_t dflt) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 0) : dflt;
}

void run_campaign(std::uint64_t sequences, std::size_t ops_per) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root: /proc/self/pagemap hides PFNs and /proc/kpageflags is closed";
  if (::access("/proc/kpageflags", R_OK) != 0) GTEST_SKIP() << "/proc/kpageflags is not readable";
  const host_settings hs = probe_host();
  auto* rec = static_cast<record*>(
      ::mmap(nullptr, sizeof(record), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(rec, MAP_FAILED);
  tallies t;
  std::vector<std::string> failures;
  const std::uint64_t base = env_or("SVM_FIDELITY_SEED", 1);
  for (std::uint64_t s = 0; s < sequences; ++s) {
    std::string d = check_sequence(hs, base + s, ops_per, rec, t);
    if (!d.empty() && failures.size() < 3) failures.push_back(d);
  }
  ::munmap(rec, sizeof(record));
  std::printf("fidelity: kernel %s, THP enabled '%s', use_zero_page %s, mmap_min_addr %s, fault_around_bytes %" PRIu64
              ", zero page on anonymous reads %s\n",
              hs.kernel.c_str(), hs.thp_enabled.c_str(), hs.use_zero_page.c_str(), hs.min_addr.c_str(),
              hs.opts.fault_around_bytes, hs.opts.zero_page ? "yes" : "no (mm_forbids_zeropage)");
  std::printf("fidelity: %" PRIu64 " sequences, %" PRIu64 " operations, %" PRIu64 " page comparisons (%" PRIu64
              " host reruns after khugepaged)\n",
              t.sequences, t.ops, t.pages, t.retried);
  std::printf("fidelity: exact mismatches: rc %" PRIu64 ", vmas %" PRIu64 ", present %" PRIu64 ", zero %" PRIu64
              ", exclusive %" PRIu64 ", content %" PRIu64 "\n",
              t.rc, t.vmas, t.present, t.zero, t.excl, t.content);
  std::printf("fidelity: counted: thp %" PRIu64 ", huge zero %" PRIu64 ", fault-around %" PRIu64
              ", THP fallbacks followed %" PRIu64 "\n",
              t.thp, t.hzero, t.fault_around, t.thp_followed);
  for (const std::string& f : failures) ADD_FAILURE() << f;
  EXPECT_EQ(t.exact(), 0u);
}

TEST(Fidelity, HostKernelAndModelAgreeOnEveryPage) {
  run_campaign(env_or("SVM_FIDELITY_SEQUENCES", 200), std::min<std::size_t>(env_or("SVM_FIDELITY_OPS", 60), max_ops));
}

TEST(Fidelity, SoakHostKernelAndModelAgree) {
  run_campaign(env_or("SVM_FIDELITY_SOAK_SEQUENCES", 3000), std::min<std::size_t>(env_or("SVM_FIDELITY_OPS", 60), max_ops));
}

}  // namespace
}  // namespace svm
