#include "svm/device_sim/tlb.h"

#include <algorithm>
#include <bit>

namespace svm::dev {

set_assoc_tlb::set_assoc_tlb(tlb_config c)
    : sets_(std::bit_ceil(std::max<std::size_t>(c.sets, 1))),
      ways_(std::clamp<std::size_t>(c.ways, 1, 255)),
      entries_(sets_ * ways_),
      next_(sets_, 0) {}

void set_assoc_tlb::insert(const tlb_entry& e) noexcept {
  const std::size_t s = set_of(e.tag);
  tlb_entry* set = &entries_[s * ways_];
  // Replace an entry with the same tag (a permission upgrade re-walked).
  for (std::size_t w = 0; w < ways_; ++w) {
    if (set[w].tag == e.tag) {
      set[w] = e;
      ++counters_.inserts;
      return;
    }
  }
  // Prefer an empty way, then the round-robin victim.
  std::size_t victim = ways_;
  for (std::size_t w = 0; w < ways_; ++w) {
    if (set[w].tag == 0) {
      victim = w;
      break;
    }
  }
  if (victim == ways_) {
    victim = next_[s];
    next_[s] = static_cast<std::uint8_t>(victim + 1 == ways_ ? 0 : victim + 1);  // no division on the miss path
    ++counters_.evictions;
  }
  set[victim] = e;
  level_mask_ |= 1u << e.level;
  ++counters_.inserts;
}

void set_assoc_tlb::invalidate(vm_id vm, va_range r) noexcept {
  if (r.empty()) return;
  for (unsigned level = 0; level < 3; ++level) {
    if (!(level_mask_ & (1u << level))) continue;
    const unsigned shift = page_shift + 9 * level;
    const va_t first = r.start >> shift;
    const va_t last = (r.end - 1) >> shift;
    const auto drop = [&](tlb_entry& e) {
      e.tag = 0;
      ++counters_.invalidated;
    };
    if (last - first < sets_) {
      // Few slots: probe exactly the sets they map to.
      for (va_t slot = first; slot <= last; ++slot) {
        const std::uint64_t tag = tlb_entry::make_tag(vm, slot << shift, level);
        tlb_entry* set = &entries_[set_of(tag) * ways_];
        for (std::size_t w = 0; w < ways_; ++w)
          if (set[w].tag == tag) drop(set[w]);
      }
    } else {
      // A wide range: one pass over the array.
      for (auto& e : entries_) {
        if (e.tag == 0 || e.level != level || e.vm() != vm) continue;
        if (e.base < r.end && r.start < e.base + e.span()) drop(e);
      }
    }
  }
}

void set_assoc_tlb::flush_all() noexcept {
  for (auto& e : entries_) {
    if (e.tag != 0) {
      e.tag = 0;
      ++counters_.invalidated;
    }
  }
  level_mask_ = 0;
}

std::size_t set_assoc_tlb::occupancy() const noexcept {
  return static_cast<std::size_t>(std::count_if(entries_.begin(), entries_.end(),
                                                [](const tlb_entry& e) { return e.tag != 0; }));
}

std::unique_ptr<tlb_model> make_set_assoc_tlb(tlb_config c) { return std::make_unique<set_assoc_tlb>(c); }

}  // namespace svm::dev
