#include "svm/base/errc.h"

#include <cstring>

namespace svm {
namespace {

class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "svm"; }
  std::string message(int ev) const override {
    if (ev == 0) return "success";
    return std::strerror(ev);
  }
};

}  // namespace

const std::error_category& svm_category() noexcept {
  static const category c;
  return c;
}

const char* errc_name(errc e) noexcept {
  switch (e) {
    case errc::ok: return "ok";
    case errc::perm: return "EPERM";
    case errc::noent: return "ENOENT";
    case errc::again: return "EAGAIN";
    case errc::nomem: return "ENOMEM";
    case errc::fault: return "EFAULT";
    case errc::busy: return "EBUSY";
    case errc::exist: return "EEXIST";
    case errc::inval: return "EINVAL";
    case errc::overflow: return "EOVERFLOW";
    case errc::timedout: return "ETIMEDOUT";
    case errc::canceled: return "ECANCELED";
    case errc::range: return "ERANGE";
    case errc::nospc: return "ENOSPC";
    case errc::io: return "EIO";
  }
  return "E?";
}

}  // namespace svm
