#include "svm/pagetable/node.h"

namespace svm::pt {

constexpr lock_class node_lock_class{"pt_node", lockdep::rank::pt_node};

node::node(unsigned lvl, va_t b, node* p, unsigned top_level) noexcept
    : base(b), parent(p), lock(node_lock_class, node_lock_key(lvl, b, top_level)),
      level(static_cast<std::uint8_t>(lvl)) {
  for (auto& e : entries) e.store(0, std::memory_order_relaxed);
}

}  // namespace svm::pt
