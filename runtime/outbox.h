/* runtime/outbox.h: an ordered outbox from one actor to another.
 *
 * Owns: the messages its actor could not post yet because the receiver's
 * mailbox was full, kept in order and retried from the sender's loop by a
 * timer, so a burst of completions never blocks the sender, never overtakes
 * an earlier one and is never dropped (but when malloc fails, reported).
 * A message goes straight to the mailbox when nothing waits before it.
 *
 *   struct kvrt_outbox ob;
 *   kvrt_outbox_init(&ob, notify_actor, kvrt_actor_loop(self), 0.0002);
 *   if (kvrt_outbox_send(&ob, &m) == 1) delayed++;     // from a handler
 *   lost = kvrt_outbox_close(&ob, deadline_ns, &rc);   // in the actor's stop
 *   kvrt_outbox_free(&ob);                             // after the actor ended
 *
 * Threads: the sending actor's thread (init before its loop runs, or on it).
 */
#ifndef KVRT_RUNTIME_OUTBOX_H
#define KVRT_RUNTIME_OUTBOX_H

#include <ev.h>

#include "runtime/actor.h"

struct kvrt_outbox {
	struct kvrt_actor *to;   /* the receiver */
	struct ev_loop *loop;    /* the sender's loop (the retry timer's) */
	ev_timer retry;          /* armed while messages wait */
	struct kvrt_msg *q;      /* waiting messages, a ring */
	uint32_t head, count, cap;
};

void kvrt_outbox_init(struct kvrt_outbox *o, struct kvrt_actor *to, struct ev_loop *loop,
		      double retry_s);
/* Post *m, or keep it behind the messages already waiting. 0: posted;
 * 1: kept (delivered in order later); -ENOMEM: lost (nowhere to keep it). */
int kvrt_outbox_send(struct kvrt_outbox *o, const struct kvrt_msg *m);
/* Messages waiting. */
static inline uint32_t kvrt_outbox_waiting(const struct kvrt_outbox *o)
{
	return o->count;
}
/* Stop retrying and deliver what waits, blocking until deadline_ns
 * (kvrt_now_ns clock) at most. Returns the messages that could not be
 * delivered (then *err is the post's error), 0 when all were. */
uint32_t kvrt_outbox_close(struct kvrt_outbox *o, uint64_t deadline_ns, int *err);
/* Release its memory (after close, or after the loop ended). */
void kvrt_outbox_free(struct kvrt_outbox *o);

#endif
