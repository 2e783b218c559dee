#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "svm/base/epoch.h"

namespace svm {
namespace {

void count_free(void* obj, void* ctx) {
  delete static_cast<int*>(obj);
  static_cast<std::atomic<int>*>(ctx)->fetch_add(1);
}

TEST(Epoch, RetiredObjectWaitsForActiveReader) {
  std::atomic<int> freed{0};
  std::atomic<int> state{0};
  std::jthread reader([&] {
    epoch::guard g;
    state = 1;
    state.notify_all();
    while (state.load() != 2) state.wait(1);
  });
  while (state.load() != 1) state.wait(0);
  epoch::retire(new int(7), &count_free, &freed);
  for (int i = 0; i < 10; ++i) epoch::try_reclaim();
  EXPECT_EQ(freed.load(), 0) << "freed while a reader that may hold it is active";
  state = 2;
  state.notify_all();
  reader.join();
  epoch::synchronize();
  EXPECT_EQ(freed.load(), 1);
}

TEST(Epoch, ReaderThatEntersAfterRetireDoesNotBlockReclaim) {
  std::atomic<int> freed{0};
  epoch::retire(new int(1), &count_free, &freed);
  epoch::guard g;  // this reader cannot have seen the retired object...
  // ...but it is still active at the current epoch, so only the epoch it
  // holds limits reclamation: advance until the object is old enough.
  for (int i = 0; i < 10 && freed.load() == 0; ++i) epoch::try_reclaim();
  EXPECT_LE(freed.load(), 1);
}

TEST(Epoch, NestedGuardsKeepTheSection) {
  EXPECT_FALSE(epoch::in_section());
  {
    epoch::guard a;
    {
      epoch::guard b;
      EXPECT_TRUE(epoch::in_section());
    }
    EXPECT_TRUE(epoch::in_section());
  }
  EXPECT_FALSE(epoch::in_section());
}

TEST(Epoch, SynchronizeFreesEverythingRetiredBefore) {
  std::atomic<int> freed{0};
  for (int i = 0; i < 100; ++i) epoch::retire(new int(i), &count_free, &freed);
  epoch::synchronize();
  EXPECT_EQ(freed.load(), 100);
}

}  // namespace
}  // namespace svm
