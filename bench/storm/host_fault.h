// The host reference (scenario host-minor-fault): this machine's own kernel
// taking 4K anonymous first-touch faults, measured in this process.
#pragma once

#include <atomic>
#include <cstdint>

#include "storm.h"

namespace svm::storm {

/// One pass: mmap `bytes` of fresh anonymous memory, madvise(MADV_NOHUGEPAGE),
/// touch it page by page with a store (timed), read every page back to check
/// the stores, munmap. Returns false if mmap fails.
struct host_pass {
  std::uint64_t pages = 0;
  std::uint64_t ns = 0;          ///< time of the touching loop only
  std::uint64_t data_errors = 0;
};
[[nodiscard]] bool host_touch_pass(std::uint64_t bytes, std::uint64_t seed, std::uint64_t round, host_pass& out);

/// Run host-minor-fault for the config's time (or accesses) budget.
/// `progress` receives the pages touched so far.
[[nodiscard]] run_result run_host(const run_config& c, std::atomic<std::uint64_t>& progress);

}  // namespace svm::storm
