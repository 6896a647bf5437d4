/* actors/engine.c: see engine.h (the API) and pipeline.h (the hand-offs).
 *
 * This file is the worker's and the scheduler's side: it copies plans,
 * posts to the pipeline actors and waits on what they publish. The actors
 * themselves are lookup.c, load.c and save.c; what they share with this
 * file (published words, key chains, results) is pipeline.c.
 */
#include "actors/engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "actors/key.h"
#include "actors/pipeline.h"
#include "runtime/log.h"

#define _WAIT_LIMIT_NS (60ull * 1000000000ull) /* a wedged actor, not a slow copy */

/* --- create / register / destroy -------------------------------------------- */

int kvrt_engine_create(struct kvrt_engine **out, const struct kvrt_engine_config *cfg)
{
	*out = NULL;
	if (!cfg)
		return -EINVAL;
	if (cfg->chunk_size > KVRT_CHUNK_MAX_TOKENS) {
		kvrt_error("engine: chunk_size %u (accepted: 1 .. %u, 0 = 256)", cfg->chunk_size,
			   KVRT_CHUNK_MAX_TOKENS);
		return -EINVAL;
	}
	if (cfg->mailbox_size && (cfg->mailbox_size < 4 || (cfg->mailbox_size & (cfg->mailbox_size - 1)))) {
		kvrt_error("engine: mailbox_size %u (accepted: a power of two >= 4, 0 = defaults)",
			   cfg->mailbox_size);
		return -EINVAL;
	}
	struct kvrt_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	int rc = -ENOMEM;
	e->cfg = *cfg;
	e->cs = cfg->chunk_size ? cfg->chunk_size : 256;
	if (!e->cfg.step_tokens)
		e->cfg.step_tokens = 65536;
	if (!e->cfg.pin_timeout_ns)
		e->cfg.pin_timeout_ns = 600ull * 1000000000ull;
	if (cfg->disk_dir && !(e->disk_dir = strdup(cfg->disk_dir)))
		goto err;
	e->cfg.disk_dir = e->disk_dir;
	if (cfg->remote_url && !(e->remote_url = strdup(cfg->remote_url)))
		goto err;
	e->cfg.remote_url = e->remote_url;
	pthread_mutex_init(&e->res_mu, NULL);
	pthread_mutex_init(&e->dl_mu, NULL);
	rc = kvrt_index_create(&e->idx, &(struct kvrt_index_config){.capacity = 4096});
	if (rc)
		goto err_mu;
	rc = kvrt_device_open(&e->dev, cfg->device_ordinal);
	if (rc)
		goto err_idx;
	*out = e;
	return 0;
err_idx:
	kvrt_index_destroy(e->idx);
err_mu:
	pthread_mutex_destroy(&e->dl_mu);
	pthread_mutex_destroy(&e->res_mu);
err:
	free(e->disk_dir);
	free(e->remote_url);
	free(e);
	return rc;
}

static int pin_region(void *ctx, void *addr, size_t len)
{
	return kvrt_device_register(ctx, addr, len);
}

static void unpin_region(void *ctx, void *addr, size_t len)
{
	(void)len;
	kvrt_device_unregister(ctx, addr);
}

static void destroy_events(struct kvrt_event **ev, uint32_t n)
{
	if (!ev)
		return;
	for (uint32_t i = 0; i < n; i++)
		kvrt_event_destroy(ev[i]);
	free(ev);
}

static int create_events(struct kvrt_device *d, struct kvrt_event ***out, uint32_t n)
{
	struct kvrt_event **ev = calloc(n, sizeof(*ev));
	if (!ev)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		int rc = kvrt_event_create(d, &ev[i]);
		if (rc) {
			destroy_events(ev, i);
			return rc;
		}
	}
	*out = ev;
	return 0;
}

int kvrt_engine_register(struct kvrt_engine *e, const struct kvrt_kv_tensor *t, uint32_t n,
			 void *compute_stream)
{
	if (e->registered)
		return -EALREADY;
	int rc = kvrt_kv_set_create(&e->set, t, n);
	if (rc)
		return rc;
	e->L = e->set->num_layers;
	/* A chunk of whole blocks of an opaque interior is another format:
	 * its own layout id keeps it apart on disk and in Redis. */
	e->shape = (struct kvrt_chunk_shape){.num_layers = e->L,
					     .token_bytes = e->set->geom.token_bytes,
					     .elem_size = e->set->elem_size,
					     .layout = (uint32_t)e->set->layout |
						       (e->set->whole_blocks ? KVRT_CHUNK_LAYOUT_WHOLE_BLOCKS : 0)};
	if (e->set->whole_blocks && e->cfg.save_unfull_chunk)
		kvrt_warn("engine: save_unfull_chunk has no effect with this KV layout (only whole "
			  "blocks are copied; a prompt's partial last chunk is recomputed)");
	if (e->set->whole_blocks && e->cs % e->set->geom.block_size) {
		kvrt_error("engine: chunk_size %u is not a multiple of vLLM's block size %u: this "
			   "KV layout is copied in whole blocks only (set chunk_size to a multiple)",
			   e->cs, e->set->geom.block_size);
		rc = -EINVAL;
		goto err_set;
	}
	e->chunk_bytes = kvrt_chunk_payload_bytes(&e->shape, e->cs);
	if (e->cfg.cpu_bytes < e->chunk_bytes) {
		kvrt_error("engine: cpu_bytes %llu holds not even one chunk of %llu bytes "
			   "(chunk_size %u x %u layers x %u bytes per token)",
			   (unsigned long long)e->cfg.cpu_bytes, (unsigned long long)e->chunk_bytes,
			   e->cs, e->L, e->shape.token_bytes);
		rc = -EINVAL;
		goto err_set;
	}
	if ((rc = kvrt_device_layers_create(e->dev, e->set, &e->dl)))
		goto err_set;
	/* With a GPU the pool's regions are pinned (and mapped) one by one. */
	struct kvrt_pool_pin_ops pin = {.pin = pin_region, .unpin = unpin_region, .ctx = e->dev};
	bool cuda = kvrt_device_kind(e->dev) == KVRT_DEVICE_CUDA;
	/* The hand-off ring holds the free slabs a step's saves take at once:
	 * up to half the pool (at most 4096), so that a big step is limited by
	 * free memory rather than by how often the evict actor refills the
	 * ring, while the evict actor's free list (which promotions from disk
	 * allocate from; refill moves free slabs to the ring until it is full)
	 * keeps the other half. */
	uint64_t slabs = e->cfg.cpu_bytes / ((e->chunk_bytes + 4095) & ~4095ull);
	uint32_t ring = 4;
	while ((uint64_t)ring * 2 <= slabs / 2 && ring < 4096)
		ring *= 2;
	rc = kvrt_pool_create(&e->pool, &(struct kvrt_pool_config){.budget_bytes = e->cfg.cpu_bytes,
								    .slab_bytes = e->chunk_bytes,
								    .ring_size = ring,
								    /* Fault the pool in now, not in a
								     * step's save (first touch ran at
								     * 0.4-1.7 GB/s on the dev VM, a
								     * step's copies at 20): like
								     * pinned allocations, the cost is
								     * paid at start-up. */
								    .populate = true,
								    .pin = cuda ? &pin : NULL});
	if (rc)
		goto err_dl;
	rc = kvrt_evict_create(&e->ev, &(struct kvrt_evict_config){
					       .index = e->idx,
					       .pool = e->pool,
					       .shape = e->shape,
					       .namespace_hash = e->cfg.namespace_hash,
					       .policy = e->cfg.policy,
					       .high_watermark = e->cfg.high_watermark,
					       .low_watermark = e->cfg.low_watermark,
					       .pin_timeout_ns = e->cfg.pin_timeout_ns,
					       .disk_dir = e->disk_dir,
					       .disk_budget_bytes = e->cfg.disk_bytes,
					       .disk_odirect = e->cfg.disk_odirect,
					       .remote_url = e->remote_url,
					       .remote_timeout_ms = e->cfg.remote_timeout_ms,
					       .remote_ttl_s = e->cfg.remote_ttl_s,
					       .remote_max_pending_writes = e->cfg.remote_max_pending_writes,
					       .mailbox_size = e->cfg.mailbox_size,
					       .on_room = e->cfg.on_room,
					       .debug_discard_delay_ms = e->cfg.debug_discard_delay_ms,
					       .tier_events = e->cfg.tier_events,
					       .hook_ctx = e->cfg.hook_ctx});
	if (rc)
		goto err_pool;
	if (kvrt_evict_has_remote(e->ev)) {
		uint64_t to = e->cfg.remote_timeout_ms ? e->cfg.remote_timeout_ms : 1000;
		uint64_t w = e->cfg.remote_lookup_wait_ms ? e->cfg.remote_lookup_wait_ms : 5;
		e->remote_wait_ns = (w < to ? w : to) * 1000000ull;
	}
	if ((rc = kvrt_stream_wrap(e->dev, compute_stream, &e->compute)))
		goto err_ev;
	e->lstream = kvrt_device_load_stream(e->dev);
	e->sstream = kvrt_device_save_stream(e->dev);
	if ((rc = create_events(e->dev, &e->load_ev, e->L)) ||
	    (rc = create_events(e->dev, &e->save_cev, e->L)) ||
	    (rc = kvrt_event_create(e->dev, &e->save_done)))
		goto err_events;
	e->step.layer_saved = calloc(e->L, 1);
	if (!e->step.layer_saved) {
		rc = -ENOMEM;
		goto err_events;
	}
	if ((rc = _kvrt_lookup_create(e, &e->lookup)))
		goto err_events;
	if ((rc = _kvrt_load_create(e, &e->load)))
		goto err_lookup;
	if ((rc = _kvrt_save_create(e, &e->save)))
		goto err_load;
	/* No reader (-ENOMEM): every lookup asks the actor. */
	e->dl_r = kvrt_index_reader_open(e->idx);
	e->registered = true;
	kvrt_info("engine: %u layers, %u-token chunks of %llu bytes, %u slabs, device %s", e->L, e->cs,
		  (unsigned long long)e->chunk_bytes, kvrt_pool_slabs(e->pool), kvrt_device_name(e->dev));
	return 0;
err_load:
	_kvrt_load_destroy(e->load);
	e->load = NULL;
err_lookup:
	_kvrt_lookup_destroy(e->lookup);
	_kvrt_lookup_free(e->lookup);
	e->lookup = NULL;
err_events:
	free(e->step.layer_saved);
	e->step.layer_saved = NULL;
	kvrt_event_destroy(e->save_done);
	e->save_done = NULL;
	destroy_events(e->save_cev, e->L);
	destroy_events(e->load_ev, e->L);
	e->save_cev = e->load_ev = NULL;
	kvrt_stream_destroy(e->compute);
	e->compute = NULL;
err_ev:
	e->remote_wait_ns = 0;
	kvrt_evict_destroy(e->ev);
	e->ev = NULL;
err_pool:
	kvrt_pool_destroy(e->pool);
	e->pool = NULL;
err_dl:
	kvrt_device_layers_destroy(e->dl);
	e->dl = NULL;
err_set:
	kvrt_kv_set_destroy(e->set);
	e->set = NULL;
	return rc;
}

uint32_t kvrt_engine_num_layers(const struct kvrt_engine *e)
{
	return e->set ? e->set->num_inputs : 0;
}

void kvrt_engine_destroy(struct kvrt_engine *e)
{
	if (!e)
		return;
	if (e->registered) {
		kvrt_engine_wait_save(e);
		/* wait_save does not wait: the save actor must have handled
		 * every SAVE_END (its SAVE_DONE rides the stream) before the
		 * stream is synced below, or a step's chunks would be dropped
		 * unaccounted. */
		if (_kvrt_pub_wait(&e->save_pub, e->save_next, _WAIT_LIMIT_NS))
			kvrt_error("engine: the save actor did not end its steps in 60 s");
		/* Loads posted but never started would be lost: start them so
		 * their pins are taken and released in order. */
		if (!e->step.load_posted && (e->step.nsync || e->step.nasync))
			kvrt_engine_start_load(e);
		/* The load actor drains its jobs (promotions need evict alive),
		 * the streams reach their callbacks, then the actors stop. */
		_kvrt_load_destroy(e->load);
		_kvrt_save_destroy(e->save);
		_kvrt_lookup_destroy(e->lookup);
		kvrt_evict_destroy(e->ev); /* signals promotions still waiting */
		_kvrt_lookup_free(e->lookup);
		kvrt_index_reader_close(e->dl_r);
		e->dl_r = NULL;
		kvrt_event_destroy(e->save_done);
		destroy_events(e->save_cev, e->L);
		destroy_events(e->load_ev, e->L);
		kvrt_stream_destroy(e->compute);
		kvrt_device_layers_destroy(e->dl);
		kvrt_pool_destroy(e->pool);
		kvrt_kv_set_destroy(e->set);
	}
	kvrt_device_close(e->dev);
	kvrt_index_destroy(e->idx);
	pthread_mutex_destroy(&e->res_mu);
	pthread_mutex_destroy(&e->dl_mu);
	free(e->dl_keys);
	free(e->dl_hits);
	struct _kvrt_step *st = &e->step;
	free(st->reqs);
	free(st->tokens);
	free(st->blocks);
	free(st->keys);
	free(st->layer_saved);
	free(e->ls);
	free(e->pending);
	free(e->errs);
	free(e->recv);
	free(e->disk_dir);
	free(e->remote_url);
	free(e);
}

/* --- scheduler side --------------------------------------------------------- */

/* The lookup on the caller's thread ("in one process the scheduler reads
 * the index directly"): the same keys, unpin and pinned walk as the lookup
 * actor's do_lookup (actors/lookup.c), without the round trip. It answers
 * only when the answer needs no actor: every chunk found is in the CPU tier
 * (a disk or remote chunk needs a prefetch the actor tracks) and, with a
 * remote tier, nothing is missing (a miss asks Redis). Otherwise -EAGAIN:
 * the caller asks the actor, which replaces this walk's pins with its own,
 * so the answer and the pins are the actor's exactly. dl_mu held. */
static int direct_lookup(struct kvrt_engine *e, uint64_t req, uint64_t ns, const uint32_t *tokens,
			 uint32_t n, struct kvrt_lookup_result *out)
{
	if (e->dl_off || !e->dl_r)
		return -EAGAIN;
	uint32_t cs = e->cs;
	uint32_t nfull = n / cs, tail = n % cs;
	size_t need = (size_t)nfull + 1;
	if (need > e->dl_cap) {
		size_t cap = e->dl_cap ? e->dl_cap : 256;
		while (cap < need)
			cap *= 2;
		struct kvrt_chunk_key *k = realloc(e->dl_keys, cap * sizeof(*k));
		if (!k)
			return -EAGAIN;
		e->dl_keys = k;
		struct kvrt_index_hit *h = realloc(e->dl_hits, cap * sizeof(*h));
		if (!h)
			return -EAGAIN;
		e->dl_hits = h;
		e->dl_cap = cap;
	}
	struct kvrt_chunk_key *keys = e->dl_keys;
	struct kvrt_index_hit *hits = e->dl_hits;
	_kvrt_keys(ns, tokens, cs, nfull, tail, keys);
	/* Idempotent: the request's earlier pins are replaced by this answer. */
	kvrt_index_unpin_owner(e->idx, req);
	unsigned fl = KVRT_INDEX_PIN | KVRT_INDEX_TOUCH;
	size_t found = kvrt_index_lookup(e->dl_r, keys, nfull, req, fl, hits);
	uint32_t tokens_found = (uint32_t)found * cs;
	if (found == nfull && tail && kvrt_index_lookup(e->dl_r, keys + nfull, 1, req, fl, hits + nfull)) {
		found++;
		tokens_found += tail;
	}
	uint32_t total = nfull + (tail != 0);
	if (found < total && e->remote_wait_ns)
		return -EAGAIN; /* Redis may hold the rest */
	for (size_t i = 0; i < found; i++)
		if (hits[i].tier != KVRT_TIER_CPU)
			return -EAGAIN; /* a prefetch to start */
	out->chunks = out->chunks_now = (uint32_t)found;
	out->tokens = out->tokens_now = tokens_found;
	_KVRT_STAT_ADD(e, st_lookups, 1);
	_KVRT_STAT_ADD(e, st_lookup_tokens, tokens_found);
	return 0;
}

int kvrt_engine_lookup(struct kvrt_engine *e, uint64_t req_id, uint64_t ns_hash,
		       const uint32_t *tokens, uint32_t n, struct kvrt_lookup_result *out)
{
	memset(out, 0, sizeof(*out));
	if (!e->registered || n == 0)
		return 0;
	if (!tokens)
		return -EINVAL;
	uint64_t req = _kvrt_owner_req(req_id);
	pthread_mutex_lock(&e->dl_mu);
	int rc = direct_lookup(e, req, ns_hash, tokens, n, out);
	if (rc == -EAGAIN) /* the actor must answer (or the scratch cannot grow) */
		rc = _kvrt_lookup_call(e->lookup, req, ns_hash, tokens, n, out);
	pthread_mutex_unlock(&e->dl_mu);
	return rc;
}

void _kvrt_engine_set_direct_lookup(struct kvrt_engine *e, bool on)
{
	e->dl_off = !on;
}

size_t kvrt_engine_release(struct kvrt_engine *e, uint64_t req_id)
{
	return kvrt_index_unpin_owner(e->idx, _kvrt_owner_req(req_id));
}

/* --- worker side: the last-save map ------------------------------------------- */

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	return x;
}

static struct _kvrt_lastsave *ls_find(struct kvrt_engine *e, uint64_t req)
{
	if (!e->ls_cap)
		return NULL;
	uint32_t m = e->ls_cap - 1;
	for (uint32_t i = (uint32_t)mix(req) & m, k = 0; k < e->ls_cap; i = (i + 1) & m, k++) {
		struct _kvrt_lastsave *s = &e->ls[i];
		if (!s->req && !s->tomb)
			return NULL;
		if (s->req == req + 1)
			return s;
	}
	return NULL;
}

static bool save_done(struct kvrt_engine *e, uint32_t gen)
{
	uint32_t done = atomic_load_explicit(&e->save_completed, memory_order_acquire);
	return (int32_t)(done - gen) >= 0;
}

/* Rebuild with room, dropping entries whose saves are complete. */
static int ls_rehash(struct kvrt_engine *e)
{
	uint32_t live = 0;
	for (uint32_t i = 0; i < e->ls_cap; i++)
		if (e->ls[i].req && !save_done(e, e->ls[i].gen))
			live++;
	uint32_t cap = 64;
	while (cap < 4 * (live + 1))
		cap *= 2;
	struct _kvrt_lastsave *n = calloc(cap, sizeof(*n));
	if (!n)
		return -ENOMEM;
	for (uint32_t i = 0; i < e->ls_cap; i++) {
		struct _kvrt_lastsave *s = &e->ls[i];
		if (!s->req || save_done(e, s->gen))
			continue;
		uint32_t j = (uint32_t)mix(s->req - 1) & (cap - 1);
		while (n[j].req)
			j = (j + 1) & (cap - 1);
		n[j] = *s;
		n[j].tomb = 0;
	}
	free(e->ls);
	e->ls = n;
	e->ls_cap = cap;
	e->ls_n = live;
	e->ls_tombs = 0;
	return 0;
}

static void ls_put(struct kvrt_engine *e, uint64_t req, uint32_t gen)
{
	struct _kvrt_lastsave *s = ls_find(e, req);
	if (s) {
		s->gen = gen;
		return;
	}
	/* Tombstones count: a table full of them makes every miss walk it all
	 * (each step reports its delayed requests and saves new ones). */
	if ((e->ls_n + e->ls_tombs + 1) * 2 > e->ls_cap && ls_rehash(e)) {
		kvrt_warn("engine: no memory to track a save; its request may be freed early");
		return;
	}
	uint32_t m = e->ls_cap - 1;
	uint32_t i = (uint32_t)mix(req) & m;
	while (e->ls[i].req)
		i = (i + 1) & m;
	if (e->ls[i].tomb)
		e->ls_tombs--;
	e->ls[i] = (struct _kvrt_lastsave){.req = req + 1, .gen = gen};
	e->ls_n++;
}

/* --- worker side: bind -------------------------------------------------------- */

/* Chunks a request saves this step (engine.h: full chunks completed in
 * [save_start, save_end), the prompt's tail, decode chunks by config). */
static void save_chunks(const struct kvrt_engine *e, const struct kvrt_plan_req *r, struct _kvrt_sreq *q)
{
	uint32_t cs = e->cs;
	q->save_first = q->save_full_end = q->save_tail = 0;
	if (r->save_end <= r->save_start)
		return;
	uint32_t limit = r->save_end;
	if (!e->cfg.save_decode_cache && limit > r->prompt_tokens)
		limit = r->prompt_tokens;
	uint32_t i0 = r->save_start / cs, i1 = limit / cs;
	if (i1 < i0)
		i1 = i0;
	q->save_first = i0;
	q->save_full_end = i1;
	uint32_t p = r->prompt_tokens;
	/* A tail is part of a block: never saved where only whole blocks
	 * may be copied (kernels/layout.h: whole_blocks). */
	if (e->cfg.save_unfull_chunk && !e->set->whole_blocks && p % cs && r->save_start < p &&
	    p <= r->save_end && i1 == p / cs)
		q->save_tail = p % cs;
}

static void finish_previous(struct kvrt_engine *e)
{
	struct _kvrt_step *st = &e->step;
	if (st->save_posted && !st->save_ended)
		kvrt_engine_wait_save(e);
	if (!st->load_posted && (st->nsync || st->nasync))
		kvrt_engine_start_load(e);
	/* The load actor reads the step in its handler; once it published the
	 * step's layers it is done with it. */
	if (_kvrt_pub_wait(&e->load_pub, e->load_next, _WAIT_LIMIT_NS))
		kvrt_error("engine: the load actor did not finish a step in 60 s");
	/* The save actor reads the step at SAVE_BEGIN only. Normally long
	 * done; it lags only when gathers two steps back are still running
	 * (save.c's two plans): that wait is the back-pressure that bounds the
	 * saves in flight. (Waiting for SAVE_END instead cost a wake-up of this
	 * thread per step, 1-3 ms on a busy 2-core VM.) */
	if (_kvrt_pub_wait(&e->save_taken, e->save_begins, _WAIT_LIMIT_NS))
		kvrt_error("engine: the save actor did not take a step's saves in 60 s");
}

/* Wait on the CPU until every gather of the steps whose saves ended has
 * run. Not a stream wait: blocks freed by a preemption can be written by
 * the compute stream and by loads (the load stream, async loads) alike; a
 * CPU wait orders them all, and preemption is rare. */
static int save_barrier(struct kvrt_engine *e)
{
	if (!e->any_save)
		return 0;
	if (_kvrt_pub_wait(&e->save_pub, e->save_next, _WAIT_LIMIT_NS)) {
		kvrt_error("engine: the save actor did not issue its gathers in 60 s");
		return -ETIMEDOUT;
	}
	/* save_done was recorded behind the last ended step's gathers (one
	 * stream: the earlier ones ran before). */
	int rc = kvrt_event_wait(e->save_done, _WAIT_LIMIT_NS);
	if (rc)
		kvrt_error("engine: the save copies did not finish in 60 s (%d)", rc);
	return rc;
}

unsigned kvrt_engine_step_work(const struct kvrt_engine *e)
{
	if (!e->registered)
		return 0;
	const struct _kvrt_step *st = &e->step;
	unsigned w = st->nsync ? KVRT_STEP_LOADS : 0;
	if (st->save_posted && !st->save_ended)
		w |= KVRT_STEP_SAVES | (e->cfg.all_at_once ? 0 : KVRT_STEP_SAVE_LAYERS);
	return w;
}

int kvrt_engine_save_barrier(struct kvrt_engine *e)
{
	/* A step bound but not run yet is left alone: its saves read only its
	 * own requests' blocks, after its forward (and a bind that listed
	 * the preemptions ran this barrier already). */
	return e->registered ? save_barrier(e) : 0;
}

int kvrt_engine_bind_step(struct kvrt_engine *e, const struct kvrt_step_plan *p)
{
	if (!e->registered)
		return -ENODEV;
	finish_previous(e);
	if (p && p->preempted && save_barrier(e))
		kvrt_error("engine: gathers in flight may read blocks vLLM freed on preemption");
	struct _kvrt_step *st = &e->step;
	st->gen++;
	st->plan_step = p ? p->step : 0;
	st->nreq = 0;
	st->ntok = st->nblk = st->nkeys = 0;
	st->nsync = st->nasync = st->nsave = 0;
	st->load_posted = st->load_failed = st->save_posted = st->save_ended = st->save_broken = false;
	memset(st->layer_saved, 0, e->L);
	_KVRT_STAT_ADD(e, st_steps, 1);
	int ret = 0;
	uint32_t bs = e->set->geom.block_size, cs = e->cs;
	size_t nreq = p ? p->num_reqs : 0;
	if (nreq > st->reqs_cap) {
		size_t cap = st->reqs_cap;
		if (kvrt_grow((void **)&st->reqs, &cap, nreq, sizeof(*st->reqs)))
			return -ENOMEM;
		st->reqs_cap = (uint32_t)cap;
	}
	for (size_t i = 0; i < nreq; i++) {
		const struct kvrt_plan_req *r = &p->reqs[i];
		struct _kvrt_sreq q = {.req_id = _kvrt_owner_req(r->req_id), .ns_hash = r->ns_hash,
				       .flags = r->flags, .prompt_tokens = r->prompt_tokens};
		uint32_t need_tok = 0, need_end = 0; /* tokens to copy; tokens whose blocks to copy */
		if (r->load_end > r->load_start) {
			uint32_t hit = r->load_hit ? r->load_hit : r->load_end;
			bool refused = r->flags & KVRT_PLAN_REFUSED_LOAD;
			if (refused || hit < r->load_end || hit > r->num_tokens || !r->tokens ||
			    (r->load_end + bs - 1) / bs > r->num_blocks || !r->block_ids) {
				if (!refused) {
					kvrt_error("engine: request %016llx: load [%u, %u) of a %u-token hit does "
						   "not fit its %u tokens and %u blocks: reported as load errors",
						   (unsigned long long)r->req_id, r->load_start, r->load_end, hit,
						   r->num_tokens, r->num_blocks);
					ret = -EINVAL;
				}
				/* vLLM counts these tokens as computed: never leave
				 * its blocks unwritten without saying so. */
				if (r->block_ids)
					_kvrt_result_errors(e, r->block_ids, r->num_blocks, r->load_start,
								r->load_end);
				if (r->flags & KVRT_PLAN_ASYNC_LOAD)
					_kvrt_result_recv(e, q.req_id, true);
				_KVRT_STAT_ADD(e, st_load_failed_chunks,
					       (r->load_end - 1) / cs - r->load_start / cs + 1);
				continue;
			}
			q.load = true;
			q.load_start = r->load_start;
			q.load_end = r->load_end;
			q.load_hit = hit;
			need_tok = hit;
			need_end = r->load_end;
		}
		if (r->save_end > r->save_start) {
			save_chunks(e, r, &q);
			uint32_t end = q.save_full_end * cs + q.save_tail;
			if (end > q.save_first * cs) {
				if (end > r->num_tokens || !r->tokens || !r->block_ids ||
				    (end + bs - 1) / bs > r->num_blocks) {
					kvrt_warn("engine: request %016llx: save up to token %u beyond its %u "
						  "tokens / %u blocks: not saved",
						  (unsigned long long)r->req_id, end, r->num_tokens, r->num_blocks);
				} else {
					q.save = true;
					if (end > need_tok)
						need_tok = end;
					if (end > need_end)
						need_end = end;
				}
			}
		}
		if (!q.load && !q.save)
			continue;
		uint32_t nb = (need_end + bs - 1) / bs;
		uint32_t nk = q.load && r->keys ? r->num_keys : 0;
		if (kvrt_grow((void **)&st->tokens, &st->tok_cap, st->ntok + need_tok, sizeof(*st->tokens)) ||
		    kvrt_grow((void **)&st->blocks, &st->blk_cap, st->nblk + nb, sizeof(*st->blocks)) ||
		    kvrt_grow((void **)&st->keys, &st->keys_cap, st->nkeys + nk, sizeof(*st->keys))) {
			ret = -ENOMEM;
			break;
		}
		q.tok_off = (uint32_t)st->ntok;
		q.ntok = need_tok;
		memcpy(st->tokens + st->ntok, r->tokens, (size_t)need_tok * sizeof(uint32_t));
		st->ntok += need_tok;
		q.blk_off = (uint32_t)st->nblk;
		q.nblk = nb;
		memcpy(st->blocks + st->nblk, r->block_ids, (size_t)nb * sizeof(int32_t));
		st->nblk += nb;
		q.key_off = (uint32_t)st->nkeys;
		q.nkeys = nk;
		if (nk)
			memcpy(st->keys + st->nkeys, r->keys, (size_t)nk * sizeof(*r->keys));
		st->nkeys += nk;
		if (q.load) {
			if (q.flags & KVRT_PLAN_ASYNC_LOAD)
				st->nasync++;
			else
				st->nsync++;
		}
		if (q.save)
			st->nsave++;
		st->reqs[st->nreq++] = q;
	}
	(void)cs;
	if (st->nsave) {
		/* All at once, nothing is gathered before SAVE_END: it wakes
		 * the save actor for both (one wake-up a step, a system call
		 * here and a thread switch there, 5-40 us on a VM). */
		if (_kvrt_save_post_begin(e->save, st->gen, e->cfg.all_at_once) == 0) {
			e->save_begins++;
			st->save_posted = true;
			e->last_save_gen = st->gen;
			e->any_save = true;
			/* Only saves that will run hold their requests' blocks. */
			for (uint32_t i = 0; i < st->nreq; i++)
				if (st->reqs[i].save)
					ls_put(e, st->reqs[i].req_id, st->gen);
		} else {
			_KVRT_STAT_ADD(e, st_save_skipped_mailbox, st->nsave);
			st->nsave = 0;
		}
	}
	return ret;
}

/* --- worker side: load -------------------------------------------------------- */

static void fail_all_loads(struct kvrt_engine *e)
{
	struct _kvrt_step *st = &e->step;
	for (uint32_t i = 0; i < st->nreq; i++) {
		struct _kvrt_sreq *q = &st->reqs[i];
		if (!q->load)
			continue;
		_kvrt_result_errors(e, st->blocks + q->blk_off, q->nblk, q->load_start, q->load_end);
		if (q->flags & KVRT_PLAN_ASYNC_LOAD)
			_kvrt_result_recv(e, q->req_id, true);
	}
}

int kvrt_engine_start_load(struct kvrt_engine *e)
{
	if (!e->registered)
		return -ENODEV;
	struct _kvrt_step *st = &e->step;
	if (st->load_posted)
		return 0;
	st->load_posted = true;
	if (!st->nsync && !st->nasync)
		return 0;
	st->load_base = e->load_next;
	int rc = _kvrt_load_post_step(e->load, st->gen);
	if (rc) {
		kvrt_error("engine: could not hand step %u's loads to the load actor (%d): reported as "
			   "load errors",
			   st->gen, rc);
		st->load_failed = true;
		fail_all_loads(e);
		return rc;
	}
	e->load_next += e->L;
	if (e->cfg.all_at_once && st->nsync) {
		if ((rc = _kvrt_pub_wait(&e->load_pub, e->load_next, _WAIT_LIMIT_NS)))
			return rc;
		return kvrt_stream_wait_event(e->compute, e->load_ev[e->L - 1]);
	}
	return 0;
}

int kvrt_engine_wait_layer(struct kvrt_engine *e, uint32_t layer)
{
	if (!e->registered || layer >= e->set->num_inputs)
		return -EINVAL;
	struct _kvrt_step *st = &e->step;
	if (!st->nsync)
		return 0;
	if (!st->load_posted)
		kvrt_engine_start_load(e);
	if (st->load_failed || e->cfg.all_at_once)
		return 0;
	uint32_t d = e->set->input_layer[layer];
	int rc = _kvrt_pub_wait(&e->load_pub, st->load_base + d + 1, _WAIT_LIMIT_NS);
	if (rc) {
		kvrt_error("engine: layer %u of step %u was not issued in 60 s", d, st->gen);
		return rc;
	}
	return kvrt_stream_wait_event(e->compute, e->load_ev[d]);
}

/* --- worker side: save -------------------------------------------------------- */

int kvrt_engine_save_layer(struct kvrt_engine *e, uint32_t layer)
{
	if (!e->registered || layer >= e->set->num_inputs)
		return -EINVAL;
	struct _kvrt_step *st = &e->step;
	if (!st->save_posted || st->save_ended || st->save_broken || e->cfg.all_at_once)
		return 0;
	uint32_t d = e->set->input_layer[layer];
	if (st->layer_saved[d])
		return 0;
	st->layer_saved[d] = 1;
	if (kvrt_event_record(e->save_cev[d], e->compute) ||
	    !_kvrt_save_try_post_layer(e->save, st->gen, d)) {
		/* The step's chunks lack this layer: the save actor drops them
		 * at the end of the step. The step itself goes on. */
		st->save_broken = true;
		_KVRT_STAT_ADD(e, st_save_skipped_mailbox, 1);
	}
	return 0;
}

int kvrt_engine_wait_save(struct kvrt_engine *e)
{
	if (!e->registered)
		return 0;
	struct _kvrt_step *st = &e->step;
	if (!st->save_posted || st->save_ended)
		return 0;
	st->save_ended = true;
	/* All at once: every layer is gathered behind this point of the
	 * compute stream (save_cev[0] serves as the forward's end). */
	bool all = false;
	if (e->cfg.all_at_once && !st->save_broken) {
		int erc = kvrt_event_record(e->save_cev[0], e->compute);
		all = erc == 0;
		/* Without the mark nothing is gathered: the save actor drops the
		 * step's chunks (counted as abandoned) and frees their slabs. */
		if (erc)
			kvrt_error("engine: step %u: the forward's end could not be marked (%d): "
				   "its saves are dropped", st->gen, erc);
	}
	/* SAVE_END must get through (the mailbox has room for a step's
	 * messages): without it the step's slabs and its completion would be
	 * lost. A full mailbox means the actor is slow: keep trying. */
	int rc;
	uint64_t t0 = kvrt_now_ns();
	while ((rc = _kvrt_save_post_end(e->save, st->gen, all)) == -ETIMEDOUT && kvrt_now_ns() - t0 < _WAIT_LIMIT_NS)
		;
	if (rc) {
		kvrt_error("engine: could not end step %u's save (%d)", st->gen, rc);
		return rc;
	}
	st->save_target = ++e->save_next;
	/* No wait: the gathers read blocks vLLM keeps until get_finished
	 * reports the request (delay_free) or, on preemption, until the next
	 * bind's barrier. The next bind waits for the actor to take the step. */
	return 0;
}

/* --- worker side: results ------------------------------------------------------ */

static bool pending_add(struct kvrt_engine *e, uint64_t id)
{
	if (e->npending == e->pending_cap) {
		size_t cap = e->pending_cap;
		if (kvrt_grow((void **)&e->pending, &cap, e->npending + 1, sizeof(*e->pending)))
			return false;
		e->pending_cap = (uint32_t)cap;
	}
	e->pending[e->npending++] = id;
	return true;
}

/* Report id in out->sending if its saves are done and there is room. */
static bool try_report(struct kvrt_engine *e, uint64_t id, struct kvrt_finished *out)
{
	struct _kvrt_lastsave *s = ls_find(e, id);
	if (s && !save_done(e, s->gen))
		return false;
	if (out->num_sending >= out->sending_cap)
		return false;
	out->sending[out->num_sending++] = id;
	if (s) {
		s->req = 0;
		s->tomb = 1;
		e->ls_n--;
		e->ls_tombs++;
	}
	return true;
}

uint64_t kvrt_engine_saves_done(const struct kvrt_engine *e)
{
	return atomic_load_explicit(&((struct kvrt_engine *)e)->saves_done, memory_order_acquire);
}

int kvrt_engine_get_finished(struct kvrt_engine *e, const uint64_t *delayed, uint32_t n,
			     struct kvrt_finished *out)
{
	out->num_sending = out->num_recving = out->num_failed = 0;
	uint32_t j = 0;
	for (uint32_t i = 0; i < e->npending; i++)
		if (!try_report(e, e->pending[i], out))
			e->pending[j++] = e->pending[i];
	e->npending = j;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t id = _kvrt_owner_req(delayed[i]);
		if (!try_report(e, id, out) && !pending_add(e, id))
			kvrt_error("engine: no memory to hold a delayed request; it is reported now");
	}
	pthread_mutex_lock(&e->res_mu);
	size_t k = 0, m = 0;
	for (; k < e->nrecv; k++) {
		uint64_t v = e->recv[k];
		bool failed = v & _KVRT_OWNER_LOAD;
		if (out->num_recving >= out->recving_cap || (failed && out->num_failed >= out->failed_cap)) {
			e->recv[m++] = v;
			continue;
		}
		uint64_t id = v & ~_KVRT_OWNER_LOAD;
		out->recving[out->num_recving++] = id;
		if (failed)
			out->failed[out->num_failed++] = id;
	}
	e->nrecv = m;
	pthread_mutex_unlock(&e->res_mu);
	return 0;
}

size_t kvrt_engine_load_errors(struct kvrt_engine *e, int64_t *out, size_t cap)
{
	if (!e->registered)
		return 0;
	/* Errors of the step's sync loads are known once its layers are
	 * issued: wait for that (normally long done). */
	if (e->step.load_posted && !e->step.load_failed)
		(void)_kvrt_pub_wait(&e->load_pub, e->load_next, _WAIT_LIMIT_NS);
	pthread_mutex_lock(&e->res_mu);
	size_t n = e->nerrs < cap ? e->nerrs : cap;
	if (n) {
		memcpy(out, e->errs, n * sizeof(*out));
		memmove(e->errs, e->errs + n, (e->nerrs - n) * sizeof(*e->errs));
		e->nerrs -= n;
	}
	pthread_mutex_unlock(&e->res_mu);
	return n;
}

int kvrt_engine_flush(struct kvrt_engine *e)
{
	if (!e->registered)
		return 0;
	int rc = kvrt_engine_wait_save(e);
	if (rc)
		return rc;
	uint32_t gen = e->last_save_gen;
	if (e->any_save) {
		uint64_t t0 = kvrt_now_ns();
		while (!save_done(e, gen)) {
			if (kvrt_now_ns() - t0 > _WAIT_LIMIT_NS)
				return -ETIMEDOUT;
			struct timespec ts = {0, 50000};
			nanosleep(&ts, NULL);
		}
	}
	/* Loads in flight finish (their pins are released). */
	if ((rc = _kvrt_load_idle(e->load)))
		return rc;
	/* The save actor posted its admits before publishing save_completed;
	 * our sync enters the evict actor's mailbox after them. */
	return kvrt_evict_sync(e->ev);
}

/* --- any thread ---------------------------------------------------------------- */

size_t kvrt_engine_tier_events(struct kvrt_engine *e, struct kvrt_tier_event *out, size_t max,
			       uint64_t *dropped)
{
	struct kvrt_tier_events *te = e->ev ? kvrt_evict_tier_events(e->ev) : NULL;
	if (dropped)
		*dropped = kvrt_tier_events_dropped(te);
	return kvrt_tier_events_take(te, out, max);
}

int kvrt_engine_reset(struct kvrt_engine *e, uint64_t *dropped, uint64_t *kept)
{
	if (dropped)
		*dropped = 0;
	if (kept)
		*kept = 0;
	if (!e->ev)
		return 0;
	return kvrt_evict_clear(e->ev, dropped, kept);
}

#define GET(f) atomic_load_explicit(&e->f, memory_order_relaxed)

void kvrt_engine_stats(struct kvrt_engine *e, struct kvrt_engine_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->lookups = GET(st_lookups);
	out->lookup_tokens = GET(st_lookup_tokens);
	out->prefetches = GET(st_prefetches);
	out->steps = GET(st_steps);
	out->load_reqs = GET(st_load_reqs);
	out->load_chunks = GET(st_load_chunks);
	out->load_tokens = GET(st_load_tokens);
	out->load_failed_chunks = GET(st_load_failed_chunks);
	out->load_error_blocks = GET(st_load_error_blocks);
	out->async_done = GET(st_async_done);
	out->save_chunks = GET(st_save_chunks);
	out->save_dup = GET(st_save_dup);
	out->save_skipped_pool = GET(st_save_skipped_pool);
	out->save_skipped_mailbox = GET(st_save_skipped_mailbox);
	out->save_abandoned = GET(st_save_abandoned);
	out->checksum_failures = GET(st_checksum_failures);
	if (e->ev)
		kvrt_evict_stats(e->ev, &out->evict);
	out->pinned = kvrt_index_pinned(e->idx);
	out->remote_finds = GET(st_remote_finds);
	out->remote_find_late = GET(st_remote_find_late);
	out->remote_writes = out->evict.remote_writes;
	out->remote_dropped = out->evict.remote_write_dropped + out->evict.remote_write_failed;
	out->remote_reads = out->evict.remote_reads;
	out->remote_hits = out->evict.remote_hits;
	out->remote_misses = out->evict.remote_misses;
	out->remote_errors = out->evict.remote_errors;
}

struct kvrt_index *kvrt_engine_index(struct kvrt_engine *e)
{
	return e->idx;
}

struct kvrt_pool *kvrt_engine_pool(struct kvrt_engine *e)
{
	return e->pool;
}

struct kvrt_evict *kvrt_engine_evict(struct kvrt_engine *e)
{
	return e->ev;
}

const struct kvrt_kv_set *kvrt_engine_kv_set(const struct kvrt_engine *e)
{
	return e->set;
}
