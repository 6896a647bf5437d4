/* tests/test_pipeline_util.h: a rig for the engine's tests (host backend):
 * random vLLM KV tensors of one spec (tests/test_kern_util.h), requests with
 * random tokens placed in random blocks, a step driver that does what vLLM's
 * worker does (bind, start_load, per layer wait/compute/save, wait_save),
 * and an exact check: after a load, the tensors equal their poisoned image
 * with the saved KV written at the loaded tokens' new slots, nothing else.
 */
#ifndef KVRT_TESTS_PIPELINE_UTIL_H
#define KVRT_TESTS_PIPELINE_UTIL_H

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "actors/engine.h"
#include "actors/key.h"
#include "tests/test_kern_util.h"

struct prig {
	struct kt_model m;        /* the tensors */
	struct kvrt_engine *e;    /* the engine */
	uint32_t cs, bs, L;       /* chunk size, block size, layers */
	uint32_t nkv, heads;      /* K/V count, heads */
	size_t hb;                /* bytes per head */
	uint64_t ns;              /* namespace hash of the requests */
	uint8_t *used;            /* [nb]: block taken */
	unsigned char **poison;   /* [ntensors]: image before the last load */
	uint64_t rng;             /* test randomness */
	char name[128];           /* the spec, for messages */
};

struct preq {
	uint64_t id;              /* request id */
	uint32_t T;               /* tokens */
	uint32_t *tok;            /* [T] */
	int32_t *blk;             /* [nblk] */
	uint32_t nblk;
	unsigned char *ref;       /* [T][L][nkv][heads][hb]: its KV when saved */
};

static inline void prig_up(struct prig *g, const struct kt_spec *s, struct kvrt_engine_config cfg,
			   uint64_t seed)
{
	memset(g, 0, sizeof(*g));
	setenv("KVRT_DEVICE", "host", 1);
	g->rng = seed | 1;
	kt_spec_name(s, g->name, sizeof(g->name));
	kt_model_init(&g->m, s);
	for (uint32_t i = 0; i < g->m.ntensors; i++) {
		g->m.base[i] = malloc(g->m.bytes);
		kt_fill(g->m.base[i], g->m.bytes, &g->rng);
	}
	kt_model_bind(&g->m);
	g->bs = s->bs;
	g->L = s->layers;
	g->nkv = s->layout == KVRT_KV_MLA ? 1 : 2;
	g->heads = s->layout == KVRT_KV_MLA ? 1 : s->heads;
	g->hb = (size_t)s->hs * s->elem;
	g->cs = cfg.chunk_size;
	g->ns = 0x5eed000000000000ull ^ seed;
	cfg.namespace_hash = g->ns;
	g->used = calloc(s->nb, 1);
	g->poison = calloc(g->m.ntensors, sizeof(*g->poison));
	cr_assert_eq(kvrt_engine_create(&g->e, &cfg), 0);
	cr_assert_eq(kvrt_engine_register(g->e, g->m.t, g->m.ntensors, NULL), 0);
	cr_assert_eq(kvrt_engine_num_layers(g->e), s->layers);
}

static inline void prig_down(struct prig *g)
{
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g->e, &st);
	kvrt_engine_destroy(g->e);
	for (uint32_t i = 0; i < g->m.ntensors; i++) {
		free(g->m.base[i]);
		free(g->poison[i]);
	}
	free(g->poison);
	free(g->used);
	kt_model_fini(&g->m);
}

/* Take n free blocks at random. */
static inline void prig_blocks(struct prig *g, int32_t *out, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		uint32_t b;
		uint32_t tries = 0;
		do {
			b = (uint32_t)(kvrt_test_rand(&g->rng) % g->m.s.nb);
			cr_assert_lt(++tries, 100000u, "out of blocks");
		} while (g->used[b]);
		g->used[b] = 1;
		out[i] = (int32_t)b;
	}
}

static inline void preq_free_blocks(struct prig *g, struct preq *r)
{
	for (uint32_t i = 0; i < r->nblk; i++)
		g->used[r->blk[i]] = 0;
}

/* A request of T tokens; prefix_of (or NULL) gives its first `shared` tokens. */
static inline void preq_make(struct prig *g, struct preq *r, uint64_t id, uint32_t T,
			     const struct preq *prefix_of, uint32_t shared)
{
	memset(r, 0, sizeof(*r));
	r->id = id;
	r->T = T;
	r->tok = malloc(T * sizeof(*r->tok));
	for (uint32_t t = 0; t < T; t++)
		r->tok[t] = prefix_of && t < shared ? prefix_of->tok[t] : (uint32_t)(kvrt_test_rand(&g->rng) % 150000);
	r->nblk = (T + g->bs - 1) / g->bs;
	r->blk = malloc(r->nblk * sizeof(*r->blk));
	prig_blocks(g, r->blk, r->nblk);
	r->ref = malloc((size_t)T * g->L * g->nkv * g->heads * g->hb);
}

static inline void preq_fini(struct prig *g, struct preq *r)
{
	preq_free_blocks(g, r);
	free(r->tok);
	free(r->blk);
	free(r->ref);
}

static inline int64_t preq_slot(const struct prig *g, const struct preq *r, uint32_t t)
{
	return (int64_t)r->blk[t / g->bs] * g->bs + t % g->bs;
}

static inline unsigned char *preq_ref(const struct prig *g, const struct preq *r, uint32_t t, uint32_t l,
				      uint32_t kv, uint32_t h)
{
	return r->ref + ((((size_t)t * g->L + l) * g->nkv + kv) * g->heads + h) * g->hb;
}

/* Same tokens, same KV: copy src's KV of tokens [0, n) into dst's slots
 * (as a model would compute it), so a shared prefix saved once is right for
 * both. */
static inline void preq_share_kv(struct prig *g, struct preq *dst, const struct preq *src, uint32_t n)
{
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t l = 0; l < g->L; l++)
			for (uint32_t kv = 0; kv < g->nkv; kv++)
				for (uint32_t h = 0; h < g->heads; h++)
					memcpy(kt_at(&g->m, l, kv, preq_slot(g, dst, t), h),
					       kt_at(&g->m, l, kv, preq_slot(g, src, t), h), g->hb);
}

/* Remember the request's KV as it is in the tensors now. */
static inline void preq_snapshot(const struct prig *g, struct preq *r)
{
	for (uint32_t t = 0; t < r->T; t++)
		for (uint32_t l = 0; l < g->L; l++)
			for (uint32_t kv = 0; kv < g->nkv; kv++)
				for (uint32_t h = 0; h < g->heads; h++)
					memcpy(preq_ref(g, r, t, l, kv, h), kt_at(&g->m, l, kv, preq_slot(g, r, t), h),
					       g->hb);
}

/* Move the request to fresh blocks and poison every tensor. */
static inline void preq_relocate(struct prig *g, struct preq *r)
{
	preq_free_blocks(g, r);
	prig_blocks(g, r->blk, r->nblk);
}

static inline void prig_poison(struct prig *g)
{
	for (uint32_t i = 0; i < g->m.ntensors; i++) {
		kt_fill(g->m.base[i], g->m.bytes, &g->rng);
		if (!g->poison[i])
			g->poison[i] = malloc(g->m.bytes);
		memcpy(g->poison[i], g->m.base[i], g->m.bytes);
	}
}

static inline size_t _first_diff(const unsigned char *a, const unsigned char *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (a[i] != b[i])
			return i;
	return n;
}

/* Expect: the poisoned image, with tokens [from[i], to[i]) of reqs[i]
 * written from their reference; nothing else changed. */
static inline void prig_check(struct prig *g, struct preq **reqs, const uint32_t *from, const uint32_t *to,
			      uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t t = from[i]; t < to[i]; t++)
			for (uint32_t l = 0; l < g->L; l++)
				for (uint32_t kv = 0; kv < g->nkv; kv++)
					for (uint32_t h = 0; h < g->heads; h++) {
						unsigned char *p = kt_at(&g->m, l, kv, preq_slot(g, reqs[i], t), h);
						/* Put the reference into the poison image at p. */
						size_t off = (size_t)(p - (g->m.s.cross ? g->m.base[0] : g->m.base[l]));
						unsigned char *img = (g->m.s.cross ? g->poison[0] : g->poison[l]) + off;
						memcpy(img, preq_ref(g, reqs[i], t, l, kv, h), g->hb);
					}
	for (uint32_t i = 0; i < g->m.ntensors; i++)
		cr_assert(!memcmp(g->poison[i], g->m.base[i], g->m.bytes),
			  "%s: tensor %u differs from the expected image at byte %zu", g->name, i,
			  _first_diff(g->poison[i], g->m.base[i], g->m.bytes));
}

/* A plan request for r. */
static inline struct kvrt_plan_req preq_plan(const struct prig *g, const struct preq *r)
{
	return (struct kvrt_plan_req){.req_id = r->id, .ns_hash = g->ns, .tokens = r->tok,
				      .num_tokens = r->T, .prompt_tokens = r->T, .block_ids = r->blk,
				      .num_blocks = r->nblk};
}

/* A plan request that saves all of r (its prompt is all its tokens). */
static inline struct kvrt_plan_req preq_save_plan(const struct prig *g, const struct preq *r)
{
	struct kvrt_plan_req pr = preq_plan(g, r);
	pr.save_start = 0;
	pr.save_end = r->T;
	return pr;
}

/* Run one step of plan: bind, start_load, per layer wait (+ busy compute,
 * + hook) and save, wait_save. */
static inline void prig_step(struct prig *g, const struct kvrt_plan_req *reqs, uint32_t n,
			     void (*per_layer)(void *ctx, uint32_t l), void *ctx)
{
	struct kvrt_step_plan p = {.reqs = reqs, .num_reqs = n};
	cr_assert_eq(kvrt_engine_bind_step(g->e, &p), 0);
	cr_assert_eq(kvrt_engine_start_load(g->e), 0);
	for (uint32_t l = 0; l < g->L; l++) {
		cr_assert_eq(kvrt_engine_wait_layer(g->e, l), 0);
		if (per_layer)
			per_layer(ctx, l);
		cr_assert_eq(kvrt_engine_save_layer(g->e, l), 0);
	}
	cr_assert_eq(kvrt_engine_wait_save(g->e), 0);
}

/* Save reqs[0..n) whole (prompt = all tokens) in one step and wait for the
 * chunks to be in the index. */
static inline void prig_save(struct prig *g, struct preq **reqs, uint32_t n)
{
	struct kvrt_plan_req *pr = calloc(n, sizeof(*pr));
	for (uint32_t i = 0; i < n; i++) {
		preq_snapshot(g, reqs[i]);
		pr[i] = preq_save_plan(g, reqs[i]);
	}
	prig_step(g, pr, n, NULL, NULL);
	cr_assert_eq(kvrt_engine_flush(g->e), 0);
	free(pr);
}

static inline size_t prig_errors(struct prig *g, int64_t *out, size_t cap)
{
	return kvrt_engine_load_errors(g->e, out, cap);
}

#endif
