/* runtime/actor.h: actors, kvrt's unit of concurrency.
 *
 * An actor is one thread running one libev loop (epoll), one bounded MPSC
 * mailbox of fixed-size messages stored by value (a ck_ring), and one ev_async
 * that wakes it. Producers on any thread post; the actor drains its mailbox
 * until empty on each wake-up and calls its handler once per message. State
 * owned by an actor is touched only on its thread. Actors know nothing of KV
 * caches: the cache engine (actors/) builds on this.
 *
 *   static void handle(struct kvrt_actor *a, struct kvrt_msg *m) {
 *           struct my_state *s = kvrt_actor_data(a);
 *           ... ;
 *           if (m->reply) { m->reply->value[0] = 42; kvrt_completion_signal(m->reply, 0); }
 *   }
 *   static const struct kvrt_actor_ops ops = { .handle = handle };
 *   struct kvrt_actor *a;
 *   int rc = kvrt_actor_create(&a, &(struct kvrt_actor_config){
 *           .name = "lookup", .mailbox_size = 1024, .ops = &ops, .data = s });
 *   struct kvrt_msg m = { .type = MY_GET };
 *   struct kvrt_completion c;
 *   rc = kvrt_actor_call(a, &m, &c, 1000000);      // c.value[0] == 42
 *   kvrt_actor_destroy(a);                         // stop, drain, join, free
 *
 * Delivery guarantees
 * - FIFO per producer thread; nothing lost, nothing duplicated.
 * - A full mailbox is reported to the producer: try_post returns false,
 *   post with a timeout returns -ETIMEDOUT. Nothing is dropped silently.
 * - Shutdown (kvrt_actor_stop): new posts fail with -ESHUTDOWN; every message
 *   accepted before that is handled before the thread exits. A message is
 *   thus either handled or its post failed: its sender always knows.
 *
 * Wake-ups cost nothing while the actor is busy: the actor marks itself idle
 * from an ev_prepare watcher (just before it would block in epoll) and
 * producers call ev_async_send only when they see that mark (a seq_cst fence
 * on each side makes the store/load pair Dekker-safe: a producer that misses
 * the mark was seen by the actor's re-check of the ring).
 */
#ifndef KVRT_RUNTIME_ACTOR_H
#define KVRT_RUNTIME_ACTOR_H

#include "runtime/common.h"
#include "runtime/completion.h"

struct ev_loop;
struct kvrt_actor;

/* A message: 64 bytes, copied by value into the mailbox. */
struct kvrt_msg {
	uint32_t type;                 /* set by the receiving actor; UINT32_MAX is reserved */
	uint32_t arg32;                /* small argument, protocol-defined */
	uint64_t flow;                 /* tracer flow id; set by post, 0 = none */
	struct kvrt_completion *reply; /* signalled by the handler, or NULL */
	union {
		uint64_t u64[5];
		int64_t i64[5];
		void *ptr[5];
		unsigned char bytes[40];
	} arg; /* payload, protocol-defined */
};
_Static_assert(sizeof(struct kvrt_msg) == 64, "kvrt_msg is one cache line");

struct kvrt_actor_ops {
	/* Handle one message, on the actor's thread. Must not block for long:
	 * the mailbox fills behind it. Required. */
	void (*handle)(struct kvrt_actor *a, struct kvrt_msg *m);
	/* Optional: on the actor's thread before the first message (start
	 * timers here). Nonzero (-errno) makes kvrt_actor_create fail. */
	int (*start)(struct kvrt_actor *a);
	/* Optional: on the actor's thread after the last message. */
	void (*stop)(struct kvrt_actor *a);
	/* Optional: a static name for a message type, for the tracer. */
	const char *(*msg_name)(uint32_t type);
};

struct kvrt_actor_config {
	const char *name;                  /* thread and trace name (copied) */
	uint32_t mailbox_size;             /* power of two, >= 4; holds size-1 */
	const struct kvrt_actor_ops *ops;  /* must outlive the actor */
	void *data;                        /* returned by kvrt_actor_data() */
};

struct kvrt_actor_stats {
	uint64_t handled;      /* messages handled */
	uint64_t rejected;     /* posts refused (mailbox full or stopped) */
	uint64_t wakeups;      /* times the loop woke to drain */
	uint64_t busy_ns;      /* time spent draining (handlers included) */
	uint32_t mailbox_hwm;  /* highest depth seen at the start of a drain */
	uint32_t depth;        /* messages waiting now (racy snapshot) */
	uint32_t capacity;     /* most messages the mailbox holds */
};

/* Create and start an actor (its thread runs when this returns 0).
 * Any thread. 0, -EINVAL (bad config), -ENOMEM, or the start hook's error. */
int kvrt_actor_create(struct kvrt_actor **out, const struct kvrt_actor_config *cfg);

/* Post a copy of *m without waiting. Any thread, the actor's own included.
 * false: the mailbox is full or the actor is stopping; nothing was queued. */
bool kvrt_actor_try_post(struct kvrt_actor *a, const struct kvrt_msg *m);

/* kvrt_actor_try_post without waking the actor if it sleeps: the message
 * is handled at its next wake-up (the next waking post, a timer). For a
 * run of messages that a waking post always ends: each wake-up of an idle
 * actor costs the poster a system call and the actor a thread switch. */
bool kvrt_actor_try_post_quiet(struct kvrt_actor *a, const struct kvrt_msg *m);

/* kvrt_actor_post without waking a sleeping actor (as try_post_quiet; a
 * mailbox full of quiet posts does wake it, so the wait for room ends). */
int kvrt_actor_post_quiet(struct kvrt_actor *a, const struct kvrt_msg *m, uint64_t timeout_ns);

/* Post, waiting up to timeout_ns for room (spin, then sleep with back-off).
 * Any thread. 0, -ETIMEDOUT (still full), -ESHUTDOWN (stopping), or
 * -EDEADLK (the actor posting to its own full mailbox would wait forever). */
int kvrt_actor_post(struct kvrt_actor *a, const struct kvrt_msg *m, uint64_t timeout_ns);

/* Request/reply: post *m with m->reply = c and wait for the handler to
 * signal c. The post waits up to post_timeout_ns for room; once accepted,
 * the reply always comes (accepted messages are always handled).
 * Any thread but the actor's own. Returns the post's error, or c->status. */
int kvrt_actor_call(struct kvrt_actor *a, struct kvrt_msg *m, struct kvrt_completion *c,
		    uint64_t post_timeout_ns);

/* Stop accepting, handle everything accepted, run the stop hook, join.
 * Any thread but the actor's own (-EDEADLK); idempotent; 0. */
int kvrt_actor_stop(struct kvrt_actor *a);

/* Stop (if still running) and free. NULL is ignored. */
void kvrt_actor_destroy(struct kvrt_actor *a);

/* The actor's loop, for timers and I/O watchers: use on the actor's thread
 * only (from handlers and the start/stop hooks). */
struct ev_loop *kvrt_actor_loop(struct kvrt_actor *a);

void *kvrt_actor_data(struct kvrt_actor *a);
const char *kvrt_actor_name(const struct kvrt_actor *a);

/* True when called on the actor's own thread. */
bool kvrt_actor_is_self(const struct kvrt_actor *a);

/* Counters; any thread (each field is read atomically, not the set). */
void kvrt_actor_stats(struct kvrt_actor *a, struct kvrt_actor_stats *out);

#endif
