// Clang thread-safety annotations, as macros that vanish where the compiler
// lacks them. Every macro carries the SVM_ prefix so that an embedding
// project's own GUARDED_BY, REQUIRES, ... never collide with ours.
//
// Every lock in svm is a wrapper type that carries these attributes (see
// svm/base/mutex.h), so the `clang-tsa` preset (-Wthread-safety
// -Werror=thread-safety) checks at compile time that guarded fields are only
// touched with their lock held and that SVM_REQUIRES()/SVM_EXCLUDES() contracts hold.
#pragma once

#if defined(__has_attribute)
#if __has_attribute(guarded_by) && __has_attribute(capability)
#define SVM_TSA(x) __attribute__((x))
#endif
#endif
#ifndef SVM_TSA
#define SVM_TSA(x)
#endif

#define SVM_CAPABILITY(x) SVM_TSA(capability(x))
#define SVM_SCOPED_CAPABILITY SVM_TSA(scoped_lockable)
#define SVM_GUARDED_BY(x) SVM_TSA(guarded_by(x))
#define SVM_PT_GUARDED_BY(x) SVM_TSA(pt_guarded_by(x))
#define SVM_ACQUIRED_BEFORE(...) SVM_TSA(acquired_before(__VA_ARGS__))
#define SVM_ACQUIRED_AFTER(...) SVM_TSA(acquired_after(__VA_ARGS__))
#define SVM_REQUIRES(...) SVM_TSA(requires_capability(__VA_ARGS__))
#define SVM_REQUIRES_SHARED(...) SVM_TSA(requires_shared_capability(__VA_ARGS__))
#define SVM_ACQUIRE(...) SVM_TSA(acquire_capability(__VA_ARGS__))
#define SVM_ACQUIRE_SHARED(...) SVM_TSA(acquire_shared_capability(__VA_ARGS__))
#define SVM_RELEASE(...) SVM_TSA(release_capability(__VA_ARGS__))
#define SVM_RELEASE_SHARED(...) SVM_TSA(release_shared_capability(__VA_ARGS__))
#define SVM_RELEASE_GENERIC(...) SVM_TSA(release_generic_capability(__VA_ARGS__))
#define SVM_TRY_ACQUIRE(...) SVM_TSA(try_acquire_capability(__VA_ARGS__))
#define SVM_TRY_ACQUIRE_SHARED(...) SVM_TSA(try_acquire_shared_capability(__VA_ARGS__))
#define SVM_EXCLUDES(...) SVM_TSA(locks_excluded(__VA_ARGS__))
#define SVM_ASSERT_CAPABILITY(x) SVM_TSA(assert_capability(x))
#define SVM_ASSERT_SHARED_CAPABILITY(x) SVM_TSA(assert_shared_capability(x))
#define SVM_RETURN_CAPABILITY(x) SVM_TSA(lock_returned(x))
#define SVM_NO_THREAD_SAFETY_ANALYSIS SVM_TSA(no_thread_safety_analysis)
