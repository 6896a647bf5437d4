/* connector/sched.c: the scheduler handle of connector/kvrt.h (vLLM's
 * scheduler role): per request, the last lookup vLLM took (its local hit
 * and kvrt's answer), the load planned after allocation, what was saved,
 * and the delayed frees; lookups against a worker of this process or the
 * ranks' lookup sockets (connector/lookup_socket.h); the step frame that
 * build_meta writes (connector/instance.h); the saves-done watermark that
 * decides delay_free (connector/saves_done.h); the test hook
 * kvrt_debug_corrupt_chunk.
 *
 * Threads: every call takes the handle's mutex: any thread, one call at a
 * time per handle (vLLM's scheduler thread).
 */
#include "runtime/bytes.h"
#include "connector/kvrt.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/engine.h"
#include "actors/index.h"
#include "actors/key.h"
#include "actors/pool.h"
#include "connector/config.h"
#include "connector/instance.h"
#include "connector/lookup_socket.h"
#include "connector/meta.h"
#include "connector/saves_done.h"
#include "runtime/log.h"

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
	uint64_t cwait_t0;      /* first "ask again" of a consumer for chunks its
				 * producer has not written yet; 0 = none */
	uint64_t cwait_last;    /* its last lookup of the workers while waiting */
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
#define _CWAIT_PERIOD_NS 20000000ull /* a waiting consumer's lookups, apart */

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
		return _kvrt_req_ns(&s->o, r);
	if (!s->plain_ns_set) {
		s->plain_ns = _kvrt_req_ns(&s->o, r);
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
	int rc = _kvrt_read_config(&s->cfg, o, err, errlen);
	if (rc) {
		free(s);
		return rc;
	}
	s->instance = _kvrt_dupstr(o->instance);
	s->model_id = _kvrt_dupstr(o->model_id);
	s->dtype = _kvrt_dupstr(o->dtype);
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
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	for (uint32_t b = 0; b < _SCHED_BUCKETS; b++)
		while (s->tab[b]) {
			struct _kvrt_sreq_state *q = s->tab[b];
			s->tab[b] = q->next;
			if (we)
				kvrt_engine_release(we, q->hash);
			else if (s->lsock)
				kvrt_lsock_client_release(s->lsock, q->hash);
			sfree(s, q);
		}
	_kvrt_reg_unlock();
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

uint32_t kvrt_sched_chunk_keys(struct kvrt_sched *s, const struct kvrt_request *r, bool tail,
			       uint64_t *out, uint32_t cap)
{
	uint32_t cs = s->cs, n = r->num_tokens / cs, rest = r->num_tokens % cs;
	uint64_t ns = sched_req_ns(s, r);
	struct kvrt_chunk_key prev = kvrt_key_root();
	uint32_t count = n + (tail && rest);
	for (uint32_t i = 0; i < count && i < cap; i++) {
		prev = kvrt_key_chunk(ns, prev, r->tokens + (size_t)i * cs, i < n ? cs : rest);
		out[2 * i] = prev.lo;
		out[2 * i + 1] = prev.hi;
	}
	return count;
}

int kvrt_sched_config_get(struct kvrt_sched *s, const char *key, char *buf, size_t len)
{
	return kvrt_config_get(&s->cfg, key, buf, len);
}

bool kvrt_sched_sees_worker(struct kvrt_sched *s)
{
	bool ok = _kvrt_reg_rdlock(s->instance) != NULL;
	_kvrt_reg_unlock();
	return ok;
}

/* No worker in this process: the scheduler's connections to every rank's
 * lookup socket, made on first use. 0, or -ENODEV when sockets are not
 * used. The timeout is lookup_timeout_ms when set, else 250 ms: the
 * scheduler's thread waits (a healthy rank answers in well under a
 * millisecond; its default 3000 would stall every step of vLLM on one
 * sick rank). */
static int sched_lsock(struct kvrt_sched *s)
{
	if (!s->lsock) {
		if (s->lsock_off || !_kvrt_lsock_wanted(&s->o))
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
	return 0;
}

/* Ask every rank (the minimum; any rank failing is no hit). */
static int sched_remote_lookup(struct kvrt_sched *s, uint64_t req, uint64_t ns, const uint32_t *tok,
			       uint32_t n, struct kvrt_lookup_result *res)
{
	int rc = sched_lsock(s);
	if (rc)
		return rc;
	return kvrt_lsock_client_lookup(s->lsock, req, ns, tok, n, res);
}

/* A reset may retire many chunks on each rank: its answers get longer. */
#define _RESET_TIMEOUT_MS 10000u

int kvrt_sched_reset_cache(struct kvrt_sched *s)
{
	uint64_t dropped = 0, kept = 0;
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	int rc = we ? kvrt_engine_reset(we, &dropped, &kept) : -ENODEV;
	_kvrt_reg_unlock();
	if (rc == -ENODEV) { /* the workers live in other processes */
		pthread_mutex_lock(&s->mu);
		rc = sched_lsock(s);
		if (!rc)
			rc = kvrt_lsock_client_reset(s->lsock, _RESET_TIMEOUT_MS, &dropped, &kept);
		pthread_mutex_unlock(&s->mu);
	}
	if (rc)
		return rc;
	kvrt_info("reset_cache '%s': %llu chunk(s) dropped, %llu kept (pinned or in flight)",
		  s->instance, (unsigned long long)dropped, (unsigned long long)kept);
	return kept ? -EBUSY : 0;
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
	/* A waiting consumer asks its workers every 20 ms, not on every pass
	 * of vLLM's scheduler (which spins while requests wait): the lookups,
	 * and Redis, are spared, and the cores go to the forward. */
	if (q->cwait_t0) {
		uint64_t now = kvrt_now_ns();
		if (now - q->cwait_t0 < (uint64_t)s->cfg.consumer_wait_ms * 1000000u &&
		    now - q->cwait_last < _CWAIT_PERIOD_NS) {
			ret = -EINPROGRESS;
			goto out;
		}
		q->cwait_last = now;
	}
	q->ns = sched_req_ns(s, r);
	q->hit = 0;
	q->async = false;
	q->lookup_computed = num_computed;
	q->lookup_matched = 0;
	q->looked_up = true;
	/* Only the prompt is looked up (decode KV is saved only on request). */
	uint32_t n = r->prompt_tokens;
	struct kvrt_lookup_result res = {0};
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	int rc = we ? kvrt_engine_lookup(we, q->hash, q->ns, r->tokens, n, &res) : -ENODEV;
	_kvrt_reg_unlock();
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
	/* A P/D consumer: its producer may still be writing the prompt's
	 * chunks to the shared tier. Short of the prompt's whole chunks, the
	 * request is asked about again (each lookup asks Redis again, 50 ms
	 * apart) for consumer_wait_ms from its first lookup; then what is
	 * missing is recomputed. */
	uint32_t whole = n / s->cs * s->cs;
	if ((s->o.flags & KVRT_OPT_CONSUMER) && s->cfg.consumer_wait_ms && res.tokens < whole &&
	    num_computed < whole) {
		uint64_t now = kvrt_now_ns();
		if (!q->cwait_t0)
			q->cwait_t0 = q->cwait_last = now;
		if (now - q->cwait_t0 < (uint64_t)s->cfg.consumer_wait_ms * 1000000u) {
			ret = -EINPROGRESS;
			goto out;
		}
	}
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
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	if (we)
		kvrt_engine_release(we, h);
	else if (s->lsock)
		kvrt_lsock_client_release(s->lsock, h);
	_kvrt_reg_unlock();
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
	struct kvrt_engine *we = anypre ? _kvrt_reg_rdlock(s->instance) : NULL;
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
			if (we)
				kvrt_engine_release(we, q->hash);
			else if (s->lsock)
				kvrt_lsock_client_release(s->lsock, q->hash);
		}
		s->ids[nids++] = (struct kvrt_meta_id){b->data, (uint32_t)b->len};
	}
	if (anypre)
		_kvrt_reg_unlock();
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
	size_t total = _KVRT_FRAME_HDR + mpad;
	for (size_t i = 0; i < nrt; i++)
		total += 24 + 4 * (size_t)s->rt[i].ntok;
	if (kvrt_grow((void **)&s->out, &s->out_cap, total, 1)) {
		rc = -ENOMEM;
		goto out;
	}
	rc = kvrt_meta_encode(&p, s->out + _KVRT_FRAME_HDR, mlen, &mlen);
	if (rc)
		goto out;
	/* The table starts 4-aligned (the worker reads tokens in place). */
	memset(s->out + _KVRT_FRAME_HDR + mlen, 0, mpad - mlen);
	memcpy(s->out, _KVRT_FRAME_MAGIC, 4);
	kvrt_put_le32(s->out + 4, 1);
	kvrt_put_le32(s->out + 8, (uint32_t)mlen);
	kvrt_put_le32(s->out + 12, (uint32_t)nrt);
	uint8_t *o = s->out + _KVRT_FRAME_HDR + mpad;
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
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	if (we)
		done = kvrt_engine_saves_done(we);
	_kvrt_reg_unlock();
	if (!we && s->sview)
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
	uint64_t ns = _kvrt_req_ns(&s->o, r);
	struct kvrt_chunk_key *keys = malloc((chunk + 1) * sizeof(*keys));
	if (!keys)
		return -ENOMEM;
	kvrt_key_prompt(ns, r->tokens, (size_t)(chunk + 1) * cs, cs, false, keys, chunk + 1);
	int rc = -ENODEV;
	struct kvrt_engine *we = _kvrt_reg_rdlock(s->instance);
	struct kvrt_index *idx = we ? kvrt_engine_index(we) : NULL;
	struct kvrt_pool *pool = we ? kvrt_engine_pool(we) : NULL;
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
	_kvrt_reg_unlock();
	free(keys);
	return rc;
}
