/* runtime/completion.c: see completion.h.
 *
 * Protocol on c->state: the owner spins while PENDING; before sleeping it
 * moves PENDING -> SLEEPING with a CAS and futex-waits while the word is
 * SLEEPING. The signaller exchanges the word to DONE (release: the reply
 * fields happen-before the owner's acquire load) and calls futex_wake only if
 * it replaced SLEEPING, so a spinning owner costs the signaller no syscall.
 */
#include "runtime/completion.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Spin iterations before sleeping: a few microseconds of pause. */
#define SPIN_ITERS 2000

static long futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
	return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

void kvrt_completion_signal(struct kvrt_completion *c, int status)
{
	c->status = status;
	uint32_t old = atomic_exchange_explicit(&c->state, _KVRT_COMPLETION_DONE,
						memory_order_acq_rel);
	KVRT_ASSERT(old != _KVRT_COMPLETION_DONE);
	if (old == _KVRT_COMPLETION_SLEEPING)
		futex(&c->state, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

int kvrt_completion_wait(struct kvrt_completion *c, uint64_t timeout_ns)
{
	for (int i = 0; i < SPIN_ITERS; i++) {
		if (kvrt_completion_done(c))
			return 0;
		kvrt_cpu_relax();
	}
	uint32_t expect = _KVRT_COMPLETION_PENDING;
	if (!atomic_compare_exchange_strong_explicit(&c->state, &expect,
						     _KVRT_COMPLETION_SLEEPING,
						     memory_order_acq_rel,
						     memory_order_acquire) &&
	    expect == _KVRT_COMPLETION_DONE)
		return 0;
	uint64_t deadline = timeout_ns == UINT64_MAX ? UINT64_MAX : kvrt_now_ns() + timeout_ns;
	for (;;) {
		if (kvrt_completion_done(c))
			return 0;
		struct timespec ts, *tsp = NULL;
		if (deadline != UINT64_MAX) {
			uint64_t now = kvrt_now_ns();
			if (now >= deadline)
				return -ETIMEDOUT;
			uint64_t left = deadline - now;
			ts.tv_sec = (time_t)(left / 1000000000u);
			ts.tv_nsec = (long)(left % 1000000000u);
			tsp = &ts;
		}
		/* Returns at once (EAGAIN) if the word is no longer SLEEPING. */
		futex(&c->state, FUTEX_WAIT_PRIVATE, _KVRT_COMPLETION_SLEEPING, tsp);
	}
}
