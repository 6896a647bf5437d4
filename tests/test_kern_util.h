/* tests/test_kern_util.h: fixtures for the kernels' tests (host and GPU):
 * synthetic vLLM KV tensors of every layout, physical order, element size
 * and padding; slot tables like a scheduler's (runs of consecutive slots in
 * shuffled blocks, with -1 holes); and a naive per-head reference of the
 * chunk layout, written independently of copy_host.c.
 *
 * Plain C with no Criterion: tests/gpu/ programs include it too. Memory for
 * the tensors is the caller's (host or device): kt_model_init computes
 * shapes, strides and sizes only.
 */
#ifndef KVRT_TESTS_KERN_UTIL_H
#define KVRT_TESTS_KERN_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/layout.h"
#include "tests/test_util.h"

/* Roles of a KV tensor's dimensions. */
enum { KT_L, KT_KV, KT_B, KT_T, KT_H, KT_D, KT_NROLES };

/* Physical orders. */
enum {
	KT_NHD = 0,    /* the layout's logical order */
	KT_HND = 1,    /* heads outside tokens */
	KT_BFIRST = 2, /* blocks outermost (vLLM's stride order for FA) */
};

struct kt_spec {
	enum kvrt_kv_layout layout;
	int order;          /* KT_NHD, KT_HND, KT_BFIRST */
	bool cross;         /* one cross-layer tensor instead of one per layer */
	uint32_t layers;    /* model layers */
	uint32_t nb;        /* blocks */
	uint32_t bs;        /* block size */
	uint32_t heads;     /* KV heads (ignored for MLA) */
	uint32_t hs;        /* head size, elements */
	uint32_t elem;      /* element size */
	uint32_t pad;       /* extra elements in each block's stride */
};

/* A model's KV tensors: `ntensors` tensors (1 when cross) described for
 * kvrt_kv_set_create; `bytes` each. */
struct kt_model {
	struct kt_spec s;
	uint32_t ntensors;
	size_t bytes;                 /* bytes of one tensor's allocation */
	int64_t size[KT_NROLES];      /* per role */
	int64_t stride[KT_NROLES];    /* per role, elements */
	unsigned char **base;         /* [ntensors]: memory (caller's) */
	struct kvrt_kv_tensor *t;     /* [ntensors] */
};

static inline const char *kt_spec_name(const struct kt_spec *s, char *buf, size_t n)
{
	snprintf(buf, n, "%s/%s%s L%u nb%u bs%u h%u hs%u e%u pad%u", kvrt_kv_layout_name(s->layout),
		 s->order == KT_HND ? "HND" : s->order == KT_BFIRST ? "BFIRST" : "NHD",
		 s->cross ? "/cross" : "", s->layers, s->nb, s->bs, s->heads, s->hs, s->elem, s->pad);
	return buf;
}

/* Logical role order of a layout (without the layer dimension). */
static inline int kt_logical(enum kvrt_kv_layout l, int *roles)
{
	static const int fa[] = {KT_KV, KT_B, KT_T, KT_H, KT_D}, fi[] = {KT_B, KT_KV, KT_T, KT_H, KT_D},
			 mla[] = {KT_B, KT_T, KT_D}, cpu[] = {KT_KV, KT_B, KT_H, KT_T, KT_D};
	const int *src = l == KVRT_KV_FLASH_ATTN ? fa : l == KVRT_KV_FLASHINFER ? fi : l == KVRT_KV_MLA ? mla : cpu;
	int n = l == KVRT_KV_MLA ? 3 : 5;
	memcpy(roles, src, (size_t)n * sizeof(int));
	return n;
}

/* Compute shapes and strides; allocates the arrays (free: kt_model_fini).
 * Memory: set m->base[i] then call kt_model_bind. */
static inline void kt_model_init(struct kt_model *m, const struct kt_spec *s)
{
	memset(m, 0, sizeof(*m));
	m->s = *s;
	bool mla = s->layout == KVRT_KV_MLA;
	m->size[KT_L] = s->layers;
	m->size[KT_KV] = mla ? 1 : 2;
	m->size[KT_B] = s->nb;
	m->size[KT_T] = s->bs;
	m->size[KT_H] = mla ? 1 : s->heads;
	m->size[KT_D] = s->hs;
	/* Physical order, outermost first. */
	int logical[5], phys[6], np = 0;
	int nl = kt_logical(s->layout, logical);
	int order[5];
	memcpy(order, logical, sizeof(order));
	if (!mla && s->order == KT_HND) { /* swap T and H physically */
		/* (CPU is HND logically: "HND" of it means NHD physically.) */
		for (int i = 0; i < nl; i++)
			order[i] = order[i] == KT_T ? KT_H : order[i] == KT_H ? KT_T : order[i];
	}
	if (s->order == KT_BFIRST || s->cross) { /* blocks outermost, layers next */
		phys[np++] = KT_B;
		if (s->cross)
			phys[np++] = KT_L;
		for (int i = 0; i < nl; i++)
			if (order[i] != KT_B)
				phys[np++] = order[i];
	} else {
		for (int i = 0; i < nl; i++)
			phys[np++] = order[i];
	}
	int64_t running = 1;
	for (int i = np - 1; i >= 0; i--) {
		int r = phys[i];
		if (r == KT_B) {
			m->stride[r] = running + s->pad;
			running = m->stride[r] * m->size[r];
		} else {
			m->stride[r] = running;
			running *= m->size[r];
		}
	}
	if (mla) {
		m->stride[KT_KV] = 0;
		m->stride[KT_H] = 0;
	}
	if (!s->cross)
		m->stride[KT_L] = 0;
	m->bytes = (size_t)running * s->elem;
	m->ntensors = s->cross ? 1 : s->layers;
	m->base = calloc(m->ntensors, sizeof(*m->base));
	m->t = calloc(m->ntensors, sizeof(*m->t));
}

/* Fill the tensor descriptions from m->base[]. */
static inline void kt_model_bind(struct kt_model *m)
{
	int logical[5];
	int nl = kt_logical(m->s.layout, logical);
	for (uint32_t i = 0; i < m->ntensors; i++) {
		struct kvrt_kv_tensor *t = &m->t[i];
		memset(t, 0, sizeof(*t));
		t->data = m->base[i];
		t->layout = m->s.layout;
		t->cross_layer = m->s.cross;
		t->elem_size = m->s.elem;
		uint32_t d = 0;
		if (m->s.cross) {
			t->shape[d] = m->size[KT_L];
			t->stride[d++] = m->stride[KT_L];
		}
		for (int k = 0; k < nl; k++) {
			t->shape[d] = m->size[logical[k]];
			t->stride[d++] = m->stride[logical[k]];
		}
		t->ndim = d;
		t->name = "kt";
	}
}

static inline void kt_model_fini(struct kt_model *m)
{
	free(m->base);
	free(m->t);
}

/* Address of head h (byte 0) of K/V kv at slot of layer l. */
static inline unsigned char *kt_at(const struct kt_model *m, uint32_t l, uint32_t kv, int64_t slot,
				   uint32_t h)
{
	unsigned char *b = m->s.cross ? m->base[0] : m->base[l];
	int64_t blk = slot / m->s.bs, off = slot % m->s.bs;
	int64_t e = (m->s.cross ? (int64_t)l * m->stride[KT_L] : 0) + kv * m->stride[KT_KV] +
		    blk * m->stride[KT_B] + off * m->stride[KT_T] + h * m->stride[KT_H];
	return b + e * m->s.elem;
}

static inline void kt_fill(unsigned char *p, size_t n, uint64_t *rng)
{
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		uint64_t r = kvrt_test_rand(rng);
		memcpy(p + i, &r, 8);
	}
	for (; i < n; i++)
		p[i] = (unsigned char)(kvrt_test_rand(rng) | 1);
}

/* n slots as a scheduler hands them: requests take shuffled blocks and fill
 * them from a random offset, so runs of consecutive slots cross block
 * edges; ~1 in 8 is -1. Slots are distinct. n <= nb * bs / 2. */
static inline void kt_slots(int64_t *out, uint32_t n, uint32_t nb, uint32_t bs, uint64_t *rng)
{
	uint32_t *perm = malloc(nb * sizeof(*perm));
	for (uint32_t i = 0; i < nb; i++)
		perm[i] = i;
	for (uint32_t i = nb - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(kvrt_test_rand(rng) % (i + 1));
		uint32_t x = perm[i]; perm[i] = perm[j]; perm[j] = x;
	}
	unsigned char *used = calloc((size_t)nb * bs, 1);
	uint32_t pb = 0, off = (uint32_t)(kvrt_test_rand(rng) % bs);
	for (uint32_t i = 0; i < n; i++) {
		if (off == bs || kvrt_test_rand(rng) % 64 == 0) { /* next block (or jump) */
			pb++;
			off = kvrt_test_rand(rng) % 4 == 0 ? (uint32_t)(kvrt_test_rand(rng) % bs) : 0;
		}
		int64_t slot = (int64_t)perm[pb % nb] * bs + off++;
		out[i] = used[slot] || kvrt_test_rand(rng) % 8 == 0 ? -1 : slot;
		used[slot] = 1;
	}
	free(used);
	free(perm);
}

/* A plan's worth of chunks: chunk c has n[c] tokens, of which tokens
 * first[c] .. first[c]+count[c]-1 map to slots + slot_off[c]. */
struct kt_chunks {
	uint32_t num;
	uint32_t *n, *first, *count, *slot_off;
	int64_t *slots;          /* all slots, chunk after chunk */
	uint32_t total;          /* slots in all */
	size_t *bytes;           /* payload bytes of chunk c */
	unsigned char **buf;     /* caller's memory per chunk */
};

static inline void kt_chunks_init(struct kt_chunks *c, uint32_t num, uint32_t max_n,
				  const struct kvrt_kv_set *set, uint32_t nb, uint32_t bs, uint64_t *rng)
{
	memset(c, 0, sizeof(*c));
	c->num = num;
	c->n = calloc(num, sizeof(uint32_t));
	c->first = calloc(num, sizeof(uint32_t));
	c->count = calloc(num, sizeof(uint32_t));
	c->slot_off = calloc(num, sizeof(uint32_t));
	c->bytes = calloc(num, sizeof(size_t));
	c->buf = calloc(num, sizeof(*c->buf));
	for (uint32_t i = 0; i < num; i++) {
		c->n[i] = 1 + (uint32_t)(kvrt_test_rand(rng) % max_n);
		/* Mostly whole chunks; sometimes a part (a tail, a partial hit). */
		if (kvrt_test_rand(rng) % 3 == 0) {
			c->first[i] = (uint32_t)(kvrt_test_rand(rng) % c->n[i]);
			c->count[i] = 1 + (uint32_t)(kvrt_test_rand(rng) % (c->n[i] - c->first[i]));
		} else {
			c->count[i] = c->n[i];
		}
		c->slot_off[i] = c->total;
		c->total += c->count[i];
		c->bytes[i] = kvrt_kv_set_chunk_bytes(set, c->n[i]);
	}
	if (c->total > nb * bs / 2) { /* keep slots distinct: shrink */
		fprintf(stderr, "kt_chunks_init: too many tokens for the tensor\n");
		abort();
	}
	c->slots = calloc(c->total ? c->total : 1, sizeof(int64_t));
	kt_slots(c->slots, c->total, nb, bs, rng);
}

static inline void kt_chunks_fini(struct kt_chunks *c)
{
	free(c->n); free(c->first); free(c->count); free(c->slot_off);
	free(c->slots); free(c->bytes); free(c->buf);
}

/* Naive reference: apply a gather (paged -> chunk images) or a scatter
 * (chunk images -> paged) of layers [l0, l0+nl), head by head, into the
 * given images. `chunk[c]` and the model's bases are host memory here. */
static inline void kt_reference(const struct kt_model *m, const struct kt_chunks *c,
				unsigned char **chunk, uint32_t l0, uint32_t nl, bool gather)
{
	uint32_t nkv = m->s.layout == KVRT_KV_MLA ? 1 : 2;
	uint32_t heads = m->s.layout == KVRT_KV_MLA ? 1 : m->s.heads;
	size_t hb = (size_t)m->s.hs * m->s.elem, kvb = hb * heads;
	for (uint32_t i = 0; i < c->num; i++) {
		for (uint32_t j = 0; j < c->count[i]; j++) {
			int64_t slot = c->slots[c->slot_off[i] + j];
			if (slot < 0)
				continue;
			uint32_t t = c->first[i] + j;
			for (uint32_t l = l0; l < l0 + nl; l++)
				for (uint32_t kv = 0; kv < nkv; kv++)
					for (uint32_t h = 0; h < heads; h++) {
						unsigned char *p = kt_at(m, l, kv, slot, h);
						unsigned char *q = chunk[i] +
							(((size_t)l * nkv + kv) * c->n[i] + t) * kvb + h * hb;
						if (gather)
							memcpy(q, p, hb);
						else
							memcpy(p, q, hb);
					}
		}
	}
}

/* The spec matrix the tests sweep: every layout and physical order, cross
 * and per-layer, every element size, with and without padding. */
static inline uint32_t kt_specs(struct kt_spec *out, uint32_t max)
{
	static const struct { enum kvrt_kv_layout l; int order; } lo[] = {
		{KVRT_KV_FLASH_ATTN, KT_NHD}, {KVRT_KV_FLASH_ATTN, KT_HND}, {KVRT_KV_FLASH_ATTN, KT_BFIRST},
		{KVRT_KV_FLASHINFER, KT_NHD}, {KVRT_KV_FLASHINFER, KT_HND}, {KVRT_KV_MLA, KT_NHD},
		{KVRT_KV_CPU, KT_NHD}, {KVRT_KV_CPU, KT_HND},
	};
	static const uint32_t elems[] = {1, 2, 4, 8};
	uint32_t n = 0;
	for (size_t i = 0; i < sizeof(lo) / sizeof(lo[0]); i++)
		for (size_t e = 0; e < 4; e++)
			for (int cross = 0; cross < 2; cross++) {
				if (n == max)
					return n;
				struct kt_spec s = {
					.layout = lo[i].l, .order = lo[i].order, .cross = cross,
					.layers = 3 + (uint32_t)(i % 2), .nb = 40, .bs = 4u << (e % 3),
					.heads = 1 + (uint32_t)((i + e) % 4), .hs = (i + e) % 2 ? 8u << (e % 2) : 3 + (uint32_t)(8 * e + i) % 29,
					.elem = elems[e], .pad = (uint32_t)((i + e + (uint32_t)cross) % 3) * 5,
				};
				out[n++] = s;
			}
	return n;
}

#endif
