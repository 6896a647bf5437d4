/* runtime/completion.h: a one-shot completion a caller owns and waits on.
 *
 * The caller initialises it (usually on its stack), hands its address to an
 * actor in a message, and waits; the actor fills the reply fields and
 * signals. Waiting spins briefly (the common case: the reply is microseconds
 * away), then sleeps on a futex. No mutex, no allocation.
 *
 * Threads: init and wait by the owner; signal by exactly one other thread,
 * exactly once. The owner must keep the completion alive until it is
 * signalled (a timed-out wait does not release it: wait again or keep it).
 */
#ifndef KVRT_RUNTIME_COMPLETION_H
#define KVRT_RUNTIME_COMPLETION_H

#include <stdatomic.h>

#include "runtime/common.h"

struct kvrt_completion {
	_Atomic uint32_t state; /* _KVRT_COMPLETION_{PENDING,SLEEPING,DONE} */
	int32_t status;         /* set by the signaller: 0 or -errno */
	uint64_t value[4];      /* reply payload, meaning set by the protocol */
};

/* Internal states of kvrt_completion.state. */
enum {
	_KVRT_COMPLETION_PENDING = 0,  /* not signalled, owner not asleep */
	_KVRT_COMPLETION_SLEEPING = 1, /* owner may be in futex_wait */
	_KVRT_COMPLETION_DONE = 2,     /* signalled; fields are valid */
};

static inline void kvrt_completion_init(struct kvrt_completion *c)
{
	atomic_init(&c->state, _KVRT_COMPLETION_PENDING);
	c->status = 0;
	for (int i = 0; i < 4; i++)
		c->value[i] = 0;
}

/* True once signalled (acquire: the reply fields are then visible). */
static inline bool kvrt_completion_done(struct kvrt_completion *c)
{
	return atomic_load_explicit(&c->state, memory_order_acquire) == _KVRT_COMPLETION_DONE;
}

/* Signal with a status (0 or -errno); write value[] before calling. The
 * completion must not be touched by the signaller afterwards. */
void kvrt_completion_signal(struct kvrt_completion *c, int status);

/* Wait until signalled or timeout_ns passes (UINT64_MAX: no limit).
 * Returns 0 when signalled (then read status and value[]), -ETIMEDOUT. */
int kvrt_completion_wait(struct kvrt_completion *c, uint64_t timeout_ns);

#endif
