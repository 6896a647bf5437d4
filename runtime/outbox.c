/* runtime/outbox.c: see outbox.h. */
#include "runtime/outbox.h"

#include <errno.h>
#include <stdlib.h>

/* Deliver waiting messages in order while the receiver has room. */
static void flush(struct kvrt_outbox *o)
{
	while (o->count) {
		if (!kvrt_actor_try_post(o->to, &o->q[o->head]))
			return;
		o->head = (o->head + 1) % o->cap;
		o->count--;
	}
	ev_timer_stop(o->loop, &o->retry);
}

static void on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	flush(w->data);
}

void kvrt_outbox_init(struct kvrt_outbox *o, struct kvrt_actor *to, struct ev_loop *loop,
		      double retry_s)
{
	*o = (struct kvrt_outbox){.to = to, .loop = loop};
	ev_timer_init(&o->retry, on_retry, retry_s, retry_s);
	o->retry.data = o;
}

int kvrt_outbox_send(struct kvrt_outbox *o, const struct kvrt_msg *m)
{
	if (!o->count && kvrt_actor_try_post(o->to, m))
		return 0;
	if (o->count == o->cap) {
		uint32_t cap = o->cap ? o->cap * 2 : 64;
		struct kvrt_msg *q = malloc(cap * sizeof(*q));
		if (!q)
			return -ENOMEM;
		for (uint32_t i = 0; i < o->count; i++)
			q[i] = o->q[(o->head + i) % o->cap];
		free(o->q);
		o->q = q;
		o->cap = cap;
		o->head = 0;
	}
	o->q[(o->head + o->count) % o->cap] = *m;
	o->count++;
	if (!ev_is_active(&o->retry))
		ev_timer_start(o->loop, &o->retry);
	return 1;
}

uint32_t kvrt_outbox_close(struct kvrt_outbox *o, uint64_t deadline_ns, int *err)
{
	ev_timer_stop(o->loop, &o->retry);
	*err = 0;
	while (o->count) {
		uint64_t now = kvrt_now_ns();
		int rc = now < deadline_ns ? kvrt_actor_post(o->to, &o->q[o->head], deadline_ns - now)
					   : -ETIMEDOUT;
		if (rc) {
			uint32_t lost = o->count;
			*err = rc;
			o->count = 0;
			return lost;
		}
		o->head = (o->head + 1) % o->cap;
		o->count--;
	}
	return 0;
}

void kvrt_outbox_free(struct kvrt_outbox *o)
{
	free(o->q);
	o->q = NULL;
	o->count = o->cap = o->head = 0;
}
