/* kernels/device_host.c: the host backend of the device layer (device.h).
 *
 * Emulates a device so that every pipeline above runs its real code paths
 * on a CPU-only machine:
 * - a stream is a worker thread draining a bounded FIFO of operations in
 *   order (a producer waits while the FIFO is full, as a CUDA launch queue
 *   does); a wrapped stream (kvrt_stream_wrap(dev, NULL)) is the caller's own
 *   thread: its operations run inline;
 * - an event is a pair of counters: a record takes the next number from
 *   `recorded` and queues "completed = max(completed, n)"; query and waits
 *   compare `completed` with `recorded` as it was when they were called;
 * - device memory is ordinary memory; copies, gathers and scatters run the
 *   host engine (copy_host.c) on the stream's thread.
 *
 * The FIFO's mutex and condition variables are the emulated device's
 * internals, not a per-token path of kvrt: the real device has its own.
 * Event progress is announced on one device-wide condition variable.
 *
 * Limitation: an event recorded again on another stream before its previous
 * record completed has a single completion counter, so a wait captured for
 * the older record may end when the newer one completes (CUDA tracks each
 * record). kvrt records each event on one stream.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/copy.h"
#include "kernels/device.h"
#include "kernels/device_impl.h"
#include "runtime/cpus.h"
#include "runtime/log.h"

#define _QUEUE_CAP 1024u /* operations a stream holds before producers wait */
#define _SPIN_NS 20000u  /* CPU waits spin this long before sleeping */

/* The device: where event progress is announced. */
struct _hdev {
	pthread_mutex_t mu; /* guards nothing but the wait/broadcast pairing */
	pthread_cond_t cv;  /* broadcast whenever an event completes */
};

struct _hevent {
	_Atomic uint64_t recorded;  /* records issued (the latest's number) */
	_Atomic uint64_t completed; /* highest record number completed */
	_Atomic uint32_t refs;      /* the owner's + one per queued record/wait:
				     * destroy may come before they run */
};

enum _op_type { _OP_COPY, _OP_FN, _OP_RECORD, _OP_WAIT, _OP_KERNEL };

struct _op {
	enum _op_type type;
	union {
		struct {
			void *dst;
			const void *src;
			size_t n;
		} copy;
		struct {
			void (*fn)(void *);
			void *arg;
		} fn;
		struct {
			struct _hevent *ev;
			uint64_t seq; /* record number to complete / wait for */
		} ev;
		struct _kvrt_copy_launch kernel;
	} u;
};

struct _hstream {
	struct _hdev *dev;
	bool inline_run;         /* caller-thread stream: no worker */
	pthread_t thread;        /* the worker */
	pthread_mutex_t mu;      /* guards everything below */
	pthread_cond_t cv_work;  /* worker: operations arrived, or stop */
	pthread_cond_t cv_space; /* producers: room in the FIFO */
	pthread_cond_t cv_done;  /* sync: an operation finished */
	struct _op ring[_QUEUE_CAP];
	uint32_t head;           /* next operation to run */
	uint32_t count;          /* operations waiting */
	uint64_t queued;         /* operations ever queued */
	uint64_t finished;       /* operations ever finished */
	uint32_t sync_waiters;   /* threads in stream_sync */
	bool stop;               /* worker exits once the FIFO is empty */
};

static struct _hdev *_dev(struct kvrt_device *d)
{
	return d->impl;
}

/* --- events ----------------------------------------------------------------- */

/* Mark record `seq` done and wake CPU waiters. The release orders the work
 * that ran before this record (copies, gathers) before the counter, so a
 * waiter that acquires the counter sees the bytes. */
static void _event_complete(struct _hdev *hd, struct _hevent *ev, uint64_t seq)
{
	uint64_t cur = atomic_load_explicit(&ev->completed, memory_order_relaxed);
	while (cur < seq && !atomic_compare_exchange_weak_explicit(&ev->completed, &cur, seq,
								   memory_order_release,
								   memory_order_relaxed))
		;
	/* Taking the mutex before broadcasting pairs with waiters that check
	 * the counter under it: a waiter either saw the new value or is
	 * already asleep in the wait and gets this broadcast. */
	pthread_mutex_lock(&hd->mu);
	pthread_cond_broadcast(&hd->cv);
	pthread_mutex_unlock(&hd->mu);
}

static bool _event_reached(struct _hevent *ev, uint64_t seq)
{
	return atomic_load_explicit(&ev->completed, memory_order_acquire) >= seq;
}

/* Wait until ev reaches seq or the deadline passes. 0 or -ETIMEDOUT. */
static int _event_wait_seq(struct _hdev *hd, struct _hevent *ev, uint64_t seq, uint64_t timeout_ns)
{
	if (_event_reached(ev, seq))
		return 0;
	uint64_t start = kvrt_now_ns();
	while (kvrt_now_ns() - start < _SPIN_NS) {
		for (int i = 0; i < 64; i++)
			kvrt_cpu_relax();
		if (_event_reached(ev, seq))
			return 0;
	}
	struct timespec dl;
	bool bounded = timeout_ns != UINT64_MAX;
	if (bounded) {
		uint64_t at = start + timeout_ns;
		if (at < start)
			bounded = false;
		dl.tv_sec = (time_t)(at / 1000000000u);
		dl.tv_nsec = (long)(at % 1000000000u);
	}
	int rc = 0;
	pthread_mutex_lock(&hd->mu);
	while (!_event_reached(ev, seq)) {
		if (!bounded) {
			pthread_cond_wait(&hd->cv, &hd->mu);
		} else if (pthread_cond_timedwait(&hd->cv, &hd->mu, &dl) == ETIMEDOUT) {
			rc = _event_reached(ev, seq) ? 0 : -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&hd->mu);
	return rc;
}

static int _event_create(struct kvrt_event *e)
{
	struct _hevent *ev = calloc(1, sizeof(*ev));
	if (!ev)
		return -ENOMEM;
	atomic_init(&ev->recorded, 0);
	atomic_init(&ev->completed, 0);
	atomic_init(&ev->refs, 1);
	e->impl = ev;
	return 0;
}

static void _event_ref(struct _hevent *ev)
{
	atomic_fetch_add_explicit(&ev->refs, 1, memory_order_relaxed);
}

/* acq_rel: the last release sees every other holder's use before freeing. */
static void _event_unref(struct _hevent *ev)
{
	if (atomic_fetch_sub_explicit(&ev->refs, 1, memory_order_acq_rel) == 1)
		free(ev);
}

static void _event_destroy(struct kvrt_event *e)
{
	_event_unref(e->impl);
}

static int _event_query(struct kvrt_event *e)
{
	struct _hevent *ev = e->impl;
	uint64_t want = atomic_load_explicit(&ev->recorded, memory_order_acquire);
	return _event_reached(ev, want) ? 0 : -EBUSY;
}

static int _event_wait(struct kvrt_event *e, uint64_t timeout_ns)
{
	struct _hevent *ev = e->impl;
	uint64_t want = atomic_load_explicit(&ev->recorded, memory_order_acquire);
	return _event_wait_seq(_dev(e->dev), ev, want, timeout_ns);
}

/* --- streams ------------------------------------------------------------------- */

static void _run(struct _hstream *hs, const struct _op *op)
{
	switch (op->type) {
	case _OP_COPY:
		memmove(op->u.copy.dst, op->u.copy.src, op->u.copy.n);
		break;
	case _OP_FN:
		op->u.fn.fn(op->u.fn.arg);
		break;
	case _OP_RECORD:
		_event_complete(hs->dev, op->u.ev.ev, op->u.ev.seq);
		_event_unref(op->u.ev.ev);
		break;
	case _OP_WAIT:
		_event_wait_seq(hs->dev, op->u.ev.ev, op->u.ev.seq, UINT64_MAX);
		_event_unref(op->u.ev.ev);
		break;
	case _OP_KERNEL: {
		const struct _kvrt_copy_launch *k = &op->u.kernel;
		kvrt_copy_host(k->layers, &k->geom, k->tok, k->ntok, k->layer_first, k->layer_count,
			       (enum kvrt_copy_dir)k->dir);
		break;
	}
	}
}

static void *_worker(void *arg)
{
	struct kvrt_stream *s = arg;
	struct _hstream *hs = s->impl;
	char name[16];
	memcpy(name, s->name, sizeof(name) - 1); /* the kernel keeps 15 bytes */
	name[sizeof(name) - 1] = 0;
	pthread_setname_np(pthread_self(), name);
	kvrt_cpus_apply(); /* off the cores vLLM's OpenMP threads are bound to */
	pthread_mutex_lock(&hs->mu);
	for (;;) {
		while (hs->count == 0 && !hs->stop)
			pthread_cond_wait(&hs->cv_work, &hs->mu);
		if (hs->count == 0)
			break;
		struct _op op = hs->ring[hs->head];
		hs->head = (hs->head + 1) % _QUEUE_CAP;
		hs->count--;
		pthread_cond_signal(&hs->cv_space);
		pthread_mutex_unlock(&hs->mu);
		_run(hs, &op);
		pthread_mutex_lock(&hs->mu);
		hs->finished++;
		if (hs->sync_waiters)
			pthread_cond_broadcast(&hs->cv_done);
	}
	pthread_mutex_unlock(&hs->mu);
	return NULL;
}

/* Queue op (or run it now on a caller-thread stream). */
static int _submit(struct kvrt_stream *s, const struct _op *op)
{
	struct _hstream *hs = s->impl;
	if (hs->inline_run) {
		_run(hs, op);
		return 0;
	}
	pthread_mutex_lock(&hs->mu);
	while (hs->count == _QUEUE_CAP)
		pthread_cond_wait(&hs->cv_space, &hs->mu);
	hs->ring[(hs->head + hs->count) % _QUEUE_CAP] = *op;
	hs->count++;
	hs->queued++;
	pthread_cond_signal(&hs->cv_work);
	pthread_mutex_unlock(&hs->mu);
	return 0;
}

static int _cond_init_mono(pthread_cond_t *cv)
{
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	int rc = pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
	return -rc;
}

static int _stream_create(struct kvrt_stream *s, void *native, bool wrap)
{
	if (native)
		return -EINVAL;
	struct _hstream *hs = calloc(1, sizeof(*hs));
	if (!hs)
		return -ENOMEM;
	hs->dev = _dev(s->dev);
	hs->inline_run = wrap;
	s->impl = hs;
	if (wrap)
		return 0;
	pthread_mutex_init(&hs->mu, NULL);
	pthread_cond_init(&hs->cv_work, NULL);
	pthread_cond_init(&hs->cv_space, NULL);
	pthread_cond_init(&hs->cv_done, NULL);
	int rc = pthread_create(&hs->thread, NULL, _worker, s);
	if (rc != 0) {
		kvrt_error("kernels: host stream %s: pthread_create: %s", s->name, strerror(rc));
		pthread_cond_destroy(&hs->cv_done);
		pthread_cond_destroy(&hs->cv_space);
		pthread_cond_destroy(&hs->cv_work);
		pthread_mutex_destroy(&hs->mu);
		free(hs);
		s->impl = NULL;
		return -rc;
	}
	return 0;
}

static int _stream_sync(struct kvrt_stream *s)
{
	struct _hstream *hs = s->impl;
	if (hs->inline_run)
		return 0;
	pthread_mutex_lock(&hs->mu);
	uint64_t target = hs->queued;
	hs->sync_waiters++;
	while (hs->finished < target)
		pthread_cond_wait(&hs->cv_done, &hs->mu);
	hs->sync_waiters--;
	pthread_mutex_unlock(&hs->mu);
	return 0;
}

static void _stream_destroy(struct kvrt_stream *s)
{
	struct _hstream *hs = s->impl;
	if (!hs->inline_run) {
		pthread_mutex_lock(&hs->mu);
		hs->stop = true; /* the worker drains the FIFO first */
		pthread_cond_signal(&hs->cv_work);
		pthread_mutex_unlock(&hs->mu);
		pthread_join(hs->thread, NULL);
		pthread_cond_destroy(&hs->cv_done);
		pthread_cond_destroy(&hs->cv_space);
		pthread_cond_destroy(&hs->cv_work);
		pthread_mutex_destroy(&hs->mu);
	}
	free(hs);
}

static int _event_record(struct kvrt_event *e, struct kvrt_stream *s)
{
	struct _hevent *ev = e->impl;
	struct _op op = {.type = _OP_RECORD};
	op.u.ev.ev = ev;
	op.u.ev.seq = atomic_fetch_add_explicit(&ev->recorded, 1, memory_order_acq_rel) + 1;
	_event_ref(ev);
	return _submit(s, &op);
}

static int _stream_wait_event(struct kvrt_stream *s, struct kvrt_event *e)
{
	struct _hevent *ev = e->impl;
	struct _op op = {.type = _OP_WAIT};
	op.u.ev.ev = ev;
	op.u.ev.seq = atomic_load_explicit(&ev->recorded, memory_order_acquire);
	if (_event_reached(ev, op.u.ev.seq))
		return 0; /* nothing to wait for */
	_event_ref(ev);
	return _submit(s, &op);
}

static int _memcpy_async(struct kvrt_stream *s, void *dst, const void *src, size_t n)
{
	struct _op op = {.type = _OP_COPY};
	op.u.copy.dst = dst;
	op.u.copy.src = src;
	op.u.copy.n = n;
	return _submit(s, &op);
}

static int _host_fn(struct kvrt_stream *s, void (*fn)(void *), void *arg)
{
	struct _op op = {.type = _OP_FN};
	op.u.fn.fn = fn;
	op.u.fn.arg = arg;
	return _submit(s, &op);
}

static int _copy(struct kvrt_stream *s, const struct _kvrt_copy_launch *l)
{
	struct _op op = {.type = _OP_KERNEL};
	op.u.kernel = *l;
	return _submit(s, &op);
}

/* --- device and memory ------------------------------------------------------------ */

static int _open(struct kvrt_device *d)
{
	struct _hdev *hd = calloc(1, sizeof(*hd));
	if (!hd)
		return -ENOMEM;
	pthread_mutex_init(&hd->mu, NULL);
	int rc = _cond_init_mono(&hd->cv);
	if (rc < 0) {
		pthread_mutex_destroy(&hd->mu);
		free(hd);
		return rc;
	}
	d->impl = hd;
	snprintf(d->name, sizeof(d->name), "host");
	return 0;
}

static void _close(struct kvrt_device *d)
{
	struct _hdev *hd = d->impl;
	pthread_cond_destroy(&hd->cv);
	pthread_mutex_destroy(&hd->mu);
	free(hd);
}

static int _alloc_aligned(size_t align, size_t n, void **out)
{
	size_t rounded = (n + align - 1) / align * align;
	if (rounded < n)
		return -ENOMEM;
	*out = aligned_alloc(align, rounded);
	return *out ? 0 : -ENOMEM;
}

static int _alloc(struct kvrt_device *d, size_t n, void **out)
{
	(void)d;
	return _alloc_aligned(256, n, out);
}

static int _alloc_pinned(struct kvrt_device *d, size_t n, void **out)
{
	(void)d;
	return _alloc_aligned(4096, n, out);
}

static void _free(struct kvrt_device *d, void *p)
{
	(void)d;
	free(p);
}

static int _host_register(struct kvrt_device *d, void *p, size_t n)
{
	(void)d, (void)p, (void)n;
	return 0;
}

static int _host_unregister(struct kvrt_device *d, void *p)
{
	(void)d, (void)p;
	return 0;
}

static int _map_host(struct kvrt_device *d, void *host, void **dev_ptr)
{
	(void)d;
	*dev_ptr = host;
	return 0;
}

const struct _kvrt_device_ops _kvrt_device_host_ops = {
	.name = "host",
	.open = _open,
	.close = _close,
	.stream_create = _stream_create,
	.stream_destroy = _stream_destroy,
	.stream_sync = _stream_sync,
	.stream_wait_event = _stream_wait_event,
	.memcpy_async = _memcpy_async,
	.host_fn = _host_fn,
	.copy = _copy,
	.event_create = _event_create,
	.event_destroy = _event_destroy,
	.event_record = _event_record,
	.event_query = _event_query,
	.event_wait = _event_wait,
	.alloc = _alloc,
	.free = _free,
	.alloc_pinned = _alloc_pinned,
	.free_pinned = _free,
	.host_register = _host_register,
	.host_unregister = _host_unregister,
	.map_host = _map_host,
};
