#include "svm/pagetable/table_base.h"

#include <cassert>
#include <new>

#include "svm/base/epoch.h"

namespace svm::pt {

table_base::table_base(options o)
    : top_(o.levels == 5 ? 4u : 3u), limit_(va_t{1} << entry_shift(top_ + 1)), root_(nullptr) {
  root_ = new node(top_, 0, nullptr, top_);
  allocated_.store(1, std::memory_order_relaxed);
  live_.store(1, std::memory_order_relaxed);
}

table_base::~table_base() {
  destroy_subtree(root_);
  // Retired nodes of this table carry `this` as their deleter context: wait
  // for them before the accounting fields go away.
  epoch::synchronize();
}

void table_base::destroy_subtree(node* n) noexcept {
  if (n->level > 0) {
    for (auto& e : n->entries) {
      std::uint64_t v = e.load(std::memory_order_relaxed);
      if (is_link(v)) destroy_subtree(link_target(v));
    }
  }
  delete n;
  live_.fetch_sub(1, std::memory_order_relaxed);
}

errc table_base::check_range(va_t start, va_t end, std::uint64_t align) const noexcept {
  if (end < start) return errc::overflow;
  if (end == start) return errc::inval;
  if (!is_aligned(start, align) || !is_aligned(end, align)) return errc::inval;
  if (end > limit_) return errc::range;
  return errc::ok;
}

node* table_base::alloc_node(unsigned level, va_t base, node* parent) {
  if (alloc_fail_ && alloc_fail_(level)) return nullptr;
  node* n = new (std::nothrow) node(level, base, parent, top_);
  if (!n) return nullptr;
  allocated_.fetch_add(1, std::memory_order_relaxed);
  live_.fetch_add(1, std::memory_order_relaxed);
  return n;
}

void table_base::free_unpublished(node* n) noexcept {
  delete n;
  live_.fetch_sub(1, std::memory_order_relaxed);
}

void table_base::reclaim(void* obj, void* ctx) noexcept {
  auto* self = static_cast<table_base*>(ctx);
  delete static_cast<node*>(obj);
  self->live_.fetch_sub(1, std::memory_order_relaxed);
  self->reclaimed_.fetch_add(1, std::memory_order_relaxed);
}

void table_base::retire(node* n) noexcept {
  retired_.fetch_add(1, std::memory_order_relaxed);
  epoch::retire(n, &table_base::reclaim, this);
}

void table_base::install_child_locked(node& parent, unsigned idx, node* child, std::uint64_t old,
                                      split_fn split) {
  if (old != 0) {
    // Fill the child before publishing it: the release store of the link
    // below makes these relaxed stores visible to any walker that follows it.
    std::uint32_t n = 0;
    for (unsigned i = 0; i < entries_per_node; ++i) {
      std::uint64_t e = split(old, parent.level, i);
      child->entries[i].store(e, std::memory_order_relaxed);
      n += e != 0;
    }
    child->n_leaves.store(n, std::memory_order_relaxed);
    parent.add_leaves_locked(-1);
  }
  parent.entries[idx].store(make_link(child), std::memory_order_release);
  parent.add_links_locked(1);
}

result<node*> table_base::pin(va_t va, unsigned level, split_fn split) {
  if (level > top_ || va >= limit_) return errc::inval;
  epoch::guard g;
  for (;;) {
    node* n = root_;
    bool restart = false;
    for (unsigned l = top_; l > level && !restart; --l) {
      const unsigned idx = entry_index(va, l);
      std::uint64_t e = n->entries[idx].load(std::memory_order_seq_cst);  // epoch protocol
      if (is_link(e)) {
        n = link_target(e);
        continue;
      }
      if (e != 0 && !split) return errc::exist;
      node* c = alloc_node(l - 1, align_down(va, entry_span(l)), n);
      if (!c) return errc::nomem;
      node* next = nullptr;
      {
        lock_guard lk(n->lock);
        std::uint64_t cur = n->entries[idx].load(std::memory_order_relaxed);
        if (n->dead) {
          restart = true;
        } else if (is_link(cur)) {
          next = link_target(cur);
        } else if (cur != 0 && !split) {
          free_unpublished(c);
          return errc::exist;
        } else {
          install_child_locked(*n, idx, c, cur, split);
          next = c;
          c = nullptr;
        }
      }
      if (c) free_unpublished(c);
      n = next;
    }
    if (restart) continue;
    // seq_cst: pairs with the seq_cst load of pins in free_if_empty(); one
    // of the two must see the other.
    n->pins.fetch_add(1, std::memory_order_seq_cst);
    bool dead;
    {
      lock_guard lk(n->lock);
      dead = n->dead;
    }
    if (!dead) return n;
    n->pins.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void table_base::unpin(node* n) {
  epoch::guard g;  // n may be freed by another thread the moment the pin drops
  if (n->pins.fetch_sub(1, std::memory_order_seq_cst) == 1) free_if_empty(n);
}

node* table_base::find_node(va_t va, unsigned level) const noexcept {
  if (va >= limit_) return nullptr;
  node* n = root_;
  for (unsigned l = top_; l > level; --l) {
    std::uint64_t e = n->entries[entry_index(va, l)].load(std::memory_order_seq_cst);
    if (!is_link(e)) break;
    n = link_target(e);
  }
  return n;
}

bool table_base::any_leaf(va_t start, va_t end) const noexcept {
  if (end > limit_) end = limit_;
  epoch::guard g;
  va_t va = start;
  while (va < end) {
    const node* n = root_;
    unsigned l = top_;
    std::uint64_t e;
    for (;; --l) {
      e = n->entries[entry_index(va, l)].load(std::memory_order_seq_cst);  // epoch protocol
      if (!is_link(e) || l == 0) break;
      n = link_target(e);
    }
    if (e != 0) return true;
    const va_t next = align_down(va, entry_span(l)) + entry_span(l);
    if (next <= va) break;  // wrapped at the top of the VA space
    va = next;
  }
  return false;
}

void table_base::set_leaf_locked(node& n, unsigned idx, std::uint64_t e) {
  n.lock.assert_held();
  assert(!is_link(e) && "leaf entries keep bit 0 clear");
  std::uint64_t old = n.entries[idx].load(std::memory_order_relaxed);
  assert(!is_link(old) && "set_leaf_locked over a link");
  // release: pairs with the walkers' loads in translate().
  n.entries[idx].store(e, std::memory_order_release);
  if ((old != 0) != (e != 0)) n.add_leaves_locked(e != 0 ? 1 : -1);
}

void table_base::free_if_empty(node* n) {
  while (n != root_) {
    if (n->valid_count() != 0 || n->pins.load(std::memory_order_seq_cst) != 0) return;
    node* p = n->parent;
    bool freed = false;
    {
      lock_guard lp(p->lock);
      lock_guard ln(n->lock);
      if (!n->dead && !p->dead && n->valid_count() == 0 && n->pins.load(std::memory_order_seq_cst) == 0) {
        const unsigned idx = entry_index(n->base, p->level);
        assert(p->entries[idx].load(std::memory_order_relaxed) == make_link(n));
        n->dead = true;
        // seq_cst: the unlink half of the epoch protocol (epoch.h); pairs
        // with the walkers' seq_cst link loads.
        p->entries[idx].store(0, std::memory_order_seq_cst);
        p->add_links_locked(-1);
        // A structural change of the parent: a fault that snapshotted the
        // parent's seq (to install a huge leaf in this slot) must not miss
        // invalidations that ended in the child it never saw.
        p->bump_seq_locked(idx, idx);
        freed = true;
      }
    }
    if (!freed) return;
    retire(n);
    n = p;
  }
}

table_stats table_base::stats() const {
  table_stats s;
  epoch::guard g;
  auto visit = [&](auto& self, const node* n) -> void {
    ++s.nodes;
    for (const auto& ent : n->entries) {
      std::uint64_t e = ent.load(std::memory_order_seq_cst);  // epoch protocol
      if (e == 0) continue;
      if (is_link(e)) {
        self(self, link_target(e));
      } else if (n->level == 0) {
        ++s.leaves_4k;
      } else if (n->level == 1) {
        ++s.leaves_2m;
      } else {
        ++s.leaves_1g;
      }
    }
  };
  visit(visit, root_);
  s.bytes = s.nodes * sizeof(node);
  s.nodes_allocated = allocated_.load(std::memory_order_relaxed);
  s.nodes_reclaimed = reclaimed_.load(std::memory_order_relaxed);
  s.nodes_retired = retired_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace svm::pt
