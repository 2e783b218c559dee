// Clang thread-safety annotations, as macros that vanish on other compilers.
//
// Every lock in svm is a wrapper type that carries these attributes (see
// svm/base/mutex.h), so the `clang-tsa` preset (-Wthread-safety
// -Werror=thread-safety) checks at compile time that guarded fields are only
// touched with their lock held and that REQUIRES()/EXCLUDES() contracts hold.
#pragma once

#if defined(__clang__)
#define SVM_TSA(x) __attribute__((x))
#else
#define SVM_TSA(x)
#endif

#define CAPABILITY(x) SVM_TSA(capability(x))
#define SCOPED_CAPABILITY SVM_TSA(scoped_lockable)
#define GUARDED_BY(x) SVM_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) SVM_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) SVM_TSA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) SVM_TSA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) SVM_TSA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) SVM_TSA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) SVM_TSA(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) SVM_TSA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) SVM_TSA(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) SVM_TSA(release_shared_capability(__VA_ARGS__))
#define RELEASE_GENERIC(...) SVM_TSA(release_generic_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) SVM_TSA(try_acquire_capability(__VA_ARGS__))
#define TRY_ACQUIRE_SHARED(...) SVM_TSA(try_acquire_shared_capability(__VA_ARGS__))
#define EXCLUDES(...) SVM_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) SVM_TSA(assert_capability(x))
#define ASSERT_SHARED_CAPABILITY(x) SVM_TSA(assert_shared_capability(x))
#define RETURN_CAPABILITY(x) SVM_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS SVM_TSA(no_thread_safety_analysis)
