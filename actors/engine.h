/* actors/engine.h: the cache engine, everything below the connector.
 *
 * Owns: the device (kernels/device.h), the chunk index, the CPU pool, the
 * evict actor (and through it the optional disk and remote tiers), and the three
 * pipeline actors: lookup (actors/lookup.c), load (actors/load.c) and save
 * (actors/save.c). The connector (connector/kvrt.h) wraps these calls one
 * to one; vLLM's threads only post messages and wait on events here.
 *
 * Walk-through (one vLLM worker, TP=1, the scheduler in the same process):
 *
 *   kvrt_engine_create(&e, &(struct kvrt_engine_config){ .chunk_size = 256,
 *           .cpu_bytes = 8ull << 30, .namespace_hash = ns });
 *   kvrt_engine_register(e, tensors, n, NULL);      // register_kv_caches
 *   // scheduler: get_num_new_matched_tokens
 *   kvrt_engine_lookup(e, req, ns_req, tokens, n, &hit);   // pins what it found
 *   // worker, each step:
 *   kvrt_engine_bind_step(e, &plan);                 // bind_connector_metadata
 *   kvrt_engine_start_load(e);                       // start_load_kv
 *   for each layer l: kvrt_engine_wait_layer(e, l);  // wait_for_layer_load
 *                     ... attention ...
 *                     kvrt_engine_save_layer(e, l);  // save_kv_layer
 *   kvrt_engine_wait_save(e);                        // wait_for_save
 *   kvrt_engine_get_finished(e, delayed, n, &fin);   // get_finished
 *   kvrt_engine_load_errors(e, blocks, cap);         // get_block_ids_with_load_errors
 *   // scheduler: request_finished / abort / preemption
 *   kvrt_engine_release(e, req);
 *   kvrt_engine_destroy(e);                          // shutdown
 *
 * Requests are 64-bit ids (the connector hashes vLLM's strings). An id only
 * names pins and finished-sets: what is loaded is decided by the token ids
 * the plan carries (keys are recomputed from them, and checked against the
 * keys the plan may carry), so two requests whose ids collide can never be
 * served each other's KV. Bit 63 of a request id is ignored (the engine's
 * own pin owners use it).
 *
 * The step plan (struct kvrt_step_plan) is plain data, copied by
 * kvrt_engine_bind_step: the caller may free it when that returns. Tokens
 * are placed by vLLM block ids (slot = block_ids[t / block_size] *
 * block_size + t % block_size), the compact form of a slot list.
 *
 * Chunks: a request's tokens are cut at multiples of chunk_size from token
 * 0. Chunk i's key chains over chunks 0..i (actors/key.h). A cached "tail"
 * (fewer than chunk_size tokens, saved with save_unfull_chunk) has its own
 * key. A load of tokens [load_start, load_end) reads the chunks of the first
 * load_hit tokens: full chunks, then a tail when load_hit is not a multiple
 * of chunk_size (pass the lookup's `tokens` as load_hit).
 *
 * Threads
 * - create/register/destroy: one owner thread, nothing else running.
 * - Scheduler side (lookup, release): any thread, concurrently with each
 *   other and with the worker side.
 * - Worker side (bind_step ... load_errors): one thread at a time (vLLM's
 *   worker thread); the calls of a step in the order above. No malloc,
 *   syscall or lock per token or per layer on this path; bind_step grows
 *   its buffers only when a step is larger than every step before.
 * - stats: any thread.
 */
#ifndef KVRT_ACTORS_ENGINE_H
#define KVRT_ACTORS_ENGINE_H

#include "actors/chunk.h"
#include "actors/evict.h"
#include "actors/index.h"
#include "actors/policy.h"
#include "actors/pool.h"
#include "kernels/layout.h"
#include "runtime/common.h"

struct kvrt_engine;

struct kvrt_engine_config {
	int device_ordinal;          /* CUDA ordinal (host backend: ignored) */
	uint32_t chunk_size;         /* tokens per chunk; 0 = 256 */
	uint64_t cpu_bytes;          /* max_local_cpu_size: pool budget (> one chunk) */
	uint64_t namespace_hash;     /* the engine's namespace (disk headers) */
	enum kvrt_policy_kind policy; /* cache_policy */
	double high_watermark;       /* evict above this share of slabs; 0 = 0.95 */
	double low_watermark;        /* ... down to this; 0 = 0.85 */
	uint64_t pin_timeout_ns;     /* lookup pins older than this are released; 0 = 10 min */
	const char *disk_dir;        /* local disk tier, or NULL */
	uint64_t disk_bytes;         /* its budget; 0 = no disk tier */
	bool disk_odirect;           /* O_DIRECT for the disk tier */
	/* Remote tier (actors/remote.h), shared by every engine pointed at the
	 * same Redis with the same namespace_hash: chunks saved here are
	 * written there in the background; lookups that miss locally ask it. */
	const char *remote_url;      /* redis://host:port[/db], redis-cluster://h:p,...;
				      * NULL or "" = none (copied) */
	uint32_t remote_timeout_ms;  /* per-request deadline; 0 = 1000 */
	uint32_t remote_ttl_s;       /* expiry of written chunks; 0 = none */
	uint32_t remote_max_pending_writes; /* write-behinds in flight before new
				      * ones are dropped (counted); 0 = 16 */
	uint32_t remote_lookup_wait_ms; /* how long a request's lookups answer
				      * -EINPROGRESS while Redis is asked (none
				      * blocks); then the local answer (a later
				      * lookup sees a late one); 0 = 5, capped
				      * by remote_timeout_ms */
	bool all_at_once;            /* non-layerwise: start_load returns with every
				      * layer loaded (cross-layer layouts, full CUDA
				      * graphs); default: one event per layer */
	bool save_unfull_chunk;      /* save a prompt's last partial chunk */
	bool save_decode_cache;      /* save chunks holding generated tokens */
	bool verify_checksums;       /* checksum chunks when saved, verify on load */
	uint32_t step_tokens;        /* copy-plan rows preallocated per step; 0 = 65536
				      * (grows when a step needs more) */
	uint32_t mailbox_size;       /* actor mailbox slots, power of two (>= 4),
				      * for the lookup, load, save and evict actors
				      * (save keeps at least 4 x (layers + 8));
				      * 0 = each actor's default (1024, 64, 64, 4096) */
	uint32_t room_wait_us;       /* how long a step's save waits for the evict
				      * actor to free slabs when the hand-off ring
				      * is dry (the next bind may wait behind it);
				      * 0 = 5000 */
	/* Test instrumentation: called on a backend thread when layer l of a
	 * step's loads has been scattered (the stream reached that point).
	 * NULL: none (the default; costs nothing). */
	void (*on_layer_loaded)(void *ctx, uint32_t layer);
	/* ... and on the evict actor before it serves a room request. */
	void (*on_room)(void *ctx);
	void *hook_ctx;              /* first argument of both */
	/* Test instrumentation of loads (the connector sets them from
	 * KVRT_DEBUG; 0/false: off, the default). The first
	 * debug_corrupt_loads chunks loaded have their CPU copy overwritten
	 * before the checksum is checked, as memory corruption would (their
	 * loads fail and are recomputed); with debug_perturb_loads every chunk
	 * loaded is overwritten and scattered without the check (vLLM then
	 * reads wrong KV: the proof that the model reads what kvrt loads). */
	uint32_t debug_corrupt_loads;
	bool debug_perturb_loads;
	uint32_t debug_save_done_delay_ms; /* the save actor holds each step's
					    * "saves done" this long (a finished
					    * request then keeps delay_free) */
	uint32_t tier_events; /* KV events: the evict actor's tier-event ring
			       * entries (kvrt_engine_tier_events); 0 = none */
	uint32_t debug_discard_delay_ms; /* the evict actor sleeps this long
					  * before it drops a chunk a load found
					  * corrupt (a busy evict actor) */
	/* Where kvrt_engine_saves_done's value is also stored (release) each
	 * time it advances, written by the save actor until destroy returns:
	 * shared memory a scheduler in another process reads. NULL: none. */
	_Atomic uint64_t *saves_done_pub;
};

/* What a lookup found. tokens_now <= tokens. */
struct kvrt_lookup_result {
	uint32_t tokens_now; /* leading tokens cached in the CPU tier: loadable now */
	uint32_t tokens;     /* leading tokens cached in any tier (CPU, then disk):
			      * loadable after the prefetch this lookup started */
	uint32_t chunks;     /* chunks behind `tokens` (all pinned) */
	uint32_t chunks_now; /* chunks behind `tokens_now` */
};

/* Flags of a plan request. */
enum {
	KVRT_PLAN_ASYNC_LOAD = 1u << 0, /* load outside the step: promote lower-tier
					 * chunks first, report finished-recving when
					 * the KV is in vLLM's blocks */
	KVRT_PLAN_REFUSED_LOAD = 1u << 1, /* the load [load_start, load_end) was
					   * refused upstream: nothing is loaded,
					   * its blocks are reported as load errors
					   * (async: finished-recving, failed) */
};

/* One request of a step. Token ranges are [start, end) in the request's
 * token positions; an empty range (start == end) means nothing to do. */
struct kvrt_plan_req {
	uint64_t req_id;           /* vLLM's request, hashed (bit 63 ignored) */
	uint64_t ns_hash;          /* the request's key namespace (kvrt_key_namespace_hash) */
	const uint32_t *tokens;    /* token ids known so far [num_tokens] */
	uint32_t num_tokens;       /* prompt + generated so far */
	uint32_t prompt_tokens;    /* prompt length (tokens beyond are decode) */
	const int32_t *block_ids;  /* vLLM blocks of tokens [i*bs, (i+1)*bs) */
	uint32_t num_blocks;       /* entries in block_ids */
	uint32_t flags;            /* KVRT_PLAN_* */
	uint32_t load_start;       /* first token to load (vLLM's computed tokens) */
	uint32_t load_end;         /* one past the last token to load */
	uint32_t load_hit;         /* tokens the lookup matched (chunk structure);
				    * 0 = load_end */
	uint32_t save_start;       /* tokens whose KV existed before this step */
	uint32_t save_end;         /* tokens whose KV exists after this step */
	const struct kvrt_chunk_key *keys; /* optional: keys of chunks 0.. as the
					    * scheduler computed them; a load whose
					    * recomputed key differs fails */
	uint32_t num_keys;         /* entries in keys */
};

struct kvrt_step_plan {
	const struct kvrt_plan_req *reqs; /* [num_reqs] */
	uint32_t num_reqs;
	uint64_t step;  /* the caller's number for this step (the scheduler's,
			 * increasing; 0 = none): kvrt_engine_saves_done reports
			 * it once the step's saves are complete */
	bool preempted; /* vLLM freed preempted requests' blocks before this
			 * step: gathers still reading them finish first */
};

/* The plan step (kvrt_step_plan.step) of the newest step with saves whose
 * copies out of vLLM's blocks, and those of every step before it, are
 * complete: a request whose last save was in a step <= this no longer needs
 * its blocks (delay_free may be skipped). 0: none yet. Any thread. */
uint64_t kvrt_engine_saves_done(const struct kvrt_engine *e);

/* get_finished's answer; arrays are the caller's. Ids that do not fit stay
 * for the next call. */
struct kvrt_finished {
	uint64_t *sending;     /* delayed-free requests whose saves are done */
	uint32_t sending_cap;  /* room */
	uint32_t num_sending;  /* written */
	uint64_t *recving;     /* async loads finished (failed ones included) */
	uint32_t recving_cap;
	uint32_t num_recving;
	uint64_t *failed;      /* async loads that failed (also in recving) */
	uint32_t failed_cap;
	uint32_t num_failed;
};

struct kvrt_engine_stats {
	uint64_t lookups;            /* lookups answered */
	uint64_t lookup_tokens;      /* tokens they matched (any tier) */
	uint64_t prefetches;         /* chunks promoted by lookups */
	uint64_t steps;              /* steps bound */
	uint64_t load_reqs;          /* request loads issued (sync + async) */
	uint64_t load_chunks;        /* chunks scattered */
	uint64_t load_tokens;        /* tokens scattered */
	uint64_t load_failed_chunks; /* chunks that could not be loaded */
	uint64_t load_error_blocks;  /* block ids reported as load errors */
	uint64_t async_done;         /* async loads finished */
	uint64_t save_chunks;        /* chunks gathered and admitted */
	uint64_t save_dup;           /* chunks not saved: already cached */
	uint64_t save_skipped_pool;  /* chunks not saved: no free slab */
	uint64_t save_skipped_mailbox; /* chunks/layers not saved: a mailbox was full */
	uint64_t save_abandoned;     /* chunks dropped: not every layer was saved */
	uint64_t checksum_failures;  /* loads refused by verify_checksums */
	struct kvrt_evict_stats evict; /* the evict actor's */
	uint64_t pinned;             /* index pins held now */
	/* Remote tier (also in evict.remote_*): */
	uint64_t remote_finds;       /* lookups that asked Redis (a local miss) */
	uint64_t remote_find_late;   /* ... whose answer came after the lookup's wait */
	uint64_t remote_writes;      /* chunks written to Redis (write-behind) */
	uint64_t remote_dropped;     /* write-behinds dropped (queue full, server
				      * down) or failed in flight */
	uint64_t remote_reads;       /* chunks read from Redis (prefetches) */
	uint64_t remote_hits;        /* ... that arrived in the CPU tier */
	uint64_t remote_misses;      /* ... gone from Redis meanwhile */
	uint64_t remote_errors;      /* ... corrupt / timed out / connection lost, and
				      * finds that failed */
};

/* Open the device and create the index (lookups answer 0 until register).
 * 0, -EINVAL (bad config, one kvrt_error naming the field), -ENOMEM,
 * -ENODEV, -EIO. Owner thread. */
int kvrt_engine_create(struct kvrt_engine **out, const struct kvrt_engine_config *cfg);

/* register_kv_caches: describe vLLM's n KV tensors (model layer order) and
 * start the pool, the evict actor (and disk tier) and the pipeline actors.
 * compute_stream: vLLM's stream (a cudaStream_t; NULL = the default stream,
 * or on the host backend the caller's thread). Once. 0, -EINVAL, -EALREADY,
 * -ENOMEM, or a device / disk error. Owner thread. */
int kvrt_engine_register(struct kvrt_engine *e, const struct kvrt_kv_tensor *t, uint32_t n,
			 void *compute_stream);

/* Layers as vLLM names them (inputs; cross-layer tensors expanded). */
uint32_t kvrt_engine_num_layers(const struct kvrt_engine *e);

/* Stop every actor (accepted work finishes), release every pin, free.
 * Owner thread; NULL is ignored. */
void kvrt_engine_destroy(struct kvrt_engine *e);

/* --- scheduler side (any thread) ------------------------------------------ */

/* How many leading tokens of tokens[0..n) are cached under ns_hash, and
 * where. Pins every chunk found under req_id (replacing pins req_id held
 * from an earlier lookup: calling it every step is idempotent) and starts
 * promoting the ones found only on disk or in Redis. Only whole chunks
 * count, plus a cached tail of exactly the remaining tokens. 0, -EAGAIN
 * (the lookup actor's mailbox is full: answer "no hit"), -EINPROGRESS
 * (remote_url: a local miss was asked of Redis, which has not answered:
 * *out is empty, ask again; for remote_lookup_wait_ms from the first ask,
 * then the local answer; actors/lookup.c), -ESHUTDOWN. Before register:
 * 0 with nothing found.
 * Answered on the caller's thread (hash, walk and pin through the engine's
 * own index reader, no message) unless a chunk found is not in the CPU tier
 * (the lookup actor starts its prefetch) or, with a remote tier, a chunk is
 * missing (the actor asks Redis): then the actor answers, with the same
 * result and pins. Lookups are serialized by one engine mutex (uncontended
 * with vLLM's single scheduler thread), held across an actor call. */
int kvrt_engine_lookup(struct kvrt_engine *e, uint64_t req_id, uint64_t ns_hash,
		       const uint32_t *tokens, uint32_t n, struct kvrt_lookup_result *out);

/* Release every lookup pin of req_id (scheduled-and-loaded, finished,
 * aborted, preempted). Returns the pins released. */
size_t kvrt_engine_release(struct kvrt_engine *e, uint64_t req_id);

/* --- worker side (one thread) --------------------------------------------- */

/* Bind the step's plan (copied). Hands its saves to the save actor at once
 * (it prepares while the forward runs). Finishes the previous step first if
 * the caller skipped its wait_save. 0, -EINVAL (a request's ranges do not
 * fit its tokens or blocks: that request is dropped, logged, the rest bound),
 * -ENOMEM, -ENODEV (not registered). */
int kvrt_engine_bind_step(struct kvrt_engine *e, const struct kvrt_step_plan *p);

/* start_load_kv: hand the bound step's loads to the load actor. Layerwise:
 * returns at once; all-at-once: returns when every layer is loaded (the
 * compute stream waits on it). Async loads start here too. Idempotent per
 * step. 0 or -ESHUTDOWN (then every planned block is a load error). */
int kvrt_engine_start_load(struct kvrt_engine *e);

/* wait_for_layer_load(layer): once the load actor has issued the layer's
 * copies (spin briefly, then sleep), make the compute stream wait for them
 * (CUDA: the CPU does not wait for the copy; host: it does). Starts the
 * step's loads if start_load was not called yet. 0, -EINVAL (layer), -EIO. */
int kvrt_engine_wait_layer(struct kvrt_engine *e, uint32_t layer);

/* save_kv_layer(layer): layerwise (all_at_once false): record the compute
 * stream's progress and post the layer to the save actor, which gathers it
 * behind that point. Never blocks: a full mailbox skips the step's save
 * (counted). All at once: nothing (wait_save marks the forward's end and
 * every layer is gathered behind it; vLLM's per-layer hooks do not even
 * run under full CUDA graphs). 0 or -EINVAL. */
int kvrt_engine_save_layer(struct kvrt_engine *e, uint32_t layer);

/* wait_for_save: ends the step's saves and returns without waiting for
 * their gathers (all at once: it records the compute stream's progress,
 * behind which they run). The gathers read vLLM's blocks after the forward moved on:
 * that is safe because vLLM rewrites a block only after it freed it, and
 * it frees a saving request's blocks only when get_finished reports it
 * (delay_free) or on preemption (the next bind_step with preempted set, or
 * kvrt_engine_save_barrier, waits for the gathers first). The next bind_step
 * waits for the save actor to take the step (it lags only when gathers two
 * steps back still run: the back-pressure). 0 or -ESHUTDOWN. */
int kvrt_engine_wait_save(struct kvrt_engine *e);

/* What the bound step needs of the per-layer calls: KVRT_STEP_LOADS when
 * wait_layer must be called (synchronous loads), KVRT_STEP_SAVES when
 * wait_save must (saves posted), KVRT_STEP_SAVE_LAYERS when save_layer
 * must too (layerwise saves). 0: the calls would do nothing, a caller may
 * skip them (the shim does). */
#define KVRT_STEP_LOADS 1u
#define KVRT_STEP_SAVES 2u
#define KVRT_STEP_SAVE_LAYERS 4u
unsigned kvrt_engine_step_work(const struct kvrt_engine *e);

/* handle_preemptions: returns once every gather of the steps whose saves
 * ended has run (a CPU wait: the freed blocks may next be written by the
 * forward or by loads). A step bound but not run is not waited for.
 * 0 or -ETIMEDOUT. */
int kvrt_engine_save_barrier(struct kvrt_engine *e);

/* get_finished: delayed[0..n) are requests the connector freed with
 * delay_free; each is reported in out->sending exactly once, when no
 * gather of it is in flight. Async loads that finished are reported in
 * out->recving (and, when they failed, in out->failed too). 0. */
int kvrt_engine_get_finished(struct kvrt_engine *e, const uint64_t *delayed, uint32_t n,
			     struct kvrt_finished *out);

/* get_block_ids_with_load_errors: block ids whose load failed since the last
 * call (each failed request's blocks from its first failed token to the end
 * of its load; nothing in them was claimed valid). Returns how many were
 * written (at most cap; the rest stay for the next call). */
size_t kvrt_engine_load_errors(struct kvrt_engine *e, int64_t *out, size_t cap);

/* Wait until every save of the steps so far has reached the index (or was
 * dropped: the save actor admitted its chunks and the evict actor handled
 * them) and no load is in flight (async ones included; their pins are
 * released). For tests, tools and shutdown, not for the step. 0 or
 * -ETIMEDOUT. */
int kvrt_engine_flush(struct kvrt_engine *e);

/* --- any thread ------------------------------------------------------------ */

/* Drop everything cached that nobody uses (vLLM's reset_cache): every index
 * entry neither pinned (a request's lookup, a load) nor in flight (disk or
 * Redis write, promotion) is retired (kvrt_evict_clear: CPU slabs freed,
 * disk copies removed, Redis left as it is). Saves still in the pipeline
 * may land after it. *dropped / *kept (NULL ok): entries retired / left.
 * 0 (nothing registered yet: 0 and 0), or kvrt_evict_clear's error. */
int kvrt_engine_reset(struct kvrt_engine *e, uint64_t *dropped, uint64_t *kept);

void kvrt_engine_stats(struct kvrt_engine *e, struct kvrt_engine_stats *out);

/* Up to max tier events (actors/tier_events.h), oldest first; how many.
 * One consumer thread at a time; 0 before register or with events off.
 * *dropped (NULL ok): events lost to a full ring so far. */
size_t kvrt_engine_tier_events(struct kvrt_engine *e, struct kvrt_tier_event *out, size_t max,
			       uint64_t *dropped);

/* Parts, for tests and tools (NULL before register for pool/evict). */
struct kvrt_index *kvrt_engine_index(struct kvrt_engine *e);
struct kvrt_pool *kvrt_engine_pool(struct kvrt_engine *e);
struct kvrt_evict *kvrt_engine_evict(struct kvrt_engine *e);
const struct kvrt_kv_set *kvrt_engine_kv_set(const struct kvrt_engine *e);

#endif
