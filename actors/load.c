/* actors/load.c: the load actor.
 *
 * Owns: its index reader; three device plans (two alternating for the
 * steps' synchronous loads, one for async loads) and their events; the
 * async load jobs; the load pins (owners with bit 63 set, one per step or
 * job) until the scatter that reads the pinned slabs has completed.
 *
 * A step (LOAD_STEP, posted by kvrt_engine_start_load): for each request
 * with a sync load, recompute its chunk keys from its tokens (and check them
 * against the scheduler's, when given), pin the chunks under the step's
 * owner, promote any that are not in the CPU tier (disk or remote: the evict
 * actor reads them into slabs) and wait for them, then
 * add its tokens to the plan. A request whose chunk is missing, fails to
 * promote or fails its checksum keeps the chunks before it; its blocks from
 * the first failed token on are reported as load errors and nothing is
 * scattered into them. Then, layer by layer in model order: one scatter of
 * that layer for every request, record the layer's event, publish it
 * (load_pub). A LOAD_DONE posted behind the last scatter releases the pins.
 *
 * Async loads become jobs: pinned like sync ones, promotions started without
 * waiting (a timer polls them), then one all-layer scatter per job on the
 * load stream; ASYNC_DONE behind it releases the pins and reports the
 * request finished-receiving (failed when any block is a load error).
 *
 * Threads: everything runs on the actor's thread except create/destroy
 * (engine's owner thread) and _kvrt_load_post_step (the worker).
 */
#include <errno.h>
#include <ev.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "actors/key.h"
#include "actors/pipeline.h"
#include "runtime/actor.h"
#include "runtime/log.h"

enum { _LOAD_STEP = 1, _LOAD_DONE, _ASYNC_DONE, _DRAIN };

/* One chunk to load for one request. */
struct _lchunk {
	struct kvrt_index_entry *e; /* pinned under the load's owner */
	struct kvrt_chunk_key key;  /* its key */
	uint32_t idx;               /* chunk index in the request */
	uint32_t n;                 /* tokens in the chunk */
	uint32_t first, count;      /* its tokens to load */
	bool promote;               /* not in the CPU tier when pinned */
	bool posted;                /* promotion requested (c will be signalled) */
	struct kvrt_completion c;   /* promotion's answer */
};

/* An async load. */
struct _job {
	struct _job *next;          /* list */
	uint64_t req_id;            /* request */
	uint64_t owner;             /* load pin owner */
	int32_t *blk;               /* copy of its block ids */
	uint32_t nblk;
	uint32_t load_start, load_end;
	uint32_t fail_tok;          /* first token not loaded (load_end: none) */
	uint32_t nch;               /* chunks */
	struct kvrt_stream_post post; /* ASYNC_DONE behind its scatter */
	struct _lchunk ch[];        /* [nch] */
};

/* A step whose scatter is in flight. */
struct _inflight {
	uint64_t owner;             /* its pins */
	struct kvrt_stream_post post; /* LOAD_DONE */
};

/* A hook call (test instrumentation). */
struct _hook {
	struct kvrt_engine *e;
	uint32_t layer;
};

struct kvrt_load {
	struct kvrt_engine *e;
	struct kvrt_actor *actor;
	struct kvrt_index_reader *r;   /* actor thread */
	struct kvrt_device_plan *plan[3]; /* [0], [1]: steps; [2]: async */
	uint32_t plan_cap[3];          /* rows each holds */
	struct kvrt_event *plan_ev[3]; /* after each plan's last scatter */
	uint32_t flip;                 /* step plan to use next */
	uint64_t seq;                  /* owner ids */
	struct kvrt_chunk_key *keys;   /* scratch */
	struct kvrt_index_hit *hits;   /* scratch */
	struct _lchunk *ch;            /* scratch */
	size_t cap;                    /* entries in each scratch above */
	int64_t *slots;                /* scratch: one chunk's slots */
	size_t slots_cap;
	struct _job *waiting;          /* promoting */
	struct _job *ready, **ready_tail; /* promoted, waiting for the async plan */
	struct _job *running;          /* its scatter in flight */
	uint32_t inflight;             /* LOAD_DONE messages to come */
	struct kvrt_completion *drain; /* DRAIN's reply, once idle */
	ev_timer tick;                 /* polls promotions */
	struct _hook *hooks;           /* [L] */
	uint32_t corrupt_left;         /* debug_corrupt_loads still to do */
};

static int ensure(struct kvrt_load *l, size_t n)
{
	if (n <= l->cap)
		return 0;
	size_t cap = l->cap ? l->cap : 256;
	while (cap < n)
		cap *= 2;
	void *a = realloc(l->keys, cap * sizeof(*l->keys));
	if (!a)
		return -ENOMEM;
	l->keys = a;
	if (!(a = realloc(l->hits, cap * sizeof(*l->hits))))
		return -ENOMEM;
	l->hits = a;
	if (!(a = realloc(l->ch, cap * sizeof(*l->ch))))
		return -ENOMEM;
	l->ch = a;
	l->cap = cap;
	return 0;
}

/* Plan k with room for rows tokens (recreated larger when needed; its
 * previous scatter has completed: the caller waited for plan_ev[k]). */
static int plan_ready(struct kvrt_load *l, uint32_t k, uint32_t rows)
{
	if (rows > l->plan_cap[k]) {
		uint32_t cap = l->plan_cap[k];
		while (cap < rows)
			cap *= 2;
		struct kvrt_device_plan *p;
		int rc = kvrt_device_plan_create(l->e->dev, l->e->set, cap, &p);
		if (rc)
			return rc;
		kvrt_device_plan_destroy(l->plan[k]);
		l->plan[k] = p;
		l->plan_cap[k] = cap;
		return 0;
	}
	return kvrt_device_plan_reset(l->plan[k]);
}

/* Pin request q's chunks under owner and describe them in l->ch.
 * Returns the chunks usable (in order, before the first failure), and sets
 * *fail_chunk to the first chunk index that cannot be loaded (c1: none). */
static uint32_t prepare(struct kvrt_load *l, const struct _kvrt_step *st, const struct _kvrt_sreq *q,
			uint64_t owner, uint32_t *fail_chunk)
{
	struct kvrt_engine *e = l->e;
	uint32_t cs = e->cs;
	uint32_t nfull = q->load_hit / cs, tail = q->load_hit % cs;
	uint32_t total = nfull + (tail != 0);
	uint32_t c0 = q->load_start / cs, c1 = (q->load_end + cs - 1) / cs;
	*fail_chunk = c0;
	if (c1 > total || ensure(l, total))
		return 0;
	_kvrt_keys(q->ns_hash, st->tokens + q->tok_off, cs, nfull, tail, l->keys);
	uint32_t fail = c1;
	const struct kvrt_chunk_key *want = st->keys + q->key_off;
	for (uint32_t i = 0; i < q->nkeys && i < total; i++) {
		if (!kvrt_chunk_key_eq(want[i], l->keys[i])) {
			kvrt_warn("load: request %016llx: chunk %u's key differs from the scheduler's: "
				  "not loaded",
				  (unsigned long long)q->req_id, i);
			fail = i < c0 ? c0 : i < fail ? i : fail;
			break;
		}
	}
	uint32_t n = fail > c0 ? fail - c0 : 0;
	size_t found = n ? kvrt_index_lookup(l->r, l->keys + c0, n, owner, KVRT_INDEX_PIN | KVRT_INDEX_TOUCH,
					     l->hits)
			 : 0;
	if (found < n)
		fail = c0 + (uint32_t)found;
	uint32_t used = 0;
	for (uint32_t i = c0; i < fail; i++) {
		struct _lchunk *c = &l->ch[used];
		const struct kvrt_index_hit *h = &l->hits[i - c0];
		uint32_t t0 = i * cs;
		c->e = h->entry;
		c->key = l->keys[i];
		c->idx = i;
		c->n = i < nfull ? cs : tail;
		if (c->e->num_tokens != c->n) {
			fail = i;
			break;
		}
		uint32_t from = q->load_start > t0 ? q->load_start : t0;
		uint32_t to = q->load_end < t0 + c->n ? q->load_end : t0 + c->n;
		if (e->set->whole_blocks) {
			/* vLLM's blocks are copied whole (kernels/layout.h): out
			 * to block edges. vLLM recomputes the tokens past
			 * load_end over the extra ones before reading them;
			 * tokens before a mid-block load_start (never vLLM's
			 * block-aligned local hits) get the same tokens' KV.
			 * Chunks are whole blocks here (no tails are saved). */
			uint32_t bs = e->set->geom.block_size;
			if (c->n % bs) {
				fail = i;
				break;
			}
			from = t0 + (from - t0) / bs * bs;
			to = t0 + (to - t0 + bs - 1) / bs * bs;
		}
		c->first = from - t0;
		c->count = to - from;
		c->promote = h->tier != KVRT_TIER_CPU;
		c->posted = false;
		used++;
	}
	/* The load holds its own pins now: the lookup's promise is kept. */
	kvrt_index_unpin_owner(e->idx, q->req_id);
	_KVRT_STAT_ADD(e, st_load_reqs, 1);
	*fail_chunk = fail;
	return used;
}

/* Ask the evict actor for the chunks not in the CPU tier. */
static void promote_start(struct kvrt_load *l, struct _lchunk *ch, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (!ch[i].promote)
			continue;
		kvrt_completion_init(&ch[i].c);
		ch[i].posted = kvrt_evict_promote(l->e->ev, ch[i].key, &ch[i].c) == 0;
	}
}

static bool promote_done(const struct _lchunk *ch, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (ch[i].posted && !kvrt_completion_done((struct kvrt_completion *)&ch[i].c))
			return false;
	return true;
}

/* Chunks usable after promotion: the first failed one cuts the rest. */
static uint32_t promote_result(const struct _lchunk *ch, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (ch[i].promote && (!ch[i].posted || ch[i].c.status != 0)) {
			char hex[33];
			kvrt_key_format(ch[i].key, hex);
			kvrt_warn("load: chunk %s could not be brought into the CPU tier (%d): not loaded", hex,
				  ch[i].posted ? ch[i].c.status : -EAGAIN);
			return i;
		}
	}
	return n;
}

/* Test instrumentation (debug_corrupt_loads / debug_perturb_loads): the
 * chunk's CPU copy becomes a constant pattern, finite in every float
 * format (0x3f bytes: 0.75 in fp32, fp16 and bf16), unlike its KV. */
static void debug_overwrite(void *addr, uint64_t bytes)
{
	memset(addr, 0x3f, bytes);
}

/* Add chunks ch[0..n) of a request to plan p. Returns how many were added
 * (the first that cannot be stops it). A chunk failing its checksum is
 * discarded (the evict actor drops it from the index and the disk tier;
 * this thread waits until it has, before the load is reported): later
 * lookups miss it, and the recompute's save caches a good copy instead of
 * finding the bad one still indexed. */
static uint32_t add_chunks(struct kvrt_load *l, struct kvrt_device_plan *p, const struct _lchunk *ch,
			   uint32_t n, const int32_t *blk, uint32_t nblk)
{
	struct kvrt_engine *e = l->e;
	uint32_t bs = e->set->geom.block_size;
	for (uint32_t i = 0; i < n; i++) {
		const struct _lchunk *c = &ch[i];
		/* acquire: a promotion's slab store is visible once we see CPU. */
		uint64_t s = atomic_load_explicit(&c->e->state, memory_order_acquire);
		if (kvrt_index_state_tier(s) != KVRT_TIER_CPU)
			return i;
		uint32_t slab = atomic_load_explicit(&c->e->slab, memory_order_relaxed);
		void *addr = kvrt_pool_addr(e->pool, slab);
		if (KVRT_UNLIKELY(l->corrupt_left)) {
			l->corrupt_left--;
			debug_overwrite(addr, c->e->bytes);
		}
		if (KVRT_UNLIKELY(e->cfg.debug_perturb_loads)) {
			debug_overwrite(addr, c->e->bytes);
		} else if (e->cfg.verify_checksums && c->e->checksum &&
			   XXH3_64bits(addr, c->e->bytes) != c->e->checksum) {
			char hex[33];
			kvrt_key_format(c->key, hex);
			int drc = kvrt_evict_discard(e->ev, c->key);
			kvrt_error("load: chunk %s fails its checksum: not loaded, %s", hex,
				   drc ? "dropped at its next failure (evict actor not answering)"
				       : "dropped from the cache (the recompute saves it again)");
			_KVRT_STAT_ADD(e, st_checksum_failures, 1);
			return i;
		}
		void *dptr;
		if (kvrt_device_map_host(e->dev, addr, &dptr))
			return i;
		if (c->count > l->slots_cap) {
			int64_t *s2 = realloc(l->slots, c->count * sizeof(*s2));
			if (!s2)
				return i;
			l->slots = s2;
			l->slots_cap = c->count;
		}
		uint32_t t0 = c->idx * e->cs + c->first;
		for (uint32_t t = 0; t < c->count; t++)
			l->slots[t] = _kvrt_slot(blk, nblk, bs, t0 + t);
		if (kvrt_device_plan_add(p, dptr, c->n, c->first, c->count, l->slots))
			return i;
		_KVRT_STAT_ADD(e, st_load_chunks, 1);
		_KVRT_STAT_ADD(e, st_load_tokens, c->count);
	}
	return n;
}

/* Tokens of ch[0..n) that are loaded: the first failed chunk's start. */
static uint32_t fail_token(const struct _kvrt_sreq *q, uint32_t cs, uint32_t chunk)
{
	uint32_t t = chunk * cs;
	if (t < q->load_start)
		t = q->load_start;
	return t < q->load_end ? t : q->load_end;
}

static void maybe_drained(struct kvrt_load *l)
{
	if (l->drain && !l->inflight && !l->waiting && !l->ready && !l->running) {
		kvrt_completion_signal(l->drain, 0);
		l->drain = NULL;
	}
}

/* --- async jobs ---------------------------------------------------------------- */

static void job_finish(struct kvrt_load *l, struct _job *j)
{
	struct kvrt_engine *e = l->e;
	uint32_t failed_chunks = 0;
	if (j->fail_tok < j->load_end) {
		_kvrt_result_errors(e, j->blk, j->nblk, j->fail_tok, j->load_end);
		failed_chunks = 1;
	}
	_KVRT_STAT_ADD(e, st_load_failed_chunks, failed_chunks);
	kvrt_index_unpin_owner(e->idx, j->owner);
	_kvrt_result_recv(e, j->req_id, j->fail_tok < j->load_end);
	free(j->blk);
	free(j);
}

/* Issue the next ready job's scatter when the async plan is free. */
static void job_issue(struct kvrt_load *l)
{
	struct kvrt_engine *e = l->e;
	while (!l->running && l->ready) {
		struct _job *j = l->ready;
		l->ready = j->next;
		if (!l->ready)
			l->ready_tail = &l->ready;
		uint32_t rows = 0;
		for (uint32_t i = 0; i < j->nch; i++)
			rows += j->ch[i].count;
		uint32_t ok = 0;
		int rc = rows ? plan_ready(l, 2, rows) : -ENODATA;
		if (rc == 0)
			ok = add_chunks(l, l->plan[2], j->ch, j->nch, j->blk, j->nblk);
		if (ok < j->nch) {
			struct _kvrt_sreq q = {.load_start = j->load_start, .load_end = j->load_end};
			uint32_t t = j->nch ? fail_token(&q, e->cs, j->ch[ok].idx) : j->load_end;
			if (t < j->fail_tok)
				j->fail_tok = t;
		}
		if (ok == 0 || kvrt_device_plan_upload(l->plan[2], e->lstream) ||
		    kvrt_device_scatter(e->lstream, e->dl, l->plan[2], 0, e->L) ||
		    kvrt_event_record(l->plan_ev[2], e->lstream)) {
			if (ok) {
				/* A device error: nothing of it counts as loaded. */
				kvrt_event_wait(l->plan_ev[2], UINT64_MAX);
				j->fail_tok = j->load_start;
			}
			job_finish(l, j);
			continue;
		}
		j->post = (struct kvrt_stream_post){.actor = l->actor, .msg = {.type = _ASYNC_DONE}};
		j->post.msg.arg.ptr[0] = j;
		l->running = j;
		if (kvrt_stream_post(e->lstream, &j->post)) {
			kvrt_event_wait(l->plan_ev[2], UINT64_MAX);
			l->running = NULL;
			job_finish(l, j);
		}
	}
}

/* Move jobs whose promotions are all answered to the ready queue. */
static void job_poll(struct kvrt_load *l)
{
	struct _job **pp = &l->waiting;
	while (*pp) {
		struct _job *j = *pp;
		if (!promote_done(j->ch, j->nch)) {
			pp = &j->next;
			continue;
		}
		*pp = j->next;
		uint32_t ok = promote_result(j->ch, j->nch);
		if (ok < j->nch) {
			struct _kvrt_sreq q = {.load_start = j->load_start, .load_end = j->load_end};
			uint32_t t = fail_token(&q, l->e->cs, j->ch[ok].idx);
			if (t < j->fail_tok)
				j->fail_tok = t;
			j->nch = ok;
		}
		j->next = NULL;
		*l->ready_tail = j;
		l->ready_tail = &j->next;
	}
	job_issue(l);
	if (!l->waiting && ev_is_active(&l->tick))
		ev_timer_stop(kvrt_actor_loop(l->actor), &l->tick);
	maybe_drained(l);
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop;
	(void)revents;
	job_poll(w->data);
}

static void job_create(struct kvrt_load *l, const struct _kvrt_step *st, const struct _kvrt_sreq *q)
{
	struct kvrt_engine *e = l->e;
	uint64_t owner = _KVRT_OWNER_LOAD | ++l->seq;
	uint32_t fail_chunk;
	uint32_t n = prepare(l, st, q, owner, &fail_chunk);
	struct _job *j = malloc(sizeof(*j) + n * sizeof(j->ch[0]));
	int32_t *blk = malloc((q->nblk ? q->nblk : 1) * sizeof(*blk));
	if (!j || !blk) {
		free(j);
		free(blk);
		kvrt_index_unpin_owner(e->idx, owner);
		_kvrt_result_errors(e, st->blocks + q->blk_off, q->nblk, q->load_start, q->load_end);
		_kvrt_result_recv(e, q->req_id, true);
		return;
	}
	memcpy(blk, st->blocks + q->blk_off, q->nblk * sizeof(*blk));
	*j = (struct _job){.req_id = q->req_id, .owner = owner, .blk = blk, .nblk = q->nblk,
			   .load_start = q->load_start, .load_end = q->load_end,
			   .fail_tok = fail_token(q, e->cs, fail_chunk), .nch = n};
	memcpy(j->ch, l->ch, n * sizeof(j->ch[0]));
	promote_start(l, j->ch, n);
	j->next = l->waiting;
	l->waiting = j;
	if (!ev_is_active(&l->tick))
		ev_timer_start(kvrt_actor_loop(l->actor), &l->tick);
}

/* --- a step's sync loads ---------------------------------------------------------- */

static void hook_tramp(void *arg)
{
	struct _hook *h = arg;
	h->e->cfg.on_layer_loaded(h->e->cfg.hook_ctx, h->layer);
}

static void on_step(struct kvrt_load *l, uint32_t gen)
{
	struct kvrt_engine *e = l->e;
	const struct _kvrt_step *st = &e->step;
	KVRT_ASSERT(st->gen == gen);
	uint32_t k = l->flip;
	l->flip ^= 1;
	bool any = false;
	uint64_t owner = _KVRT_OWNER_LOAD | ++l->seq;
	if (st->nsync) {
		uint32_t rows = 0;
		for (uint32_t i = 0; i < st->nreq; i++)
			if (st->reqs[i].load && !(st->reqs[i].flags & KVRT_PLAN_ASYNC_LOAD))
				rows += st->reqs[i].load_end - st->reqs[i].load_start;
		/* The scatter that last read plan k (two steps ago) must be done
		 * before its rows are rewritten; normally it long is. */
		kvrt_event_wait(l->plan_ev[k], UINT64_MAX);
		bool plan_ok = plan_ready(l, k, rows) == 0;
		for (uint32_t i = 0; i < st->nreq; i++) {
			const struct _kvrt_sreq *q = &st->reqs[i];
			if (!q->load || (q->flags & KVRT_PLAN_ASYNC_LOAD))
				continue;
			uint32_t fail_chunk;
			uint32_t n = prepare(l, st, q, owner, &fail_chunk);
			promote_start(l, l->ch, n);
			for (uint32_t c = 0; c < n; c++)
				if (l->ch[c].posted)
					kvrt_completion_wait(&l->ch[c].c, UINT64_MAX);
			uint32_t ok = promote_result(l->ch, n);
			if (plan_ok)
				ok = add_chunks(l, l->plan[k], l->ch, ok, st->blocks + q->blk_off, q->nblk);
			else
				ok = 0;
			any |= ok > 0;
			uint32_t fail_tok = ok < n ? fail_token(q, e->cs, l->ch[ok].idx)
						   : fail_token(q, e->cs, fail_chunk);
			if (fail_tok < q->load_end) {
				_KVRT_STAT_ADD(e, st_load_failed_chunks, 1);
				_kvrt_result_errors(e, st->blocks + q->blk_off, q->nblk, fail_tok, q->load_end);
			}
		}
	}
	for (uint32_t i = 0; i < st->nreq; i++) {
		const struct _kvrt_sreq *q = &st->reqs[i];
		if (q->load && (q->flags & KVRT_PLAN_ASYNC_LOAD))
			job_create(l, st, q);
	}
	if (!st->nsync) {
		_kvrt_pub_add(&e->load_pub, e->L);
		return;
	}
	bool dev_ok = !any || kvrt_device_plan_upload(l->plan[k], e->lstream) == 0;
	for (uint32_t d = 0; d < e->L; d++) {
		if (any && dev_ok && kvrt_device_scatter(e->lstream, e->dl, l->plan[k], d, 1))
			dev_ok = false;
		if (any && !dev_ok && d == 0)
			kvrt_error("load: the device refused step %u's scatter", gen);
		/* The hook runs before the record: a wait that ends on the
		 * layer's event has seen the hook (tests check that order). */
		if (e->cfg.on_layer_loaded)
			kvrt_stream_host_fn(e->lstream, hook_tramp, &l->hooks[d]);
		kvrt_event_record(e->load_ev[d], e->lstream);
		/* Layer d's event exists: wait_for_layer_load(d) may go. */
		_kvrt_pub_add(&e->load_pub, 1);
	}
	kvrt_event_record(l->plan_ev[k], e->lstream);
	if (any && !dev_ok) {
		/* Whatever was scattered is not to be trusted: every planned
		 * block of the step is a load error. */
		for (uint32_t i = 0; i < st->nreq; i++) {
			const struct _kvrt_sreq *q = &st->reqs[i];
			if (q->load && !(q->flags & KVRT_PLAN_ASYNC_LOAD))
				_kvrt_result_errors(e, st->blocks + q->blk_off, q->nblk, q->load_start,
							q->load_end);
		}
	}
	struct _inflight *f = malloc(sizeof(*f));
	if (f) {
		*f = (struct _inflight){.owner = owner,
					.post = {.actor = l->actor, .msg = {.type = _LOAD_DONE}}};
		f->post.msg.arg.ptr[0] = f;
		if (kvrt_stream_post(e->lstream, &f->post) == 0) {
			l->inflight++;
			return;
		}
		free(f);
	}
	/* No way to be told: wait here, then release. */
	kvrt_event_wait(l->plan_ev[k], UINT64_MAX);
	kvrt_index_unpin_owner(e->idx, owner);
}

static void handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_load *l = kvrt_actor_data(a);
	switch (m->type) {
	case _LOAD_STEP:
		on_step(l, m->arg32);
		break;
	case _LOAD_DONE: {
		struct _inflight *f = m->arg.ptr[0];
		/* The scatter read the slabs: they may go. */
		kvrt_index_unpin_owner(l->e->idx, f->owner);
		free(f);
		l->inflight--;
		break;
	}
	case _ASYNC_DONE: {
		struct _job *j = m->arg.ptr[0];
		KVRT_ASSERT(j == l->running);
		l->running = NULL;
		job_finish(l, j);
		job_issue(l);
		break;
	}
	case _DRAIN:
		l->drain = m->reply;
		m->reply = NULL;
		job_poll(l);
		break;
	}
	maybe_drained(l);
	if (m->reply)
		kvrt_completion_signal(m->reply, 0);
}

static int start(struct kvrt_actor *a)
{
	struct kvrt_load *l = kvrt_actor_data(a);
	l->r = kvrt_index_reader_open(l->e->idx);
	if (!l->r)
		return -ENOMEM;
	ev_timer_init(&l->tick, tick_cb, 0.0002, 0.0002);
	l->tick.data = l;
	return 0;
}

static void stop(struct kvrt_actor *a)
{
	struct kvrt_load *l = kvrt_actor_data(a);
	ev_timer_stop(kvrt_actor_loop(a), &l->tick);
	kvrt_index_reader_close(l->r);
	l->r = NULL;
}

static const char *msg_name(uint32_t type)
{
	switch (type) {
	case _LOAD_STEP: return "load_step";
	case _LOAD_DONE: return "load_done";
	case _ASYNC_DONE: return "async_done";
	case _DRAIN: return "drain";
	default: return "?";
	}
}

static const struct kvrt_actor_ops load_ops = {
	.handle = handle, .start = start, .stop = stop, .msg_name = msg_name};

static void free_load(struct kvrt_load *l)
{
	for (int k = 0; k < 3; k++) {
		kvrt_device_plan_destroy(l->plan[k]);
		kvrt_event_destroy(l->plan_ev[k]);
	}
	free(l->keys);
	free(l->hits);
	free(l->ch);
	free(l->slots);
	free(l->hooks);
	free(l);
}

int _kvrt_load_create(struct kvrt_engine *e, struct kvrt_load **out)
{
	struct kvrt_load *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->e = e;
	l->corrupt_left = e->cfg.debug_corrupt_loads;
	l->ready_tail = &l->ready;
	int rc = -ENOMEM;
	l->hooks = calloc(e->L, sizeof(*l->hooks));
	if (!l->hooks)
		goto err;
	for (uint32_t d = 0; d < e->L; d++)
		l->hooks[d] = (struct _hook){.e = e, .layer = d};
	for (int k = 0; k < 3; k++) {
		l->plan_cap[k] = k < 2 ? e->cfg.step_tokens : e->cs * 4;
		if ((rc = kvrt_device_plan_create(e->dev, e->set, l->plan_cap[k], &l->plan[k])) ||
		    (rc = kvrt_event_create(e->dev, &l->plan_ev[k])))
			goto err;
	}
	uint32_t mb = e->cfg.mailbox_size ? e->cfg.mailbox_size : 64;
	rc = kvrt_actor_create(&l->actor, &(struct kvrt_actor_config){
						      .name = "load", .mailbox_size = mb, .ops = &load_ops, .data = l});
	if (rc)
		goto err;
	*out = l;
	return 0;
err:
	free_load(l);
	return rc;
}

void _kvrt_load_destroy(struct kvrt_load *l)
{
	if (!l)
		return;
	/* Let every job and step in flight finish: their promotions need the
	 * evict actor, their stream callbacks post to us. */
	struct kvrt_msg m = {.type = _DRAIN};
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	if (kvrt_actor_call(l->actor, &m, &c, 5000000000ull))
		kvrt_error("load: could not drain the load actor before stopping it");
	/* A stream callback that posted our last message may still be inside
	 * the post (waking us): let the stream finish it before we go. */
	kvrt_stream_sync(l->e->lstream);
	kvrt_actor_destroy(l->actor);
	free_load(l);
}

int _kvrt_load_idle(struct kvrt_load *l)
{
	struct kvrt_msg m = {.type = _DRAIN};
	struct kvrt_completion c;
	kvrt_completion_init(&c);
	return kvrt_actor_call(l->actor, &m, &c, 5000000000ull);
}

int _kvrt_load_post_step(struct kvrt_load *l, uint32_t gen)
{
	struct kvrt_msg m = {.type = _LOAD_STEP, .arg32 = gen};
	return kvrt_actor_post(l->actor, &m, 1000000000ull);
}
