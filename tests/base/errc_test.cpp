#include <gtest/gtest.h>

#include <string>
#include <cstring>
#include <system_error>

#include "svm/base/errc.h"

namespace svm {
namespace {

TEST(Errc, ConvertsToErrorCodeWithKernelNumbers) {
  std::error_code ec = errc::fault;
  EXPECT_EQ(ec.value(), EFAULT);
  EXPECT_EQ(std::string(ec.category().name()), "svm");
  EXPECT_EQ(ec.message(), std::string(std::strerror(EFAULT)));
  EXPECT_STREQ(errc_name(errc::busy), "EBUSY");
  EXPECT_FALSE(std::error_code(errc::ok));
}

TEST(Errc, ResultCarriesValueOrError) {
  result<int> good = 5;
  result<int> bad = errc::nomem;
  EXPECT_TRUE(good.ok());
  EXPECT_EQ(good.value(), 5);
  EXPECT_EQ(good.error(), errc::ok);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.error(), errc::nomem);
  EXPECT_DEATH((void)bad.value(), "ENOMEM");
}

}  // namespace
}  // namespace svm
