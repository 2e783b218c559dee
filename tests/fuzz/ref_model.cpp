#include "fuzz/ref_model.h"

#include <algorithm>
#include <cstring>
#include <sstream>

namespace svm::fuzz {

namespace {
constexpr std::uint32_t prot_bits = 7;
}

// ---- memory objects ------------------------------------------------------------

int ref_model::add_file(std::uint64_t pages) {
  objects.push_back(ref_object{pages, false, {}});
  return static_cast<int>(objects.size() - 1);
}

errc ref_model::file_pwrite(int obj, std::uint64_t off, std::span<const std::uint8_t> in) {
  ref_object& o = objects.at(static_cast<std::size_t>(obj));
  if (off + in.size() > o.pages * page_size) return errc::fault;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const std::uint64_t a = off + i;
    auto [it, fresh] = o.data.try_emplace(a / page_size);
    if (fresh) it->second.fill(0);
    it->second[a % page_size] = in[i];
  }
  return errc::ok;
}

// ---- VMAs ------------------------------------------------------------------------

const ref_vma* ref_model::find_vma(const ref_space& s, va_t va, va_t* start) const {
  auto it = s.vmas.upper_bound(va);
  if (it == s.vmas.begin()) return nullptr;
  --it;
  if (va >= it->second.end) return nullptr;
  if (start) *start = it->first;
  return &it->second;
}

void ref_model::split_at(ref_space& s, va_t va) {
  auto it = s.vmas.upper_bound(va);
  if (it == s.vmas.begin()) return;
  --it;
  if (va >= it->second.end || it->first == va) return;
  ref_vma tail = it->second;
  tail.pgoff += (va - it->first) / page_size;
  it->second.end = va;
  s.vmas.emplace(va, tail);
}

void ref_model::merge(ref_space& s) {
  for (auto it = s.vmas.begin(); it != s.vmas.end();) {
    auto nx = std::next(it);
    if (nx == s.vmas.end()) break;
    const ref_vma& a = it->second;
    const ref_vma& b = nx->second;
    const bool ok = a.end == nx->first && a.p == b.p && a.shared == b.shared && a.obj == b.obj && a.file == b.file &&
                    a.advice == b.advice && a.account == b.account &&
                    b.pgoff == a.pgoff + (a.end - it->first) / page_size && (!a.anon || !b.anon || a.anon == b.anon);
    if (ok) {
      it->second.end = b.end;
      if (!it->second.anon) it->second.anon = b.anon;
      s.vmas.erase(nx);
    } else {
      it = nx;
    }
  }
}

bool ref_model::range_free(const ref_space& s, va_t lo, va_t hi) const {
  auto it = s.vmas.upper_bound(lo);
  if (it != s.vmas.begin() && std::prev(it)->second.end > lo) return false;
  return it == s.vmas.end() || it->first >= hi;
}

void ref_model::do_munmap(ref_space& s, va_t lo, va_t hi) {
  split_at(s, lo);
  split_at(s, hi);
  for (auto it = s.vmas.lower_bound(lo); it != s.vmas.end() && it->first < hi;) it = s.vmas.erase(it);
  for (auto it = s.priv.lower_bound(lo); it != s.priv.end() && it->first < hi;) it = s.priv.erase(it);
}

std::optional<va_t> ref_model::get_unmapped_area(const ref_space& s, std::uint64_t len) const {
  const std::uint64_t align = len >= huge_size ? huge_size : page_size;
  va_t cand = align_up(base_, align);
  for (const auto& [start, v] : s.vmas) {
    if (v.end <= cand) continue;
    if (start >= cand + len) break;
    cand = align_up(v.end, align);
  }
  if (cand + len > limit_ || cand + len < cand) return std::nullopt;
  return cand;
}

bool ref_model::beyond_eof(const ref_vma& v, va_t start, va_t page) const {
  if (v.obj < 0) return false;
  return v.pgoff + (page - start) / page_size >= objects[static_cast<std::size_t>(v.obj)].pages;
}

result<va_t> ref_model::mmap_fixed(ref_space& s, va_t addr, std::uint64_t length, prot p, bool shared, int obj,
                                   std::uint64_t offset) {
  if (length == 0) return errc::inval;
  if (static_cast<std::uint32_t>(p) & ~prot_bits) return errc::inval;
  if (!is_aligned(offset, page_size)) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (addr + len < addr || addr + len > limit_) return errc::nomem;
  if (addr < mm_options{}.mmap_min_addr) return errc::perm;
  do_munmap(s, addr, addr + len);
  ref_vma v;
  v.end = addr + len;
  v.p = p;
  v.shared = shared;
  if (obj >= 0) {
    v.obj = obj;
    v.file = true;
    v.pgoff = offset / page_size;
  } else if (shared) {
    objects.push_back(ref_object{len / page_size, true, {}});
    v.obj = static_cast<int>(objects.size() - 1);
  } else {
    v.pgoff = addr / page_size;
  }
  v.account = !shared && any(p & prot::write);
  s.vmas.emplace(addr, v);
  merge(s);
  return addr;
}

errc ref_model::munmap(ref_space& s, va_t addr, std::uint64_t length) {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len < addr || addr + len > limit_) return errc::inval;
  do_munmap(s, addr, addr + len);
  return errc::ok;
}

errc ref_model::mprotect(ref_space& s, va_t addr, std::uint64_t length, prot p) {
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (static_cast<std::uint32_t>(p) & ~prot_bits) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::nomem;
  const va_t end = addr + len;
  const ref_vma* v0 = find_vma(s, addr);
  if (!v0) return errc::nomem;
  va_t covered = v0->end;
  for (auto it = s.vmas.find(covered); it != s.vmas.end() && covered < end; it = s.vmas.find(covered))
    covered = it->second.end;
  covered = std::min(covered, end);
  split_at(s, addr);
  split_at(s, covered);
  for (auto it = s.vmas.find(addr); it != s.vmas.end() && it->first < covered; ++it) {
    ref_vma& v = it->second;
    if (!v.shared) {
      if (any(p & prot::write)) v.account = true;
      else if (v.account && v.private_anon() && !v.anon) v.account = false;
    }
    v.p = p;
  }
  merge(s);
  return covered < end ? errc::nomem : errc::ok;
}

errc ref_model::madvise(ref_space& s, va_t addr, std::uint64_t length, madvice a) {
  if (a != madvice::dontneed && a != madvice::hugepage && a != madvice::nohugepage) return errc::inval;
  if (!is_aligned(addr, page_size)) return errc::inval;
  if (length == 0) return errc::ok;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  const va_t end = addr + len;
  bool hole = false;
  va_t cur = addr;
  auto it = s.vmas.upper_bound(addr);
  if (it != s.vmas.begin() && std::prev(it)->second.end > addr) --it;
  for (; it != s.vmas.end() && it->first < end; ++it) {
    if (it->first > cur) hole = true;
    cur = it->second.end;
  }
  if (cur < end) hole = true;
  if (a == madvice::dontneed) {
    // Private pages drop their own bytes (anonymous: zero again; file: the
    // file's bytes again); shared mappings keep the object's bytes.
    for (auto p = s.priv.lower_bound(addr); p != s.priv.end() && p->first < end;) p = s.priv.erase(p);
  } else {
    split_at(s, addr);
    split_at(s, end);
    for (auto v = s.vmas.lower_bound(addr); v != s.vmas.end() && v->first < end; ++v) v->second.advice = a;
    merge(s);
  }
  return hole ? errc::nomem : errc::ok;
}

result<va_t> ref_model::mremap(ref_space& s, va_t old_addr, std::uint64_t old_length, std::uint64_t new_length,
                               mremap_flags flags, va_t new_addr) {
  const auto fl = static_cast<std::uint32_t>(flags);
  if (fl & ~7u) return errc::inval;
  const bool maymove = any(flags & mremap_flags::maymove), fixed = any(flags & mremap_flags::fixed),
             dontunmap = any(flags & mremap_flags::dontunmap);
  if (!is_aligned(old_addr, page_size)) return errc::inval;
  if ((fixed || dontunmap) && !maymove) return errc::inval;
  const std::uint64_t old_len = align_up(old_length, page_size), new_len = align_up(new_length, page_size);
  if (new_len == 0) return errc::inval;
  if (dontunmap && old_len != new_len) return errc::inval;
  if (old_addr + old_len < old_addr || old_addr + old_len > limit_) return errc::inval;
  if (fixed) {
    if (!is_aligned(new_addr, page_size)) return errc::inval;
    if (new_addr + new_len < new_addr || new_addr + new_len > limit_) return errc::inval;
    if (new_addr < old_addr + old_len && old_addr < new_addr + new_len) return errc::inval;
  }
  va_t vstart = 0;
  const ref_vma* v = find_vma(s, old_addr, &vstart);
  if (!v) return errc::fault;
  if (old_len == 0) {  // a second mapping of a shared object
    if (!v->shared || dontunmap) return errc::inval;
    if (!maymove) return errc::nomem;
    va_t target;
    if (fixed) {
      do_munmap(s, new_addr, new_addr + new_len);
      target = new_addr;
    } else {
      auto a = get_unmapped_area(s, new_len);
      if (!a) return errc::nomem;
      target = *a;
    }
    ref_vma nv = *v;
    nv.pgoff = v->pgoff + (old_addr - vstart) / page_size;
    nv.end = target + new_len;
    s.vmas[target] = nv;
    merge(s);
    return target;
  }
  std::uint64_t cur_len = old_len;
  if (fixed && new_len < old_len) {  // a shrinking move: the kept part in one VMA, then the tail goes
    if (old_addr + new_len > v->end) return errc::fault;
    do_munmap(s, new_addr, new_addr + new_len);
    do_munmap(s, old_addr + new_len, old_addr + old_len);
    cur_len = new_len;
    v = find_vma(s, old_addr, &vstart);
    if (!v) return errc::fault;
  }
  if (fixed && old_len == new_len && old_addr + old_len > v->end) {
    // A move of several VMAs and the gaps between them.
    split_at(s, old_addr);
    split_at(s, old_addr + old_len);
    std::vector<std::pair<va_t, va_t>> pieces;
    for (auto it = s.vmas.lower_bound(old_addr); it != s.vmas.end() && it->first < old_addr + old_len; ++it)
      pieces.emplace_back(it->first, it->second.end);
    for (auto [lo, hi] : pieces) {
      const va_t to = lo - old_addr + new_addr;
      do_munmap(s, to, to + (hi - lo));  // each VMA's own target only
      move_piece(s, lo, hi, to, hi - lo, dontunmap);
    }
    merge(s);
    return new_addr;
  }
  if (!fixed && !dontunmap && new_len <= old_len) {
    if (new_len < old_len) do_munmap(s, old_addr + new_len, old_addr + old_len);
    return old_addr;
  }
  if (old_addr + cur_len > v->end) return errc::fault;
  if (!fixed && !dontunmap && new_len > old_len && old_addr + old_len == v->end && old_addr + new_len <= limit_ &&
      range_free(s, v->end, old_addr + new_len)) {
    s.vmas.at(vstart).end = old_addr + new_len;  // shmem keeps its size
    merge(s);
    return old_addr;
  }
  if (!maymove) return errc::nomem;

  va_t target;
  std::uint64_t move_len = old_len;
  if (fixed) {
    do_munmap(s, new_addr, new_addr + new_len);
    target = new_addr;
    move_len = cur_len;
  } else {
    auto a = get_unmapped_area(s, new_len);
    if (!a) return errc::nomem;
    target = *a;
  }
  split_at(s, old_addr);
  split_at(s, old_addr + move_len);
  move_piece(s, old_addr, old_addr + move_len, target, new_len, dontunmap);
  merge(s);
  return target;
}

void ref_model::move_piece(ref_space& s, va_t lo, va_t hi, va_t target, std::uint64_t new_len, bool keep_old) {
  ref_vma piece = s.vmas.at(lo);
  // The pages move with their bytes; the old range keeps nothing.
  std::vector<std::pair<va_t, page_bytes>> moved;
  for (auto p = s.priv.lower_bound(lo); p != s.priv.end() && p->first < hi;) {
    moved.emplace_back(p->first - lo + target, p->second);
    p = s.priv.erase(p);
  }
  ref_vma nv = piece;
  nv.end = target + new_len;
  if (nv.private_anon() && !nv.anon) nv.pgoff = target / page_size;
  if (!keep_old) s.vmas.erase(lo);
  else if (s.vmas.at(lo).private_anon()) s.vmas.at(lo).anon = 0;  // DONTUNMAP: the emptied VMA drops its anon_vma
  s.vmas[target] = nv;
  for (auto& [va, bytes] : moved) s.priv[va] = bytes;
}

errc ref_model::reclaim_or_migrate_check(va_t addr, std::uint64_t length) const {
  if (!is_aligned(addr, page_size) || length == 0) return errc::inval;
  const std::uint64_t len = align_up(length, page_size);
  if (len < length || addr + len <= addr) return errc::inval;
  return errc::ok;
}

// ---- CPU access ------------------------------------------------------------------

errc ref_model::cpu_check(const ref_space& s, va_t va, bool write) const {
  va_t start = 0;
  const ref_vma* v = find_vma(s, va, &start);
  if (!v) return errc::fault;
  if (write && !v->writable()) return v->readable() ? errc::perm : errc::fault;
  // PROT_WRITE implies read for the CPU, as on x86 (not for hmm_range_fault).
  if (!write && !v->readable() && !v->writable()) return errc::fault;
  const va_t page = align_down(va, page_size);
  if (!s.priv.contains(page) && beyond_eof(*v, start, page)) return errc::fault;  // SIGBUS
  return errc::ok;
}

const page_bytes* ref_model::page_read(const ref_space& s, va_t page) const {
  if (auto it = s.priv.find(page); it != s.priv.end()) return &it->second;
  va_t start = 0;
  const ref_vma* v = find_vma(s, page, &start);
  if (!v || v->obj < 0) return nullptr;
  const ref_object& o = objects[static_cast<std::size_t>(v->obj)];
  auto it = o.data.find(v->pgoff + (page - start) / page_size);
  return it == o.data.end() ? nullptr : &it->second;
}

page_bytes& ref_model::page_write(ref_space& s, va_t page) {
  va_t start = 0;
  const ref_vma* v = find_vma(s, page, &start);
  if (v && v->shared) {
    ref_object& o = objects[static_cast<std::size_t>(v->obj)];
    auto [it, fresh] = o.data.try_emplace(v->pgoff + (page - start) / page_size);
    if (fresh) it->second.fill(0);
    return it->second;
  }
  if (auto it = s.priv.find(page); it != s.priv.end()) return it->second;
  if (v && !s.vmas.at(start).anon) s.vmas.at(start).anon = next_anon_++;  // anon_vma_prepare
  page_bytes copy{};
  if (const page_bytes* src = page_read(s, page)) copy = *src;
  return s.priv.emplace(page, copy).first->second;
}

errc ref_model::cpu_read(ref_space& s, va_t va, std::span<std::uint8_t> out) const {
  std::size_t done = 0;
  while (done < out.size()) {
    const va_t a = va + done;
    const std::size_t n = std::min<std::size_t>(page_size - (a % page_size), out.size() - done);
    if (errc e = cpu_check(s, a, false); e != errc::ok) return e;
    const page_bytes* p = page_read(s, align_down(a, page_size));
    if (p) std::memcpy(out.data() + done, p->data() + a % page_size, n);
    else std::memset(out.data() + done, 0, n);
    done += n;
  }
  return errc::ok;
}

errc ref_model::cpu_write(ref_space& s, va_t va, std::span<const std::uint8_t> in) {
  std::size_t done = 0;
  while (done < in.size()) {
    const va_t a = va + done;
    const std::size_t n = std::min<std::size_t>(page_size - (a % page_size), in.size() - done);
    if (errc e = cpu_check(s, a, true); e != errc::ok) return e;
    std::memcpy(page_write(s, align_down(a, page_size)).data() + a % page_size, in.data() + done, n);
    done += n;
  }
  return errc::ok;
}

result<std::uint64_t> ref_model::cpu_fetch_add(ref_space& s, va_t va, std::uint64_t v) {
  if (!is_aligned(va, 8)) return errc::inval;
  if (errc e = cpu_check(s, va, true); e != errc::ok) return e;
  std::uint8_t* p = page_write(s, align_down(va, page_size)).data() + va % page_size;
  std::uint64_t old = 0;
  std::memcpy(&old, p, 8);
  const std::uint64_t nv = old + v;
  std::memcpy(p, &nv, 8);
  return old;
}

// ---- BOs -------------------------------------------------------------------------------

bo_ref ref_model::create_bo(std::uint64_t pages) {
  const bo_ref id = next_bo_++;
  bos_.emplace(id, ref_bo{pages, std::vector<std::uint8_t>(pages * page_size, 0)});
  live_.push_back(id);
  return id;
}

errc ref_model::destroy_bo(bo_ref id) {
  if (!bos_.contains(id)) return errc::noent;
  for (auto it = bound_.begin(); it != bound_.end();) it = it->second.bo == id ? bound_.erase(it) : std::next(it);
  bos_.erase(id);
  live_.erase(std::find(live_.begin(), live_.end(), id));
  return errc::ok;
}

errc ref_model::bind(bo_ref id, va_t gva, std::uint64_t offset, std::uint64_t size) {
  if (size == 0 || !is_aligned(gva | offset | size, page_size)) return errc::inval;
  if (gva + size < gva) return errc::overflow;
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  if (offset + size < offset || offset + size > it->second.pages * page_size) return errc::inval;
  for (std::uint64_t i = 0; i < size / page_size; ++i)
    bound_[gva + i * page_size] = binding{id, offset / page_size + i};
  return errc::ok;
}

errc ref_model::unbind(va_t gva, std::uint64_t size) {
  if (size == 0 || !is_aligned(gva | size, page_size)) return errc::inval;
  if (gva + size < gva) return errc::overflow;
  for (auto it = bound_.lower_bound(gva); it != bound_.end() && it->first < gva + size;) it = bound_.erase(it);
  return errc::ok;
}

errc ref_model::bo_write(bo_ref id, std::uint64_t off, std::span<const std::uint8_t> in) {
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  if (off + in.size() < off || off + in.size() > it->second.bytes.size()) return errc::inval;
  std::memcpy(it->second.bytes.data() + off, in.data(), in.size());
  return errc::ok;
}

errc ref_model::bo_read(bo_ref id, std::uint64_t off, std::span<std::uint8_t> out) const {
  auto it = bos_.find(id);
  if (it == bos_.end()) return errc::noent;
  if (off + out.size() < off || off + out.size() > it->second.bytes.size()) return errc::inval;
  std::memcpy(out.data(), it->second.bytes.data() + off, out.size());
  return errc::ok;
}

// ---- the device -----------------------------------------------------------------------

ref_dev_result ref_model::dev_access(va_t gva, unsigned size, dev_op op, std::uint64_t v, std::uint64_t desired) {
  if (!is_aligned(gva, size)) return {errc::inval, errc::inval, 0};
  const bool write = op != dev_op::load;
  const std::uint64_t mask = size == 8 ? ~std::uint64_t{0} : (std::uint64_t{1} << (8 * size)) - 1;
  std::uint8_t* p = nullptr;
  const va_t gpage = align_down(gva, page_size);
  if (auto b = bound_.find(gpage); b != bound_.end()) {
    p = bos_.at(b->second.bo).bytes.data() + b->second.page * page_size + gva % page_size;
  } else {
    va_t cpu = gva;
    if (windows_) {
      if (gva < wgpu_ || gva >= wgpu_ + wsize_) return {errc::canceled, errc::fault, 0};
      cpu = gva - wgpu_ + wcpu_;
    }
    va_t start = 0;
    const ref_vma* vm = find_vma(parent, cpu, &start);
    if (!vm || !vm->readable()) return {errc::canceled, errc::fault, 0};
    if (write && !vm->writable()) return {errc::canceled, errc::perm, 0};
    const va_t page = align_down(cpu, page_size);
    if (!parent.priv.contains(page) && beyond_eof(*vm, start, page)) return {errc::canceled, errc::fault, 0};
    if (!write) {
      std::uint64_t out = 0;
      if (const page_bytes* pb = page_read(parent, page)) std::memcpy(&out, pb->data() + cpu % page_size, size);
      return {errc::ok, errc::ok, out};
    }
    p = page_write(parent, page).data() + cpu % page_size;
  }
  std::uint64_t old = 0;
  std::memcpy(&old, p, size);
  std::uint64_t nv = old;
  switch (op) {
    case dev_op::load: break;
    case dev_op::store: nv = v; break;
    case dev_op::add: nv = old + v; break;
    case dev_op::cmpxchg: nv = old == (v & mask) ? desired : old; break;
    case dev_op::xchg: nv = v; break;
  }
  nv &= mask;
  std::memcpy(p, &nv, size);
  return {errc::ok, errc::ok, op == dev_op::store ? 0 : old};
}

std::string ref_model::describe(const ref_space& s) const {
  std::ostringstream os;
  os << std::hex;
  for (const auto& [start, v] : s.vmas) {
    os << "[" << start << "," << v.end << " p" << static_cast<unsigned>(v.p) << (v.shared ? " sh" : " pr");
    if (v.obj >= 0) os << " obj" << v.obj << "+" << v.pgoff;
    os << "] ";
  }
  os << "priv pages " << std::dec << s.priv.size();
  return os.str();
}

std::vector<va_t> ref_model::reachable_gpu_pages(va_t cpu_base, va_t gpu_base, std::uint64_t pages) const {
  std::vector<va_t> out;
  const va_t end = gpu_base + pages * page_size;
  for (va_t g = gpu_base; g < end; g += page_size) {
    const va_t cpu = g - gpu_base + cpu_base;
    const bool mirrored = !windows_ || (g >= wgpu_ && g < wgpu_ + wsize_);
    if (bound_.contains(g) || (mirrored && find_vma(parent, cpu) != nullptr)) out.push_back(g);
  }
  return out;
}

}  // namespace svm::fuzz
