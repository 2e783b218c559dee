// Shared fixture of the end-to-end tests: an mm, a device with its fault
// handler, and a gpu_vm, parameterised by sequence mode and mirror.
//
// The access oracle is on for every test (it is on in test builds): it
// watches the fixture's VM (full-mm mirror; a windows mirror must call
// watch_windows()) and TearDown fails the test on any stale access.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "svm/svm/gpu_vm.h"
#include "svm/svm/oracle.h"

namespace svm::test {

struct e2e_param {
  seq_mode seq;
  mirror_impl impl;
};

inline std::string param_name(const ::testing::TestParamInfo<e2e_param>& p) {
  return std::string(to_string(p.param.seq)) + "_" + to_string(p.param.impl);
}

class E2E : public ::testing::TestWithParam<e2e_param> {
 protected:
  void SetUp() override { make(); }
  void TearDown() override {
    if (oracle) {
      EXPECT_EQ(oracle->stale(), 0u) << stale_text();
      oracle.reset();
    }
    vm.reset();
    dev.reset();
    m.reset();
  }
  void make(vm_config cfg = {}, dev::device_config hw = {}) {
    if (oracle) {
      EXPECT_EQ(oracle->stale(), 0u) << stale_text();
      oracle.reset();
    }
    vm.reset();
    dev.reset();
    m = std::make_unique<mm>(mm_options{.frames = 8192});
    if (hw.engines == 4) hw.engines = 2;
    dev = driver::create(driver_config{.hw = hw}).value();
    cfg.seq = GetParam().seq;
    cfg.impl = GetParam().impl;
    vm = gpu_vm::create(*dev, *m, cfg).value();
    oracle = std::make_unique<access_oracle>(*dev);
    if (cfg.mirror != mirror_kind::windows) {
      EXPECT_EQ(oracle->watch(*vm, *m), errc::ok);
    }
  }
  /// A windows-mirror test tells the oracle its windows after add_window().
  void watch_windows(std::vector<oracle_window> w) {
    EXPECT_EQ(oracle->watch(*vm, *m, std::move(w)), errc::ok);
  }
  std::string stale_text() const {
    std::string out;
    for (const auto& r : oracle->reports()) out += describe(r) + "\n";
    return out;
  }
  va_t map_anon(std::uint64_t bytes, prot p = prot::read | prot::write) {
    auto va = m->mmap(0, bytes, p, map::private_ | map::anonymous);
    EXPECT_TRUE(va.ok());
    return va.ok() ? *va : 0;
  }
  dev::kernel_status run(std::uint64_t n, dev::kernel_fn fn) {
    auto c = dev->submit(*vm, n, std::move(fn));
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return {c.error()};
    return c->wait(std::chrono::seconds(60));
  }

  std::unique_ptr<mm> m;
  std::unique_ptr<driver> dev;
  std::unique_ptr<gpu_vm> vm;
  std::unique_ptr<access_oracle> oracle;  ///< destroyed before the device
};

#define SVM_E2E_MODES                                                                              \
  ::testing::Values(::svm::test::e2e_param{::svm::seq_mode::pgtable, ::svm::mirror_impl::page},   \
                    ::svm::test::e2e_param{::svm::seq_mode::notifier, ::svm::mirror_impl::page}, \
                    ::svm::test::e2e_param{::svm::seq_mode::notifier, ::svm::mirror_impl::range})

}  // namespace svm::test
