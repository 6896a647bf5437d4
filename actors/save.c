/* actors/save.c: the save actor.
 *
 * Owns: its index reader; two alternating device plans (gathers) and their
 * events; the current step's chunks (slabs taken from the pool, being
 * filled); a stash of slabs taken but not used (handed back at stop); the
 * records of steps whose gathers are in flight.
 *
 * A step: SAVE_BEGIN (posted by bind_step; all at once, quietly: SAVE_END
 * wakes the actor for both, so a step costs the forward one wake-up) picks
 * the chunks to save (engine.h: full chunks completed this step, the
 * prompt's tail, decode chunks by config), skips those already cached,
 * takes a slab for each (the hand-off ring dry: the evict actor is asked
 * to free what the step wants, evicting if it must; still none: the rest
 * of that request is skipped and counted), uploads the plan and
 * publishes save_taken (the next bind waits for that before it rewrites
 * e->step). Layerwise, SAVE_LAYER(l) (posted by save_layer after recording
 * the compute stream's progress in save_cev[l]; posted quietly: it does
 * not wake the actor, SAVE_END does) makes the save stream wait for that
 * point and gathers layer l of every chunk. All at once (the default),
 * save_layer posts nothing: SAVE_END gathers every layer in one launch
 * behind the forward's end, which wait_save records in save_cev[0] (one
 * event and one wake-up per step instead of one per layer, and saves work
 * when vLLM's per-layer hooks do not run: full CUDA graphs). SAVE_END
 * (posted by wait_save, which does not wait for it) records save_done behind the gathers, publishes
 * save_pub (a preemption's barrier waits for it, then on save_done) and
 * posts SAVE_DONE behind them on the save stream: once
 * the gathers completed, complete chunks go to the evict actor for
 * admission; chunks missing a layer are dropped. save_completed then says
 * the step's gathers are done (get_finished's delayed-free requests).
 *
 * Threads: handlers on the actor's thread; create/destroy on the engine's
 * owner thread; the _kvrt_save_*post* functions on the worker.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <xxhash.h>

#include "actors/pipeline.h"
#include "runtime/actor.h"
#include "runtime/log.h"

enum { _SAVE_BEGIN = 1, _SAVE_LAYER, _SAVE_END, _SAVE_DONE };

/* A chunk being saved. */
struct _schunk {
	struct kvrt_chunk_key key; /* its key */
	uint32_t slab;             /* pool slab being filled */
	uint32_t n;                /* tokens */
};

/* A step whose gathers are in flight. */
struct _sstep {
	uint32_t gen;                 /* the step */
	uint64_t plan_step;           /* its plan's step number */
	bool complete;                /* every layer was gathered */
	uint32_t n;                   /* chunks */
	struct kvrt_stream_post post; /* SAVE_DONE */
	struct _schunk ch[];          /* [n] */
};

struct kvrt_save {
	struct kvrt_engine *e;
	struct kvrt_actor *actor;
	struct kvrt_index_reader *r;      /* actor thread */
	struct kvrt_device_plan *plan[2]; /* alternating per step */
	uint32_t plan_cap[2];             /* rows */
	struct kvrt_event *plan_ev[2];    /* after each plan's last gather */
	uint32_t flip;                    /* plan of the next step */
	uint32_t k;                       /* plan of the current step */
	uint32_t gen;                     /* the current step */
	uint64_t plan_step;               /* its plan's step number */
	bool active;                      /* between BEGIN and END */
	bool failed;                      /* a gather was refused */
	uint32_t gathered;                /* layers gathered this step */
	struct _schunk *ch;               /* the current step's chunks */
	size_t n, cap;
	struct kvrt_chunk_key *keys;      /* scratch */
	size_t keys_cap;
	int64_t *slots;                   /* scratch: one chunk's slots */
	size_t slots_cap;
	uint32_t *stash;                  /* slabs taken, unused */
	uint32_t nstash, stash_cap;
	uint32_t later;                   /* chunks of the step's requests not planned yet */
	uint32_t takes;                   /* slabs it took from the ring */
	uint32_t asked_at;                /* takes when it last asked for room */
	struct kvrt_completion room;      /* the evict actor's answer */
	bool room_pending;                /* asked, answer not seen yet */
};

/* A slab for one of the step's chunks; want: the chunks the step may still
 * take, this one included. */
static bool take(struct kvrt_save *s, uint32_t *slab, uint32_t want)
{
	if (s->nstash) {
		*slab = s->stash[--s->nstash];
		return true;
	}
	if (kvrt_pool_take(s->e->pool, slab)) {
		s->takes++;
		return true;
	}
	/* The ring ran dry (it holds at most half the pool, refilled as
	 * chunks are admitted): the evict actor frees what the rest of the
	 * step wants, evicting if it must, and refills it. The forward does
	 * not wait for this, but the next bind waits for this step's
	 * SAVE_BEGIN, hence the bound below. Asked again only after the last
	 * answer helped: pins and reads can hold the whole pool. */
	if (s->asked_at == s->takes)
		return false;
	if (s->room_pending && !kvrt_completion_done(&s->room))
		return false; /* an earlier answer is late: the evict actor is busy */
	s->asked_at = s->takes;
	if (kvrt_evict_ask_room(s->e->ev, want, &s->room))
		return false;
	s->room_pending = true;
	/* Bounded (room_wait_us): a busy evict actor must not hold the save
	 * actor, which the next bind may wait for. */
	uint64_t wait = s->e->cfg.room_wait_us ? s->e->cfg.room_wait_us : 5000;
	if (kvrt_completion_wait(&s->room, wait * 1000)) {
		/* Late: seen done at the next ask or at stop. One warning per
		 * late answer (no new ask until it came). */
		kvrt_warn("save: step %u: the evict actor did not free slabs within %llu us: "
			  "the step's other chunks are not saved (counted in skipped_saves)",
			  s->gen, (unsigned long long)wait);
		return false;
	}
	s->room_pending = false;
	if (!kvrt_pool_take(s->e->pool, slab))
		return false;
	s->takes++;
	return true;
}

static void stash(struct kvrt_save *s, uint32_t slab)
{
	/* The stash holds every slab of the pool at most: it never overflows. */
	KVRT_ASSERT(s->nstash < s->stash_cap);
	s->stash[s->nstash++] = slab;
}

static bool in_step(const struct kvrt_save *s, struct kvrt_chunk_key k)
{
	for (size_t i = 0; i < s->n; i++)
		if (kvrt_chunk_key_eq(s->ch[i].key, k))
			return true;
	return false;
}

static int plan_ready(struct kvrt_save *s, uint32_t k, uint32_t rows)
{
	if (rows > s->plan_cap[k]) {
		uint32_t cap = s->plan_cap[k];
		while (cap < rows)
			cap *= 2;
		struct kvrt_device_plan *p;
		int rc = kvrt_device_plan_create(s->e->dev, s->e->set, cap, &p);
		if (rc)
			return rc;
		kvrt_device_plan_destroy(s->plan[k]);
		s->plan[k] = p;
		s->plan_cap[k] = cap;
		return 0;
	}
	return kvrt_device_plan_reset(s->plan[k]);
}

/* Chunks request q saves (before dedup). */
static uint32_t save_chunks(const struct _kvrt_sreq *q)
{
	return q->save_full_end + (q->save_tail != 0) - q->save_first;
}

/* Plan the chunks of request q; what cannot be planned is counted. */
static void plan_req(struct kvrt_save *s, const struct _kvrt_step *st, const struct _kvrt_sreq *q)
{
	struct kvrt_engine *e = s->e;
	uint32_t cs = e->cs, bs = e->set->geom.block_size;
	uint32_t nkeys = q->save_full_end + (q->save_tail != 0);
	if (kvrt_grow((void **)&s->keys, &s->keys_cap, nkeys, sizeof(*s->keys)) ||
	    kvrt_grow((void **)&s->ch, &s->cap, s->n + (nkeys - q->save_first), sizeof(*s->ch)) ||
	    kvrt_grow((void **)&s->slots, &s->slots_cap, cs, sizeof(*s->slots))) {
		_KVRT_STAT_ADD(e, st_save_abandoned, nkeys - q->save_first);
		return;
	}
	_kvrt_keys(q->ns_hash, st->tokens + q->tok_off, cs, q->save_full_end, q->save_tail, s->keys);
	const int32_t *blk = st->blocks + q->blk_off;
	for (uint32_t i = q->save_first; i < nkeys; i++) {
		struct kvrt_chunk_key key = s->keys[i];
		uint32_t n = i < q->save_full_end ? cs : q->save_tail;
		if (kvrt_index_lookup(s->r, &key, 1, 0, 0, NULL) || in_step(s, key)) {
			_KVRT_STAT_ADD(e, st_save_dup, 1);
			continue;
		}
		uint32_t slab;
		if (!take(s, &slab, nkeys - i + s->later)) {
			/* Later chunks without this one are unreachable (lookups
			 * stop at the first missing chunk): skip them too. */
			_KVRT_STAT_ADD(e, st_save_skipped_pool, nkeys - i);
			return;
		}
		void *dptr;
		bool ok = kvrt_device_map_host(e->dev, kvrt_pool_addr(e->pool, slab), &dptr) == 0;
		for (uint32_t t = 0; ok && t < n; t++)
			ok = (s->slots[t] = _kvrt_slot(blk, q->nblk, bs, i * cs + t)) >= 0;
		if (!ok || kvrt_device_plan_add(s->plan[s->k], dptr, n, 0, n, s->slots)) {
			stash(s, slab);
			_KVRT_STAT_ADD(e, st_save_abandoned, nkeys - i);
			return;
		}
		s->ch[s->n++] = (struct _schunk){.key = key, .slab = slab, .n = n};
	}
}

/* Step gen's gathers, and every earlier step's, are done: get_finished
 * (acquire) may free their requests' blocks, and the scheduler may skip
 * delay_free for requests that last saved in it (kvrt_engine_saves_done). */
static void completed(struct kvrt_engine *e, uint32_t gen, uint64_t plan_step)
{
	if (plan_step) {
		atomic_store_explicit(&e->saves_done, plan_step, memory_order_release);
		if (e->cfg.saves_done_pub)
			atomic_store_explicit(e->cfg.saves_done_pub, plan_step, memory_order_release);
	}
	atomic_store_explicit(&e->save_completed, gen, memory_order_release);
}

static void on_begin(struct kvrt_save *s, uint32_t gen)
{
	struct kvrt_engine *e = s->e;
	const struct _kvrt_step *st = &e->step;
	KVRT_ASSERT(st->gen == gen);
	s->k = s->flip;
	s->flip ^= 1;
	s->gen = gen;
	s->plan_step = st->plan_step;
	s->n = 0;
	s->gathered = 0;
	s->failed = false;
	s->active = true;
	uint32_t rows = 0;
	s->later = 0;
	s->takes = 0;
	s->asked_at = UINT32_MAX;
	for (uint32_t i = 0; i < st->nreq; i++) {
		const struct _kvrt_sreq *q = &st->reqs[i];
		if (q->save) {
			rows += (q->save_full_end - q->save_first) * e->cs + q->save_tail;
			s->later += save_chunks(q);
		}
	}
	/* The gathers that last read plan k (two steps ago) must be done. */
	kvrt_event_wait(s->plan_ev[s->k], UINT64_MAX);
	if (plan_ready(s, s->k, rows)) {
		kvrt_error("save: no plan for step %u's %u tokens: not saved", gen, rows);
		s->failed = true;
		return;
	}
	for (uint32_t i = 0; i < st->nreq; i++)
		if (st->reqs[i].save) {
			s->later -= save_chunks(&st->reqs[i]);
			plan_req(s, st, &st->reqs[i]);
		}
	if (s->n && kvrt_device_plan_upload(s->plan[s->k], e->sstream))
		s->failed = true;
}

static void on_layer(struct kvrt_save *s, uint32_t gen, uint32_t d)
{
	struct kvrt_engine *e = s->e;
	if (!s->active || gen != s->gen || !s->n || s->failed || d >= e->L)
		return;
	if (kvrt_stream_wait_event(e->sstream, e->save_cev[d]) ||
	    kvrt_device_gather(e->sstream, e->dl, s->plan[s->k], d, 1)) {
		s->failed = true;
		return;
	}
	s->gathered++;
}

static void on_done(struct kvrt_save *s, struct _sstep *t)
{
	struct kvrt_engine *e = s->e;
	for (uint32_t i = 0; i < t->n; i++) {
		struct _schunk *c = &t->ch[i];
		if (!t->complete) {
			stash(s, c->slab);
			_KVRT_STAT_ADD(e, st_save_abandoned, 1);
			continue;
		}
		uint64_t sum = 0;
		if (e->cfg.verify_checksums)
			sum = XXH3_64bits(kvrt_pool_addr(e->pool, c->slab),
					  kvrt_chunk_payload_bytes(&e->shape, c->n));
		if (kvrt_evict_admit(e->ev, c->key, c->slab, c->n, sum) == 0) {
			_KVRT_STAT_ADD(e, st_save_chunks, 1);
		} else {
			stash(s, c->slab);
			_KVRT_STAT_ADD(e, st_save_skipped_mailbox, 1);
		}
	}
	if (KVRT_UNLIKELY(e->cfg.debug_save_done_delay_ms)) { /* test instrumentation */
		struct timespec ts = {e->cfg.debug_save_done_delay_ms / 1000,
				      (long)(e->cfg.debug_save_done_delay_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	/* release: get_finished (acquire) then knows the gathers are done. */
	completed(e, t->gen, t->plan_step);
	free(t);
}

static void on_end(struct kvrt_save *s, uint32_t gen, bool gather_all)
{
	struct kvrt_engine *e = s->e;
	KVRT_ASSERT(s->active && gen == s->gen);
	/* All at once: one launch for every layer, behind the forward's end. */
	if (gather_all && s->n && !s->failed) {
		if (kvrt_stream_wait_event(e->sstream, e->save_cev[0]) ||
		    kvrt_device_gather(e->sstream, e->dl, s->plan[s->k], 0, e->L))
			s->failed = true;
		else
			s->gathered = e->L;
	}
	s->active = false;
	kvrt_event_record(e->save_done, e->sstream);
	kvrt_event_record(s->plan_ev[s->k], e->sstream);
	struct _sstep *t = malloc(sizeof(*t) + s->n * sizeof(t->ch[0]));
	if (!t) {
		/* Cannot hold the chunks: wait for the gathers, drop them. */
		kvrt_event_wait(s->plan_ev[s->k], UINT64_MAX);
		for (size_t i = 0; i < s->n; i++)
			stash(s, s->ch[i].slab);
		_KVRT_STAT_ADD(e, st_save_abandoned, s->n);
		completed(e, gen, s->plan_step);
	} else {
		t->gen = gen;
		t->plan_step = s->plan_step;
		t->complete = !s->failed && s->gathered == e->L;
		t->n = (uint32_t)s->n;
		memcpy(t->ch, s->ch, s->n * sizeof(t->ch[0]));
		t->post = (struct kvrt_stream_post){.actor = s->actor, .msg = {.type = _SAVE_DONE}};
		t->post.msg.arg.ptr[0] = t;
		if (kvrt_stream_post(e->sstream, &t->post)) {
			kvrt_event_wait(s->plan_ev[s->k], UINT64_MAX);
			on_done(s, t);
		}
	}
	s->n = 0;
	/* save_done is recorded: wait_for_save may go. */
	_kvrt_pub_add(&e->save_pub, 1);
}

static void handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	struct kvrt_save *s = kvrt_actor_data(a);
	switch (m->type) {
	case _SAVE_BEGIN:
		on_begin(s, m->arg32);
		_kvrt_pub_add(&s->e->save_taken, 1); /* the worker may rewrite e->step */
		break;
	case _SAVE_LAYER: on_layer(s, m->arg32, (uint32_t)m->arg.u64[0]); break;
	case _SAVE_END: on_end(s, m->arg32, m->arg.u64[0] != 0); break;
	case _SAVE_DONE: on_done(s, m->arg.ptr[0]); break;
	}
	if (m->reply)
		kvrt_completion_signal(m->reply, 0);
}

static int start(struct kvrt_actor *a)
{
	struct kvrt_save *s = kvrt_actor_data(a);
	s->r = kvrt_index_reader_open(s->e->idx);
	return s->r ? 0 : -ENOMEM;
}

static void stop(struct kvrt_actor *a)
{
	struct kvrt_save *s = kvrt_actor_data(a);
	/* A late answer still writes s->room: the evict actor stops after us
	 * and answers everything it accepted. */
	if (s->room_pending)
		kvrt_completion_wait(&s->room, UINT64_MAX);
	/* Hand the stash back to the evict actor, five at a time. */
	while (s->nstash) {
		uint32_t n = s->nstash < 5 ? s->nstash : 5;
		if (kvrt_evict_return_slabs(s->e->ev, s->stash + s->nstash - n, n) == 0)
			s->nstash -= n;
		else if (kvrt_evict_sync(s->e->ev))
			break;
	}
	kvrt_index_reader_close(s->r);
	s->r = NULL;
}

static const char *msg_name(uint32_t type)
{
	switch (type) {
	case _SAVE_BEGIN: return "save_begin";
	case _SAVE_LAYER: return "save_layer";
	case _SAVE_END: return "save_end";
	case _SAVE_DONE: return "save_done";
	default: return "?";
	}
}

static const struct kvrt_actor_ops save_ops = {
	.handle = handle, .start = start, .stop = stop, .msg_name = msg_name};

static void free_save(struct kvrt_save *s)
{
	for (int k = 0; k < 2; k++) {
		kvrt_device_plan_destroy(s->plan[k]);
		kvrt_event_destroy(s->plan_ev[k]);
	}
	free(s->ch);
	free(s->keys);
	free(s->slots);
	free(s->stash);
	free(s);
}

int _kvrt_save_create(struct kvrt_engine *e, struct kvrt_save **out)
{
	struct kvrt_save *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->e = e;
	int rc = -ENOMEM;
	s->stash_cap = kvrt_pool_slabs(e->pool);
	s->stash = calloc(s->stash_cap, sizeof(*s->stash));
	if (!s->stash)
		goto err;
	for (int k = 0; k < 2; k++) {
		s->plan_cap[k] = e->cs * 16;
		if ((rc = kvrt_device_plan_create(e->dev, e->set, s->plan_cap[k], &s->plan[k])) ||
		    (rc = kvrt_event_create(e->dev, &s->plan_ev[k])))
			goto err;
	}
	/* A step posts BEGIN, one message per layer, END, and SAVE_DONE:
	 * never fewer slots than that, whatever mailbox_size says. */
	uint32_t mb = e->cfg.mailbox_size ? e->cfg.mailbox_size : 64;
	while (mb < 4 * (e->L + 8))
		mb *= 2;
	rc = kvrt_actor_create(&s->actor, &(struct kvrt_actor_config){
						      .name = "save", .mailbox_size = mb, .ops = &save_ops, .data = s});
	if (rc)
		goto err;
	*out = s;
	return 0;
err:
	free_save(s);
	return rc;
}

void _kvrt_save_destroy(struct kvrt_save *s)
{
	if (!s)
		return;
	/* SAVE_DONE callbacks post to us: let the stream reach them first. */
	kvrt_stream_sync(s->e->sstream);
	kvrt_actor_destroy(s->actor);
	free_save(s);
}

int _kvrt_save_post_begin(struct kvrt_save *s, uint32_t gen, bool quiet)
{
	struct kvrt_msg m = {.type = _SAVE_BEGIN, .arg32 = gen};
	return quiet ? kvrt_actor_post_quiet(s->actor, &m, 1000000000ull)
		     : kvrt_actor_post(s->actor, &m, 1000000000ull);
}

bool _kvrt_save_try_post_layer(struct kvrt_save *s, uint32_t gen, uint32_t layer)
{
	struct kvrt_msg m = {.type = _SAVE_LAYER, .arg32 = gen};
	m.arg.u64[0] = layer;
	/* Quiet: a layer's post does not wake the actor (a system call on the
	 * forward's thread per layer); SAVE_END, always posted after, does. An
	 * actor awake for SAVE_BEGIN still takes them as they come. */
	return kvrt_actor_try_post_quiet(s->actor, &m);
}

int _kvrt_save_post_end(struct kvrt_save *s, uint32_t gen, bool gather_all)
{
	struct kvrt_msg m = {.type = _SAVE_END, .arg32 = gen};
	m.arg.u64[0] = gather_all;
	return kvrt_actor_post(s->actor, &m, 1000000000ull);
}
