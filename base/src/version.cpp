#include "svm/version.h"

namespace svm {

const char* version() noexcept { return SVM_VERSION_STRING; }

}  // namespace svm
