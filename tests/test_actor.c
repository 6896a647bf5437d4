/* Actors: FIFO per producer, nothing lost or duplicated, back-pressure,
 * shutdown with messages in flight, request/reply under load, hooks; the
 * outbox (runtime/outbox.h) to a full receiver. */
#include <criterion/criterion.h>
#include <errno.h>
#include <ev.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "runtime/actor.h"
#include "runtime/outbox.h"
#include "tests/test_util.h"

#define MAX_PRODUCERS 8

enum { MSG_SEQ = 1, MSG_CALL = 2, MSG_BLOCK = 3, MSG_REENTER = 4 };

struct sink {
	uint64_t next[MAX_PRODUCERS]; /* next expected sequence per producer */
	uint64_t got[MAX_PRODUCERS];  /* messages received per producer */
	uint64_t out_of_order;        /* FIFO violations seen */
	_Atomic int gate_open;        /* MSG_BLOCK handlers spin until set */
	_Atomic int blocked;          /* a MSG_BLOCK handler is waiting */
	uint64_t handled_at_stop;     /* messages seen when the stop hook ran */
	uint64_t total;               /* messages handled */
	int reenter_call_rc;          /* kvrt_actor_call on itself, from a handler */
	int reenter_stop_rc;          /* kvrt_actor_stop on itself, from a handler */
	_Atomic int timer_fired_on_self; /* the start hook's timer fired on the actor */
	ev_timer timer;               /* started by the start hook */
	struct kvrt_actor *self;      /* the actor, for the timer */
};

static void sink_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct sink *s = kvrt_actor_data(a);
	s->total++;
	switch (m->type) {
	case MSG_SEQ: {
		uint32_t p = m->arg32;
		if (m->arg.u64[0] != s->next[p])
			s->out_of_order++;
		s->next[p] = m->arg.u64[0] + 1;
		s->got[p]++;
		break;
	}
	case MSG_CALL:
		m->reply->value[0] = m->arg.u64[0] * 2 + m->arg32;
		kvrt_completion_signal(m->reply, 0);
		break;
	case MSG_BLOCK:
		atomic_store(&s->blocked, 1);
		while (!atomic_load(&s->gate_open))
			usleep(100);
		break;
	case MSG_REENTER: {
		struct kvrt_msg m2 = {.type = MSG_SEQ};
		struct kvrt_completion c;
		s->reenter_call_rc = kvrt_actor_call(a, &m2, &c, 1000);
		s->reenter_stop_rc = kvrt_actor_stop(a);
		kvrt_completion_signal(m->reply, 0);
		break;
	}
	}
}

static void sink_stop(struct kvrt_actor *a)
{
	struct sink *s = kvrt_actor_data(a);
	s->handled_at_stop = s->total;
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	struct sink *s = w->data;
	s->timer_fired_on_self = kvrt_actor_is_self(s->self);
}

static int sink_start_with_timer(struct kvrt_actor *a)
{
	struct sink *s = kvrt_actor_data(a);
	s->self = a;
	ev_timer_init(&s->timer, on_timer, 0.001, 0.);
	s->timer.data = s;
	ev_timer_start(kvrt_actor_loop(a), &s->timer);
	return 0;
}

static const struct kvrt_actor_ops sink_ops = {
	.handle = sink_handle,
	.stop = sink_stop,
};

static struct kvrt_actor *make_sink(struct sink *s, uint32_t mailbox, const struct kvrt_actor_ops *ops)
{
	memset(s, 0, sizeof *s);
	struct kvrt_actor *a;
	int rc = kvrt_actor_create(&a, &(struct kvrt_actor_config){
		.name = "sink", .mailbox_size = mailbox, .ops = ops, .data = s});
	cr_assert_eq(rc, 0, "kvrt_actor_create: %d", rc);
	return a;
}

struct producer {
	struct kvrt_actor *a;
	uint32_t id;
	uint64_t n;        /* messages to send */
	uint64_t accepted; /* posts that returned 0 */
	int last_rc;       /* the post result that ended the loop */
	_Atomic int *go;   /* start together */
};

static void *produce(void *arg)
{
	struct producer *p = arg;
	while (p->go && !atomic_load(p->go))
		;
	for (uint64_t i = 0; i < p->n; i++) {
		struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = p->id};
		m.arg.u64[0] = i;
		int rc = kvrt_actor_post(p->a, &m, 10ull * 1000 * 1000 * 1000);
		if (rc != 0) {
			p->last_rc = rc;
			return NULL;
		}
		p->accepted++;
	}
	return NULL;
}

Test(actor, four_producers_fifo_nothing_lost_or_duplicated, .timeout = 120)
{
	struct sink s;
	struct kvrt_actor *a = make_sink(&s, 1024, &sink_ops);
	uint64_t n = kvrt_test_scaled(1000000, 20000);
	struct producer p[4];
	pthread_t t[4];
	_Atomic int go = 0;
	for (uint32_t i = 0; i < 4; i++) {
		p[i] = (struct producer){.a = a, .id = i, .n = n, .go = &go};
		pthread_create(&t[i], NULL, produce, &p[i]);
	}
	atomic_store(&go, 1);
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	cr_assert_eq(kvrt_actor_stop(a), 0);
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(p[i].accepted, n, "producer %d: %lu of %lu accepted (rc %d)", i,
			     (unsigned long)p[i].accepted, (unsigned long)n, p[i].last_rc);
		cr_assert_eq(s.got[i], n, "producer %d: %lu of %lu received", i,
			     (unsigned long)s.got[i], (unsigned long)n);
	}
	cr_assert_eq(s.out_of_order, 0, "%lu messages out of order", (unsigned long)s.out_of_order);
	struct kvrt_actor_stats st;
	kvrt_actor_stats(a, &st);
	cr_assert_eq(st.handled, 4 * n);
	cr_assert_eq(s.handled_at_stop, 4 * n, "stop hook ran before the last message");
	cr_assert_gt(st.mailbox_hwm, 0);
	cr_assert_leq(st.mailbox_hwm, st.capacity);
	kvrt_actor_destroy(a);
}

Test(actor, full_mailbox_is_back_pressure_not_a_drop)
{
	struct sink s;
	struct kvrt_actor *a = make_sink(&s, 16, &sink_ops);
	struct kvrt_msg block = {.type = MSG_BLOCK};
	cr_assert(kvrt_actor_try_post(a, &block));
	while (!atomic_load(&s.blocked))
		usleep(100);
	/* Fill while the handler is stuck on the gate. */
	uint64_t accepted = 0;
	for (int i = 0; i < 1000; i++) {
		struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = 0};
		m.arg.u64[0] = accepted;
		if (!kvrt_actor_try_post(a, &m))
			break;
		accepted++;
	}
	cr_assert(accepted == 15, "accepted %lu into a 16-slot mailbox",
		  (unsigned long)accepted);
	struct kvrt_msg extra = {.type = MSG_SEQ, .arg32 = 1};
	cr_assert_eq(kvrt_actor_post(a, &extra, 2 * 1000 * 1000), -ETIMEDOUT);
	struct kvrt_actor_stats st;
	kvrt_actor_stats(a, &st);
	cr_assert_geq(st.rejected, 2);
	atomic_store(&s.gate_open, 1);
	cr_assert_eq(kvrt_actor_post(a, &extra, 1000ull * 1000 * 1000), 0);
	kvrt_actor_stop(a);
	cr_assert_eq(s.got[0], accepted, "accepted messages lost");
	cr_assert_eq(s.got[1], 1);
	cr_assert_eq(s.out_of_order, 0);
	kvrt_actor_destroy(a);
}

Test(actor, shutdown_with_messages_in_flight_loses_none, .timeout = 60)
{
	for (int round = 0; round < 5; round++) {
		struct sink s;
		struct kvrt_actor *a = make_sink(&s, 64, &sink_ops);
		struct producer p[3];
		pthread_t t[3];
		for (uint32_t i = 0; i < 3; i++) {
			p[i] = (struct producer){.a = a, .id = i, .n = UINT64_MAX};
			pthread_create(&t[i], NULL, produce, &p[i]);
		}
		usleep(2000 + 3000 * round);
		cr_assert_eq(kvrt_actor_stop(a), 0);
		for (int i = 0; i < 3; i++) {
			pthread_join(t[i], NULL);
			cr_assert_eq(p[i].last_rc, -ESHUTDOWN);
			cr_assert_eq(s.got[i], p[i].accepted,
				     "round %d producer %d: %lu accepted, %lu handled", round, i,
				     (unsigned long)p[i].accepted, (unsigned long)s.got[i]);
		}
		cr_assert_eq(s.out_of_order, 0);
		struct kvrt_msg m = {.type = MSG_SEQ};
		cr_assert_not(kvrt_actor_try_post(a, &m));
		cr_assert_eq(kvrt_actor_post(a, &m, 1000), -ESHUTDOWN);
		cr_assert_eq(kvrt_actor_stop(a), 0, "stop is idempotent");
		kvrt_actor_destroy(a);
	}
}

struct caller {
	struct kvrt_actor *a;
	uint32_t id;
	uint64_t n;
	uint64_t wrong; /* replies that did not match */
};

static void *call_loop(void *arg)
{
	struct caller *c = arg;
	for (uint64_t i = 0; i < c->n; i++) {
		struct kvrt_msg m = {.type = MSG_CALL, .arg32 = c->id};
		m.arg.u64[0] = i;
		struct kvrt_completion done;
		int rc = kvrt_actor_call(c->a, &m, &done, 1000ull * 1000 * 1000);
		if (rc != 0 || done.value[0] != i * 2 + c->id)
			c->wrong++;
	}
	return NULL;
}

Test(actor, request_reply_under_load_from_many_threads, .timeout = 120)
{
	struct sink s;
	struct kvrt_actor *a = make_sink(&s, 256, &sink_ops);
	uint64_t n = kvrt_test_scaled(100000, 2000);
	struct caller c[4];
	pthread_t t[4], bg;
	struct producer noise = {.a = a, .id = 7, .n = n};
	pthread_create(&bg, NULL, produce, &noise);
	for (uint32_t i = 0; i < 4; i++) {
		c[i] = (struct caller){.a = a, .id = i, .n = n};
		pthread_create(&t[i], NULL, call_loop, &c[i]);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(c[i].wrong, 0, "caller %d: %lu wrong replies", i, (unsigned long)c[i].wrong);
	}
	pthread_join(bg, NULL);
	kvrt_actor_stop(a);
	cr_assert_eq(s.got[7], n);
	cr_assert_eq(s.out_of_order, 0);
	kvrt_actor_destroy(a);
}

Test(actor, reentrant_calls_are_refused_not_deadlocked)
{
	struct sink s;
	struct kvrt_actor *a = make_sink(&s, 16, &sink_ops);
	struct kvrt_msg m = {.type = MSG_REENTER};
	struct kvrt_completion c;
	cr_assert_eq(kvrt_actor_call(a, &m, &c, 1000000), 0);
	cr_assert_eq(s.reenter_call_rc, -EDEADLK);
	cr_assert_eq(s.reenter_stop_rc, -EDEADLK);
	kvrt_actor_destroy(a);
}

static int failing_start(struct kvrt_actor *a)
{
	(void)a;
	return -EADDRINUSE;
}

Test(actor, hooks_timers_and_bad_config)
{
	struct kvrt_actor *a = (struct kvrt_actor *)1;
	struct sink s;
	cr_assert_eq(kvrt_actor_create(&a, &(struct kvrt_actor_config){
			     .name = "bad", .mailbox_size = 1000, .ops = &sink_ops, .data = &s}),
		     -EINVAL);
	cr_assert_null(a);
	static const struct kvrt_actor_ops failing = {.handle = sink_handle, .start = failing_start};
	cr_assert_eq(kvrt_actor_create(&a, &(struct kvrt_actor_config){
			     .name = "fail", .mailbox_size = 16, .ops = &failing, .data = &s}),
		     -EADDRINUSE);

	static const struct kvrt_actor_ops timed = {.handle = sink_handle,
						    .start = sink_start_with_timer};
	a = make_sink(&s, 16, &timed);
	cr_assert_str_eq(kvrt_actor_name(a), "sink");
	cr_assert_not(kvrt_actor_is_self(a));
	for (int i = 0; i < 2000 && !s.timer_fired_on_self; i++) {
		/* A round trip orders the timer's write before our read. */
		struct kvrt_msg m = {.type = MSG_CALL};
		struct kvrt_completion c;
		kvrt_actor_call(a, &m, &c, 1000000);
		if (!s.timer_fired_on_self)
			usleep(500);
	}
	cr_assert(s.timer_fired_on_self, "timer on the actor's loop did not fire on its thread");
	kvrt_actor_destroy(a);
}

/* A 16-slot sink that handled one call and then fell asleep. */
static struct kvrt_actor *sleeping_sink(struct sink *s, struct kvrt_msg *call, struct kvrt_completion *c)
{
	struct kvrt_actor *a = make_sink(s, 16, &sink_ops);
	cr_assert_eq(kvrt_actor_call(a, call, c, 1000000000ull), 0);
	usleep(200000);
	return a;
}

/* A quiet post does not wake a sleeping actor: it waits in the mailbox
 * until the next waking post, then both are handled, in order. (The save
 * actor's per-layer messages are quiet; the step's end wakes it.) */
Test(actor, quiet_post_waits_for_the_next_wake)
{
	struct sink s;
	struct kvrt_msg call = {.type = MSG_CALL};
	struct kvrt_completion c;
	struct kvrt_actor *a = sleeping_sink(&s, &call, &c);
	for (uint64_t i = 0; i < 3; i++) {
		struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = 0};
		m.arg.u64[0] = i;
		if (i == 1)
			cr_assert_eq(kvrt_actor_post_quiet(a, &m, 1000000000ull), 0);
		else
			cr_assert(kvrt_actor_try_post_quiet(a, &m));
	}
	usleep(100000);
	struct kvrt_actor_stats st;
	kvrt_actor_stats(a, &st);
	cr_assert_eq(st.handled, 1, "a quiet post woke the actor");
	cr_assert_eq(st.depth, 3);
	struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = 0};
	m.arg.u64[0] = 3;
	cr_assert(kvrt_actor_try_post(a, &m));
	cr_assert_eq(kvrt_actor_call(a, &call, &c, 1000000000ull), 0);
	kvrt_actor_stop(a);
	cr_assert_eq(s.got[0], 4);
	cr_assert_eq(s.out_of_order, 0);
	kvrt_actor_destroy(a);
}

/* Quiet posts that fill the mailbox of a sleeping actor: a blocking quiet
 * post wakes it rather than wait for room that would never come. */
Test(actor, quiet_posts_filling_the_mailbox_wake_the_actor)
{
	struct sink s;
	struct kvrt_msg call = {.type = MSG_CALL};
	struct kvrt_completion c;
	struct kvrt_actor *a = sleeping_sink(&s, &call, &c);
	uint64_t n = 0;
	for (;; n++) {
		struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = 0};
		m.arg.u64[0] = n;
		if (!kvrt_actor_try_post_quiet(a, &m))
			break;
	}
	cr_assert_eq(n, 15, "a 16-slot mailbox took %lu", (unsigned long)n);
	struct kvrt_msg m = {.type = MSG_SEQ, .arg32 = 0};
	m.arg.u64[0] = n;
	cr_assert_eq(kvrt_actor_post_quiet(a, &m, 5000000000ull), 0, "the full mailbox was never drained");
	cr_assert_eq(kvrt_actor_call(a, &call, &c, 1000000000ull), 0);
	kvrt_actor_stop(a);
	cr_assert_eq(s.got[0], n + 1);
	cr_assert_eq(s.out_of_order, 0);
	kvrt_actor_destroy(a);
}

/* An outbox (runtime/outbox.h) from a sender actor to a sink whose mailbox
 * holds 4: the sender's burst of 500 never blocks it; the sink gets every
 * message once, in order, the ones that waited through the retry timer and
 * the rest when the sender's stop closes the outbox. */
struct sender {
	struct kvrt_outbox ob;
	struct kvrt_actor *to;
	uint32_t queued;    /* sends that had to wait */
	uint32_t lost;      /* close could not deliver */
	int close_rc;
};

static int sender_start(struct kvrt_actor *a)
{
	struct sender *s = kvrt_actor_data(a);
	kvrt_outbox_init(&s->ob, s->to, kvrt_actor_loop(a), 0.0002);
	return 0;
}

static void sender_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct sender *s = kvrt_actor_data(a);
	for (uint64_t i = 0; i < m->arg.u64[0]; i++) {
		struct kvrt_msg out = {.type = MSG_SEQ, .arg32 = 0};
		out.arg.u64[0] = i;
		if (kvrt_outbox_send(&s->ob, &out) == 1)
			s->queued++;
	}
}

static void sender_stop(struct kvrt_actor *a)
{
	struct sender *s = kvrt_actor_data(a);
	s->lost = kvrt_outbox_close(&s->ob, kvrt_now_ns() + 5000000000ull, &s->close_rc);
}

Test(actor, outbox_keeps_order_when_the_receiver_is_full, .timeout = 60)
{
	struct sink sk;
	struct kvrt_actor *sink = make_sink(&sk, 4, &sink_ops);
	struct sender s = {.to = sink};
	static const struct kvrt_actor_ops ops = {
		.start = sender_start, .handle = sender_handle, .stop = sender_stop};
	struct kvrt_actor *a;
	cr_assert_eq(kvrt_actor_create(&a, &(struct kvrt_actor_config){
					   .name = "sender", .mailbox_size = 4, .ops = &ops, .data = &s}),
		     0);
	struct kvrt_msg go = {.type = 1};
	go.arg.u64[0] = 500;
	cr_assert_eq(kvrt_actor_post(a, &go, 1000000000ull), 0);
	usleep(20000); /* some go through the retry timer */
	kvrt_actor_destroy(a);
	kvrt_outbox_free(&s.ob);
	kvrt_actor_destroy(sink);
	cr_assert_gt(s.queued, 0, "the sink never filled up: the test lost its point");
	cr_assert_eq(s.lost, 0u, "%u lost (%d)", s.lost, s.close_rc);
	cr_assert_eq(sk.got[0], 500u);
	cr_assert_eq(sk.out_of_order, 0u);
}
