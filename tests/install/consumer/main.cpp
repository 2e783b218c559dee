// A runtime that embeds svm: builds against the installed package only
// (find_package(svm), svm::svm), and runs a kernel that faults SVM memory in.
#include <chrono>
#include <cstdio>
#include <cstring>

#include "svm/svm/driver.h"
#include "svm/svm/gpu_vm.h"
#include "svm/version.h"

int main() {
  if (std::strcmp(svm::version(), SVM_VERSION_STRING) != 0) {
    std::fprintf(stderr, "consumer: library %s, headers %s\n", svm::version(), SVM_VERSION_STRING);
    return 1;
  }
  svm::mm mm;
  auto va = mm.mmap(0, 4 * svm::page_size, svm::prot::read | svm::prot::write, svm::map::private_ | svm::map::anonymous);
  if (!va) return 2;
  auto drv = svm::driver::create({.hw = {.engines = 1}});
  if (!drv) return 5;
  auto made = svm::gpu_vm::create(**drv, mm);
  if (!made) return 6;
  svm::driver& dev = **drv;
  svm::gpu_vm& vm = **made;
  const svm::va_t base = *va;
  auto k = dev.submit(vm, 4, [base](svm::dev::work_item& wi) {
    wi.store<std::uint64_t>(base + wi.id() * svm::page_size, 100 + wi.id());
  });
  if (!k || !k->wait(std::chrono::seconds(30)).ok()) return 3;
  for (std::uint64_t i = 0; i < 4; ++i) {
    std::uint64_t v = 0;
    if (mm.read(base + i * svm::page_size, std::as_writable_bytes(std::span{&v, 1})) != svm::errc::ok || v != 100 + i)
      return 4;
  }
  std::printf("consumer: svm %s ok (a kernel wrote 4 SVM pages the CPU reads back)\n", svm::version());
  return 0;
}
