// The scheduler: VMs, queues, kernels in submission order per queue, work
// claiming by the engines, and cancel (per kernel, queue or VM).
#include <algorithm>

#include "device_impl.h"

namespace svm::dev {

errc device::impl::attach_vm(vm_id id, dev_page_table& table, phys_mem& sysmem) {
  if (id > max_vm_id) return errc::inval;
  lock_guard g(sched_lock_);
  if (vms_.count(id)) return errc::exist;
  vms_.emplace(id, std::make_unique<vm_ctx>(vm_ctx{id, &table, &sysmem, table.va_limit()}));
  return errc::ok;
}

errc device::impl::detach_vm(vm_id id) {
  lock_guard g(sched_lock_);
  auto it = vms_.find(id);
  if (it == vms_.end()) return errc::noent;
  for (auto& [qid, q] : queues_)
    if (q->vm == it->second.get()) return errc::busy;
  vms_.erase(it);
  return errc::ok;
}

result<queue_id> device::impl::create_queue(vm_id vm) {
  lock_guard g(sched_lock_);
  auto it = vms_.find(vm);
  if (it == vms_.end()) return errc::noent;
  const queue_id id = next_queue_++;
  queues_.emplace(id, std::make_unique<queue_state>(queue_state{id, it->second.get(), {}}));
  return id;
}

errc device::impl::destroy_queue(queue_id q) {
  lock_guard g(sched_lock_);
  auto it = queues_.find(q);
  if (it == queues_.end()) return errc::noent;
  if (!it->second->jobs.empty()) return errc::busy;
  queues_.erase(it);
  return errc::ok;
}

void device::impl::cancel_running_locked(const job& j, errc reason) {
  // j.aborted was stored (seq_cst) before: a wave that stores its fault
  // word after our load below sees it and cancels itself (raise_fault).
  // The word first, then the kernel: if the wave was resolved meanwhile and
  // moved on to another kernel's item (and faulted again), its word holds
  // another token and the CAS in resolve() fails.
  for (auto& e : engines_)
    for (auto& w : e->waves) {
      const std::uint32_t x = w->fault_word.load(std::memory_order_seq_cst);
      if ((x & 3) != f_pending || w->job_pub.load(std::memory_order_seq_cst) != &j) continue;
      (void)resolve(*w, x, f_cancel, reason);
    }
}

void device::impl::cancel_job_locked(queue_state& q, job& j, errc reason, signal_list& sig) {
  if (j.status.ok()) j.status = {errc::canceled, 0, reason, access::read};
  if (&j != q.jobs.front().get()) {
    // Waiting behind the front kernel: never started, complete it now.
    j.done->status = j.status;
    kernels_failed_.fetch_add(1, std::memory_order_relaxed);
    sig.push_back(j.done);
    q.jobs.erase(std::find_if(q.jobs.begin(), q.jobs.end(), [&](const auto& p) { return p.get() == &j; }));
    return;
  }
  j.aborted.store(true, std::memory_order_seq_cst);
  cancel_running_locked(j, reason);
  drop_unclaimed_locked(j);
  if (j.completed == j.items) finalize_locked(j, sig);  // no chunk in flight
}

void device::impl::cancel_all_locked(queue_state& q, errc reason, signal_list& sig) {
  // The waiting ones first, so that finalizing the front activates nothing.
  while (q.jobs.size() > 1) cancel_job_locked(q, *q.jobs.back(), reason, sig);
  if (!q.jobs.empty()) cancel_job_locked(q, *q.jobs.front(), reason, sig);
}


errc device::impl::cancel_queue(queue_id qid, errc reason) {
  if (reason == errc::ok) return errc::inval;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    cancel_all_locked(*it->second, reason, sig);
  }
  kick_engines();
  signal_all(sig);
  return errc::ok;
}

errc device::impl::cancel_vm(vm_id vm, errc reason) {
  if (reason == errc::ok) return errc::inval;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    auto v = vms_.find(vm);
    if (v == vms_.end()) return errc::noent;
    for (auto& [id, q] : queues_)
      if (q->vm == v->second.get()) cancel_all_locked(*q, reason, sig);
  }
  kick_engines();
  signal_all(sig);
  return errc::ok;
}

errc device::impl::cancel_kernel(queue_id qid, std::uint64_t serial, errc reason, signal_list& sig) {
  if (reason == errc::ok) return errc::inval;
  {
    lock_guard g(sched_lock_);
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    queue_state& q = *it->second;
    auto j = std::find_if(q.jobs.begin(), q.jobs.end(), [&](const auto& p) { return p->serial == serial; });
    if (j == q.jobs.end()) return errc::noent;
    // The front one, finalized, activates the next kernel, which runs.
    cancel_job_locked(q, **j, reason, sig);
  }
  kick_engines();
  return errc::ok;
}

result<completion> device::impl::submit(queue_id qid, std::uint64_t items, kernel_fn fn) {
  if (!fn) return errc::inval;
  auto st = std::make_shared<completion::state>();
  st->done = fence::create("kernel");
  st->queue = qid;
  st->anchor = anchor_;
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    if (stopping_) return errc::canceled;
    auto it = queues_.find(qid);
    if (it == queues_.end()) return errc::noent;
    queue_state& q = *it->second;
    auto j = std::make_unique<job>();
    j->items = items;
    j->fn = std::move(fn);
    j->vm = q.vm;
    j->q = &q;
    j->chunk = std::clamp<std::uint64_t>(items / (std::uint64_t{cfg_.engines} * 4), 1, 1024);
    j->done = st;
    j->serial = st->serial = next_serial_++;
    const bool was_idle = q.jobs.empty();
    q.jobs.push_back(std::move(j));
    if (was_idle) activate_next_locked(q, sig);
  }
  signal_all(sig);
  return completion(std::move(st));
}

void device::impl::activate_next_locked(queue_state& q, signal_list& sig) {
  while (!q.jobs.empty()) {
    job& j = *q.jobs.front();
    if (j.items == 0) {  // nothing to run: complete in queue order
      j.done->status = j.status;
      kernels_ok_.fetch_add(1, std::memory_order_relaxed);
      sig.push_back(j.done);
      q.jobs.pop_front();
      continue;
    }
    runnable_.push_back(&j);
    publish_work();
    return;
  }
}

void device::impl::drop_unclaimed_locked(job& j) {
  if (j.next == j.items) return;
  j.completed += j.items - j.next;
  j.next = j.items;
  auto it = std::find(runnable_.begin(), runnable_.end(), &j);
  if (it != runnable_.end()) {
    *it = runnable_.back();
    runnable_.pop_back();
  }
}

void device::impl::finalize_locked(job& j, signal_list& sig) {
  queue_state& q = *j.q;
  j.done->status = j.status;
  (j.status.ok() ? kernels_ok_ : kernels_failed_).fetch_add(1, std::memory_order_relaxed);
  sig.push_back(j.done);
  // Only the front job of a queue is ever runnable, so j is the front.
  q.jobs.pop_front();  // destroys j
  activate_next_locked(q, sig);
}

claim device::impl::claim_work(detail::engine&, bool& stop) {
  signal_list sig;
  claim c;
  {
    lock_guard g(sched_lock_);
    stop = stopping_;
    while (!stop && !runnable_.empty()) {
      if (rr_ >= runnable_.size()) rr_ = 0;
      job& j = *runnable_[rr_];
      if (j.aborted.load(std::memory_order_relaxed)) {
        drop_unclaimed_locked(j);
        if (j.completed == j.items) finalize_locked(j, sig);
        continue;
      }
      c = {&j, j.next, std::min(j.items, j.next + j.chunk)};
      j.next = c.end;
      if (j.next == j.items) {
        runnable_[rr_] = runnable_.back();
        runnable_.pop_back();
      } else {
        ++rr_;  // round-robin over kernels of different queues
      }
      break;
    }
  }
  signal_all(sig);
  return c;
}

void device::impl::complete_chunk(const claim& c, std::uint64_t done) {
  signal_list sig;
  {
    lock_guard g(sched_lock_);
    job& j = *c.j;
    j.completed += done;
    if (j.aborted.load(std::memory_order_relaxed)) drop_unclaimed_locked(j);
    if (j.completed == j.items) finalize_locked(j, sig);
  }
  signal_all(sig);
}

void device::impl::fail_job(job& j, const kernel_status& s) {
  lock_guard g(sched_lock_);
  if (j.status.ok()) j.status = s;
  j.aborted.store(true, std::memory_order_relaxed);
}

}  // namespace svm::dev
