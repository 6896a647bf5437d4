/* runtime/common.h: small helpers every kvrt module uses.
 *
 * Owns nothing. Safe from any thread. Conventions (see README "Conventions"):
 * fallible calls return 0 or a negative errno and never touch errno; try-calls
 * return bool; KVRT_ASSERT is for invariants only (a failed one is a kvrt bug,
 * never a transient fault).
 */
#ifndef KVRT_RUNTIME_COMMON_H
#define KVRT_RUNTIME_COMMON_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define KVRT_LIKELY(x) __builtin_expect(!!(x), 1)
#define KVRT_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define KVRT_CACHELINE 64
#define KVRT_CL_ALIGNED __attribute__((aligned(KVRT_CACHELINE)))
#define KVRT_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define KVRT_API __attribute__((visibility("default")))
#define KVRT_UNUSED __attribute__((unused))

/* Invariant check; stays on in release builds. Prints where and aborts. */
#define KVRT_ASSERT(x)                                                         \
	do {                                                                   \
		if (KVRT_UNLIKELY(!(x)))                                       \
			kvrt_assert_fail(#x, __FILE__, __LINE__);              \
	} while (0)

_Noreturn void kvrt_assert_fail(const char *expr, const char *file, int line);

/* Make *p (an array of elem-byte items, *cap of them) hold at least need
 * items, doubling from 64; contents kept. 0 or -ENOMEM (*p unchanged). */
static inline int kvrt_grow(void **p, size_t *cap, size_t need, size_t elem)
{
	if (need <= *cap)
		return 0;
	size_t c = *cap ? *cap : 64;
	while (c < need)
		c *= 2;
	void *n = realloc(*p, c * elem);
	if (!n)
		return -ENOMEM;
	*p = n;
	*cap = c;
	return 0;
}

/* Monotonic clock in nanoseconds (vDSO, no syscall). */
static inline uint64_t kvrt_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A pause for spin loops. */
static inline void kvrt_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/*
 * A full (seq_cst) fence. GCC refuses atomic_thread_fence under TSan
 * (-Wtsan: TSan cannot model fences), so TSan builds use a seq_cst
 * read-modify-write of one shared word instead: all such RMWs are totally
 * ordered, which gives the Dekker-style pairs kvrt uses fences for the same
 * guarantee, and TSan understands RMWs. Other builds: one mfence.
 */
#if defined(__SANITIZE_THREAD__)
extern int _kvrt_fence_word;
#define kvrt_fence_seq_cst() ((void)__atomic_fetch_add(&_kvrt_fence_word, 0, __ATOMIC_SEQ_CST))
#else
#define kvrt_fence_seq_cst() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

/*
 * ThreadSanitizer does not model ck's fences and libck is not instrumented
 * (see docs/design.md, "Special problems"). Wrappers that publish through ck
 * (mailbox enqueue, index put) call KVRT_TSAN_RELEASE(obj) before publishing
 * and KVRT_TSAN_ACQUIRE(obj) after consuming, so TSan sees the happens-before
 * edge that ck's fences provide. No-ops outside TSan builds.
 */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define KVRT_TSAN_RELEASE(p) __tsan_release((void *)(p))
#define KVRT_TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
#else
#define KVRT_TSAN_RELEASE(p) ((void)(p))
#define KVRT_TSAN_ACQUIRE(p) ((void)(p))
#endif

#endif
