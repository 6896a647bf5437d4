/* runtime/actor.c: see actor.h.
 *
 * Shared state of an actor, and who writes it:
 *   ring      ck_ring MPSC: producers enqueue (CAS on p_head), the actor
 *             dequeues (single consumer).
 *   closed    set once by kvrt_actor_stop; producers read it between
 *             reserving a slot and committing it (see "Shutdown" below).
 *   idle      the actor sets it just before blocking in epoll (ev_prepare)
 *             and clears it after waking (ev_check); producers read it.
 *   counters  written by the actor thread only, read by anyone (relaxed).
 *
 * Wake-ups. Producer: enqueue; seq_cst fence; if (idle) ev_async_send.
 * Actor (prepare): idle = 1; seq_cst fence; if ring not empty, wake itself.
 * With both fences, either the producer sees idle == 1 and sends, or the
 * actor's re-check sees the message and does not sleep: no lost wake-up. A
 * busy actor is never sent anything, which keeps the post path free of
 * writes to the actor's cache lines other than the ring's.
 *
 * Shutdown. A producer reserves its slot (the CAS on ck's p_head), then,
 * after a fence, reads `closed`; seeing it set, it commits the slot as a
 * tombstone (type KVRT_MSG_TOMBSTONE, skipped by the actor) and fails with
 * -ESHUTDOWN. Stop sets `closed`, and after a fence reads p_head and waits
 * until p_tail reaches it: every slot reserved before that read is then
 * committed, and every producer that reserved later saw `closed` (the two
 * store-fence-load pairs are Dekker-ordered). Stop then sets quit and wakes
 * the actor, which drains the ring once more and leaves its loop. A post
 * thus either fails or is handled: nothing accepted is lost. The cost on the
 * message path is one load and one uncontended fence; an earlier version
 * counted posts in flight with two read-modify-writes on a shared word per
 * message, which halved throughput with two producers.
 */
#include "runtime/actor.h"
#include "runtime/cpus.h"

#include <errno.h>
#include <ev.h>
#include <pthread.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ck_ring.h>

#include "runtime/log.h"
#include "runtime/trace.h"

CK_RING_PROTOTYPE(kvrt_msg, kvrt_msg)

/* A slot committed by a post that lost the race with stop: skipped. */
#define KVRT_MSG_TOMBSTONE UINT32_MAX

struct kvrt_actor {
	/* Producer side: written by every poster. */
	struct ck_ring ring;          /* the mailbox (ck pads its own heads) */
	_Atomic uint64_t rejected KVRT_CL_ALIGNED; /* posts refused */
	_Atomic uint32_t tail_sleepers; /* producers asleep waiting for p_tail */

	/* Actor side. */
	_Atomic int idle KVRT_CL_ALIGNED; /* 1 while the loop may block */
	_Atomic int quit;             /* set by stop once no post can land */
	_Atomic uint64_t handled;     /* messages handled */
	_Atomic uint64_t wakeups;     /* drains run */
	_Atomic uint64_t busy_ns;     /* time spent draining */
	_Atomic uint32_t hwm;         /* mailbox depth high-water mark */

	/* Immutable after create. */
	struct kvrt_msg *slots;       /* ring storage, mailbox_size entries */
	uint32_t capacity;            /* messages the ring holds */
	struct ev_loop *loop;         /* the actor's libev loop */
	ev_async wake;                /* producers' wake-up */
	ev_prepare prepare;           /* marks idle before blocking */
	ev_check check;               /* clears idle after waking */
	pthread_t thread;             /* the actor's thread (for join) */
	pthread_t self;               /* the same, written by the actor's
				       * thread before its start hook runs, so
				       * is_self works inside that hook */
	const struct kvrt_actor_ops *ops;
	void *data;                   /* user data */
	char name[32];                /* thread and trace name */
	const char *trace_name;       /* interned name for slices */
	const char *trace_depth;      /* interned "<name>.mailbox" counter */

	/* Start/stop handshake (create and stop only, not the message path). */
	struct kvrt_completion started; /* status of the start hook */
	_Atomic int stopped;            /* kvrt_actor_stop has joined */
	_Atomic int stopping;           /* a stop is under way */
	_Atomic int closed;             /* posts fail from now on (see top) */
};

/* The single consumer's dequeue: ck's _ck_ring_dequeue_sc (what
 * ck_ring_dequeue_mpsc runs), step for step, on ck's ring fields, with the
 * two ThreadSanitizer edges placed where the hand-offs really are: acquire
 * after the p_tail load that makes the slot ours (pairs with the producer's
 * release before its commit), and release before the c_head store that hands
 * the slot back to the producers (pairs with their acquire after reserving).
 * Through ck's own function the second edge could only be marked after the
 * store, too late to be exact. (Batching the p_tail loads and c_head stores
 * was tried; it made no measurable difference here and shrank the mailbox
 * while a handler runs, so it was left out.) */
static bool dequeue(struct kvrt_actor *a, struct kvrt_msg *out)
{
	unsigned int consumer = a->ring.c_head; /* only this thread writes it */
	unsigned int producer = ck_pr_load_uint(&a->ring.p_tail);
	if (consumer == producer)
		return false;
	/* Slot reads after the p_tail snapshot. */
	ck_pr_fence_load();
	KVRT_TSAN_ACQUIRE(&a->ring);
	struct kvrt_msg *slot = &a->slots[consumer & a->ring.mask];
	*out = *slot;
	KVRT_TSAN_RELEASE(slot);
	/* The copy completes before the slot is handed back. */
	ck_pr_fence_store();
	ck_pr_store_uint(&a->ring.c_head, consumer + 1);
	return true;
}

/* Drain everything queued. Bounded per call so timers still run when
 * producers outpace the handler; if the bound is hit, wake again. */
static void drain(struct kvrt_actor *a)
{
	uint32_t depth = ck_ring_size(&a->ring);
	if (depth > atomic_load_explicit(&a->hwm, memory_order_relaxed))
		atomic_store_explicit(&a->hwm, depth, memory_order_relaxed);
	if (KVRT_TRACING())
		kvrt_trace_counter(a->trace_depth, depth);

	uint64_t t0 = kvrt_now_ns(), n = 0;
	struct kvrt_msg m;
	while (n < a->capacity && dequeue(a, &m)) {
		if (KVRT_UNLIKELY(m.type == KVRT_MSG_TOMBSTONE))
			continue;
		if (KVRT_UNLIKELY(KVRT_TRACING())) {
			uint64_t s = kvrt_now_ns();
			a->ops->handle(a, &m);
			const char *nm = a->ops->msg_name ? a->ops->msg_name(m.type) : NULL;
			kvrt_trace_slice(nm ? nm : a->trace_name, s, kvrt_now_ns(), m.flow);
		} else {
			a->ops->handle(a, &m);
		}
		n++;
	}
	uint64_t t1 = kvrt_now_ns();
	atomic_store_explicit(&a->handled,
			      atomic_load_explicit(&a->handled, memory_order_relaxed) + n,
			      memory_order_relaxed);
	atomic_store_explicit(&a->busy_ns,
			      atomic_load_explicit(&a->busy_ns, memory_order_relaxed) + (t1 - t0),
			      memory_order_relaxed);
	atomic_store_explicit(&a->wakeups,
			      atomic_load_explicit(&a->wakeups, memory_order_relaxed) + 1,
			      memory_order_relaxed);
	if (n == a->capacity)
		ev_async_send(a->loop, &a->wake);
}

static void on_wake(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)revents;
	struct kvrt_actor *a = w->data;
	drain(a);
	if (atomic_load_explicit(&a->quit, memory_order_acquire)) {
		/* Every accepted post is committed (stop waited for them):
		 * one last drain empties the ring for good. */
		while (ck_ring_size(&a->ring) > 0)
			drain(a);
		ev_break(loop, EVBREAK_ALL);
	}
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
	(void)revents;
	struct kvrt_actor *a = w->data;
	atomic_store_explicit(&a->idle, 1, memory_order_relaxed);
	/* Orders the idle store before the ring re-check (pairs with the
	 * producer's fence between its enqueue and its idle load). */
	kvrt_fence_seq_cst();
	if (ck_ring_size(&a->ring) > 0 || atomic_load_explicit(&a->quit, memory_order_relaxed))
		ev_async_send(loop, &a->wake);
}

static void on_check(struct ev_loop *loop, ev_check *w, int revents)
{
	(void)loop;
	(void)revents;
	struct kvrt_actor *a = w->data;
	atomic_store_explicit(&a->idle, 0, memory_order_relaxed);
}

static void *actor_main(void *arg)
{
	struct kvrt_actor *a = arg;
	a->self = pthread_self();
	pthread_setname_np(pthread_self(), a->name);
	kvrt_cpus_apply(); /* off the cores vLLM's OpenMP threads are bound to */
	if (KVRT_TRACING())
		kvrt_trace_thread_name(a->trace_name);
	int rc = a->ops->start ? a->ops->start(a) : 0;
	kvrt_completion_signal(&a->started, rc);
	if (rc != 0)
		return NULL;
	ev_run(a->loop, 0);
	if (a->ops->stop)
		a->ops->stop(a);
	return NULL;
}

int kvrt_actor_create(struct kvrt_actor **out, const struct kvrt_actor_config *cfg)
{
	*out = NULL;
	if (!cfg || !cfg->ops || !cfg->ops->handle || cfg->mailbox_size < 4 ||
	    (cfg->mailbox_size & (cfg->mailbox_size - 1)) || cfg->mailbox_size > (1u << 24)) {
		kvrt_error("actor '%s': mailbox_size must be a power of two in [4, 2^24], and a handler is required",
			   cfg && cfg->name ? cfg->name : "?");
		return -EINVAL;
	}
	kvrt_trace_init_from_env();

	int rc = -ENOMEM;
	struct kvrt_actor *a = aligned_alloc(KVRT_CACHELINE, sizeof *a);
	if (!a)
		return -ENOMEM;
	memset(a, 0, sizeof *a);
	a->slots = aligned_alloc(KVRT_CACHELINE, sizeof(struct kvrt_msg) * cfg->mailbox_size);
	if (!a->slots)
		goto err_free;
	ck_ring_init(&a->ring, cfg->mailbox_size);
	a->capacity = cfg->mailbox_size - 1;
	a->ops = cfg->ops;
	a->data = cfg->data;
	snprintf(a->name, sizeof a->name, "%s", cfg->name ? cfg->name : "actor");
	char depth_name[48];
	snprintf(depth_name, sizeof depth_name, "%s.mailbox", a->name);
	a->trace_name = kvrt_trace_intern(a->name);
	a->trace_depth = kvrt_trace_intern(depth_name);
	kvrt_completion_init(&a->started);

	/* EVFLAG_NOSIGMASK: never touch the host process's signal mask. */
	a->loop = ev_loop_new(EVBACKEND_EPOLL | EVFLAG_NOSIGMASK);
	if (!a->loop)
		a->loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
	if (!a->loop)
		goto err_slots;
	ev_async_init(&a->wake, on_wake);
	a->wake.data = a;
	ev_async_start(a->loop, &a->wake);
	ev_prepare_init(&a->prepare, on_prepare);
	a->prepare.data = a;
	ev_prepare_start(a->loop, &a->prepare);
	ev_check_init(&a->check, on_check);
	a->check.data = a;
	ev_check_start(a->loop, &a->check);

	/* The loop and watchers are set up before the thread exists; from here
	 * on only the actor's thread touches them (ev_async_send excepted). */
	int prc = pthread_create(&a->thread, NULL, actor_main, a);
	if (prc != 0) {
		rc = -prc;
		goto err_loop;
	}
	kvrt_completion_wait(&a->started, UINT64_MAX);
	if (a->started.status != 0) {
		rc = a->started.status;
		pthread_join(a->thread, NULL);
		goto err_loop;
	}
	*out = a;
	return 0;

err_loop:
	ev_loop_destroy(a->loop);
err_slots:
	free(a->slots);
err_free:
	free(a);
	return rc;
}

/* ck's MPSC enqueue publishes slots in ticket order: a producer that has
 * copied its message waits until every earlier ticket is committed. ck spins
 * with a bare pause there. With more runnable threads than cores (vLLM's
 * process, a 2-core CI machine) the ticket holder may be descheduled inside
 * its few-instruction window, and spinners then burn whole time slices that
 * the holder needs: measured here, 4 producers on 2 cores fell to a few
 * thousand messages/s, and yielding instead of spinning only moved the time
 * into sched_yield. So kvrt reserves, copies and waits itself: spin briefly,
 * then sleep on the ring's p_tail word (a futex) until it changes. A
 * committer calls futex_wake only when a sleeper announced itself in
 * tail_sleepers (Dekker pair: the committer's p_tail store and sleepers load,
 * the sleeper's sleepers increment and p_tail load, each side fenced), so the
 * common path makes no syscall. ck's commit then finds p_tail == ticket and
 * returns at once. post_once below does the reserve, copy and commit. */
static void wait_for_turn(struct kvrt_actor *a, unsigned int ticket)
{
	for (unsigned spins = 0; spins < 256; spins++) {
		if (ck_pr_load_uint(&a->ring.p_tail) == ticket)
			return;
		kvrt_cpu_relax();
	}
	atomic_fetch_add_explicit(&a->tail_sleepers, 1, memory_order_seq_cst);
	for (;;) {
		unsigned int t = ck_pr_load_uint(&a->ring.p_tail);
		if (t == ticket)
			break;
		struct timespec ts = {.tv_sec = 0, .tv_nsec = 1000000};
		/* Sleeps only while p_tail still equals t; the timeout bounds
		 * the cost of any wake-up this protocol could miss. */
		syscall(SYS_futex, &a->ring.p_tail, FUTEX_WAIT_PRIVATE, t, &ts, NULL, 0);
	}
	atomic_fetch_sub_explicit(&a->tail_sleepers, 1, memory_order_relaxed);
}

/* 1 queued, 0 full, -ESHUTDOWN closed (see "Shutdown" at the top). */
static int post_once(struct kvrt_actor *a, const struct kvrt_msg *m, bool wake)
{
	unsigned int ticket;
	struct kvrt_msg *slot = ck_ring_enqueue_reserve_mpsc_kvrt_msg(&a->ring, a->slots, &ticket);
	if (!slot)
		return atomic_load_explicit(&a->closed, memory_order_relaxed) ? -ESHUTDOWN : 0;
	/* TSan: the consumer's read of this slot's previous message
	 * happened-before this write (see dequeue). */
	KVRT_TSAN_ACQUIRE(slot);
	*slot = *m;
	/* Orders the reservation before the closed load (pairs with stop). */
	kvrt_fence_seq_cst();
	bool closed = atomic_load_explicit(&a->closed, memory_order_relaxed);
	if (KVRT_UNLIKELY(closed))
		slot->type = KVRT_MSG_TOMBSTONE;
	if (ck_pr_load_uint(&a->ring.p_tail) != ticket)
		wait_for_turn(a, ticket);
	/* TSan: the slot's contents happen-before the consumer's dequeue. */
	KVRT_TSAN_RELEASE(&a->ring);
	ck_ring_enqueue_commit_mpsc(&a->ring, ticket);
	/* Orders the p_tail store before the loads of tail_sleepers and idle
	 * (pairs with wait_for_turn and with the actor's on_prepare). */
	kvrt_fence_seq_cst();
	if (atomic_load_explicit(&a->tail_sleepers, memory_order_relaxed))
		syscall(SYS_futex, &a->ring.p_tail, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
	if (closed)
		return -ESHUTDOWN;
	if (wake && atomic_load_explicit(&a->idle, memory_order_relaxed))
		ev_async_send(a->loop, &a->wake);
	return 1;
}

/* When tracing, the message carries a new flow id (one per post, not per
 * attempt: a retried post is one arrow). */
static const struct kvrt_msg *traced(struct kvrt_actor *a, const struct kvrt_msg *m,
				     struct kvrt_msg *copy)
{
	if (KVRT_LIKELY(!KVRT_TRACING()))
		return m;
	*copy = *m;
	copy->flow = kvrt_trace_flow_begin(a->trace_name);
	return copy;
}

static bool try_post(struct kvrt_actor *a, const struct kvrt_msg *m, bool wake)
{
	struct kvrt_msg copy;
	if (post_once(a, traced(a, m, &copy), wake) == 1)
		return true;
	atomic_fetch_add_explicit(&a->rejected, 1, memory_order_relaxed);
	return false;
}

bool kvrt_actor_try_post(struct kvrt_actor *a, const struct kvrt_msg *m)
{
	return try_post(a, m, true);
}

bool kvrt_actor_try_post_quiet(struct kvrt_actor *a, const struct kvrt_msg *m)
{
	return try_post(a, m, false);
}

static int post_wait(struct kvrt_actor *a, const struct kvrt_msg *m, uint64_t timeout_ns, bool wake)
{
	struct kvrt_msg copy;
	m = traced(a, m, &copy);
	uint64_t deadline = 0, sleep_ns = 2000;
	for (int spins = 0;; spins++) {
		int r = post_once(a, m, wake);
		if (r == 1)
			return 0;
		if (r < 0)
			break;
		/* Full: if quiet posts filled it, the actor may sleep on them. */
		if (spins == 0 && !wake && atomic_load_explicit(&a->idle, memory_order_relaxed))
			ev_async_send(a->loop, &a->wake);
		if (kvrt_actor_is_self(a)) {
			/* Only this thread could make room: waiting would
			 * deadlock. */
			atomic_fetch_add_explicit(&a->rejected, 1, memory_order_relaxed);
			return -EDEADLK;
		}
		uint64_t now = kvrt_now_ns();
		if (spins == 0)
			deadline = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
		if (now >= deadline) {
			atomic_fetch_add_explicit(&a->rejected, 1, memory_order_relaxed);
			return -ETIMEDOUT;
		}
		if (spins < 64) {
			kvrt_cpu_relax();
			continue;
		}
		/* Full for a while: back off, 2 us doubling to 1 ms. */
		uint64_t left = deadline - now, ns = sleep_ns < left ? sleep_ns : left;
		struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u),
				      .tv_nsec = (long)(ns % 1000000000u)};
		nanosleep(&ts, NULL);
		if (sleep_ns < 1000000)
			sleep_ns *= 2;
	}
	atomic_fetch_add_explicit(&a->rejected, 1, memory_order_relaxed);
	return -ESHUTDOWN;
}

int kvrt_actor_post(struct kvrt_actor *a, const struct kvrt_msg *m, uint64_t timeout_ns)
{
	return post_wait(a, m, timeout_ns, true);
}

int kvrt_actor_post_quiet(struct kvrt_actor *a, const struct kvrt_msg *m, uint64_t timeout_ns)
{
	return post_wait(a, m, timeout_ns, false);
}

int kvrt_actor_call(struct kvrt_actor *a, struct kvrt_msg *m, struct kvrt_completion *c,
		    uint64_t post_timeout_ns)
{
	if (kvrt_actor_is_self(a))
		return -EDEADLK;
	kvrt_completion_init(c);
	m->reply = c;
	int rc = kvrt_actor_post(a, m, post_timeout_ns);
	if (rc != 0)
		return rc;
	kvrt_completion_wait(c, UINT64_MAX);
	return c->status;
}

int kvrt_actor_stop(struct kvrt_actor *a)
{
	if (kvrt_actor_is_self(a))
		return -EDEADLK;
	if (atomic_exchange(&a->stopping, 1)) {
		/* Another thread is stopping it: wait until it has joined. */
		while (!atomic_load_explicit(&a->stopped, memory_order_acquire))
			sched_yield();
		return 0;
	}
	atomic_store_explicit(&a->closed, 1, memory_order_relaxed);
	/* Orders the closed store before the p_head load (pairs with the
	 * producers' fence in post_once). */
	kvrt_fence_seq_cst();
	unsigned int head = ck_pr_load_uint(&a->ring.p_head);
	/* Wait until every slot reserved before that load is committed; each
	 * is a few instructions away (or its producer sleeps on its turn). */
	while ((int)(ck_pr_load_uint(&a->ring.p_tail) - head) < 0)
		sched_yield();
	atomic_store_explicit(&a->quit, 1, memory_order_release);
	ev_async_send(a->loop, &a->wake);
	pthread_join(a->thread, NULL);
	atomic_store_explicit(&a->stopped, 1, memory_order_release);
	return 0;
}

void kvrt_actor_destroy(struct kvrt_actor *a)
{
	if (!a)
		return;
	kvrt_actor_stop(a);
	ev_loop_destroy(a->loop);
	free(a->slots);
	free(a);
}

struct ev_loop *kvrt_actor_loop(struct kvrt_actor *a)
{
	return a->loop;
}

void *kvrt_actor_data(struct kvrt_actor *a)
{
	return a->data;
}

const char *kvrt_actor_name(const struct kvrt_actor *a)
{
	return a->name;
}

bool kvrt_actor_is_self(const struct kvrt_actor *a)
{
	return pthread_equal(pthread_self(), a->self);
}

void kvrt_actor_stats(struct kvrt_actor *a, struct kvrt_actor_stats *out)
{
	out->handled = atomic_load_explicit(&a->handled, memory_order_relaxed);
	out->rejected = atomic_load_explicit(&a->rejected, memory_order_relaxed);
	out->wakeups = atomic_load_explicit(&a->wakeups, memory_order_relaxed);
	out->busy_ns = atomic_load_explicit(&a->busy_ns, memory_order_relaxed);
	out->mailbox_hwm = atomic_load_explicit(&a->hwm, memory_order_relaxed);
	out->depth = ck_ring_size(&a->ring);
	out->capacity = a->capacity;
}
