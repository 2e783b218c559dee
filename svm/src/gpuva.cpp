#include "svm/svm/gpuva.h"

#include <algorithm>
#include <new>

#include "check.h"

namespace svm {

const char* to_string(gpuva_op_kind k) noexcept {
  switch (k) {
    case gpuva_op_kind::map: return "map";
    case gpuva_op_kind::remap: return "remap";
    case gpuva_op_kind::unmap: return "unmap";
  }
  return "?";
}

va_range gpuva_op::clear_range() const noexcept {
  if (kind == gpuva_op_kind::map || merged || old == nullptr) return {};
  return {std::max(old->start(), req.start), std::min(old->end(), req.end)};
}

va_range gpuva_op::write_range() const noexcept {
  if (kind != gpuva_op_kind::map) return {};
  return req;
}

void visit(const gpuva_op& op, gpuva_ops_visitor& v) noexcept {
  switch (op.kind) {
    case gpuva_op_kind::map: v.sm_step_map(op); break;
    case gpuva_op_kind::remap: v.sm_step_remap(op); break;
    case gpuva_op_kind::unmap: v.sm_step_unmap(op); break;
  }
}

gpuva_tree::gpuva_tree(const shared_mutex& vm_lock, gpuva_tree_options opts)
    : vm_lock_(vm_lock), opts_(opts) {
  SVM_CHECK(is_aligned(opts.managed.start, page_size) && is_aligned(opts.managed.end, page_size) &&
                !opts.managed.empty(),
            "gpuva_tree: managed range must be non-empty and 4K aligned");
}

gpuva_tree::~gpuva_tree() {
  by_bo_.clear();
  by_va_.clear_and_dispose([](gpuva* v) { delete v; });
}

void gpuva_tree::assert_locked() const { vm_lock_.assert_held(); }

std::size_t gpuva_tree::size() const {
  assert_locked();
  return by_va_.size();
}

const gpuva* gpuva_tree::find(va_t va) const {
  assert_locked();
  auto it = by_va_.upper_bound(va);  // first with start > va
  if (it == by_va_.begin()) return nullptr;
  --it;
  return it->range().contains(va) ? &*it : nullptr;
}

const gpuva* gpuva_tree::first_overlap(va_range r) const {
  assert_locked();
  if (r.empty()) return nullptr;
  auto it = by_va_.upper_bound(r.start);
  if (it != by_va_.begin()) {
    auto p = std::prev(it);
    if (p->end() > r.start) return &*p;
  }
  if (it != by_va_.end() && it->start() < r.end) return &*it;
  return nullptr;
}

const gpuva* gpuva_tree::next(const gpuva& v) const {
  assert_locked();
  auto it = by_va_.iterator_to(v);
  ++it;
  return it == by_va_.end() ? nullptr : &*it;
}

errc gpuva_tree::check_range(va_t va, std::uint64_t size) const {
  if (size == 0) return errc::inval;
  if (!is_aligned(va, page_size) || !is_aligned(size, page_size)) return errc::inval;
  if (va + size < va) return errc::overflow;  // also catches an end of exactly 2^64
  if (va < opts_.managed.start || va + size > opts_.managed.end) return errc::inval;
  return errc::ok;
}

gpuva_plan gpuva_tree::new_plan(va_range req) const {
  gpuva_plan p;
  p.tree_ = this;
  p.gen_ = gen_;
  p.req_ = req;
  return p;
}

// Emit the unmap/remap steps for every mapping overlapping `req`, in address
// order. `merge_left` / `merge_right`: the prev piece of the first / the next
// piece of the last overlapping mapping is absorbed by the new mapping, so it
// is not recreated.
void gpuva_tree::plan_overlaps(gpuva_plan& p, va_range req, bool merge_left, bool merge_right) const {
  for (const gpuva* m = first_overlap(req); m != nullptr && m->start() < req.end; m = next(*m)) {
    gpuva_op op;
    op.old = m;
    op.req = req;
    if (m->start() < req.start && !merge_left) {
      p.new_nodes_.push_back(
          std::make_unique<gpuva>(va_range{m->start(), req.start}, m->bo(), m->bo_offset(), m->flags()));
      op.prev = p.new_nodes_.back().get();
    }
    if (m->end() > req.end && !merge_right) {
      p.new_nodes_.push_back(std::make_unique<gpuva>(va_range{req.end, m->end()}, m->bo(),
                                                     m->bo_offset_at(req.end), m->flags()));
      op.next = p.new_nodes_.back().get();
    }
    op.kind = (op.prev != nullptr || op.next != nullptr) ? gpuva_op_kind::remap : gpuva_op_kind::unmap;
    p.ops_.push_back(op);
  }
}

result<gpuva_plan> gpuva_tree::plan_map(const gpuva_map_req& r) {
  assert_locked();
  if (errc e = check_range(r.va, r.size); e != errc::ok) return e;
  if (!is_aligned(r.bo_offset, page_size)) return errc::inval;
  if (r.bo_offset + r.size < r.bo_offset || r.bo_offset + r.size > r.bo_size) return errc::inval;

  const va_range req{r.va, r.va + r.size};
  auto mergeable = [&](const gpuva& n) {
    return n.bo() == r.bo && n.flags() == r.flags;
  };
  // Left: either the first overlapping mapping sticks out to the left (its
  // prev piece is the neighbour) or an untouched mapping ends at req.start.
  // Either way the neighbour is contiguous if its BO offset at req.start is
  // ours. Right: symmetric, at req.end.
  const gpuva* left = nullptr;
  bool left_untouched = false;
  if (req.start > opts_.managed.start) {
    if (const gpuva* n = find(req.start - 1)) {
      left = n;
      left_untouched = n->end() == req.start;
    }
  }
  // find(req.end) either starts at req.end (untouched) or contains req.end
  // and so is the last overlapping mapping, sticking out to the right.
  const gpuva* right = find(req.end);
  const bool right_untouched = right != nullptr && right->start() == req.end;
  // bo_offset_at() is plain arithmetic, so it also gives the offset "one past
  // the end" of an untouched left neighbour.
  const bool merge_left = opts_.merge && left != nullptr && mergeable(*left) &&
                          left->bo_offset_at(req.start) == r.bo_offset;
  const bool merge_right = opts_.merge && right != nullptr && mergeable(*right) &&
                           right->bo_offset_at(req.end) == r.bo_offset + r.size;

  try {
    gpuva_plan p = new_plan(req);
    p.ops_.reserve(8);
    p.new_nodes_.reserve(3);
    if (merge_left && left_untouched) {
      gpuva_op op;
      op.kind = gpuva_op_kind::unmap;
      op.old = left;
      op.merged = true;
      op.req = req;
      p.ops_.push_back(op);
    }
    plan_overlaps(p, req, merge_left && !left_untouched, merge_right && !right_untouched);
    if (merge_right && right_untouched) {
      gpuva_op op;
      op.kind = gpuva_op_kind::unmap;
      op.old = right;
      op.merged = true;
      op.req = req;
      p.ops_.push_back(op);
    }
    const va_t start = merge_left ? left->start() : req.start;
    const va_t end = merge_right ? right->end() : req.end;
    const std::uint64_t offset = merge_left ? left->bo_offset() : r.bo_offset;
    p.new_nodes_.push_back(std::make_unique<gpuva>(va_range{start, end}, r.bo, offset, r.flags));
    gpuva_op op;
    op.kind = gpuva_op_kind::map;
    op.map = p.new_nodes_.back().get();
    op.req = req;
    p.ops_.push_back(op);
    p.removed_.reserve(p.ops_.size() - 1);
    return p;
  } catch (const std::bad_alloc&) {
    return errc::nomem;
  }
}

result<gpuva_plan> gpuva_tree::plan_map(va_t va, std::uint64_t size, bo_handle bo, std::uint64_t bo_offset,
                                        gpuva_flags flags, const gpuva_bo_resolver& bos) {
  assert_locked();
  if (errc e = check_range(va, size); e != errc::ok) return e;
  result<std::uint64_t> bo_size = bos.bo_size(bo);
  if (!bo_size) return bo_size.error();
  return plan_map(gpuva_map_req{va, size, bo, bo_offset, bo_size.value(), flags});
}

result<gpuva_plan> gpuva_tree::plan_unmap(va_t va, std::uint64_t size) {
  assert_locked();
  if (errc e = check_range(va, size); e != errc::ok) return e;
  const va_range req{va, va + size};
  try {
    gpuva_plan p = new_plan(req);
    plan_overlaps(p, req, false, false);
    p.removed_.reserve(p.ops_.size());
    return p;
  } catch (const std::bad_alloc&) {
    return errc::nomem;
  }
}

void gpuva_tree::link(gpuva* v) {
  const bool inserted = by_va_.insert_unique(*v).second;
  SVM_CHECK(inserted, "gpuva commit: overlapping insert");
  by_bo_.insert_unique(*v);
}

void gpuva_tree::unlink(gpuva* v) {
  by_va_.erase(by_va_.iterator_to(*v));
  by_bo_.erase(by_bo_.iterator_to(*v));
}

void gpuva_tree::commit_impl(gpuva_plan& plan, step_fn fn, void* arg) {
  assert_locked();
  SVM_CHECK(plan.tree_ == this, "gpuva commit: plan of another tree (or moved-from)");
  SVM_CHECK(!plan.committed_, "gpuva commit: plan committed twice");
  SVM_CHECK(plan.gen_ == gen_, "gpuva commit: tree changed since the plan (VM lock not held throughout?)");
  // The tree owns its nodes through raw intrusive links; the ops point to
  // them as const because the driver must not touch them.
  for (const gpuva_op& op : plan.ops_) {
    if (op.old != nullptr) {
      auto* old = const_cast<gpuva*>(op.old);
      unlink(old);
      plan.removed_.emplace_back(old);  // within the capacity reserved at plan time
    }
    if (op.prev != nullptr) link(const_cast<gpuva*>(op.prev));
    if (op.next != nullptr) link(const_cast<gpuva*>(op.next));
    if (op.map != nullptr) link(const_cast<gpuva*>(op.map));
    if (fn != nullptr) fn(arg, op);
  }
  for (auto& n : plan.new_nodes_) (void)n.release();  // now owned by the tree
  plan.new_nodes_.clear();
  plan.committed_ = true;
  ++gen_;
}

bool gpuva_tree::check_invariants() const {
  assert_locked();
  const gpuva* prev = nullptr;
  std::size_t n = 0;
  for (const gpuva& v : by_va_) {
    ++n;
    if (v.range().empty() || !is_aligned(v.start(), page_size) || !is_aligned(v.end(), page_size) ||
        !is_aligned(v.bo_offset(), page_size))
      return false;
    if (v.start() < opts_.managed.start || v.end() > opts_.managed.end) return false;
    if (prev != nullptr) {
      if (prev->end() > v.start()) return false;
      if (opts_.merge && prev->end() == v.start() && prev->bo() == v.bo() && prev->flags() == v.flags() &&
          prev->bo_offset() + prev->size() == v.bo_offset())
        return false;
    }
    prev = &v;
  }
  std::size_t nb = 0;
  for (const gpuva& v : by_bo_) {
    ++nb;
    if (by_va_.find(v.start()) == by_va_.end() || &*by_va_.find(v.start()) != &v) return false;
  }
  return n == nb;
}

}  // namespace svm
