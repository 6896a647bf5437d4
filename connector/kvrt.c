/* connector/kvrt.c: the public API (connector/kvrt.h) over the engine
 * (actors/engine.h), the config (connector/config.h) and the metadata codec
 * (connector/meta.h).
 *
 * Step metadata bytes = a frame of kvrt's own around the codec's message:
 *
 *   "KVRS" | u32 version 1 | u32 meta_len | u32 nreq | meta_len bytes of a
 *   connector/meta.h message | 0-3 zero bytes to a multiple of 4 | nreq x (u64 id_hash | u64 ns_hash |
 *   u32 prompt_tokens | u32 ntok | ntok x u32 token id)
 *
 * The request table carries what meta.h's message lacks and the engine
 * needs: each planned request's key namespace and its leading token ids (the
 * engine recomputes every key from them and checks the scheduler's).
 * Integers little-endian (the hosts vLLM runs on); read with memcpy.
 */
#include "runtime/bytes.h"
#include "connector/kvrt.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "actors/engine.h"
#include "actors/index.h"
#include "actors/key.h"
#include "actors/pool.h"
#include "connector/config.h"
#include "connector/lookup_socket.h"
#include "connector/meta.h"
#include "connector/saves_done.h"
#include "runtime/log.h"
#include "runtime/trace.h"

#define _FRAME_MAGIC "KVRS"
#define _FRAME_HDR 16u

/* --- the registry: workers by instance (scheduler lookups) ----------------- */

struct kvrt_worker {
	struct kvrt_engine *e;        /* the engine */
	struct kvrt_config cfg;       /* effective config */
	char *instance;               /* registry key */
	uint32_t tp_rank, pp_rank;    /* registry key */
	uint64_t model_ns;            /* model namespace hash (engine's) */
	struct kvrt_worker *next;     /* registry list */
	bool registered;              /* register succeeded */
	char *lsock_path;             /* lookup socket to serve once registered, or NULL */
	struct kvrt_lsock_server *lsrv; /* its server (connector/lookup_socket.h), or NULL */
	struct kvrt_saves_pub *spub;  /* its saves-done file (connector/saves_done.h), or NULL */
	bool trace_owned;             /* the trace key started tracing: destroy writes it */
	bool debug_skip_saves;        /* KVRT_DEBUG skip_saves_rank=<this rank>: saves nothing */
	/* bind scratch (worker thread) */
	struct kvrt_plan_req *preqs;  /* plan requests */
	size_t preqs_cap;
	int32_t *blocks;              /* full block tables */
	size_t blocks_cap;
	struct kvrt_chunk_key *keys;  /* expected keys */
	size_t keys_cap;
	uint8_t *frame;               /* the bound frame (tokens point into it) */
	size_t frame_cap;
	struct _kvrt_rtslot *rtmap;   /* the frame's table by id hash (open addressing) */
	size_t rtmap_cap;             /* slots (a power of 2); grown, never shrunk */
	uint32_t rtmap_gen;           /* slots of other generations are empty */
	/* ids to report (worker thread) */
	struct _kvrt_pend *pend;      /* delayed frees and async loads in flight */
	size_t npend, pend_cap;
	uint64_t *scratch;            /* hashes for get_finished */
	size_t scratch_cap;
};

/* A request id the worker will report. */
struct _kvrt_pend {
	uint64_t hash;  /* kvrt_meta_id_hash, bit 63 cleared (the engine's ids) */
	bool delayed;   /* a delay_free request (else an async load) */
	bool told;      /* delayed: handed to the engine (it keeps it until done) */
	bool done;      /* async load: the engine reported it finished (and has
			 * forgotten it): kept until it fits get_finished's buffer */
	bool failed;    /* ... and it failed */
	bool out;       /* written by this get_finished call */
	uint16_t len;   /* id bytes */
	char *id;       /* malloc'd */
};

static pthread_rwlock_t reg_lock = PTHREAD_RWLOCK_INITIALIZER; /* guards reg_head and
								* the engines lookups use */
static struct kvrt_worker *reg_head;

static struct kvrt_worker *reg_find(const char *instance)
{
	for (struct kvrt_worker *w = reg_head; w; w = w->next)
		if (!strcmp(w->instance, instance) && w->tp_rank == 0 && w->pp_rank == 0)
			return w;
	return NULL;
}

/* --- helpers ---------------------------------------------------------------- */

static char *dupstr(const char *s)
{
	return strdup(s ? s : "");
}

/* Config: init (defaults, file, env), then the caller's keys, then check. */
static int read_config(struct kvrt_config *c, const struct kvrt_options *o, char *err, size_t errlen)
{
	int rc = kvrt_config_init(c, err, errlen);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < o->num_keys; i++) {
		rc = kvrt_config_set(c, o->keys[i], o->values[i], err, errlen);
		if (rc)
			return rc;
	}
	return kvrt_config_check(c, err, errlen);
}

static uint64_t model_ns(const struct kvrt_options *o, uint32_t tp_rank, uint32_t pp_rank)
{
	struct kvrt_key_namespace ns = {.model_id = o->model_id, .dtype = o->dtype,
					.tp_rank = tp_rank, .tp_size = o->tp_size ? o->tp_size : 1,
					.pp_rank = pp_rank, .pp_size = o->pp_size ? o->pp_size : 1};
	return kvrt_key_namespace_hash(&ns);
}

/* A request's namespace: the model's, plus everything of the request that
 * changes its KV. The scheduler keys rank 0 (TP = 1: see kvrt.h). */
static uint64_t req_ns(const struct kvrt_options *o, const struct kvrt_request *r)
{
	struct kvrt_key_bytes ex[64];
	uint32_t nex = r->num_extra;
	if (nex > 64) /* fold the rest into the last one's hash */
		nex = 64;
	for (uint32_t i = 0; i < nex; i++)
		ex[i] = (struct kvrt_key_bytes){r->extra[i].data, r->extra[i].len};
	uint64_t more = 0;
	for (uint32_t i = 64; i < r->num_extra; i++)
		more = XXH3_64bits_withSeed(r->extra[i].data, r->extra[i].len, more);
	struct kvrt_key_bytes exm = {&more, sizeof more};
	if (r->num_extra > 64)
		ex[63] = exm;
	struct kvrt_key_namespace ns = {.model_id = o->model_id, .dtype = o->dtype,
					.tp_rank = 0, .tp_size = o->tp_size ? o->tp_size : 1,
					.pp_rank = 0, .pp_size = o->pp_size ? o->pp_size : 1,
					.lora_name = r->lora_name, .lora_id = r->lora_id,
					.cache_salt = {r->cache_salt.data, r->cache_salt.len},
					.extra = ex, .num_extra = nex};
	return kvrt_key_namespace_hash(&ns);
}

/* Lookup sockets (connector/lookup_socket.h) between a scheduler and
 * workers of other processes: KVRT_LOOKUP_SOCKET=1 turns them on, =0 off;
 * unset, they are on when the workers may run in another process
 * (KVRT_OPT_WORKERS_ELSEWHERE) or the instance has more than one rank
 * (TP x PP > 1). A scheduler still reads a worker of its own process
 * directly when there is one. Rank k = pp_rank * tp_size + tp_rank. */
static bool lsock_wanted(const struct kvrt_options *o)
{
	const char *v = getenv("KVRT_LOOKUP_SOCKET");
	if (v && v[0])
		return v[0] == '1';
	uint64_t world = (uint64_t)(o->tp_size ? o->tp_size : 1) * (o->pp_size ? o->pp_size : 1);
	return world > 1 || (o->flags & KVRT_OPT_WORKERS_ELSEWHERE);
}

/* --- worker ----------------------------------------------------------------- */

/* KVRT_DEBUG (tests only): comma-separated words, each logged as a warning
 * when the worker starts. corrupt_loads=N: the first N chunks this worker
 * loads are overwritten in its CPU pool before their checksum is checked
 * (memory corruption: the loads fail and are recomputed); perturb_loads:
 * every chunk is overwritten and served without the check (wrong KV: the
 * negative control of the engine tests); slow_saves=MS: each step's saves
 * are reported done MS ms late (finished requests keep delay_free);
 * skip_saves_rank=K: the worker of TP rank K saves nothing (the scheduler
 * must then take the minimum over ranks). The shim reads
 * zero_kv_before_load itself. Unknown words are ignored with a warning. */
static void debug_from_env(struct kvrt_engine_config *ec, struct kvrt_worker *wk)
{
	const char *v = getenv("KVRT_DEBUG");
	if (!v || !v[0])
		return;
	char buf[256];
	snprintf(buf, sizeof buf, "%s", v);
	char *save = NULL;
	for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
		unsigned n;
		if (sscanf(w, "corrupt_loads=%u", &n) == 1)
			ec->debug_corrupt_loads = n;
		else if (sscanf(w, "slow_saves=%u", &n) == 1)
			ec->debug_save_done_delay_ms = n;
		else if (sscanf(w, "skip_saves_rank=%u", &n) == 1)
			wk->debug_skip_saves = n == wk->tp_rank;
		else if (!strcmp(w, "perturb_loads"))
			ec->debug_perturb_loads = true;
		else if (strcmp(w, "zero_kv_before_load") != 0) {
			kvrt_warn("KVRT_DEBUG: '%s' is not a test hook; ignored", w);
			continue;
		}
		kvrt_warn("KVRT_DEBUG: test hook '%s' on (for tests only)", w);
	}
}

int kvrt_worker_create(struct kvrt_worker **out, const struct kvrt_options *o, char *err,
		       size_t errlen)
{
	*out = NULL;
	if (err && errlen)
		err[0] = '\0';
	struct kvrt_worker *w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	int rc = read_config(&w->cfg, o, err, errlen);
	if (rc)
		goto fail;
	/* The copy engine is chosen by KVRT_DEVICE (kernels/device.c); a value
	 * from the file or extra_config reaches it the same way. */
	if (w->cfg.source[kvrt_config_key_index("device")] >= KVRT_CONFIG_SRC_FILE &&
	    w->cfg.source[kvrt_config_key_index("device")] != KVRT_CONFIG_SRC_ENV) {
		char dev[16];
		kvrt_config_get(&w->cfg, "device", dev, sizeof dev);
		setenv("KVRT_DEVICE", dev, 1);
	}
	rc = -ENOMEM;
	w->instance = dupstr(o->instance);
	if (!w->instance)
		goto fail;
	w->tp_rank = o->tp_rank;
	w->pp_rank = o->pp_rank;
	w->model_ns = model_ns(o, o->tp_rank, o->pp_rank);
	const struct kvrt_config *c = &w->cfg;
	struct kvrt_engine_config ec = {
		.chunk_size = c->chunk_size,
		.cpu_bytes = kvrt_config_gb_bytes(c->max_local_cpu_size),
		.namespace_hash = w->model_ns,
		.policy = c->cache_policy,
		.high_watermark = c->high_watermark,
		.low_watermark = c->low_watermark,
		.pin_timeout_ns = c->pin_timeout_ms ? (uint64_t)c->pin_timeout_ms * 1000000ull : UINT64_MAX,
		.disk_dir = kvrt_config_disk_enabled(c) ? c->local_disk : NULL,
		.disk_bytes = kvrt_config_disk_enabled(c) ? kvrt_config_gb_bytes(c->max_local_disk_size) : 0,
		.disk_odirect = c->disk_odirect,
		.all_at_once = !c->use_layerwise,
		.save_unfull_chunk = c->save_unfull_chunk,
		.save_decode_cache = c->save_decode_cache,
		/* Never serve wrong KV: a chunk damaged in memory or on disk is
		 * refused and recomputed (config.h has no key for it yet). */
		.verify_checksums = true,
		/* remote_url reaches the evict actor's remote tier (started by
		 * register). lookup_timeout_ms is each Redis request's deadline;
		 * remote_lookup_wait_ms how long a request is asked about again
		 * for Redis' answer (the engine caps it by the deadline). */
		.remote_url = c->remote_url[0] ? c->remote_url : NULL,
		.remote_timeout_ms = c->lookup_timeout_ms,
		.remote_lookup_wait_ms = c->remote_lookup_wait_ms,
		/* Checked a power of two by config.h; the engine applies it to
		 * the evict actor's mailbox (actors/engine.h). */
		.mailbox_size = c->mailbox_size,
	};
	debug_from_env(&ec, w);
	if (lsock_wanted(o)) {
		/* Served from register on (lookups before it find nothing anyway). */
		char p[128], sp[160];
		uint32_t tp = o->tp_size ? o->tp_size : 1;
		int prc = kvrt_lsock_path(p, sizeof p, w->instance, o->pp_rank * tp + o->tp_rank, true);
		if (!prc)
			w->lsock_path = strdup(p);
		if (prc || !w->lsock_path)
			kvrt_warn("worker '%s' rank %u: no lookup socket (%d): the scheduler "
				  "of another process will see no hit", w->instance, w->tp_rank, prc);
		/* The scheduler there learns from this file when a finished
		 * request's saves are done (else its blocks wait for a step). */
		_Atomic uint64_t *slot = NULL;
		if (w->lsock_path && !(prc = kvrt_saves_path(sp, sizeof sp, p)) &&
		    !(prc = kvrt_saves_pub_create(&w->spub, sp, &slot)))
			ec.saves_done_pub = slot;
		else if (w->lsock_path)
			kvrt_info("worker '%s' rank %u: no saves-done file (%d): finished requests "
				  "free their blocks a step later", w->instance, w->tp_rank, prc);
	}
	if (c->trace[0]) {
		int trc = kvrt_trace_start(c->trace);
		if (!trc)
			w->trace_owned = true;
		else if (trc != -EALREADY)
			kvrt_warn("trace '%s' not started (%d)", c->trace, trc);
	}
	rc = kvrt_engine_create(&w->e, &ec);
	if (rc) {
		if (err && errlen)
			snprintf(err, errlen, "kvrt: engine create failed (%d)", rc);
		goto fail;
	}
	pthread_rwlock_wrlock(&reg_lock);
	for (struct kvrt_worker *x = reg_head; x; x = x->next)
		if (!strcmp(x->instance, w->instance) && x->tp_rank == w->tp_rank && x->pp_rank == w->pp_rank)
			rc = -EEXIST;
	if (!rc) {
		w->next = reg_head;
		reg_head = w;
	}
	pthread_rwlock_unlock(&reg_lock);
	if (rc) {
		if (err && errlen)
			snprintf(err, errlen, "kvrt: instance '%s' rank %u/%u exists in this process",
				 w->instance, w->tp_rank, w->pp_rank);
		goto fail;
	}
	char line[2048];
	kvrt_config_describe(c, line, sizeof line);
	kvrt_info("worker '%s' rank %u: %s", w->instance, w->tp_rank, line);
	*out = w;
	return 0;
fail:
	kvrt_engine_destroy(w->e);
	kvrt_saves_pub_close(w->spub); /* after the engine that stores into it */
	free(w->lsock_path);
	if (w->trace_owned)
		kvrt_trace_stop();
	free(w->instance);
	free(w);
	return rc;
}

/* vLLM >= 0.33 per-layer views (B, H, N, 2D) as FlashInfer's (B, 2, N, H, D). */
static int convert_tensor(const struct kvrt_tensor *t, struct kvrt_kv_tensor *o)
{
	memset(o, 0, sizeof(*o));
	o->data = t->data;
	o->elem_size = t->elem_size;
	o->name = t->name;
	if (t->ndim > KVRT_TENSOR_MAX_DIMS)
		return -EINVAL;
	switch (t->layout) {
	case KVRT_LAYOUT_FLASH_ATTN:
	case KVRT_LAYOUT_FLASHINFER:
	case KVRT_LAYOUT_MLA:
	case KVRT_LAYOUT_CPU:
		o->layout = (enum kvrt_kv_layout)t->layout;
		o->ndim = t->ndim;
		memcpy(o->shape, t->shape, sizeof(o->shape));
		memcpy(o->stride, t->stride, sizeof(o->stride));
		return 0;
	case KVRT_LAYOUT_BHNC:
	case KVRT_LAYOUT_BHNC_BLOCKS: {
		if (t->ndim != 4 || t->shape[3] % 2 || t->shape[3] < 2)
			return -EINVAL;
		/* Whole blocks: copied as FlashInfer's view too, a permutation
		 * of the block's bytes that every save and load shares. */
		o->whole_blocks = t->layout == KVRT_LAYOUT_BHNC_BLOCKS;
		int64_t d = t->shape[3] / 2;
		o->layout = KVRT_KV_FLASHINFER;
		o->ndim = 5;
		int64_t sh[5] = {t->shape[0], 2, t->shape[2], t->shape[1], d};
		int64_t st[5] = {t->stride[0], d * t->stride[3], t->stride[2], t->stride[1], t->stride[3]};
		memcpy(o->shape, sh, sizeof sh);
		memcpy(o->stride, st, sizeof st);
		return 0;
	}
	case KVRT_LAYOUT_BHNC_MLA: {
		if (t->ndim != 4 || t->shape[1] != 1)
			return -EINVAL;
		o->layout = KVRT_KV_MLA;
		o->ndim = 3;
		int64_t sh[3] = {t->shape[0], t->shape[2], t->shape[3]};
		int64_t st[3] = {t->stride[0], t->stride[2], t->stride[3]};
		memcpy(o->shape, sh, sizeof sh);
		memcpy(o->stride, st, sizeof st);
		return 0;
	}
	}
	return -EINVAL;
}

int kvrt_worker_register(struct kvrt_worker *w, const struct kvrt_tensor *t, uint32_t n)
{
	if (w->registered)
		return -EALREADY;
	if (!n)
		return -EINVAL;
	struct kvrt_kv_tensor *kt = calloc(n, sizeof(*kt));
	if (!kt)
		return -ENOMEM;
	int rc = 0;
	for (uint32_t i = 0; i < n && !rc; i++) {
		rc = convert_tensor(&t[i], &kt[i]);
		if (rc)
			kvrt_error("tensor %u (%s): layout %d with %u dims is not understood", i,
				   t[i].name ? t[i].name : "?", (int)t[i].layout, t[i].ndim);
	}
	if (!rc) {
		/* Lookups read the index while register builds the pool: keep
		 * them out (they answer "no hit" until this returns). */
		pthread_rwlock_wrlock(&reg_lock);
		rc = kvrt_engine_register(w->e, kt, n, NULL);
		pthread_rwlock_unlock(&reg_lock);
	}
	free(kt);
	if (!rc)
		w->registered = true;
	if (!rc && w->lsock_path) {
		int src = kvrt_lsock_server_start(&w->lsrv, w->e, w->lsock_path);
		if (src)
			kvrt_warn("worker '%s' rank %u: cannot serve lookups on %s (%d): the "
				  "scheduler of another process will see no hit",
				  w->instance, w->tp_rank, w->lsock_path, src);
	}
	return rc;
}

#define _ID_MASK (~(1ull << 63))

static struct _kvrt_pend *pend_find(struct kvrt_worker *w, uint64_t hash, bool delayed)
{
	hash &= _ID_MASK;
	for (size_t i = 0; i < w->npend; i++)
		if (w->pend[i].hash == hash && w->pend[i].delayed == delayed)
			return &w->pend[i];
	return NULL;
}

static int pend_add(struct kvrt_worker *w, uint64_t hash, bool delayed, const char *id, uint32_t len)
{
	if (pend_find(w, hash, delayed))
		return 0;
	if (kvrt_grow((void **)&w->pend, &w->pend_cap, w->npend + 1, sizeof(*w->pend)))
		return -ENOMEM;
	char *c = malloc(len ? len : 1);
	if (!c)
		return -ENOMEM;
	memcpy(c, id, len);
	w->pend[w->npend++] = (struct _kvrt_pend){.hash = hash & _ID_MASK, .delayed = delayed, .len = (uint16_t)len, .id = c};
	return 0;
}

/* A request's table entry in the frame (NULL: none). */
struct _kvrt_rt {
	uint64_t hash, ns;
	uint32_t prompt, ntok;
	const uint32_t *tok; /* into the frame copy (aligned: the copy is malloc'd
			      * and entries start at offsets that are multiples of 4) */
};

/* A slot of the worker's map from id hash to the frame's table entry. */
struct _kvrt_rtslot {
	const uint8_t *p; /* the entry in the frame */
	uint64_t hash;    /* its id hash */
	int64_t preq;     /* its plan request (index into preqs), or -1 */
	uint32_t gen;     /* the bind that filled it: empty unless rtmap_gen */
};

static size_t rt_slot(const struct kvrt_worker *w, uint64_t hash)
{
	size_t m = w->rtmap_cap - 1;
	size_t i = (size_t)((hash * 0x9e3779b97f4a7c15ull) >> 17) & m;
	while (w->rtmap[i].gen == w->rtmap_gen && w->rtmap[i].hash != hash)
		i = (i + 1) & m;
	return i;
}

/* Index the frame's table (validated by frame_open): the first entry of
 * each hash wins, as a scan from the start would find. */
static int rt_index(struct kvrt_worker *w, const uint8_t *tab, uint32_t nreq)
{
	size_t cap = w->rtmap_cap ? w->rtmap_cap : 64;
	while (cap < 2 * (size_t)nreq + 2)
		cap *= 2;
	if (cap != w->rtmap_cap) {
		struct _kvrt_rtslot *m = malloc(cap * sizeof(*m));
		if (!m)
			return -ENOMEM;
		free(w->rtmap);
		w->rtmap = m;
		w->rtmap_cap = cap;
		w->rtmap_gen = 0;
	}
	/* A new generation empties every slot; clear them (to generation 0)
	 * only when the counter starts over (a fresh map, or a wrap). */
	if (++w->rtmap_gen <= 1) {
		w->rtmap_gen = 1;
		memset(w->rtmap, 0, w->rtmap_cap * sizeof(*w->rtmap));
	}
	const uint8_t *p = tab;
	for (uint32_t i = 0; i < nreq; i++) {
		uint64_t h = kvrt_get_le64(p);
		size_t k = rt_slot(w, h);
		if (w->rtmap[k].gen != w->rtmap_gen)
			w->rtmap[k] = (struct _kvrt_rtslot){p, h, -1, w->rtmap_gen};
		p += 24 + 4 * (size_t)kvrt_get_le32(p + 20);
	}
	return 0;
}

static struct _kvrt_rtslot *rt_find(struct kvrt_worker *w, uint64_t hash, struct _kvrt_rt *out)
{
	struct _kvrt_rtslot *sl = &w->rtmap[rt_slot(w, hash)];
	if (sl->gen != w->rtmap_gen)
		return NULL;
	const uint8_t *p = sl->p;
	*out = (struct _kvrt_rt){kvrt_get_le64(p), kvrt_get_le64(p + 8), kvrt_get_le32(p + 16),
				 kvrt_get_le32(p + 20), (const uint32_t *)(const void *)(p + 24)};
	return sl;
}

/* Validate the frame; on success the meta view and the table. */
static int frame_open(const uint8_t *f, size_t len, struct kvrt_meta_view *v, const uint8_t **tab,
		      uint32_t *nreq)
{
	if (len < _FRAME_HDR || memcmp(f, _FRAME_MAGIC, 4) || kvrt_get_le32(f + 4) != 1)
		return -EBADMSG;
	uint32_t mlen = kvrt_get_le32(f + 8);
	*nreq = kvrt_get_le32(f + 12);
	size_t mpad = ((size_t)mlen + 3) & ~(size_t)3;
	if (mpad > len - _FRAME_HDR)
		return -EBADMSG;
	if (kvrt_meta_decode(f + _FRAME_HDR, mlen, v))
		return -EBADMSG;
	const uint8_t *p = f + _FRAME_HDR + mpad, *end = f + len;
	*tab = p;
	for (uint32_t i = 0; i < *nreq; i++) {
		if ((size_t)(end - p) < 24)
			return -EBADMSG;
		uint32_t ntok = kvrt_get_le32(p + 20);
		if ((size_t)(end - p - 24) / 4 < ntok)
			return -EBADMSG;
		p += 24 + 4 * (size_t)ntok;
	}
	return p == end ? 0 : -EBADMSG;
}

static struct kvrt_plan_req *plan_get(struct kvrt_worker *w, size_t *n, uint64_t hash,
				      const struct _kvrt_rt *rt, struct _kvrt_rtslot *sl)
{
	if (sl->preq >= 0)
		return &w->preqs[sl->preq];
	if (kvrt_grow((void **)&w->preqs, &w->preqs_cap, *n + 1, sizeof(*w->preqs)))
		return NULL;
	sl->preq = (int64_t)*n;
	struct kvrt_plan_req *r = &w->preqs[(*n)++];
	*r = (struct kvrt_plan_req){.req_id = hash, .ns_hash = rt->ns, .tokens = rt->tok,
				    .num_tokens = rt->ntok, .prompt_tokens = rt->prompt};
	return r;
}

int kvrt_worker_bind(struct kvrt_worker *w, const void *meta, size_t len)
{
	if (!w->registered)
		return -ENODEV;
	if (kvrt_grow((void **)&w->frame, &w->frame_cap, len, 1))
		return -ENOMEM;
	memcpy(w->frame, meta, len);
	struct kvrt_meta_view v;
	const uint8_t *tab;
	uint32_t nreq;
	if (frame_open(w->frame, len, &v, &tab, &nreq)) {
		kvrt_error("step metadata of %zu bytes is not kvrt's: nothing bound", len);
		kvrt_engine_bind_step(w->e, &(struct kvrt_step_plan){0});
		return -EBADMSG;
	}
	if (rt_index(w, tab, nreq))
		return -ENOMEM;
	uint32_t bs = v.block_size, cs = v.chunk_size;
	/* Pass 1: the requests, their block-table and key sizes. */
	size_t n = 0, nblk = 0, nkeys = 0;
	int ret = 0;
	struct kvrt_meta_iter it;
	struct kvrt_meta_item item;
	for (int l = KVRT_META_LOADS; l <= KVRT_META_SAVES; l++) {
		for (kvrt_meta_iter_init(&it, &v, (enum kvrt_meta_list)l); kvrt_meta_iter_next(&it, &item);) {
			struct _kvrt_rt rt;
			struct _kvrt_rtslot *sl = rt_find(w, item.id_hash, &rt);
			if (!sl) {
				kvrt_error("step metadata names request %.*s without its tokens",
					   (int)item.id_len, item.id);
				ret = -EINVAL;
				continue;
			}
			struct kvrt_plan_req *r = plan_get(w, &n, item.id_hash, &rt, sl);
			if (!r)
				return -ENOMEM;
			if (l == KVRT_META_LOADS) {
				r->load_start = item.token_start;
				r->load_end = item.token_end;
				if (item.flags & KVRT_META_REFUSED) {
					r->flags |= KVRT_PLAN_REFUSED_LOAD;
					r->load_hit = item.token_end;
				} else {
					r->load_hit = (kvrt_meta_item_first_chunk(&item, &v) + item.num_keys - 1) *
							      cs +
						      item.last_chunk_tokens;
				}
				if (item.flags & KVRT_META_ASYNC) {
					r->flags |= KVRT_PLAN_ASYNC_LOAD;
					if (pend_add(w, item.id_hash, false, item.id, item.id_len))
						return -ENOMEM;
				}
				nkeys += kvrt_meta_item_first_chunk(&item, &v) + item.num_keys;
			} else {
				r->save_start = item.token_start;
				r->save_end = item.token_end;
			}
		}
	}
	for (size_t i = 0; i < n; i++) {
		uint32_t e2 = w->preqs[i].load_end > w->preqs[i].save_end ? w->preqs[i].load_end
									  : w->preqs[i].save_end;
		nblk += (e2 + bs - 1) / bs;
	}
	if (kvrt_grow((void **)&w->blocks, &w->blocks_cap, nblk, sizeof(*w->blocks)) ||
	    kvrt_grow((void **)&w->keys, &w->keys_cap, nkeys, sizeof(*w->keys)))
		return -ENOMEM;
	/* Pass 2: block tables (vLLM's null block 0 where nothing is read or
	 * written) and the scheduler's keys. */
	size_t bo = 0, ko = 0;
	for (size_t i = 0; i < n; i++) {
		struct kvrt_plan_req *r = &w->preqs[i];
		uint32_t e2 = r->load_end > r->save_end ? r->load_end : r->save_end;
		r->num_blocks = (e2 + bs - 1) / bs;
		r->block_ids = w->blocks + bo;
		memset(w->blocks + bo, 0, r->num_blocks * sizeof(int32_t));
		bo += r->num_blocks;
	}
	for (int l = KVRT_META_LOADS; l <= KVRT_META_SAVES; l++) {
		for (kvrt_meta_iter_init(&it, &v, (enum kvrt_meta_list)l); kvrt_meta_iter_next(&it, &item);) {
			struct _kvrt_rt rt;
			struct _kvrt_rtslot *sl = rt_find(w, item.id_hash, &rt);
			if (!sl || sl->preq < 0)
				continue;
			struct kvrt_plan_req *r = &w->preqs[sl->preq];
			int32_t *bt = (int32_t *)r->block_ids;
			uint32_t b0 = item.token_start / bs;
			for (uint32_t b = 0; b < item.num_blocks && b0 + b < r->num_blocks; b++)
				bt[b0 + b] = (int32_t)kvrt_meta_item_block(&item, b);
			if (l == KVRT_META_LOADS) {
				/* Keys of chunks 0..first-1 are not in the message:
				 * the engine checks only what it is given, so give it
				 * none unless the load starts at chunk 0. */
				uint32_t first = kvrt_meta_item_first_chunk(&item, &v);
				if (first == 0 && item.num_keys) {
					r->keys = w->keys + ko;
					r->num_keys = item.num_keys;
					for (uint32_t k = 0; k < item.num_keys; k++)
						w->keys[ko + k] = kvrt_meta_item_key(&item, k);
					ko += item.num_keys;
				}
			}
		}
	}
	if (w->debug_skip_saves) /* test hook: this rank keeps nothing */
		for (size_t i = 0; i < n; i++)
			w->preqs[i].save_end = w->preqs[i].save_start;
	/* Delayed frees announced by this step. */
	for (kvrt_meta_iter_init(&it, &v, KVRT_META_FINISHED); kvrt_meta_iter_next(&it, &item);)
		if (pend_add(w, item.id_hash, true, item.id, item.id_len))
			return -ENOMEM;
	int rc = kvrt_engine_bind_step(w->e, &(struct kvrt_step_plan){
						     .reqs = w->preqs, .num_reqs = (uint32_t)n,
						     .step = v.step,
						     .preempted = v.count[KVRT_META_PREEMPTED] > 0});
	return rc ? rc : ret;
}

int kvrt_worker_preempted(struct kvrt_worker *w)
{
	return w->registered ? kvrt_engine_save_barrier(w->e) : 0;
}

unsigned kvrt_worker_step_work(struct kvrt_worker *w)
{
	return w->registered ? kvrt_engine_step_work(w->e) : 0;
}

int kvrt_worker_start_load(struct kvrt_worker *w)
{
	return w->registered ? kvrt_engine_start_load(w->e) : 0;
}

int kvrt_worker_wait_layer(struct kvrt_worker *w, uint32_t layer)
{
	return w->registered ? kvrt_engine_wait_layer(w->e, layer) : 0;
}

int kvrt_worker_save_layer(struct kvrt_worker *w, uint32_t layer)
{
	return w->registered ? kvrt_engine_save_layer(w->e, layer) : 0;
}

int kvrt_worker_wait_save(struct kvrt_worker *w)
{
	return w->registered ? kvrt_engine_wait_save(w->e) : 0;
}

/* Append one id record; false when it does not fit. */
static bool put_id(uint8_t *buf, size_t cap, size_t *off, const struct _kvrt_pend *p)
{
	if (cap - *off < 2u + p->len)
		return false;
	buf[*off] = (uint8_t)(p->len & 0xff);
	buf[*off + 1] = (uint8_t)(p->len >> 8);
	memcpy(buf + *off + 2, p->id, p->len);
	*off += 2u + p->len;
	return true;
}

static void pend_drop(struct kvrt_worker *w, size_t i)
{
	free(w->pend[i].id);
	w->pend[i] = w->pend[--w->npend];
}

int kvrt_worker_get_finished(struct kvrt_worker *w, void *buf, size_t cap, uint32_t *nsend,
			     uint32_t *nrecv, uint32_t *nfail)
{
	*nsend = *nrecv = *nfail = 0;
	if (!w->npend)
		return 0;
	size_t nd = 0;
	if (kvrt_grow((void **)&w->scratch, &w->scratch_cap, 3 * w->npend + 3, sizeof(uint64_t)))
		return -ENOMEM;
	uint64_t *delayed = w->scratch;
	/* The engine keeps a delayed id until it reports it: hand each once. */
	for (size_t i = 0; i < w->npend; i++)
		if (w->pend[i].delayed && !w->pend[i].told) {
			delayed[nd++] = w->pend[i].hash;
			w->pend[i].told = true;
		}
	uint32_t room = (uint32_t)w->npend + 1;
	uint64_t *snd = w->scratch + w->npend + 1, *rcv = snd + room, *fl = rcv + room;
	(void)fl;
	struct kvrt_finished f = {.sending = snd, .sending_cap = room, .recving = rcv, .recving_cap = room};
	uint64_t failed[64];
	f.failed = failed;
	f.failed_cap = 64;
	int rc = w->registered ? kvrt_engine_get_finished(w->e, delayed, (uint32_t)nd, &f) : 0;
	if (!w->registered)
		f.num_sending = (uint32_t)nd, memcpy(snd, delayed, nd * sizeof(*delayed));
	if (rc)
		return rc;
	/* The engine forgets what it reports. Finished async loads are kept
	 * here until they are written; delayed ids that do not fit are offered
	 * to the engine again. So the loads get the room first. */
	for (uint32_t i = 0; i < f.num_recving; i++) {
		struct _kvrt_pend *p = pend_find(w, rcv[i], false);
		if (p)
			p->done = true;
	}
	for (uint32_t i = 0; i < f.num_failed; i++) {
		struct _kvrt_pend *p = pend_find(w, failed[i], false);
		if (p)
			p->failed = true;
	}
	size_t loads = 0; /* bytes of every finished load's records */
	for (size_t i = 0; i < w->npend; i++)
		if (w->pend[i].done)
			loads += (2u + w->pend[i].len) * (w->pend[i].failed ? 2u : 1u);
	size_t room_send = cap > loads ? cap - loads : 0;
	uint8_t *b = buf;
	size_t off = 0;
	for (uint32_t i = 0; i < f.num_sending; i++) {
		struct _kvrt_pend *p = pend_find(w, snd[i], true);
		if (p && put_id(b, room_send, &off, p)) {
			(*nsend)++;
			pend_drop(w, (size_t)(p - w->pend));
		} else if (p) {
			p->told = false;
		}
	}
	/* Records: sending, then receiving, then failed (a subset of the
	 * receiving): a failed load goes out with its receiving record. */
	size_t fail_bytes = 0;
	for (size_t i = 0; i < w->npend; i++) {
		struct _kvrt_pend *p = &w->pend[i];
		p->out = false;
		if (!p->done)
			continue;
		size_t extra = p->failed ? 2u + p->len : 0;
		if (cap - off < extra + fail_bytes)
			continue;
		if (put_id(b, cap - fail_bytes - extra, &off, p)) {
			p->out = true;
			fail_bytes += extra;
			(*nrecv)++;
		}
	}
	for (size_t i = 0; i < w->npend; i++)
		if (w->pend[i].out && w->pend[i].failed && put_id(b, cap, &off, &w->pend[i]))
			(*nfail)++;
	for (size_t i = w->npend; i-- > 0;)
		if (w->pend[i].out)
			pend_drop(w, i);
	return 0;
}

size_t kvrt_worker_load_errors(struct kvrt_worker *w, int64_t *out, size_t cap)
{
	return w->registered ? kvrt_engine_load_errors(w->e, out, cap) : 0;
}

int kvrt_worker_stats(struct kvrt_worker *w, struct kvrt_stats *o)
{
	memset(o, 0, sizeof(*o));
	struct kvrt_engine_stats s;
	kvrt_engine_stats(w->e, &s);
	o->lookups = s.lookups;
	o->lookup_tokens = s.lookup_tokens;
	o->prefetches = s.prefetches;
	o->steps = s.steps;
	o->load_reqs = s.load_reqs;
	o->load_chunks = s.load_chunks;
	o->load_tokens = s.load_tokens;
	o->load_failed_chunks = s.load_failed_chunks;
	o->load_error_blocks = s.load_error_blocks;
	o->async_done = s.async_done;
	o->save_chunks = s.save_chunks;
	o->save_dup = s.save_dup;
	o->save_skipped_pool = s.save_skipped_pool;
	o->save_skipped_mailbox = s.save_skipped_mailbox;
	o->save_abandoned = s.save_abandoned;
	o->checksum_failures = s.checksum_failures;
	o->pinned = s.pinned;
	struct kvrt_index *idx = kvrt_engine_index(w->e);
	o->chunks = idx ? kvrt_index_count(idx) : 0;
	struct kvrt_pool *pool = kvrt_engine_pool(w->e);
	uint64_t sb = pool ? kvrt_pool_slab_bytes(pool) : 0;
	uint64_t slabs = pool ? kvrt_pool_slabs(pool) : 0;
	o->pool_bytes = slabs * sb;
	o->pool_used_bytes = slabs > s.evict.slabs_free ? (slabs - s.evict.slabs_free) * sb : 0;
	o->cpu_chunks = s.evict.cpu_entries;
	o->disk_chunks = s.evict.disk_entries;
	o->disk_used_bytes = s.evict.disk_entries * sb;
	o->evicted = s.evict.evicted;
	o->demoted = s.evict.demoted;
	o->promoted = s.evict.promoted;
	o->remote_writes = s.remote_writes;
	o->remote_hits = s.remote_hits;
	o->remote_errors = s.remote_errors;
	return 0;
}

int kvrt_worker_flush(struct kvrt_worker *w)
{
	return w->registered ? kvrt_engine_flush(w->e) : 0;
}

void kvrt_worker_destroy(struct kvrt_worker *w)
{
	if (!w)
		return;
	kvrt_saves_pub_unlink(w->spub);  /* before the socket: the directory goes with it */
	kvrt_lsock_server_stop(w->lsrv); /* before the engine it asks */
	free(w->lsock_path);
	pthread_rwlock_wrlock(&reg_lock);
	for (struct kvrt_worker **pp = &reg_head; *pp; pp = &(*pp)->next)
		if (*pp == w) {
			*pp = w->next;
			break;
		}
	pthread_rwlock_unlock(&reg_lock);
	kvrt_engine_destroy(w->e);
	kvrt_saves_pub_close(w->spub); /* after the engine that stores into it */
	if (w->trace_owned) /* after the actors stopped: their records are in */
		kvrt_trace_stop();
	for (size_t i = 0; i < w->npend; i++)
		free(w->pend[i].id);
	free(w->pend);
	free(w->scratch);
	free(w->preqs);
	free(w->blocks);
	free(w->keys);
	free(w->frame);
	free(w->rtmap);
	free(w->instance);
	free(w);
}

/* --- scheduler -------------------------------------------------------------- */

/* A request the scheduler knows (looked up, loading, saving). */
struct _kvrt_sreq_state {
	uint64_t hash;          /* id hash */
	char *id;               /* id bytes */
	uint32_t id_len;
	uint64_t ns;            /* key namespace */
	uint32_t hit;           /* tokens the last lookup matched (load_hit) */
	/* The last lookup vLLM asked: its num_computed (vLLM's local hit) and
	 * kvrt's answer. vLLM allocates right after the lookup whose answer it
	 * takes, so after_alloc plans the load from lookup_computed, never from
	 * request.num_computed_tokens (still 0 then: vLLM sets it after
	 * update_state_after_alloc). */
	uint32_t lookup_computed;
	uint32_t lookup_matched;
	bool looked_up;
	uint64_t wait_t0;       /* first "ask again" for chunks coming from disk or
				 * Redis (sync loads, prefetch_wait_ms); 0 = none */
	bool async;             /* the last lookup answered async */
	uint32_t saved_chunks;  /* chunks [0, saved_chunks) saved or loaded */
	bool tail_saved;        /* the prompt's tail chunk was saved */
	uint64_t save_step;     /* last step that saved from its blocks */
	/* a load planned by after_alloc, for the next metadata */
	bool load;
	uint32_t load_start, load_end;
	bool load_refused;      /* after_alloc refused it: the worker reports its
				 * blocks as load errors */
	uint32_t *load_tok;     /* tokens [0, hit); NULL when refused */
	int32_t *load_blk;      /* blocks [load_start/bs, (load_end-1)/bs] */
	uint32_t load_nblk;
	struct _kvrt_sreq_state *next; /* hash chain */
	char idbuf[];           /* id's storage (id points here): one allocation */
};

#define _SCHED_BUCKETS 1024u

struct kvrt_sched {
	pthread_mutex_t mu;            /* serializes every call */
	struct kvrt_config cfg;        /* effective config */
	struct kvrt_options o;         /* strings copied below */
	char *instance, *model_id, *dtype;
	uint32_t bs, cs;               /* block, chunk size */
	uint64_t step;                 /* metadata built so far */
	bool warned;                   /* "no worker" said */
	bool warned_alloc;             /* a refused load said */
	uint64_t refused_loads;        /* loads refused by after_alloc */
	struct kvrt_lsock_client *lsock; /* the ranks' lookup sockets, or NULL */
	bool lsock_off;                /* lookup sockets not used (not wanted or failed) */
	struct kvrt_saves_view *sview; /* the ranks' saves-done files (with lsock), or NULL */
	struct _kvrt_sreq_state *tab[_SCHED_BUCKETS]; /* requests by hash */
	uint32_t nload;                /* requests with load set: build_meta scans
					* the table only when some */
	uint64_t plain_ns;             /* req_ns of a request without lora, salt or
					* extra (the common case), once plain_ns_set */
	bool plain_ns_set;
	struct kvrt_bytes *delayed;    /* ids freed with delay_free, for the next meta */
	uint32_t ndelayed, delayed_cap;
	/* build scratch */
	uint8_t *out;                  /* the last frame */
	size_t out_cap;
	struct kvrt_meta_req *mreq;    /* loads then saves */
	size_t mreq_cap;
	struct kvrt_chunk_key *keys;   /* keys of every item */
	size_t keys_cap;
	uint32_t *blk;                 /* block ids of every item */
	size_t blk_cap;
	struct kvrt_meta_id *ids;      /* preempted, finished */
	size_t ids_cap;
	struct { uint64_t hash, ns; uint32_t prompt, ntok; const uint32_t *tok; } *rt;
	size_t rt_cap;
};

static struct _kvrt_sreq_state **sfind(struct kvrt_sched *s, const char *id, uint32_t len, uint64_t h)
{
	struct _kvrt_sreq_state **pp = &s->tab[h % _SCHED_BUCKETS];
	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->hash == h && (*pp)->id_len == len && !memcmp((*pp)->id, id, len))
			break;
	return pp;
}

static struct _kvrt_sreq_state *sget(struct kvrt_sched *s, const char *id, uint32_t len)
{
	uint64_t h = kvrt_meta_id_hash(id, len);
	struct _kvrt_sreq_state **pp = sfind(s, id, len, h);
	if (*pp)
		return *pp;
	struct _kvrt_sreq_state *q = calloc(1, sizeof(*q) + (len ? len : 1));
	if (!q)
		return NULL;
	q->id = q->idbuf;
	memcpy(q->id, id, len);
	q->id_len = len;
	q->hash = h;
	q->save_step = UINT64_MAX;
	*pp = q;
	return q;
}

/* req_ns, remembered for plain requests: lora_name NULL or "" (the same
 * bytes to the namespace hash), lora_id 0, no salt, no extra. */
static uint64_t sched_req_ns(struct kvrt_sched *s, const struct kvrt_request *r)
{
	bool plain = (!r->lora_name || !r->lora_name[0]) && !r->lora_id && !r->cache_salt.len &&
		     !r->num_extra;
	if (!plain)
		return req_ns(&s->o, r);
	if (!s->plain_ns_set) {
		s->plain_ns = req_ns(&s->o, r);
		s->plain_ns_set = true;
	}
	return s->plain_ns;
}

static void sload_clear(struct kvrt_sched *s, struct _kvrt_sreq_state *q)
{
	if (q->load)
		s->nload--;
	free(q->load_tok);
	free(q->load_blk);
	q->load_tok = NULL;
	q->load_blk = NULL;
	q->load = false;
}

static void sfree(struct kvrt_sched *s, struct _kvrt_sreq_state *q)
{
	sload_clear(s, q);
	free(q);
}

int kvrt_sched_create(struct kvrt_sched **out, const struct kvrt_options *o, char *err, size_t errlen)
{
	*out = NULL;
	if (err && errlen)
		err[0] = '\0';
	if (!o->block_size) {
		if (err && errlen)
			snprintf(err, errlen, "kvrt: block_size must be > 0");
		return -EINVAL;
	}
	struct kvrt_sched *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	int rc = read_config(&s->cfg, o, err, errlen);
	if (rc) {
		free(s);
		return rc;
	}
	s->instance = dupstr(o->instance);
	s->model_id = dupstr(o->model_id);
	s->dtype = dupstr(o->dtype);
	if (!s->instance || !s->model_id || !s->dtype) {
		free(s->instance);
		free(s->model_id);
		free(s->dtype);
		free(s);
		return -ENOMEM;
	}
	s->o = *o;
	s->step = 1; /* step numbers start at 1: the workers' saves-done 0 means none */
	s->o.instance = s->instance;
	s->o.model_id = s->model_id;
	s->o.dtype = s->dtype;
	s->o.keys = s->o.values = NULL;
	s->o.num_keys = 0;
	s->bs = o->block_size;
	s->cs = s->cfg.chunk_size;
	pthread_mutex_init(&s->mu, NULL);
	*out = s;
	return 0;
}

void kvrt_sched_destroy(struct kvrt_sched *s)
{
	if (!s)
		return;
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	for (uint32_t b = 0; b < _SCHED_BUCKETS; b++)
		while (s->tab[b]) {
			struct _kvrt_sreq_state *q = s->tab[b];
			s->tab[b] = q->next;
			if (w)
				kvrt_engine_release(w->e, q->hash);
			else if (s->lsock)
				kvrt_lsock_client_release(s->lsock, q->hash);
			sfree(s, q);
		}
	pthread_rwlock_unlock(&reg_lock);
	kvrt_lsock_client_destroy(s->lsock);
	kvrt_saves_view_destroy(s->sview);
	for (uint32_t i = 0; i < s->ndelayed; i++)
		free((void *)s->delayed[i].data);
	free(s->delayed);
	free(s->out);
	free(s->mreq);
	free(s->keys);
	free(s->blk);
	free(s->ids);
	free(s->rt);
	free(s->instance);
	free(s->model_id);
	free(s->dtype);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

int kvrt_sched_reset_cache(struct kvrt_sched *s)
{
	uint64_t dropped = 0, kept = 0;
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	int rc = w ? kvrt_engine_reset(w->e, &dropped, &kept) : -ENODEV;
	pthread_rwlock_unlock(&reg_lock);
	if (rc)
		return rc;
	kvrt_info("reset_cache '%s': %llu chunk(s) dropped, %llu kept (pinned or in flight)",
		  s->instance, (unsigned long long)dropped, (unsigned long long)kept);
	return kept ? -EBUSY : 0;
}

int kvrt_sched_config_get(struct kvrt_sched *s, const char *key, char *buf, size_t len)
{
	return kvrt_config_get(&s->cfg, key, buf, len);
}

bool kvrt_sched_sees_worker(struct kvrt_sched *s)
{
	pthread_rwlock_rdlock(&reg_lock);
	bool ok = reg_find(s->instance) != NULL;
	pthread_rwlock_unlock(&reg_lock);
	return ok;
}

/* No worker in this process: ask every rank's lookup socket (the minimum;
 * any rank failing is no hit). -ENODEV when sockets are not used. The
 * timeout is lookup_timeout_ms when set, else 250 ms: the scheduler's
 * thread waits (a healthy rank answers in well under a millisecond; its
 * default 3000 would stall every step of vLLM on one sick rank). */
static int sched_remote_lookup(struct kvrt_sched *s, uint64_t req, uint64_t ns, const uint32_t *tok,
			       uint32_t n, struct kvrt_lookup_result *res)
{
	if (!s->lsock) {
		if (s->lsock_off || !lsock_wanted(&s->o))
			return -ENODEV;
		s->lsock_off = true;
		uint64_t world = (uint64_t)(s->o.tp_size ? s->o.tp_size : 1) * (s->o.pp_size ? s->o.pp_size : 1);
		if (world > 4096)
			return -ENODEV;
		char (*p)[128] = calloc(world, sizeof(*p));
		const char **pv = calloc(world, sizeof(*pv));
		int rc = p && pv ? 0 : -ENOMEM;
		for (uint32_t k = 0; k < world && !rc; k++) {
			rc = kvrt_lsock_path(p[k], sizeof p[k], s->instance, k, false);
			pv[k] = p[k];
		}
		uint32_t ms = s->cfg.source[kvrt_config_key_index("lookup_timeout_ms")] == KVRT_CONFIG_SRC_DEFAULT
				      ? 250 : s->cfg.lookup_timeout_ms;
		if (!rc)
			rc = kvrt_lsock_client_create(&s->lsock, pv, (uint32_t)world, ms);
		for (uint32_t k = 0; k < world && !rc; k++)
			if (kvrt_saves_path(p[k], sizeof p[k], p[k]))
				break;
		if (!rc && kvrt_saves_view_create(&s->sview, pv, (uint32_t)world))
			s->sview = NULL; /* finished requests keep delay_free */
		free(p);
		free(pv);
		if (rc) {
			kvrt_warn("scheduler '%s': no lookup sockets (%d)", s->instance, rc);
			return -ENODEV;
		}
		s->lsock_off = false;
		kvrt_info("scheduler '%s': lookups ask %u rank(s) over their sockets "
			  "(timeout %u ms)", s->instance, (unsigned)world, ms);
	}
	return kvrt_lsock_client_lookup(s->lsock, req, ns, tok, n, res);
}

int kvrt_sched_lookup(struct kvrt_sched *s, const struct kvrt_request *r, uint32_t num_computed,
		      uint32_t *matched, bool *load_async)
{
	*matched = 0;
	*load_async = false;
	if (!r->id_len || r->id_len > KVRT_META_MAX_ID_LEN || r->prompt_tokens > r->num_tokens)
		return 0;
	int ret = 0;
	pthread_mutex_lock(&s->mu);
	struct _kvrt_sreq_state *q = sget(s, r->id, r->id_len);
	if (!q)
		goto out;
	q->ns = sched_req_ns(s, r);
	q->hit = 0;
	q->async = false;
	q->lookup_computed = num_computed;
	q->lookup_matched = 0;
	q->looked_up = true;
	/* Only the prompt is looked up (decode KV is saved only on request). */
	uint32_t n = r->prompt_tokens;
	struct kvrt_lookup_result res = {0};
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	int rc = w ? kvrt_engine_lookup(w->e, q->hash, q->ns, r->tokens, n, &res) : -ENODEV;
	pthread_rwlock_unlock(&reg_lock);
	if (rc == -ENODEV)
		rc = sched_remote_lookup(s, q->hash, q->ns, r->tokens, n, &res);
	if (rc == -ENODEV && !s->warned) {
		s->warned = true;
		kvrt_warn("no kvrt worker '%s' in this process and no lookup sockets "
			  "(KVRT_LOOKUP_SOCKET=0, or an executor kvrt does not know): lookups "
			  "answer no hit; saves go on", s->instance);
	}
	if (rc == -EINPROGRESS) {
		ret = rc; /* Redis asked: vLLM asks again on a later pass */
		goto out;
	}
	if (rc)
		goto out;
	bool async = s->cfg.enable_async_loading;
	uint32_t hit = async ? res.tokens : res.tokens_now;
	/* Synchronous loads read the CPU tier only. Chunks found on disk or in
	 * Redis are being brought into it (this lookup started that, pinned):
	 * while they come the request is not scheduled (vLLM asks again each
	 * pass, other requests go on), for prefetch_wait_ms from the first
	 * such answer; then it is scheduled with what is in the CPU tier. */
	if (!async && res.tokens > res.tokens_now && s->cfg.prefetch_wait_ms && res.tokens > num_computed &&
	    res.tokens >= s->cfg.min_retrieve_tokens) {
		uint64_t now = kvrt_now_ns();
		if (!q->wait_t0)
			q->wait_t0 = now;
		if (now - q->wait_t0 < (uint64_t)s->cfg.prefetch_wait_ms * 1000000u) {
			ret = -EINPROGRESS;
			goto out;
		}
	}
	if (!hit || hit < s->cfg.min_retrieve_tokens)
		goto out;
	uint32_t total = r->total_tokens ? r->total_tokens : r->num_tokens;
	uint32_t upto = hit < total ? hit : total - 1; /* the last token is always computed */
	if (upto <= num_computed)
		goto out;
	q->hit = hit;
	q->async = async;
	q->lookup_matched = *matched = upto - num_computed;
	*load_async = async;
out:
	pthread_mutex_unlock(&s->mu);
	return ret;
}

/* The lookup's pins of request hash h, released here or on the ranks of
 * other processes (caller holds s->mu). */
static void sched_release(struct kvrt_sched *s, uint64_t h)
{
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	if (w)
		kvrt_engine_release(w->e, h);
	else if (s->lsock)
		kvrt_lsock_client_release(s->lsock, h);
	pthread_rwlock_unlock(&reg_lock);
}

/* Plan q's load of [start, end) into block_ids (the whole table); refused:
 * a load the worker does not run but reports as load errors. */
static int sched_plan_load(struct kvrt_sched *s, struct _kvrt_sreq_state *q, const struct kvrt_request *r,
			   const int32_t *block_ids, uint32_t start, uint32_t end, bool refused)
{
	sload_clear(s, q);
	uint32_t b0 = start / s->bs, b1 = (end - 1) / s->bs + 1;
	q->load_tok = refused ? NULL : malloc((size_t)q->hit * sizeof(uint32_t));
	q->load_blk = malloc((size_t)(b1 - b0) * sizeof(int32_t));
	if ((!refused && !q->load_tok) || !q->load_blk) {
		sload_clear(s, q);
		return -ENOMEM;
	}
	if (!refused)
		memcpy(q->load_tok, r->tokens, (size_t)q->hit * sizeof(uint32_t));
	memcpy(q->load_blk, block_ids + b0, (size_t)(b1 - b0) * sizeof(int32_t));
	q->load_nblk = b1 - b0;
	q->load_start = start;
	q->load_end = end;
	q->load_refused = refused;
	q->load = true;
	s->nload++;
	return 0;
}

int kvrt_sched_after_alloc(struct kvrt_sched *s, const struct kvrt_request *r, const int32_t *block_ids,
			   uint32_t num_blocks, uint32_t num_computed, uint32_t num_external)
{
	int rc = 0;
	pthread_mutex_lock(&s->mu);
	uint64_t h = kvrt_meta_id_hash(r->id, r->id_len);
	struct _kvrt_sreq_state *q = *sfind(s, r->id, r->id_len, h);
	if (!q && num_external && r->id_len && r->id_len <= KVRT_META_MAX_ID_LEN)
		q = sget(s, r->id, r->id_len); /* never looked up: refused below */
	if (!q) {
		rc = num_external ? -ENOMEM : 0;
		goto out;
	}
	if (!num_external) {
		if (!q->load && !q->async)
			sched_release(s, h); /* nothing to load: the pins are not needed */
		goto out;
	}
	/* The load starts at vLLM's local hit as the lookup vLLM took was told
	 * it: request.num_computed_tokens is not set yet when vLLM calls
	 * update_state_after_alloc. */
	uint32_t start = num_computed == KVRT_SCHED_FROM_LOOKUP ? q->lookup_computed : num_computed;
	uint32_t end = start + num_external;
	if (!q->looked_up || start != q->lookup_computed || num_external > q->lookup_matched ||
	    end > q->hit || end > r->num_tokens || (end + s->bs - 1) / s->bs > num_blocks ||
	    end < start) {
		if (!s->warned_alloc) {
			s->warned_alloc = true;
			kvrt_error("request %.*s: vLLM allocated %u external tokens at %u but kvrt's "
				   "lookup was at %u and matched %u (hit %u): load refused, its blocks "
				   "reported as load errors (recomputed); logged once",
				   (int)r->id_len, r->id, num_external, start, q->lookup_computed,
				   q->lookup_matched, q->hit);
		}
		s->refused_loads++;
		sched_release(s, h);
		/* vLLM counts these tokens as computed: the blocks it may read
		 * from kvrt (both starts, when they differ) go back as errors. */
		uint32_t lo = start < q->lookup_computed ? start : q->lookup_computed;
		uint32_t hi = (start > q->lookup_computed ? start : q->lookup_computed) + num_external;
		uint32_t cap = num_blocks * s->bs;
		if (hi > cap)
			hi = cap;
		if (lo < hi) {
			int prc = sched_plan_load(s, q, r, block_ids, lo, hi, true);
			rc = prc ? prc : -EINVAL;
		} else {
			rc = -EINVAL;
		}
		goto out;
	}
	rc = sched_plan_load(s, q, r, block_ids, start, end, false);
	/* Loaded chunks are cached already: never save them again. */
	if (!rc && end / s->cs > q->saved_chunks)
		q->saved_chunks = end / s->cs;
out:
	pthread_mutex_unlock(&s->mu);
	return rc;
}

/* Save range of q after num_computed tokens: chunks [first, full) plus a
 * tail; 0 tokens when nothing. */
static uint32_t save_range(const struct kvrt_sched *s, const struct _kvrt_sreq_state *q,
			   uint32_t num_computed, uint32_t prompt, uint32_t *first, uint32_t *last_tokens,
			   bool *tail)
{
	uint32_t cs = s->cs;
	uint32_t limit = num_computed;
	if (!s->cfg.save_decode_cache && limit > prompt)
		limit = prompt;
	uint32_t full = limit / cs;
	*first = q->saved_chunks;
	*tail = false;
	*last_tokens = cs;
	if (s->cfg.save_unfull_chunk && !q->tail_saved && prompt % cs && num_computed >= prompt &&
	    full == prompt / cs && *first <= full) {
		*tail = true;
		*last_tokens = prompt % cs;
		return prompt;
	}
	if (full <= *first)
		return 0;
	return full * cs;
}

int kvrt_sched_rewound(struct kvrt_sched *s, const char *id, uint32_t id_len, uint32_t num_computed)
{
	pthread_mutex_lock(&s->mu);
	uint64_t h = kvrt_meta_id_hash(id, id_len);
	struct _kvrt_sreq_state *q = *sfind(s, id, id_len, h);
	int rc = -ENOENT;
	if (q) {
		/* Chunks past what vLLM still holds are recomputed: save them
		 * again (a chunk that failed its load was dropped by the worker;
		 * one that is still cached is skipped there as already cached). */
		if (q->saved_chunks > num_computed / s->cs) {
			q->saved_chunks = num_computed / s->cs;
			q->tail_saved = false;
		}
		rc = 0;
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

uint32_t kvrt_sched_save_need(struct kvrt_sched *s, const char *id, uint32_t id_len,
			      uint32_t num_computed, uint32_t prompt_tokens)
{
	pthread_mutex_lock(&s->mu);
	struct _kvrt_sreq_state *q = sget(s, id, id_len);
	uint32_t need = 0, first, lt;
	bool tail;
	if (q)
		need = save_range(s, q, num_computed, prompt_tokens, &first, &lt, &tail);
	pthread_mutex_unlock(&s->mu);
	return need;
}

static int rt_add(struct kvrt_sched *s, size_t *nrt, uint64_t hash, uint64_t ns, uint32_t prompt,
		  uint32_t ntok, const uint32_t *tok)
{
	for (size_t i = 0; i < *nrt; i++)
		if (s->rt[i].hash == hash) {
			/* A load's entry carries its hit as the prompt; a save's
			 * carries the real prompt, which the engine's save range
			 * is clipped to: keep the longer. */
			if (prompt > s->rt[i].prompt)
				s->rt[i].prompt = prompt;
			if (ntok > s->rt[i].ntok) {
				s->rt[i].ntok = ntok;
				s->rt[i].tok = tok;
			}
			return 0;
		}
	if (kvrt_grow((void **)&s->rt, &s->rt_cap, *nrt + 1, sizeof(*s->rt)))
		return -ENOMEM;
	s->rt[*nrt].hash = hash;
	s->rt[*nrt].ns = ns;
	s->rt[*nrt].prompt = prompt;
	s->rt[*nrt].ntok = ntok;
	s->rt[*nrt].tok = tok;
	(*nrt)++;
	return 0;
}

int kvrt_sched_build_meta(struct kvrt_sched *s, const struct kvrt_sched_step *st, const void **meta,
			  size_t *len)
{
	pthread_mutex_lock(&s->mu);
	int rc = 0, ret = 0;
	uint32_t bs = s->bs, cs = s->cs;
	size_t nitems = 0, nkeys = 0, nblk = 0, nrt = 0;
	/* Upper bounds for the scratch arrays. */
	size_t want_items = st->num_reqs, want_keys = 0, want_blk = 0;
	for (uint32_t b = 0; s->nload && b < _SCHED_BUCKETS; b++)
		for (struct _kvrt_sreq_state *q = s->tab[b]; q; q = q->next)
			if (q->load) {
				want_items++;
				want_keys += q->load_end / cs + 1;
				want_blk += q->load_nblk;
			}
	for (uint32_t i = 0; i < st->num_reqs; i++) {
		want_keys += st->reqs[i].num_computed / cs + 2;
		want_blk += st->reqs[i].num_blocks;
	}
	if (kvrt_grow((void **)&s->mreq, &s->mreq_cap, want_items + 1, sizeof(*s->mreq)) ||
	    kvrt_grow((void **)&s->keys, &s->keys_cap, want_keys + 1, sizeof(*s->keys)) ||
	    kvrt_grow((void **)&s->blk, &s->blk_cap, want_blk + 1, sizeof(*s->blk)) ||
	    kvrt_grow((void **)&s->ids, &s->ids_cap, st->num_preempted + s->ndelayed + 1, sizeof(*s->ids))) {
		rc = -ENOMEM;
		goto out;
	}
	/* Loads planned by after_alloc. */
	for (uint32_t b = 0; s->nload && b < _SCHED_BUCKETS; b++)
		for (struct _kvrt_sreq_state *q = s->tab[b]; q; q = q->next) {
			if (!q->load)
				continue;
			if (q->load_refused) {
				for (uint32_t i = 0; i < q->load_nblk; i++)
					s->blk[nblk + i] = (uint32_t)q->load_blk[i];
				s->mreq[nitems++] = (struct kvrt_meta_req){
					.id = {q->id, q->id_len},
					.flags = KVRT_META_REFUSED | (q->async ? KVRT_META_ASYNC : 0),
					.token_start = q->load_start, .token_end = q->load_end,
					.last_chunk_tokens = cs, .keys = NULL, .num_keys = 0,
					.block_ids = s->blk + nblk, .num_blocks = q->load_nblk};
				nblk += q->load_nblk;
				static const uint32_t no_tokens[1];
				if (rt_add(s, &nrt, q->hash, q->ns, 0, 0, no_tokens)) {
					rc = -ENOMEM;
					goto out;
				}
				continue;
			}
			uint32_t first = q->load_start / cs, last = (q->load_end - 1) / cs;
			bool tail = (uint64_t)(last + 1) * cs > q->hit;
			struct kvrt_chunk_key *k = s->keys + nkeys;
			size_t nk = kvrt_key_prompt(q->ns, q->load_tok, q->hit, cs, tail, k, last + 1);
			if (nk != last + 1) {
				ret = -EINVAL;
				continue;
			}
			memmove(k, k + first, (last - first + 1) * sizeof(*k));
			for (uint32_t i = 0; i < q->load_nblk; i++)
				s->blk[nblk + i] = (uint32_t)q->load_blk[i];
			s->mreq[nitems++] = (struct kvrt_meta_req){
				.id = {q->id, q->id_len},
				.flags = (q->async ? KVRT_META_ASYNC : 0) | (tail ? KVRT_META_UNFULL : 0),
				.token_start = q->load_start, .token_end = q->load_end,
				.last_chunk_tokens = tail ? q->hit - last * cs : cs,
				.keys = k, .num_keys = last - first + 1,
				.block_ids = s->blk + nblk, .num_blocks = q->load_nblk};
			nkeys += last - first + 1;
			nblk += q->load_nblk;
			if (rt_add(s, &nrt, q->hash, q->ns, q->hit, q->hit, q->load_tok)) {
				rc = -ENOMEM;
				goto out;
			}
		}
	size_t nloads = nitems;
	/* Saves of the scheduled requests. */
	for (uint32_t i = 0; i < st->num_reqs; i++) {
		const struct kvrt_sched_req *sr = &st->reqs[i];
		const struct kvrt_request *r = &sr->req;
		struct _kvrt_sreq_state *q = sget(s, r->id, r->id_len);
		if (!q) {
			rc = -ENOMEM;
			goto out;
		}
		if (!q->ns)
			q->ns = sched_req_ns(s, r);
		uint32_t first, lt;
		bool tail;
		uint32_t end = save_range(s, q, sr->num_computed, r->prompt_tokens, &first, &lt, &tail);
		if (!end)
			continue;
		uint32_t start = first * cs;
		if (end > r->num_tokens || (end + bs - 1) / bs > sr->num_blocks || !sr->block_ids) {
			kvrt_error("request %.*s: save up to %u beyond its %u tokens / %u blocks",
				   (int)r->id_len, r->id, end, r->num_tokens, sr->num_blocks);
			ret = -EINVAL;
			continue;
		}
		uint32_t nchunks = (end - 1) / cs + 1;
		struct kvrt_chunk_key *k = s->keys + nkeys;
		size_t nk = kvrt_key_prompt(q->ns, r->tokens, end, cs, tail, k, nchunks);
		if (nk != nchunks) {
			ret = -EINVAL;
			continue;
		}
		memmove(k, k + first, (nchunks - first) * sizeof(*k));
		uint32_t b0 = start / bs, b1 = (end - 1) / bs + 1;
		for (uint32_t b = b0; b < b1; b++)
			s->blk[nblk + b - b0] = (uint32_t)sr->block_ids[b];
		s->mreq[nitems++] = (struct kvrt_meta_req){
			.id = {q->id, q->id_len},
			.flags = (tail ? KVRT_META_UNFULL : 0) | (end > r->prompt_tokens ? KVRT_META_DECODE : 0),
			.token_start = start, .token_end = end, .last_chunk_tokens = lt,
			.keys = k, .num_keys = nchunks - first,
			.block_ids = s->blk + nblk, .num_blocks = b1 - b0};
		nkeys += nchunks - first;
		nblk += b1 - b0;
		if (rt_add(s, &nrt, q->hash, q->ns, r->prompt_tokens, end, r->tokens)) {
			rc = -ENOMEM;
			goto out;
		}
		q->saved_chunks = tail ? nchunks : end / cs;
		if (tail)
			q->tail_saved = true;
		q->save_step = s->step;
	}
	/* Preempted requests: their blocks are gone; they start over. */
	uint32_t nids = 0;
	bool anypre = st->num_preempted > 0; /* the registry lock only when needed */
	if (anypre)
		pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = anypre ? reg_find(s->instance) : NULL;
	for (uint32_t i = 0; i < st->num_preempted; i++) {
		const struct kvrt_bytes *b = &st->preempted[i];
		if (!b->len || b->len > KVRT_META_MAX_ID_LEN)
			continue;
		struct _kvrt_sreq_state *q = *sfind(s, b->data, (uint32_t)b->len, kvrt_meta_id_hash(b->data, b->len));
		if (q) {
			q->saved_chunks = 0;
			q->tail_saved = false;
			q->wait_t0 = 0; /* a resumed request may wait for disk again */
			sload_clear(s, q);
			/* Its lookup pins go, here or on the ranks of other
			 * processes (else they would last until the request
			 * finishes or pin_timeout_ms passes). */
			if (w)
				kvrt_engine_release(w->e, q->hash);
			else if (s->lsock)
				kvrt_lsock_client_release(s->lsock, q->hash);
		}
		s->ids[nids++] = (struct kvrt_meta_id){b->data, (uint32_t)b->len};
	}
	if (anypre)
		pthread_rwlock_unlock(&reg_lock);
	uint32_t npre = nids;
	for (uint32_t i = 0; i < s->ndelayed; i++)
		s->ids[nids++] = (struct kvrt_meta_id){s->delayed[i].data, (uint32_t)s->delayed[i].len};
	struct kvrt_meta_plan p = {.step = s->step, .block_size = bs, .chunk_size = cs,
				   .loads = s->mreq, .num_loads = (uint32_t)nloads,
				   .saves = s->mreq + nloads, .num_saves = (uint32_t)(nitems - nloads),
				   .preempted = s->ids, .num_preempted = npre,
				   .finished = s->ids + npre, .num_finished = nids - npre};
	size_t mlen = 0;
	rc = kvrt_meta_encode(&p, NULL, 0, &mlen);
	if (rc && rc != -ENOSPC) {
		kvrt_error("step %llu: metadata refused by the codec (%d): empty step",
			   (unsigned long long)s->step, rc);
		p.num_loads = p.num_saves = 0;
		rc = kvrt_meta_encode(&p, NULL, 0, &mlen);
		ret = -EINVAL;
	}
	size_t mpad = (mlen + 3) & ~(size_t)3;
	size_t total = _FRAME_HDR + mpad;
	for (size_t i = 0; i < nrt; i++)
		total += 24 + 4 * (size_t)s->rt[i].ntok;
	if (kvrt_grow((void **)&s->out, &s->out_cap, total, 1)) {
		rc = -ENOMEM;
		goto out;
	}
	rc = kvrt_meta_encode(&p, s->out + _FRAME_HDR, mlen, &mlen);
	if (rc)
		goto out;
	/* The table starts 4-aligned (the worker reads tokens in place). */
	memset(s->out + _FRAME_HDR + mlen, 0, mpad - mlen);
	memcpy(s->out, _FRAME_MAGIC, 4);
	kvrt_put_le32(s->out + 4, 1);
	kvrt_put_le32(s->out + 8, (uint32_t)mlen);
	kvrt_put_le32(s->out + 12, (uint32_t)nrt);
	uint8_t *o = s->out + _FRAME_HDR + mpad;
	for (size_t i = 0; i < nrt; i++) {
		kvrt_put_le64(o, s->rt[i].hash);
		kvrt_put_le64(o + 8, s->rt[i].ns);
		kvrt_put_le32(o + 16, s->rt[i].prompt);
		kvrt_put_le32(o + 20, s->rt[i].ntok);
		memcpy(o + 24, s->rt[i].tok, 4 * (size_t)s->rt[i].ntok);
		o += 24 + 4 * (size_t)s->rt[i].ntok;
	}
	*meta = s->out;
	*len = (size_t)(o - s->out);
	/* The loads are in this message; the ids are announced. */
	for (uint32_t b = 0; s->nload && b < _SCHED_BUCKETS; b++)
		for (struct _kvrt_sreq_state *q = s->tab[b]; q; q = q->next)
			if (q->load)
				sload_clear(s, q);
	for (uint32_t i = 0; i < s->ndelayed; i++)
		free((void *)s->delayed[i].data);
	s->ndelayed = 0;
	s->step++;
out:
	pthread_mutex_unlock(&s->mu);
	return rc ? rc : ret;
}

/* The step up to which every worker's saves are complete (actors/engine.h:
 * kvrt_engine_saves_done): the worker of this process, else the minimum of
 * the ranks' saves-done files; 0 when unknown. Scheduler lock held. */
static uint64_t sched_saves_done(struct kvrt_sched *s)
{
	uint64_t done = 0;
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	if (w)
		done = kvrt_engine_saves_done(w->e);
	pthread_rwlock_unlock(&reg_lock);
	if (!w && s->sview)
		done = kvrt_saves_view_min(s->sview);
	return done;
}

int kvrt_sched_finished(struct kvrt_sched *s, const char *id, uint32_t id_len, bool *delay_free)
{
	*delay_free = false;
	pthread_mutex_lock(&s->mu);
	uint64_t h = kvrt_meta_id_hash(id, id_len);
	struct _kvrt_sreq_state **pp = sfind(s, id, id_len, h);
	struct _kvrt_sreq_state *q = *pp;
	sched_release(s, h);
	if (q) {
		/* Saved from its blocks: gathers may still read them (wait_save
		 * does not wait for them). Keep the blocks until the workers
		 * say the request's saves are done: the id goes in the next
		 * metadata, get_finished reports it. */
		*pp = q->next;
		if (q->save_step != UINT64_MAX && q->save_step > sched_saves_done(s)) {
			size_t cap = s->delayed_cap;
			char *c = malloc(id_len);
			if (c && !kvrt_grow((void **)&s->delayed, &cap, s->ndelayed + 1, sizeof(*s->delayed))) {
				s->delayed_cap = (uint32_t)cap;
				memcpy(c, id, id_len);
				s->delayed[s->ndelayed++] = (struct kvrt_bytes){c, id_len};
				*delay_free = true;
			} else {
				free(c);
			}
		}
		sfree(s, q);
	}
	pthread_mutex_unlock(&s->mu);
	return 0;
}

/* --- debug ------------------------------------------------------------------ */

int kvrt_debug_corrupt_chunk(struct kvrt_sched *s, const struct kvrt_request *r, uint32_t chunk)
{
	uint32_t cs = s->cs;
	if ((uint64_t)(chunk + 1) * cs > r->num_tokens)
		return -ENOENT;
	uint64_t ns = req_ns(&s->o, r);
	struct kvrt_chunk_key *keys = malloc((chunk + 1) * sizeof(*keys));
	if (!keys)
		return -ENOMEM;
	kvrt_key_prompt(ns, r->tokens, (size_t)(chunk + 1) * cs, cs, false, keys, chunk + 1);
	int rc = -ENODEV;
	pthread_rwlock_rdlock(&reg_lock);
	struct kvrt_worker *w = reg_find(s->instance);
	struct kvrt_index *idx = w ? kvrt_engine_index(w->e) : NULL;
	struct kvrt_pool *pool = w ? kvrt_engine_pool(w->e) : NULL;
	if (idx && pool) {
		struct kvrt_index_reader *rd = kvrt_index_reader_open(idx);
		struct kvrt_index_hit hit;
		const uint64_t owner = 0x7fffdeb600000000ull;
		rc = -ENOENT;
		if (rd && kvrt_index_lookup(rd, &keys[chunk], 1, owner, KVRT_INDEX_PIN, &hit) == 1) {
			if (hit.tier == KVRT_TIER_CPU) {
				uint8_t *p = kvrt_pool_addr(pool, hit.slab);
				uint64_t x = 0x9e3779b97f4a7c15ull ^ kvrt_now_ns();
				for (uint64_t i = 0; i < hit.entry->bytes; i++) {
					x ^= x << 13, x ^= x >> 7, x ^= x << 17;
					p[i] ^= (uint8_t)(x | 1);
				}
				rc = 0;
			}
			kvrt_index_unpin(idx, owner, keys[chunk]);
		}
		if (rd)
			kvrt_index_reader_close(rd);
	}
	pthread_rwlock_unlock(&reg_lock);
	free(keys);
	return rc;
}
