// A compute runtime's first program: c[i] = a[i] + b[i], where a and b are
// ordinary process memory (SVM: the device faults it in on demand) and c is
// a buffer object in VRAM bound into the same GPU VM. Every call that can
// fail is checked; an error ends the program with its name and a non-zero
// status, never an abort.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "svm/svm/driver.h"
#include "svm/svm/gpu_vm.h"

namespace {

constexpr std::uint64_t n = 4096;                   // floats per array
constexpr std::uint64_t bytes = n * sizeof(float);  // 16 KiB: four pages
constexpr svm::va_t c_gpu_va = 0x7000'0000'0000;    // where the BO is bound

int fail(const char* what, svm::errc e) {
  std::fprintf(stderr, "vector_add: %s: %s\n", what, svm::errc_name(e));
  return 1;
}

}  // namespace

int main() {
  svm::mm mm;  // the simulated process address space
  auto a = mm.mmap(0, bytes, svm::prot::read | svm::prot::write, svm::map::private_ | svm::map::anonymous);
  auto b = mm.mmap(0, bytes, svm::prot::read | svm::prot::write, svm::map::private_ | svm::map::anonymous);
  if (!a) return fail("mmap a", a.error());
  if (!b) return fail("mmap b", b.error());
  std::vector<float> host_a(n), host_b(n);
  for (std::uint64_t i = 0; i < n; ++i) host_a[i] = float(i), host_b[i] = 0.5f * float(i);
  if (auto e = mm.write(*a, std::as_bytes(std::span{host_a})); e != svm::errc::ok) return fail("write a", e);
  if (auto e = mm.write(*b, std::as_bytes(std::span{host_b})); e != svm::errc::ok) return fail("write b", e);

  auto drv = svm::driver::create({.hw = {.engines = 2}});  // the device and its fault handler
  if (!drv) return fail("driver", drv.error());
  auto made = svm::gpu_vm::create(**drv, mm);  // fault mode, the whole mm mirrored
  if (!made) return fail("gpu_vm", made.error());
  svm::driver& dev = **drv;
  svm::gpu_vm& vm = **made;
  auto bo = vm.create_bo(bytes, svm::placement::vram);
  if (!bo) return fail("create_bo", bo.error());
  if (auto e = vm.bind(*bo, c_gpu_va, 0, bytes); e != svm::errc::ok) return fail("bind", e);

  // One work item per element. SVM addresses equal CPU addresses.
  const svm::va_t pa = *a, pb = *b;
  auto done = dev.submit(vm, n, [pa, pb](svm::dev::work_item& wi) {
    const std::uint64_t off = wi.id() * sizeof(float);
    wi.store<float>(c_gpu_va + off, wi.load<float>(pa + off) + wi.load<float>(pb + off));
  });
  if (!done) return fail("submit", done.error());
  const svm::dev::kernel_status st = done->wait(std::chrono::seconds(30));
  if (!st.ok()) {
    std::fprintf(stderr, "vector_add: kernel failed: %s at 0x%llx (reason %s)\n", svm::errc_name(st.error),
                 static_cast<unsigned long long>(st.address), svm::errc_name(st.reason));
    return 1;
  }

  std::vector<float> c(n);
  if (auto e = vm.bo_read(*bo, 0, std::as_writable_bytes(std::span{c})); e != svm::errc::ok) return fail("bo_read", e);
  for (std::uint64_t i = 0; i < n; ++i)
    if (c[i] != 1.5f * float(i)) {
      std::fprintf(stderr, "vector_add: c[%llu] = %g, expected %g\n", static_cast<unsigned long long>(i), c[i], 1.5 * double(i));
      return 1;
    }

  // Misuse gets an error code and changes nothing: an unaligned bind is refused.
  if (vm.bind(*bo, c_gpu_va + 1, 0, bytes) != svm::errc::inval) return fail("unaligned bind accepted", svm::errc::ok);
  const svm::vm_stats s = vm.stats();
  std::printf("vector_add: %llu floats ok; %llu faults serviced in %llu batches, %llu PTEs written\n",
              static_cast<unsigned long long>(n), static_cast<unsigned long long>(s.faults_serviced),
              static_cast<unsigned long long>(s.batches), static_cast<unsigned long long>(s.ptes_written));
  return 0;
}
