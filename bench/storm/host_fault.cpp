#include "host_fault.h"

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "data.h"

namespace svm::storm {

bool host_touch_pass(std::uint64_t bytes, std::uint64_t seed, std::uint64_t round, host_pass& out) {
  const std::uint64_t pg = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  (void)::madvise(p, bytes, MADV_NOHUGEPAGE);
  auto* base = static_cast<volatile std::uint64_t*>(p);
  const std::uint64_t pages = bytes / pg;
  const std::uint64_t words_per_page = pg / sizeof(std::uint64_t);
  const auto va = reinterpret_cast<std::uint64_t>(p);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::uint64_t i = 0; i < pages; ++i) base[i * words_per_page] = value_of(seed, va + i * pg, round, 0);
  const auto t1 = std::chrono::steady_clock::now();
  std::uint64_t bad = 0;
  for (std::uint64_t i = 0; i < pages; ++i) bad += base[i * words_per_page] != value_of(seed, va + i * pg, round, 0);
  ::munmap(p, bytes);
  out.pages = pages;
  out.ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  out.data_errors = bad;
  return true;
}

run_result run_host(const run_config& c, std::atomic<std::uint64_t>& progress) {
  run_result r;
  r.config = c;
  r.host = true;
  const auto start = std::chrono::steady_clock::now();
  const auto budget = std::chrono::duration<double>(c.seconds);
  std::uint64_t ns = 0;
  do {
    host_pass p;
    if (!host_touch_pass(c.size, c.seed, r.rounds, p)) {
      ++r.kernel_errors;
      r.first_error = "host mmap failed: " + std::string(std::strerror(errno));
      break;
    }
    ++r.rounds;
    r.pages_mapped += p.pages;
    r.device_accesses += p.pages;  // one store per page (no device: the CPU's accesses)
    r.data_errors += p.data_errors;
    if (p.data_errors && r.first_error.empty()) r.first_error = "host memory read back a wrong value";
    ns += p.ns;
    progress.store(r.pages_mapped, std::memory_order_relaxed);
  } while (c.accesses ? r.device_accesses < c.accesses : std::chrono::steady_clock::now() - start < budget);
  r.wall_s = static_cast<double>(ns) / 1e9;
  r.total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (r.pages_mapped) {
    r.ns_per_page = static_cast<double>(ns) / static_cast<double>(r.pages_mapped);
    r.pages_per_s = r.wall_s > 0 ? static_cast<double>(r.pages_mapped) / r.wall_s : 0;
  }
  return r;
}

}  // namespace svm::storm
