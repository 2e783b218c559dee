// End-to-end: real kernels on the simulated device over mirrored memory.
#include <atomic>
#include <thread>
#include <vector>

#include "common/e2e_fixture.h"

namespace svm::test {
namespace {

TEST_P(E2E, KernelReadsCpuDataAndCpuReadsResults) {
  constexpr std::uint64_t n = 4096;
  const va_t in = map_anon(n * 4), out = map_anon(n * 4);
  for (std::uint64_t i = 0; i < n; ++i) ASSERT_EQ(m->store<float>(in + 4 * i, float(i)), errc::ok);
  auto st = run(n, [=](dev::work_item& wi) {
    const auto i = wi.id();
    wi.store<float>(out + 4 * i, 2.0f * wi.load<float>(in + 4 * i));
  });
  ASSERT_TRUE(st.ok()) << errc_name(st.error) << " at " << std::hex << st.address;
  for (std::uint64_t i = 0; i < n; ++i) {
    auto v = m->load<float>(out + 4 * i);
    ASSERT_TRUE(v.ok());
    ASSERT_EQ(*v, 2.0f * float(i)) << i;
  }
  auto s = vm->stats();
  EXPECT_GT(s.faults_serviced, 0u);
  EXPECT_GT(s.ptes_written, 0u);
  EXPECT_EQ(s.faults_cancelled, 0u);
}

TEST_P(E2E, DeviceTouchesMemoryTheCpuNeverTouched) {
  const va_t buf = map_anon(64 * page_size);
  auto st = run(64, [=](dev::work_item& wi) { wi.store<std::uint64_t>(buf + wi.id() * page_size, wi.id() + 100); });
  ASSERT_TRUE(st.ok()) << errc_name(st.error);
  for (std::uint64_t i = 0; i < 64; ++i) EXPECT_EQ(*m->load<std::uint64_t>(buf + i * page_size), i + 100);
}

TEST_P(E2E, InvalidAddressFailsOnlyItsKernel) {
  const va_t buf = map_anon(page_size);
  auto bad = run(1, [](dev::work_item& wi) { (void)wi.load<int>(0x1000); });
  EXPECT_EQ(bad.error, errc::canceled);
  EXPECT_EQ(bad.reason, errc::fault);
  EXPECT_EQ(bad.address, 0x1000u);
  auto good = run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 7); });
  EXPECT_TRUE(good.ok());
  EXPECT_EQ(*m->load<int>(buf), 7);
}

TEST_P(E2E, WriteToReadOnlyMemoryIsCancelledWithEperm) {
  const va_t buf = map_anon(page_size, prot::read);
  auto st = run(1, [=](dev::work_item& wi) { wi.store<int>(buf, 1); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::perm);
  auto rd = run(1, [=](dev::work_item& wi) { (void)wi.load<int>(buf); });
  EXPECT_TRUE(rd.ok());
}

TEST_P(E2E, MunmapBetweenKernelsMakesTheNextAccessFail) {
  const va_t buf = map_anon(4 * page_size);
  ASSERT_TRUE(run(4, [=](dev::work_item& wi) { wi.store<int>(buf + wi.id() * page_size, 1); }).ok());
  ASSERT_EQ(m->munmap(buf, 4 * page_size), errc::ok);
  auto st = run(1, [=](dev::work_item& wi) { (void)wi.load<int>(buf); });
  EXPECT_EQ(st.error, errc::canceled);
  EXPECT_EQ(st.reason, errc::fault);
  EXPECT_GT(vm->stats().ptes_zapped, 0u);
}



}  // namespace
}  // namespace svm::test
