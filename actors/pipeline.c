/* actors/pipeline.c: the shared state of the engine and its pipeline
 * actors (see pipeline.h): published words (an actor advances, the worker
 * waits), a prompt's chunk keys, and the results the load actor hands the
 * worker (load errors, finished async loads). The actors (lookup.c,
 * load.c, save.c) depend on this and on pipeline.h, never on engine.c.
 *
 * Threads: _kvrt_pub_add on the publishing actor, _kvrt_pub_wait on the
 * worker; _kvrt_keys anywhere; the results under e->res_mu from the load
 * actor (the worker drains them in engine.c).
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "actors/key.h"
#include "actors/pipeline.h"
#include "runtime/log.h"

/* --- published words ------------------------------------------------------ */

void _kvrt_pub_add(struct _kvrt_pub *p, uint32_t n)
{
	/* release: what the actor did before (events recorded, results
	 * stored) is visible to a worker that acquires the new value. */
	atomic_fetch_add_explicit(&p->v, n, memory_order_release);
	/* Dekker pair with _kvrt_pub_wait: either the sleeper's re-check sees
	 * the new value, or we see its waiters mark and wake it. */
	kvrt_fence_seq_cst();
	if (atomic_load_explicit(&p->waiters, memory_order_relaxed))
		syscall(SYS_futex, (uint32_t *)&p->v, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

int _kvrt_pub_wait(struct _kvrt_pub *p, uint32_t target, uint64_t timeout_ns)
{
	if (_kvrt_pub_reached(p, target))
		return 0;
	uint64_t t0 = kvrt_now_ns();
	while (kvrt_now_ns() - t0 < 20000) {
		for (int i = 0; i < 32; i++)
			kvrt_cpu_relax();
		if (_kvrt_pub_reached(p, target))
			return 0;
	}
	int rc = 0;
	atomic_fetch_add_explicit(&p->waiters, 1, memory_order_relaxed);
	for (;;) {
		kvrt_fence_seq_cst(); /* pairs with the one in _kvrt_pub_add */
		uint32_t cur = atomic_load_explicit(&p->v, memory_order_acquire);
		if ((int32_t)(cur - target) >= 0)
			break;
		uint64_t now = kvrt_now_ns();
		if (now - t0 >= timeout_ns) {
			rc = -ETIMEDOUT;
			break;
		}
		uint64_t left = timeout_ns - (now - t0);
		if (left > 100000000)
			left = 100000000; /* re-check now and then */
		struct timespec ts = {.tv_sec = (time_t)(left / 1000000000u),
				      .tv_nsec = (long)(left % 1000000000u)};
		syscall(SYS_futex, (uint32_t *)&p->v, FUTEX_WAIT_PRIVATE, cur, &ts, NULL, 0);
	}
	atomic_fetch_sub_explicit(&p->waiters, 1, memory_order_relaxed);
	return rc;
}

/* --- keys ----------------------------------------------------------------- */

void _kvrt_keys(uint64_t ns, const uint32_t *tokens, uint32_t cs, uint32_t nfull, uint32_t tail,
		struct kvrt_chunk_key *out)
{
	struct kvrt_chunk_key prev = kvrt_key_root();
	for (uint32_t i = 0; i < nfull; i++)
		prev = out[i] = kvrt_key_chunk(ns, prev, tokens + (size_t)i * cs, cs);
	if (tail)
		out[nfull] = kvrt_key_chunk(ns, prev, tokens + (size_t)nfull * cs, tail);
}

/* --- results from the load actor -------------------------------------------- */

void _kvrt_result_errors(struct kvrt_engine *e, const int32_t *blk, uint32_t nblk,
			     uint32_t from, uint32_t to)
{
	if (from >= to)
		return;
	uint32_t bs = e->set->geom.block_size;
	uint32_t b0 = from / bs, b1 = (to - 1) / bs + 1;
	if (b1 > nblk)
		b1 = nblk;
	if (b0 >= b1)
		return;
	pthread_mutex_lock(&e->res_mu);
	if (kvrt_grow((void **)&e->errs, &e->errs_cap, e->nerrs + (b1 - b0), sizeof(*e->errs)) == 0) {
		for (uint32_t b = b0; b < b1; b++)
			if (blk[b] >= 0)
				e->errs[e->nerrs++] = blk[b];
	} else {
		kvrt_error("engine: no memory to record load errors of %u blocks", b1 - b0);
	}
	pthread_mutex_unlock(&e->res_mu);
	_KVRT_STAT_ADD(e, st_load_error_blocks, b1 - b0);
}

void _kvrt_result_recv(struct kvrt_engine *e, uint64_t req_id, bool failed)
{
	pthread_mutex_lock(&e->res_mu);
	if (kvrt_grow((void **)&e->recv, &e->recv_cap, e->nrecv + 1, sizeof(*e->recv)) == 0)
		e->recv[e->nrecv++] = _kvrt_owner_req(req_id) | (failed ? _KVRT_OWNER_LOAD : 0);
	else
		kvrt_error("engine: no memory to report a finished load");
	pthread_mutex_unlock(&e->res_mu);
	_KVRT_STAT_ADD(e, st_async_done, 1);
}
