// Always-on precondition checks of the svm driver: a violated precondition
// is a bug in the caller, and continuing would corrupt the VM.
#pragma once

#include <cstdio>
#include <cstdlib>

#define SVM_CHECK(cond, msg)                                                              \
  do {                                                                                    \
    if (!(cond)) [[unlikely]] {                                                           \
      std::fprintf(stderr, "svm: %s:%d: check '%s' failed: %s\n", __FILE__, __LINE__, #cond, \
                   msg);                                                                  \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)
