/* actors/pipeline.h: internal to the engine (engine.c) and its pipeline
 * actors (lookup.c, load.c, save.c): their contract. The shared functions
 * below (published words, key chains, results) live in pipeline.c, so the
 * actors depend on this header and pipeline.c, never on engine.c. Not for
 * callers: they use engine.h.
 *
 * Owns nothing itself: it defines struct kvrt_engine, which the engine's
 * owner thread creates and destroys, and says which thread writes each
 * field. The actors' state structs are private to their files.
 *
 * Hand-offs between vLLM's worker thread and the actors
 * - Plans travel by reference: bind_step copies the step's plan into
 *   e->step (worker thread), then posts; the load and save actors read it
 *   in the handler of that message (the mailbox orders the copy before the
 *   read) and copy what they keep. The worker rewrites e->step only after
 *   both actors said they are done with it (the published words below).
 * - Published words (struct _kvrt_pub): a u32 an actor advances with a
 *   release store and the worker waits on (acquire; spin, then futex).
 *   load_pub grows by one per layer the load actor issued (its event
 *   recorded), save_pub by one per step whose gathers the save actor issued
 *   (save_done recorded), save_taken by one per SAVE_BEGIN handled (the
 *   save actor read e->step). The worker keeps the values it expects and
 *   compares wrap-safely.
 * - Results (load errors, finished async loads) go through res_mu, taken
 *   once per request load by the load actor and once per call by the
 *   worker: never per token or per layer.
 */
#ifndef KVRT_ACTORS_PIPELINE_H
#define KVRT_ACTORS_PIPELINE_H

#include <pthread.h>
#include <stdatomic.h>

#include "actors/engine.h"
#include "kernels/device.h"

struct kvrt_lookup;
struct kvrt_load;
struct kvrt_save;

/* Pin owners: lookups pin under the request id with bit 63 clear; loads
 * pin under their own ids with bit 63 set, so a re-lookup (which replaces
 * the request's pins) never releases a load's pins mid-copy. */
#define _KVRT_OWNER_LOAD (1ull << 63)
static inline uint64_t _kvrt_owner_req(uint64_t req_id)
{
	return req_id & ~_KVRT_OWNER_LOAD;
}

/* A published counter (see the header comment). */
struct _kvrt_pub {
	_Atomic uint32_t v;       /* the value; advanced by one actor */
	_Atomic uint32_t waiters; /* workers asleep on v (futex) */
};

/* Actor side: v += n (release) and wake sleepers. */
void _kvrt_pub_add(struct _kvrt_pub *p, uint32_t n);
/* Worker side: wait until v has reached target (wrap-safe). Spins ~20 us,
 * then sleeps. 0 or -ETIMEDOUT. */
int _kvrt_pub_wait(struct _kvrt_pub *p, uint32_t target, uint64_t timeout_ns);
static inline bool _kvrt_pub_reached(struct _kvrt_pub *p, uint32_t target)
{
	return (int32_t)(atomic_load_explicit(&p->v, memory_order_acquire) - target) >= 0;
}

/* One request of the bound step (copied from struct kvrt_plan_req; token,
 * block and key arrays live in the step's pools at the offsets given). */
struct _kvrt_sreq {
	uint64_t req_id;        /* owner for lookup pins (bit 63 cleared) */
	uint64_t ns_hash;       /* key namespace */
	uint32_t flags;         /* KVRT_PLAN_* */
	uint32_t prompt_tokens; /* prompt length */
	uint32_t tok_off, ntok; /* tokens [0, ntok) at step.tokens + tok_off */
	uint32_t blk_off, nblk; /* block ids at step.blocks + blk_off */
	uint32_t key_off, nkeys; /* expected keys at step.keys + key_off (0: none) */
	uint32_t load_start, load_end, load_hit; /* as in the plan; load_hit set */
	uint32_t save_first;    /* first chunk to save */
	uint32_t save_full_end; /* one past the last full chunk to save */
	uint32_t save_tail;     /* tokens of a tail chunk to save (index save_full_end), 0 = none */
	bool load;              /* has a load */
	bool save;              /* has chunks to save */
};

/* The bound step (worker thread writes; actors read in their handlers). */
struct _kvrt_step {
	uint32_t gen;                 /* step number (wraps) */
	uint64_t plan_step;           /* the caller's (kvrt_step_plan.step) */
	struct _kvrt_sreq *reqs;      /* [nreq] */
	uint32_t nreq, reqs_cap;      /* used, allocated */
	uint32_t *tokens;             /* token pool */
	size_t ntok, tok_cap;
	int32_t *blocks;              /* block id pool */
	size_t nblk, blk_cap;
	struct kvrt_chunk_key *keys;  /* expected key pool */
	size_t nkeys, keys_cap;
	uint32_t nsync, nasync, nsave; /* requests with a sync load, async load, save */
	/* Worker-only progress of the step. */
	bool load_posted;             /* start_load posted it (or had nothing to post) */
	bool load_failed;             /* the post failed: planned blocks are errors */
	bool save_posted;             /* SAVE_BEGIN posted */
	bool save_ended;              /* wait_save done */
	bool save_broken;             /* a save_layer post failed: rest skipped */
	uint32_t load_base;           /* load_pub before this step's layers */
	uint32_t save_target;         /* save_pub once this step's gathers are issued */
	uint8_t *layer_saved;         /* [num_layers]: save_layer seen this step */
};

struct kvrt_engine {
	struct kvrt_engine_config cfg; /* copy; disk_dir points into disk_dir */
	char *disk_dir;                /* copy of cfg.disk_dir */
	char *remote_url;              /* copy of cfg.remote_url */
	uint64_t remote_wait_ns;       /* a lookup's wait for Redis (0: no remote tier
					* or not registered yet: set by register) */
	uint32_t cs;                   /* chunk_size */
	struct kvrt_device *dev;       /* the device */
	struct kvrt_index *idx;        /* the index */
	/* Set by register (owner thread), read-only afterwards. */
	bool registered;
	struct kvrt_kv_set *set;       /* layers (distinct: set->num_layers) */
	uint32_t L;                    /* distinct layers */
	struct kvrt_device_layers *dl; /* the kernels' layer table */
	struct kvrt_chunk_shape shape; /* chunk payload shape */
	uint64_t chunk_bytes;          /* payload of a full chunk */
	struct kvrt_pool *pool;        /* CPU tier */
	struct kvrt_evict *ev;         /* evict actor */
	struct kvrt_stream *compute;   /* vLLM's stream (wrapped) */
	struct kvrt_stream *lstream;   /* the device's load stream */
	struct kvrt_stream *sstream;   /* the device's save stream */
	struct kvrt_event **load_ev;   /* [L]: layer l of the step's loads (load actor records) */
	struct kvrt_event **save_cev;  /* [L]: compute progress at save_layer (worker records) */
	struct kvrt_event *save_done;  /* the step's gathers (save actor records) */
	struct kvrt_lookup *lookup;    /* lookup actor */
	/* Direct lookups on the caller's thread (kvrt_engine_lookup). Every
	 * lookup, direct or through the actor, runs under dl_mu, so lookups stay
	 * serialized as when the actor answered them all (a re-lookup's unpin
	 * and pin never interleave with another lookup's). The reader's epoch
	 * record is used by one thread at a time: the mutex orders the uses. */
	pthread_mutex_t dl_mu;
	struct kvrt_index_reader *dl_r; /* opened at register, closed at destroy */
	struct kvrt_chunk_key *dl_keys; /* scratch [dl_cap] */
	struct kvrt_index_hit *dl_hits; /* scratch [dl_cap] */
	size_t dl_cap;                  /* entries in dl_keys and dl_hits */
	bool dl_off;                    /* test switch: always ask the actor */
	struct kvrt_load *load;        /* load actor */
	struct kvrt_save *save;        /* save actor */
	struct _kvrt_pub load_pub KVRT_CL_ALIGNED; /* layers issued (load actor) */
	struct _kvrt_pub save_pub KVRT_CL_ALIGNED; /* steps whose gathers are issued (save actor) */
	struct _kvrt_pub save_taken KVRT_CL_ALIGNED; /* SAVE_BEGINs handled: e->step read (save actor) */
	_Atomic uint64_t saves_done;   /* plan_step of save_completed's step */
	_Atomic uint32_t save_completed KVRT_CL_ALIGNED; /* gen of the last step whose gathers
							  * completed (save actor, release) */
	/* Worker thread only. */
	struct _kvrt_step step;        /* the bound step */
	uint32_t load_next;            /* load_pub once every posted step is issued */
	uint32_t save_next;            /* save_pub once every posted save step is issued */
	uint32_t save_begins;          /* save_taken once every posted SAVE_BEGIN is handled */
	uint32_t last_save_gen;        /* last step that posted saves */
	bool any_save;                 /* some step did */
	struct _kvrt_lastsave *ls;     /* open-addressing map req -> gen of its last save */
	uint32_t ls_cap, ls_n, ls_tombs; /* slots (power of two), used, deleted */
	uint64_t *pending;             /* delayed requests not yet reported */
	uint32_t npending, pending_cap;
	/* Results from the load actor (res_mu). */
	pthread_mutex_t res_mu;
	int64_t *errs;                 /* load-error block ids */
	size_t nerrs, errs_cap;
	uint64_t *recv;                /* finished async loads; bit 63: failed */
	size_t nrecv, recv_cap;
	/* Counters (relaxed). */
	_Atomic uint64_t st_lookups, st_lookup_tokens, st_prefetches, st_steps;
	_Atomic uint64_t st_load_reqs, st_load_chunks, st_load_tokens, st_load_failed_chunks;
	_Atomic uint64_t st_load_error_blocks, st_async_done, st_save_chunks, st_save_dup;
	_Atomic uint64_t st_save_skipped_pool, st_save_skipped_mailbox, st_save_abandoned;
	_Atomic uint64_t st_checksum_failures;
	_Atomic uint64_t st_remote_finds, st_remote_find_late;
};

/* req -> gen of the last step that saved for it (worker thread). */
struct _kvrt_lastsave {
	uint64_t req;  /* request id + 1 (0 = empty slot) */
	uint32_t gen;  /* step */
	uint32_t tomb; /* 1: deleted */
};

#define _KVRT_STAT_ADD(e, f, n) atomic_fetch_add_explicit(&(e)->f, (n), memory_order_relaxed)

/* Slot of token t of a request whose block ids are blk[0..nblk): -1 when
 * the block is unknown (negative id or beyond nblk). */
static inline int64_t _kvrt_slot(const int32_t *blk, uint32_t nblk, uint32_t bs, uint32_t t)
{
	uint32_t b = t / bs;
	if (b >= nblk || blk[b] < 0)
		return -1;
	return (int64_t)blk[b] * bs + t % bs;
}

/* Add load-error blocks of tokens [from, to) of a request (load actor). */
void _kvrt_result_errors(struct kvrt_engine *e, const int32_t *blk, uint32_t nblk,
			     uint32_t from, uint32_t to);
/* An async load finished (load actor). */
void _kvrt_result_recv(struct kvrt_engine *e, uint64_t req_id, bool failed);

/* Keys of chunks [0, nfull) (full) and, when tail, chunk nfull of `tail`
 * tokens, written to out[0 .. nfull + (tail != 0)). Any thread. */
void _kvrt_keys(uint64_t ns, const uint32_t *tokens, uint32_t cs, uint32_t nfull, uint32_t tail,
		struct kvrt_chunk_key *out);

/* The actors (each file's create/destroy on the owner thread). */
int _kvrt_lookup_create(struct kvrt_engine *e, struct kvrt_lookup **out);
void _kvrt_lookup_destroy(struct kvrt_lookup *l);
/* Free prefetch state once the evict actor is gone (it signals everything). */
void _kvrt_lookup_free(struct kvrt_lookup *l);
int _kvrt_lookup_call(struct kvrt_lookup *l, uint64_t req, uint64_t ns, const uint32_t *tokens,
		      uint32_t n, struct kvrt_lookup_result *out);
/* Tests: true makes every lookup go through the lookup actor (the direct
 * path off), to compare the two. Owner thread, no lookup in flight. */
void _kvrt_engine_set_direct_lookup(struct kvrt_engine *e, bool on);

int _kvrt_load_create(struct kvrt_engine *e, struct kvrt_load **out);
void _kvrt_load_destroy(struct kvrt_load *l);
/* Wait until no load is in flight (every pin of a load released). */
int _kvrt_load_idle(struct kvrt_load *l);
/* Post the bound step's loads (worker). 0 or the post's error. */
int _kvrt_load_post_step(struct kvrt_load *l, uint32_t gen);

int _kvrt_save_create(struct kvrt_engine *e, struct kvrt_save **out);
void _kvrt_save_destroy(struct kvrt_save *s);
/* Worker: post the bound step's saves (quiet: without waking the actor,
 * SAVE_END will) / one layer / the end of the step (gather_all: gather
 * every layer first, behind save_cev[0]).
 * begin and end wait for room (bounded); layer never blocks (false: full). */
int _kvrt_save_post_begin(struct kvrt_save *s, uint32_t gen, bool quiet);
bool _kvrt_save_try_post_layer(struct kvrt_save *s, uint32_t gen, uint32_t layer);
int _kvrt_save_post_end(struct kvrt_save *s, uint32_t gen, bool gather_all);

#endif
