/* connector/worker.c: the worker handle of connector/kvrt.h (vLLM's worker
 * role): the engine of one rank (actors/engine.h), its registration in this
 * process (connector/instance.h), its lookup socket and saves-done file
 * when the scheduler lives elsewhere, the step frame's decoding into the
 * engine's plan, and the ids get_finished reports.
 *
 * Threads: create/register/destroy on vLLM's worker thread with nothing
 * else running; bind .. load_errors on the worker thread, one at a time, in
 * a step's order (engine.h); stats and flush on any thread.
 */
#include "runtime/bytes.h"
#include "connector/kvrt.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/engine.h"
#include "connector/config.h"
#include "connector/instance.h"
#include "connector/lookup_socket.h"
#include "connector/meta.h"
#include "connector/saves_done.h"
#include "runtime/log.h"
#include "runtime/trace.h"

struct kvrt_worker {
	struct kvrt_engine *e;        /* the engine */
	struct kvrt_config cfg;       /* effective config */
	char *instance;               /* registry key */
	uint32_t tp_rank, pp_rank;    /* registry key */
	uint64_t model_ns;            /* model namespace hash (engine's) */
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

/* KVRT_DEBUG (tests only): comma-separated words, each logged as a warning
 * when the worker starts. corrupt_loads=N: the first N chunks this worker
 * loads are overwritten in its CPU pool before their checksum is checked
 * (memory corruption: the loads fail and are recomputed); perturb_loads:
 * every chunk is overwritten and served without the check (wrong KV: the
 * negative control of the engine tests); slow_saves=MS: each step's saves
 * are reported done MS ms late (finished requests keep delay_free);
 * slow_discards=MS: the evict actor takes MS ms to drop a chunk a load
 * found corrupt; skip_saves_rank=K: the worker of TP rank K saves nothing (the scheduler
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
		else if (sscanf(w, "slow_discards=%u", &n) == 1)
			ec->debug_discard_delay_ms = n;
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
	int rc = _kvrt_read_config(&w->cfg, o, err, errlen);
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
	w->instance = _kvrt_dupstr(o->instance);
	if (!w->instance)
		goto fail;
	w->tp_rank = o->tp_rank;
	w->pp_rank = o->pp_rank;
	w->model_ns = _kvrt_model_ns(o, o->tp_rank, o->pp_rank);
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
		.tier_events = (o->flags & KVRT_OPT_KV_EVENTS) ? 65536 : 0,
	};
	debug_from_env(&ec, w);
	if (_kvrt_lsock_wanted(o)) {
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
	rc = _kvrt_reg_add(w->instance, w->tp_rank, w->pp_rank, w->e);
	if (rc == -EEXIST) {
		if (err && errlen)
			snprintf(err, errlen, "kvrt: instance '%s' rank %u/%u exists in this process",
				 w->instance, w->tp_rank, w->pp_rank);
		goto fail;
	}
	if (rc)
		goto fail;
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
		_kvrt_reg_wrlock();
		rc = kvrt_engine_register(w->e, kt, n, NULL);
		_kvrt_reg_unlock();
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
	if (len < _KVRT_FRAME_HDR || memcmp(f, _KVRT_FRAME_MAGIC, 4) || kvrt_get_le32(f + 4) != 1)
		return -EBADMSG;
	uint32_t mlen = kvrt_get_le32(f + 8);
	*nreq = kvrt_get_le32(f + 12);
	size_t mpad = ((size_t)mlen + 3) & ~(size_t)3;
	if (mpad > len - _KVRT_FRAME_HDR)
		return -EBADMSG;
	if (kvrt_meta_decode(f + _KVRT_FRAME_HDR, mlen, v))
		return -EBADMSG;
	const uint8_t *p = f + _KVRT_FRAME_HDR + mpad, *end = f + len;
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
	if (len) /* (an empty frame is refused by frame_open) */
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

_Static_assert(sizeof(struct kvrt_kv_event) == sizeof(struct kvrt_tier_event) &&
		       offsetof(struct kvrt_kv_event, kind) == offsetof(struct kvrt_tier_event, kind) &&
		       offsetof(struct kvrt_kv_event, medium) == offsetof(struct kvrt_tier_event, medium),
	       "kvrt_kv_event is the engine's tier event");

size_t kvrt_worker_kv_events(struct kvrt_worker *w, struct kvrt_kv_event *out, size_t cap,
			     uint64_t *dropped)
{
	if (dropped)
		*dropped = 0;
	if (!w || !w->registered)
		return 0;
	return kvrt_engine_tier_events(w->e, (struct kvrt_tier_event *)out, cap, dropped);
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
	_kvrt_reg_remove(w->e); /* waits for lookups reading it */
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
