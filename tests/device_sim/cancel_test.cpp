// Host-side cancel of kernels (per queue, per VM, per kernel), teardown of a
// device with kernels running, and the bounded wait with its diagnosis.
#include <gtest/gtest.h>

#include <thread>

#include "test_support.h"

namespace svm::dev {
namespace {

using namespace std::chrono_literals;
using test::map_range;

constexpr va_t base_va = 0x10'0000'0000;

class Cancel : public ::testing::Test {
 protected:
  void make(device_config c) {
    auto made = device::create(std::move(c));
    ASSERT_TRUE(made.ok()) << errc_name(made.error());
    dev = std::move(*made);
    ASSERT_EQ(dev->attach_vm(vm, pt, mem), errc::ok);
    auto qq = dev->create_queue(vm);
    ASSERT_TRUE(qq.ok());
    q = *qq;
    map_range(pt, base_va, 4 * page_size, 0, aperture::system, 0);
  }
  /// A kernel whose work items loop forever over mapped memory (micro-TLB
  /// hits after the first access); `started` counts items that began.
  kernel_fn endless(std::atomic<int>& started) {
    return [&started](work_item& wi) {
      started.fetch_add(1);
      for (std::uint64_t i = 0;; ++i) wi.store<std::uint64_t>(base_va + 8 * (i % 64), i);
    };
  }
  void wait_started(const std::atomic<int>& started, int n) {
    while (started.load() < n) std::this_thread::sleep_for(1ms);
  }

  test::watchdog wd;
  test::test_mem mem{16};
  dev_page_table pt;
  const vm_id vm = 5;
  std::unique_ptr<device> dev;
  queue_id q = 0;
};

TEST_F(Cancel, EndlessKernelOverMappedMemoryIsCancelledFromHost) {
  make({.engines = 2});
  std::atomic<int> started{0};
  auto c = dev->submit(q, 2, endless(started));
  ASSERT_TRUE(c.ok());
  wait_started(started, 2);
  EXPECT_EQ(c->wait(20ms).error, errc::timedout);  // really endless
  ASSERT_EQ(dev->cancel_queue(q, errc::perm), errc::ok);
  const kernel_status s = c->wait(10s);
  EXPECT_EQ(s.error, errc::canceled);
  EXPECT_EQ(s.reason, errc::perm);
}

TEST_F(Cancel, DestroyQueueSucceedsAfterCancelAndWait) {
  make({.engines = 1});
  std::atomic<int> started{0};
  auto c = dev->submit(q, 1, endless(started));
  ASSERT_TRUE(c.ok());
  wait_started(started, 1);
  EXPECT_EQ(dev->destroy_queue(q), errc::busy);
  ASSERT_EQ(dev->cancel_queue(q, errc::canceled), errc::ok);
  EXPECT_EQ(c->wait(10s).error, errc::canceled);
  EXPECT_EQ(dev->destroy_queue(q), errc::ok);
  EXPECT_EQ(dev->detach_vm(vm), errc::ok);
}

TEST_F(Cancel, PendingKernelsNeverStartAndLaterSubmissionsRun) {
  make({.engines = 1});
  std::atomic<int> started{0}, ran_pending{0};
  auto running = dev->submit(q, 1, endless(started));
  auto pending = dev->submit(q, 4, [&](work_item&) { ran_pending.fetch_add(1); });
  ASSERT_TRUE(running.ok() && pending.ok());
  wait_started(started, 1);
  ASSERT_EQ(dev->cancel_queue(q, errc::io), errc::ok);
  EXPECT_EQ(pending->wait(10s).error, errc::canceled);
  EXPECT_EQ(pending->wait(10s).reason, errc::io);
  EXPECT_EQ(running->wait(10s).error, errc::canceled);
  EXPECT_EQ(ran_pending.load(), 0);
  std::atomic<int> ran_after{0};
  auto after = dev->submit(q, 3, [&](work_item& wi) { ran_after.fetch_add(1); wi.store<std::uint32_t>(base_va, 1); });
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->wait(10s).ok());
  EXPECT_EQ(ran_after.load(), 3);
}

TEST_F(Cancel, KernelStalledOnAFaultWithNoDriverIsCancelled) {
  make({.engines = 2});
  auto c = dev->submit(q, 2, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va + (100 + wi.id()) * page_size); });
  ASSERT_TRUE(c.ok());
  while (dev->faults().size() < 2) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(dev->cancel_queue(q, errc::fault), errc::ok);
  const kernel_status s = c->wait(10s);
  EXPECT_EQ(s.error, errc::canceled);
  EXPECT_EQ(s.reason, errc::fault);
  EXPECT_EQ(dev->destroy_queue(q), errc::ok);
}

TEST_F(Cancel, WorkItemWaitingOnHostStateStopsAtItsBoundary) {
  make({.engines = 1});
  std::atomic<int> started{0};
  auto c = dev->submit(q, 1, [&](work_item& wi) {
    started.fetch_add(1);
    for (;;) wi.boundary();  // waits on nothing the device sees
  });
  ASSERT_TRUE(c.ok());
  wait_started(started, 1);
  ASSERT_EQ(dev->cancel_queue(q, errc::canceled), errc::ok);
  EXPECT_EQ(c->wait(10s).error, errc::canceled);
}

TEST_F(Cancel, CancelVmCancelsEveryQueueOfTheVmOnly) {
  make({.engines = 2});
  test::test_mem mem2{4};
  dev_page_table pt2;
  ASSERT_EQ(dev->attach_vm(6, pt2, mem2), errc::ok);
  map_range(pt2, base_va, page_size, 0, aperture::system, 0);
  auto q2 = dev->create_queue(vm);
  auto other = dev->create_queue(6);
  ASSERT_TRUE(q2.ok() && other.ok());
  std::atomic<int> started{0};
  auto a = dev->submit(q, 1, endless(started));
  auto b = dev->submit(*q2, 1, endless(started));
  ASSERT_TRUE(a.ok() && b.ok());
  wait_started(started, 2);
  ASSERT_EQ(dev->cancel_vm(vm, errc::canceled), errc::ok);
  EXPECT_EQ(a->wait(10s).error, errc::canceled);
  EXPECT_EQ(b->wait(10s).error, errc::canceled);
  // The other VM's queue is untouched and still runs kernels.
  auto c = dev->submit(*other, 2, [](work_item& wi) { wi.store<std::uint64_t>(base_va + 8 * wi.id(), 7); });
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->wait(10s).ok());
  EXPECT_EQ(mem2.word(0, 8), 7u);
  EXPECT_EQ(dev->destroy_queue(q), errc::ok);
  EXPECT_EQ(dev->destroy_queue(*q2), errc::ok);
  EXPECT_EQ(dev->destroy_queue(*other), errc::ok);
  EXPECT_EQ(dev->detach_vm(6), errc::ok);
}

TEST_F(Cancel, CompletionCancelsOneKernelAndTheNextOnTheQueueRuns) {
  make({.engines = 1});
  std::atomic<int> started{0}, ran_next{0};
  auto first = dev->submit(q, 1, endless(started));
  auto next = dev->submit(q, 2, [&](work_item&) { ran_next.fetch_add(1); });
  ASSERT_TRUE(first.ok() && next.ok());
  wait_started(started, 1);
  ASSERT_EQ(first->cancel(errc::perm), errc::ok);
  const kernel_status s = first->wait(10s);
  EXPECT_EQ(s.error, errc::canceled);
  EXPECT_EQ(s.reason, errc::perm);
  EXPECT_TRUE(next->wait(10s).ok());
  EXPECT_EQ(ran_next.load(), 2);
  // Cancelling a finished kernel changes nothing.
  EXPECT_EQ(next->cancel(errc::perm), errc::ok);
  EXPECT_TRUE(next->wait(0s).ok());
}

TEST_F(Cancel, CompletionCancelsAKernelThatHasNotStarted) {
  make({.engines = 1});
  std::atomic<int> started{0}, ran{0};
  auto first = dev->submit(q, 1, endless(started));
  auto second = dev->submit(q, 2, [&](work_item&) { ran.fetch_add(1); });
  ASSERT_TRUE(first.ok() && second.ok());
  wait_started(started, 1);
  ASSERT_EQ(second->cancel(errc::io), errc::ok);
  EXPECT_EQ(second->wait(10s).error, errc::canceled);
  EXPECT_FALSE(first->done());  // still running: only the one kernel was cancelled
  ASSERT_EQ(first->cancel(errc::io), errc::ok);
  EXPECT_EQ(first->wait(10s).error, errc::canceled);
  EXPECT_EQ(ran.load(), 0);
}

TEST_F(Cancel, BadArgumentsAreErrors) {
  make({.engines = 1});
  EXPECT_EQ(dev->cancel_queue(q + 100, errc::canceled), errc::noent);
  EXPECT_EQ(dev->cancel_vm(vm + 1, errc::canceled), errc::noent);
  EXPECT_EQ(dev->cancel_queue(q, errc::ok), errc::inval);
  EXPECT_EQ(dev->cancel_vm(vm, errc::ok), errc::inval);
  EXPECT_EQ(completion{}.cancel(errc::canceled), errc::inval);
  EXPECT_EQ(completion{}.wait(0s).error, errc::inval);
  // An idle queue: cancel is a no-op that succeeds.
  EXPECT_EQ(dev->cancel_queue(q, errc::canceled), errc::ok);
  EXPECT_TRUE(dev->submit(q, 1, [](work_item&) {})->wait(10s).ok());
}

TEST_F(Cancel, TimedOutWaitCanDescribeWhatIsStuck) {
  make({.engines = 2});
  auto c = dev->submit(q, 1, [](work_item& wi) { (void)wi.load<std::uint64_t>(base_va + 200 * page_size); });
  ASSERT_TRUE(c.ok());
  while (dev->faults().size() < 1) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(c->wait(1ms).error, errc::timedout);
  const std::string d = c->describe();
  EXPECT_NE(d.find("not done"), std::string::npos) << d;
  EXPECT_NE(d.find("stalled"), std::string::npos) << d;   // the engine waits for a fault reply
  EXPECT_NE(d.find("pending"), std::string::npos) << d;   // on this fault word
  EXPECT_NE(d.find("queue " + std::to_string(q)), std::string::npos) << d;
  EXPECT_NE(d.find("fault buffer 1/"), std::string::npos) << d;
  ASSERT_EQ(c->cancel(errc::canceled), errc::ok);
  EXPECT_EQ(c->wait(10s).error, errc::canceled);
  dev.reset();
  EXPECT_NE(c->describe().find("device destroyed"), std::string::npos);
  EXPECT_EQ(c->cancel(errc::canceled), errc::ok);  // harmless once the device is gone
}

TEST(Teardown, DeviceDestructorCancelsRunningKernel) {
  test::watchdog wd;
  test::test_mem mem{4};
  dev_page_table pt;
  auto dev = std::move(*device::create({.engines = 2}));
  ASSERT_EQ(dev->attach_vm(1, pt, mem), errc::ok);
  map_range(pt, base_va, page_size, 0, aperture::system, 0);
  auto q = dev->create_queue(1);
  ASSERT_TRUE(q.ok());
  std::atomic<int> started{0};
  auto c = dev->submit(*q, 2, [&](work_item& wi) {
    started.fetch_add(1);
    for (;;) (void)wi.load<std::uint64_t>(base_va);
  });
  auto pending = dev->submit(*q, 1, [](work_item&) {});
  ASSERT_TRUE(c.ok() && pending.ok());
  while (started.load() < 2) std::this_thread::sleep_for(1ms);
  dev.reset();  // must return
  EXPECT_EQ(c->wait(1s).error, errc::canceled);
  EXPECT_EQ(pending->wait(1s).error, errc::canceled);
}

}  // namespace
}  // namespace svm::dev
