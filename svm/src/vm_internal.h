// Private pieces of gpu_vm shared by its source files.
#pragma once

#include <vector>

#include "svm/svm/gpu_vm.h"

namespace svm {

/// A mirror window: CPU VA [cpu, cpu + size) at GPU VA gpu.
struct gpu_vm::window {
  va_t cpu;
  va_t gpu;
  std::uint64_t size;
};

/// A buffer object.
struct gpu_vm::bo {
  bo_id id = 0;
  std::uint64_t size = 0;
  /// Where the frames are. Changed by evict() under vm.lock exclusive; read
  /// by BO faults under vm.lock shared.
  placement where = placement::vram;
  /// Backing frames, one per page: VRAM pfns, or pfns of the mm's pool 0
  /// (each owning one reference). Same protection as `where`.
  std::vector<pfn_t> frames;
  resv reservation;
};


}  // namespace svm
