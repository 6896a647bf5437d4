/* tests/test_kvrt_api.c: connector/kvrt.h end to end on host tensors: a
 * scheduler and a worker of one instance save a request's KV, a second
 * request with the same tokens hits, loads it into other blocks byte for
 * byte; another cache_salt misses; a corrupted chunk becomes load errors,
 * is dropped, and the recompute's save makes the next request hit;
 * no pins remain; a request that hits saves its chunks beyond the hit;
 * reset_cache drops what no request pins (the rest is kept and reported);
 * a small mailbox_size works; kvrt_worker_step_work says which per-layer
 * calls a step needs.
 * Plus the error paths a user can hit. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connector/kvrt.h"
#include "tests/test_util.h"

#define NB 32u  /* blocks */
#define BS 16u  /* tokens per block (= chunk size) */
#define H 2u    /* heads */
#define D 8u    /* head size */
#define T 40u   /* prompt tokens */

struct rig {
	float *kv[2];             /* two layers, (B, H, N, 2D) contiguous */
	struct kvrt_tensor t[2];
	struct kvrt_worker *w;
	struct kvrt_sched *s;
};

/* The first 3 keys everywhere; the 4th (a small mailbox_size) and the 5th
 * (async loads) where a test asks for them. */
static const char *K[] = {"chunk_size", "max_local_cpu_size", "device", "mailbox_size",
			  "enable_async_loading"};
static const char *V[] = {"16", "0.01", "host", "64", "true"};

/* The rig's KV layout (a test may switch it before rig_up). */
static enum kvrt_layout rig_layout = KVRT_LAYOUT_BHNC;

static struct kvrt_options opts(const char *inst)
{
	return (struct kvrt_options){.instance = inst, .model_id = "tiny", .dtype = "float32",
				     .block_size = BS, .keys = K, .values = V, .num_keys = 3};
}

static void rig_up_keys(struct rig *g, const char *inst, uint32_t num_keys)
{
	char err[256];
	struct kvrt_options o = opts(inst);
	o.num_keys = num_keys;
	uint64_t rng = 0x1234;
	for (int l = 0; l < 2; l++) {
		size_t n = (size_t)NB * H * BS * 2 * D;
		g->kv[l] = malloc(n * sizeof(float));
		for (size_t i = 0; i < n; i++)
			g->kv[l][i] = (float)(kvrt_test_rand(&rng) % 100000) + 1.0f;
		g->t[l] = (struct kvrt_tensor){.data = g->kv[l], .layout = rig_layout, .elem_size = 4,
					       .ndim = 4, .shape = {NB, H, BS, 2 * D},
					       .stride = {H * BS * 2 * D, BS * 2 * D, 2 * D, 1}};
	}
	cr_assert_eq(kvrt_sched_create(&g->s, &o, err, sizeof err), 0, "%s", err);
	cr_assert_eq(kvrt_worker_create(&g->w, &o, err, sizeof err), 0, "%s", err);
	cr_assert_eq(kvrt_worker_register(g->w, g->t, 2), 0);
}

static void rig_up(struct rig *g, const char *inst)
{
	rig_up_keys(g, inst, 3);
}

static void rig_down(struct rig *g)
{
	kvrt_sched_destroy(g->s);
	kvrt_worker_destroy(g->w);
	free(g->kv[0]);
	free(g->kv[1]);
}

static float *slot(struct rig *g, int l, uint32_t blk, uint32_t h, uint32_t tok)
{
	return g->kv[l] + (((size_t)blk * H + h) * BS + tok) * 2 * D;
}

/* One worker step over metadata bytes; the step's work (kvrt_worker_step_work)
 * must be `work` unless work is -1. */
static void step_work(struct rig *g, const void *m, size_t len, int work)
{
	cr_assert_eq(kvrt_worker_bind(g->w, m, len), 0);
	if (work >= 0)
		cr_assert_eq(kvrt_worker_step_work(g->w), (unsigned)work, "step work %u, want %d",
			     kvrt_worker_step_work(g->w), work);
	cr_assert_eq(kvrt_worker_start_load(g->w), 0);
	for (uint32_t l = 0; l < 2; l++) {
		cr_assert_eq(kvrt_worker_wait_layer(g->w, l), 0);
		cr_assert_eq(kvrt_worker_save_layer(g->w, l), 0);
	}
	cr_assert_eq(kvrt_worker_wait_save(g->w), 0);
}

static void step(struct rig *g, const void *m, size_t len)
{
	step_work(g, m, len, -1);
}

static struct kvrt_request req(const char *id, const uint32_t *tok, const char *salt)
{
	return (struct kvrt_request){.id = id, .id_len = (uint32_t)strlen(id), .tokens = tok,
				     .num_tokens = T, .total_tokens = T, .prompt_tokens = T,
				     .cache_salt = {salt, salt ? strlen(salt) : 0}};
}

/* Fill blocks blk[0..n) of both layers with -7 (a load must overwrite). */
static void poison(struct rig *g, const int32_t *blk, int n)
{
	for (int l = 0; l < 2; l++)
		for (int k = 0; k < n; k++)
			for (uint32_t i = 0; i < H * BS * 2 * D; i++)
				slot(g, l, (uint32_t)blk[k], 0, 0)[i] = -7.0f;
}

/* Tokens [t0, t1) hold the same KV in blocks got (by token) as in want. */
static void same_kv(struct rig *g, const int32_t *got, const int32_t *want, uint32_t t0, uint32_t t1)
{
	for (int l = 0; l < 2; l++)
		for (uint32_t t = t0; t < t1; t++)
			for (uint32_t h = 0; h < H; h++)
				cr_assert_eq(memcmp(slot(g, l, (uint32_t)got[t / BS], h, t % BS),
						    slot(g, l, (uint32_t)want[t / BS], h, t % BS), 2 * D * 4), 0,
					     "layer %d token %u head %u differs", l, t, h);
}

/* After the requests finished: the worker's stats, no pins left. */
static struct kvrt_stats no_pins_left(struct rig *g)
{
	cr_assert_eq(kvrt_worker_flush(g->w), 0);
	struct kvrt_stats st;
	kvrt_worker_stats(g->w, &st);
	cr_assert_eq(st.pinned, 0u, "%llu pins left", (unsigned long long)st.pinned);
	return st;
}

/* Save request A (blocks 1..3), then request B's lookup. */
static void save_a(struct rig *g, const uint32_t *tok, const int32_t *ablk)
{
	struct kvrt_request a = req("A", tok, NULL);
	uint32_t n;
	bool as;
	cr_assert_eq(kvrt_sched_lookup(g->s, &a, 0, &n, &as), 0);
	cr_assert_eq(n, 0u);
	cr_assert_eq(kvrt_sched_after_alloc(g->s, &a, ablk, 3, 0, 0), 0);
	cr_assert_eq(kvrt_sched_save_need(g->s, "A", 1, T, T), 32u);
	struct kvrt_sched_req sr = {.req = a, .num_computed = T, .block_ids = ablk, .num_blocks = 3};
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g->s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len), 0);
	step_work(g, m, len, 2); /* saves only: the per-layer saves matter */
	/* A saved in its last step: its blocks are kept (delay_free) unless
	 * the save actor's copies are already done. */
	bool delay;
	cr_assert_eq(kvrt_sched_finished(g->s, "A", 1, &delay), 0);
	cr_assert_eq(kvrt_sched_build_meta(g->s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step_work(g, m, len, 0); /* nothing: the per-layer calls may be skipped */
	cr_assert_eq(kvrt_worker_flush(g->w), 0);
	uint8_t buf[256];
	uint32_t ns, nr, nf;
	cr_assert_eq(kvrt_worker_get_finished(g->w, buf, sizeof buf, &ns, &nr, &nf), 0);
	cr_assert_eq(ns, delay ? 1u : 0u);
	cr_assert(!delay || (buf[0] == 1 && buf[1] == 0 && buf[2] == 'A'));
}

/* A request whose saves are complete when it finishes frees its blocks at
 * once (no delay_free), so vLLM's reset_prefix_cache right after it works;
 * the saves-done watermark is the scheduler's step number. */
Test(kvrt_api, finished_after_its_saves_completed_is_not_delayed)
{
	struct rig g;
	rig_up(&g, "t-saved");
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 7000 + i;
	int32_t ablk[3] = {1, 2, 3};
	struct kvrt_request a = req("A", tok, NULL);
	uint32_t n;
	bool as, delay;
	cr_assert_eq(kvrt_sched_lookup(g.s, &a, 0, &n, &as), 0);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &a, ablk, 3, 0, 0), 0);
	cr_assert_eq(kvrt_sched_save_need(g.s, "A", 1, T, T), 32u);
	struct kvrt_sched_req sr = {.req = a, .num_computed = T, .block_ids = ablk, .num_blocks = 3};
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len), 0);
	step(&g, m, len);
	cr_assert_eq(kvrt_worker_flush(g.w), 0); /* the copies are done */
	cr_assert_eq(kvrt_sched_finished(g.s, "A", 1, &delay), 0);
	cr_assert_not(delay, "a request whose saves completed kept its blocks");
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	uint8_t buf[256];
	uint32_t ns, nr, nf;
	cr_assert_eq(kvrt_worker_get_finished(g.w, buf, sizeof buf, &ns, &nr, &nf), 0);
	cr_assert_eq(ns, 0u, "reported finished-sending without a delay_free");
	no_pins_left(&g);
	rig_down(&g);
}

Test(kvrt_api, hit_loads_same_bytes_salt_misses_no_pins)
{
	struct rig g;
	/* mailbox_size = 64: the worker's evict actor runs on a small mailbox. */
	rig_up_keys(&g, "t-hit", 4);
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 1000 + i * 7;
	int32_t ablk[3] = {1, 2, 3}, bblk[3] = {7, 8, 9};
	save_a(&g, tok, ablk);
	struct kvrt_request b = req("B", tok, NULL), c = req("C", tok, "other");
	uint32_t n;
	bool as;
	cr_assert_eq(kvrt_sched_lookup(g.s, &c, 0, &n, &as), 0);
	cr_assert_eq(n, 0u, "another cache_salt must miss");
	cr_assert_eq(kvrt_sched_lookup(g.s, &b, 0, &n, &as), 0);
	cr_assert_eq(kvrt_sched_lookup(g.s, &b, 0, &n, &as), 0); /* idempotent */
	cr_assert_eq(n, 32u);
	cr_assert(!as);
	poison(&g, bblk, 2); /* then load */
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 3, 0, 32), 0);
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step_work(&g, m, len, 1); /* a synchronous load, nothing saved */
	int64_t errs[8];
	cr_assert_eq(kvrt_worker_load_errors(g.w, errs, 8), 0u);
	same_kv(&g, bblk, ablk, 0, 32);
	bool delay;
	cr_assert_eq(kvrt_sched_finished(g.s, "B", 1, &delay), 0);
	cr_assert_eq(kvrt_sched_finished(g.s, "C", 1, &delay), 0);
	cr_assert_eq(kvrt_worker_flush(g.w), 0);
	struct kvrt_stats st;
	kvrt_worker_stats(g.w, &st);
	cr_assert_eq(st.pinned, 0u);
	cr_assert_eq(st.load_chunks, 2u);
	rig_down(&g);
}

Test(kvrt_api, reset_cache_drops_unpinned_keeps_pinned)
{
	struct rig g;
	rig_up(&g, "t-reset");
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 3000 + i * 11;
	int32_t ablk[3] = {1, 2, 3};
	save_a(&g, tok, ablk);
	struct kvrt_request b = req("B", tok, NULL), e = req("E", tok, NULL), f = req("F", tok, NULL);
	uint32_t n;
	bool as, delay;
	/* B's lookup pins both chunks: reset keeps them and says so. */
	cr_assert_eq(kvrt_sched_lookup(g.s, &b, 0, &n, &as), 0);
	cr_assert_eq(n, 32u);
	cr_assert_eq(kvrt_sched_reset_cache(g.s), -EBUSY);
	cr_assert_eq(kvrt_sched_lookup(g.s, &e, 0, &n, &as), 0);
	cr_assert_eq(n, 32u, "pinned chunks survive a reset");
	cr_assert_eq(kvrt_sched_finished(g.s, "B", 1, &delay), 0);
	cr_assert_eq(kvrt_sched_finished(g.s, "E", 1, &delay), 0);
	cr_assert_eq(kvrt_worker_flush(g.w), 0);
	struct kvrt_stats st;
	kvrt_worker_stats(g.w, &st);
	cr_assert_eq(st.pinned, 0u);
	/* Nothing pinned: everything goes, and the prompt misses. */
	cr_assert_eq(kvrt_sched_reset_cache(g.s), 0);
	cr_assert_eq(kvrt_sched_lookup(g.s, &f, 0, &n, &as), 0);
	cr_assert_eq(n, 0u, "a reset cache misses");
	cr_assert_eq(kvrt_sched_finished(g.s, "F", 1, &delay), 0);
	cr_assert_eq(kvrt_sched_reset_cache(g.s), 0); /* empty: nothing to do */
	rig_down(&g);
}

/* One request from lookup to its blocks' release: loads its hit into blk,
 * computes and saves the rest of its prompt (all of it computed in one
 * step). Returns the hit. */
static uint32_t serve(struct rig *g, const char *id, const uint32_t *tok, uint32_t ntok,
		      const int32_t *blk, uint32_t nblk)
{
	struct kvrt_request r = {.id = id, .id_len = (uint32_t)strlen(id), .tokens = tok,
				 .num_tokens = ntok, .total_tokens = ntok, .prompt_tokens = ntok};
	uint32_t hit;
	bool as;
	cr_assert_eq(kvrt_sched_lookup(g->s, &r, 0, &hit, &as), 0);
	cr_assert_eq(kvrt_sched_after_alloc(g->s, &r, blk, nblk, 0, hit), 0);
	cr_assert_eq(kvrt_sched_save_need(g->s, id, r.id_len, ntok, ntok), ntok / BS * BS);
	struct kvrt_sched_req sr = {.req = r, .num_computed = ntok, .block_ids = blk, .num_blocks = nblk};
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g->s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len), 0);
	step(g, m, len);
	int64_t errs[8];
	cr_assert_eq(kvrt_worker_load_errors(g->w, errs, 8), 0u);
	bool delay;
	cr_assert_eq(kvrt_sched_finished(g->s, id, r.id_len, &delay), 0);
	cr_assert_eq(kvrt_sched_build_meta(g->s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(g, m, len);
	cr_assert_eq(kvrt_worker_flush(g->w), 0);
	uint8_t buf[256];
	uint32_t ns, nr, nf;
	cr_assert_eq(kvrt_worker_get_finished(g->w, buf, sizeof buf, &ns, &nr, &nf), 0);
	cr_assert_eq(ns, delay ? 1u : 0u);
	return hit;
}

/* A request that hits (and loads) a cached prefix saves its own new chunks
 * beyond the hit: the next round hits its whole history. */
Test(kvrt_api, hit_request_saves_chunks_beyond_its_hit)
{
	struct rig g;
	rig_up(&g, "t-rounds");
	uint32_t tok[5 * BS];
	for (uint32_t i = 0; i < 5 * BS; i++)
		tok[i] = 3000 + i * 11;
	int32_t ablk[2] = {1, 2}, bblk[4] = {4, 5, 6, 7}, cblk[5] = {10, 11, 12, 13, 14};
	struct kvrt_stats st;
	cr_assert_eq(serve(&g, "A", tok, 2 * BS, ablk, 2), 0u);
	kvrt_worker_stats(g.w, &st);
	cr_assert_eq(st.save_chunks, 2u);
	/* B = A + 2 chunks: hits A's 2, loads them, saves its 2 new ones. */
	cr_assert_eq(serve(&g, "B", tok, 4 * BS, bblk, 4), 2 * BS);
	kvrt_worker_stats(g.w, &st);
	cr_assert_eq(st.load_chunks, 2u);
	cr_assert_eq(st.save_chunks, 4u, "B saved %llu chunks beyond its hit, not 2",
		     (unsigned long long)(st.save_chunks - 2));
	/* C = B + 1 chunk: hits all 4, with B's bytes. */
	cr_assert_eq(serve(&g, "C", tok, 5 * BS, cblk, 5), 4 * BS);
	kvrt_worker_stats(g.w, &st);
	cr_assert_eq(st.load_chunks, 6u);
	cr_assert_eq(st.save_chunks, 5u);
	cr_assert_eq(st.pinned, 0u);
	same_kv(&g, cblk, bblk, 2 * BS, 4 * BS);
	rig_down(&g);
}

/* A chunk whose CPU copy fails its checksum: a load error, dropped, saved
 * again by the recompute, then served whole. The evict actor is made slow
 * to drop it (slow_discards): the load must not report before the chunk is
 * out of the index, or the recompute's save finds it there and skips itself
 * as a duplicate, and the chunk is lost once the drop lands. */
Test(kvrt_api, corrupt_chunk_is_a_load_error)
{
	setenv("KVRT_DEBUG", "slow_discards=300", 1);
	struct rig g;
	rig_up(&g, "t-corrupt");
	unsetenv("KVRT_DEBUG");
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 5000 + i * 3;
	int32_t ablk[3] = {1, 2, 3}, bblk[3] = {10, 11, 12};
	save_a(&g, tok, ablk);
	struct kvrt_request b = req("B", tok, NULL);
	cr_assert_eq(kvrt_debug_corrupt_chunk(g.s, &b, 1), 0);
	uint32_t n;
	bool as;
	cr_assert_eq(kvrt_sched_lookup(g.s, &b, 0, &n, &as), 0);
	cr_assert_eq(n, 32u);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 3, 0, 32), 0);
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	int64_t errs[8];
	size_t ne = kvrt_worker_load_errors(g.w, errs, 8);
	cr_assert_eq(ne, 1u);
	cr_assert_eq(errs[0], 11);
	/* vLLM rewinds B to its first bad block (token 16) and recomputes
	 * the rest (the harness's forward: A's values, which are right): the
	 * recompute's save replaces the chunk the worker dropped. */
	cr_assert_eq(kvrt_sched_rewound(g.s, "B", 1, BS), 0);
	cr_assert_eq(kvrt_sched_rewound(g.s, "Z", 1, 0), -ENOENT);
	for (int l = 0; l < 2; l++)
		for (uint32_t t = BS; t < T; t++)
			for (uint32_t h = 0; h < H; h++)
				memcpy(slot(&g, l, (uint32_t)bblk[t / BS], h, t % BS),
				       slot(&g, l, (uint32_t)ablk[t / BS], h, t % BS), 2 * D * 4);
	cr_assert_eq(kvrt_sched_save_need(g.s, "B", 1, T, T), 32u, "the recomputed chunk is not saved");
	struct kvrt_sched_req sr = {.req = b, .num_computed = T, .block_ids = bblk, .num_blocks = 3};
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len), 0);
	step(&g, m, len);
	bool delay;
	kvrt_sched_finished(g.s, "B", 1, &delay);
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	struct kvrt_stats st = no_pins_left(&g);
	cr_assert_eq(st.checksum_failures, 1u);
	/* The next request with that prefix hits both chunks and loads A's
	 * bytes, with no second failure. */
	int32_t cblk[3] = {20, 21, 22};
	poison(&g, cblk, 2);
	struct kvrt_request c = req("C", tok, NULL);
	cr_assert_eq(kvrt_sched_lookup(g.s, &c, 0, &n, &as), 0);
	cr_assert_eq(n, 32u);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &c, cblk, 3, 0, 32), 0);
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	cr_assert_eq(kvrt_worker_load_errors(g.w, errs, 8), 0u, "the corrupt chunk was served again");
	same_kv(&g, cblk, ablk, 0, 32);
	kvrt_sched_finished(g.s, "C", 1, &delay);
	st = no_pins_left(&g);
	cr_assert_eq(st.checksum_failures, 1u);
	rig_down(&g);
}

/* A backend whose block interior is its own (vLLM's CPU attention): only
 * whole blocks are copied. A 32-token prompt cached whole hits 31 tokens
 * (vLLM computes the last); the load still writes all of its last block,
 * token 31 with the cached copy (vLLM's forward then rewrites it), where the
 * token-row layout leaves it to vLLM. A chunk_size that cuts blocks is
 * refused at register. */
Test(kvrt_api, whole_blocks_layout_loads_whole_blocks)
{
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 9000 + i * 5;
	int32_t ablk[3] = {1, 2, 3}, bblk[2] = {6, 7};
	for (int mode = 0; mode < 2; mode++) {
		rig_layout = mode ? KVRT_LAYOUT_BHNC_BLOCKS : KVRT_LAYOUT_BHNC;
		struct rig g;
		rig_up(&g, mode ? "t-blocks" : "t-rows");
		save_a(&g, tok, ablk);
		struct kvrt_request b = req("B", tok, NULL);
		b.num_tokens = b.total_tokens = b.prompt_tokens = 2 * BS;
		uint32_t n;
		bool as, delay;
		cr_assert_eq(kvrt_sched_lookup(g.s, &b, 0, &n, &as), 0);
		cr_assert_eq(n, 2 * BS - 1);
		poison(&g, bblk, 2);
		cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 2, 0, n), 0);
		const void *m;
		size_t len;
		cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
		step(&g, m, len);
		same_kv(&g, bblk, ablk, 0, 2 * BS - 1);
		if (mode)
			same_kv(&g, bblk, ablk, 2 * BS - 1, 2 * BS);
		else
			cr_assert_eq(*slot(&g, 0, (uint32_t)bblk[1], 0, BS - 1), -7.0f,
				     "the token-row layout wrote past the load");
		kvrt_sched_finished(g.s, "B", 1, &delay);
		no_pins_left(&g);
		rig_down(&g);
	}
	/* chunk_size 24 cuts 16-token blocks: refused in whole-block mode. */
	static const char *ck[] = {"chunk_size", "max_local_cpu_size", "device"};
	static const char *cv[] = {"24", "0.01", "host"};
	struct kvrt_options o = opts("t-blocks-24");
	o.keys = ck;
	o.values = cv;
	char err[256];
	struct kvrt_worker *w;
	cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), 0, "%s", err);
	float *kv = calloc((size_t)NB * H * BS * 2 * D, sizeof(float));
	struct kvrt_tensor t = {.data = kv, .layout = KVRT_LAYOUT_BHNC_BLOCKS, .elem_size = 4, .ndim = 4,
				.shape = {NB, H, BS, 2 * D},
				.stride = {H * BS * 2 * D, BS * 2 * D, 2 * D, 1}};
	cr_assert_eq(kvrt_worker_register(w, &t, 1), -EINVAL);
	kvrt_worker_destroy(w);
	free(kv);
	rig_layout = KVRT_LAYOUT_BHNC;
}

Test(kvrt_api, errors_a_user_can_hit)
{
	char err[256];
	struct kvrt_worker *w;
	struct kvrt_sched *s;
	static const char *bk[] = {"chunk_size"}, *bv[] = {"banana"};
	struct kvrt_options o = opts("t-err");
	o.keys = bk;
	o.values = bv;
	o.num_keys = 1;
	cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), -EINVAL);
	cr_assert(strstr(err, "chunk_size"), "%s", err);
	o = opts("t-err");
	o.block_size = 0;
	cr_assert_eq(kvrt_sched_create(&s, &o, err, sizeof err), -EINVAL);
	/* A scheduler without a worker in the process: no hit, no crash, one
	 * warning, prefixed once ("kvrt: warning: ", not "... kvrt: "). */
	o = opts("t-alone");
	char logf[] = "/tmp/kvrt-test-log-XXXXXX";
	int lfd = mkstemp(logf), saved = dup(2);
	cr_assert(lfd >= 0 && saved >= 0);
	cr_assert_eq(dup2(lfd, 2), 2);
	cr_assert_eq(kvrt_sched_create(&s, &o, err, sizeof err), 0);
	cr_assert(!kvrt_sched_sees_worker(s));
	cr_assert_eq(kvrt_sched_reset_cache(s), -ENODEV);
	uint32_t tok[T] = {1, 2, 3};
	struct kvrt_request r = req("X", tok, NULL);
	uint32_t n = 99;
	bool as = true;
	cr_assert_eq(kvrt_sched_lookup(s, &r, 0, &n, &as), 0);
	cr_assert(n == 0 && !as);
	cr_assert_eq(dup2(saved, 2), 2);
	close(saved);
	char logbuf[4096] = {0};
	ssize_t ln = pread(lfd, logbuf, sizeof logbuf - 1, 0);
	close(lfd);
	unlink(logf);
	cr_assert(ln > 0 && strstr(logbuf, "kvrt: warning: "), "no warning logged: '%s'", logbuf);
	cr_assert_null(strstr(logbuf, ": kvrt: "), "a doubled prefix: '%s'", logbuf);
	bool delay;
	cr_assert_eq(kvrt_sched_finished(s, "X", 1, &delay), 0);
	cr_assert(!delay);
	kvrt_sched_destroy(s);
	/* Two workers of one instance and rank: refused. Garbage metadata: refused. */
	struct rig g;
	rig_up(&g, "t-dup");
	o = opts("t-dup");
	cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), -EEXIST);
	uint8_t junk[64];
	memset(junk, 0x5a, sizeof junk);
	cr_assert_eq(kvrt_worker_bind(g.w, junk, sizeof junk), -EBADMSG);
	/* An empty frame (found by fuzz_frame: memcpy from it was UB). */
	cr_assert_eq(kvrt_worker_bind(g.w, NULL, 0), -EBADMSG);
	cr_assert_eq(kvrt_worker_start_load(g.w), 0);
	rig_down(&g);
}

/* Read finished ids with a buffer of `cap` bytes until `want` ids of kind
 * `kind` (0 sending, 1 receiving) came out; seen[r] counts request r's. */
static void collect(struct rig *g, size_t cap, int kind, uint32_t want, uint32_t *seen, uint32_t nr)
{
	uint32_t total = 0;
	for (int call = 0; call < 40 && total < want; call++) {
		uint8_t buf[64];
		uint32_t n[3];
		cr_assert_leq(cap, sizeof buf);
		cr_assert_eq(kvrt_worker_get_finished(g->w, buf, cap, &n[0], &n[1], &n[2]), 0);
		const uint8_t *p = buf;
		for (int k = 0; k < 3; k++)
			for (uint32_t i = 0; i < n[k]; i++) {
				uint32_t len = (uint32_t)p[0] | (uint32_t)p[1] << 8;
				unsigned r;
				cr_assert_eq(sscanf((const char *)p + 2 + 4, "%02u", &r), 1);
				cr_assert_lt(r, nr);
				if (k == kind) {
					seen[r]++;
					total++;
				}
				p += 2 + len;
			}
	}
}

/* Ten requests finish with delay_free in one step; get_finished's buffer
 * holds three ids at a time: every id still comes out, once each. Then
 * ten async loads of the same prompts finish: every one is reported
 * receiving, once, through the same small buffer. */
Test(kvrt_api, finished_ids_that_do_not_fit_come_next_time)
{
	struct rig g;
	/* Saves reported done 300 ms late (test hook): every request finishes
	 * while its copies may run, so all ten are freed with delay_free. */
	setenv("KVRT_DEBUG", "slow_saves=300", 1);
	rig_up_keys(&g, "t-fin", 5);
	unsetenv("KVRT_DEBUG");
	enum { NR = 10 };
	uint32_t tok[NR][T];
	int32_t blk[NR][3];
	char id[NR][16];
	struct kvrt_sched_req sr[NR];
	for (uint32_t r = 0; r < NR; r++) {
		for (uint32_t i = 0; i < T; i++)
			tok[r][i] = 100000 * (r + 1) + i;
		for (uint32_t b = 0; b < 3; b++)
			blk[r][b] = (int32_t)(1 + 3 * r + b);
		snprintf(id[r], sizeof id[r], "req-%02u-xx", r);
		struct kvrt_request q = req(id[r], tok[r], NULL);
		uint32_t n;
		bool as;
		cr_assert_eq(kvrt_sched_lookup(g.s, &q, 0, &n, &as), 0);
		cr_assert_eq(kvrt_sched_after_alloc(g.s, &q, blk[r], 3, 0, 0), 0);
		cr_assert_eq(kvrt_sched_save_need(g.s, id[r], (uint32_t)strlen(id[r]), T, T), 32u);
		sr[r] = (struct kvrt_sched_req){.req = q, .num_computed = T, .block_ids = blk[r], .num_blocks = 3};
	}
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){sr, NR, NULL, 0}, &m, &len), 0);
	step(&g, m, len);
	for (uint32_t r = 0; r < NR; r++) {
		bool delay;
		cr_assert_eq(kvrt_sched_finished(g.s, id[r], (uint32_t)strlen(id[r]), &delay), 0);
		cr_assert(delay);
	}
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	cr_assert_eq(kvrt_worker_flush(g.w), 0);
	uint32_t seen[NR] = {0};
	collect(&g, 40, 0, NR, seen, NR); /* three 11-byte records a call */
	for (uint32_t r = 0; r < NR; r++)
		cr_assert_eq(seen[r], 1u, "%s reported sending %u times", id[r], seen[r]);
	/* The same prompts again, loaded while the requests wait. */
	char id2[NR][16];
	for (uint32_t r = 0; r < NR; r++) {
		snprintf(id2[r], sizeof id2[r], "asy-%02u-xx", r);
		struct kvrt_request q = req(id2[r], tok[r], NULL);
		uint32_t n;
		bool as;
		cr_assert_eq(kvrt_sched_lookup(g.s, &q, 0, &n, &as), 0);
		cr_assert(n == 32 && as, "request %u: %u tokens, async %d", r, n, as);
		cr_assert_eq(kvrt_sched_after_alloc(g.s, &q, blk[r], 3, 0, 32), 0);
	}
	cr_assert_eq(kvrt_sched_build_meta(g.s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(&g, m, len);
	cr_assert_eq(kvrt_worker_flush(g.w), 0);
	uint32_t got[NR] = {0};
	collect(&g, 40, 1, NR, got, NR);
	for (uint32_t r = 0; r < NR; r++)
		cr_assert_eq(got[r], 1u, "%s reported receiving %u times", id2[r], got[r]);
	for (uint32_t r = 0; r < NR; r++) {
		bool delay;
		cr_assert_eq(kvrt_sched_finished(g.s, id2[r], (uint32_t)strlen(id2[r]), &delay), 0);
	}
	rig_down(&g);
}

/* Request B after A saved 2 chunks: vLLM's own prefix cache holds B's first
 * block (local hit 16), kvrt the second. B's blocks are poisoned first. */
static void local_hit_rig(struct rig *g, const char *inst, uint32_t *tok, int32_t *ablk, int32_t *bblk,
			  struct kvrt_request *b)
{
	rig_up(g, inst);
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 7000 + i * 13;
	save_a(g, tok, ablk);
	*b = req("B", tok, NULL);
	uint32_t n;
	bool as;
	cr_assert_eq(kvrt_sched_lookup(g->s, b, BS, &n, &as), 0);
	cr_assert_eq(n, 16u, "kvrt adds chunk 1 to the 16-token local hit");
	poison(g, bblk, 2);
}

static void local_hit_step(struct rig *g)
{
	const void *m;
	size_t len;
	cr_assert_eq(kvrt_sched_build_meta(g->s, &(struct kvrt_sched_step){0}, &m, &len), 0);
	step(g, m, len);
	cr_assert_eq(kvrt_worker_flush(g->w), 0);
}

/* The load starts where vLLM's local hit ended, as the lookup was told:
 * vLLM calls update_state_after_alloc before it sets num_computed_tokens,
 * so the caller cannot pass it (the defect: tokens [0, 16) loaded into the
 * block of [16, 32)). KVRT_SCHED_FROM_LOOKUP and the explicit local hit
 * load the same bytes; the local block is not touched. */
Test(kvrt_api, load_starts_at_the_lookups_local_hit)
{
	for (int explicit = 0; explicit < 2; explicit++) {
		struct rig g;
		uint32_t tok[T];
		int32_t ablk[3] = {1, 2, 3}, bblk[3] = {7, 8, 9};
		struct kvrt_request b;
		local_hit_rig(&g, explicit ? "t-local-x" : "t-local", tok, ablk, bblk, &b);
		cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 3, explicit ? BS : KVRT_SCHED_FROM_LOOKUP, 16),
			     0);
		local_hit_step(&g);
		int64_t errs[8];
		cr_assert_eq(kvrt_worker_load_errors(g.w, errs, 8), 0u);
		for (int l = 0; l < 2; l++)
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t t = 0; t < BS; t++) {
					cr_assert_eq(memcmp(slot(&g, l, (uint32_t)bblk[1], h, t),
							    slot(&g, l, (uint32_t)ablk[1], h, t), 2 * D * 4), 0,
						     "layer %d token %u head %u: chunk 1 not in block 1", l, BS + t, h);
					cr_assert_eq(*slot(&g, l, (uint32_t)bblk[0], h, t), -7.0f,
						     "the local hit's block was written");
				}
		bool delay;
		cr_assert_eq(kvrt_sched_finished(g.s, "B", 1, &delay), 0);
		cr_assert_eq(no_pins_left(&g).load_tokens, 16u);
		rig_down(&g);
	}
}

/* A start other than the lookup's, more tokens than it matched, or no
 * lookup at all: refused (-EINVAL), nothing is loaded, the pins go, and
 * the blocks vLLM would read come back as load errors (vLLM recomputes
 * them) instead of holding whatever was there. */
Test(kvrt_api, after_alloc_refuses_a_range_the_lookup_did_not_give)
{
	struct rig g;
	uint32_t tok[T];
	int32_t ablk[3] = {1, 2, 3}, bblk[3] = {7, 8, 9};
	struct kvrt_request b;
	local_hit_rig(&g, "t-refuse", tok, ablk, bblk, &b);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 3, 0, 16), -EINVAL);
	no_pins_left(&g); /* a refused load keeps none */
	local_hit_step(&g);
	int64_t errs[8];
	size_t ne = kvrt_worker_load_errors(g.w, errs, 8);
	cr_assert_eq(ne, 2u, "blocks of [0, 32) reported, got %zu", ne);
	cr_assert(errs[0] == 7 && errs[1] == 8);
	for (int l = 0; l < 2; l++)
		cr_assert_eq(*slot(&g, l, (uint32_t)bblk[1], 0, 0), -7.0f, "a refused load wrote");
	cr_assert_eq(no_pins_left(&g).load_tokens, 0u);

	/* More than the lookup matched. */
	uint32_t n;
	bool as, delay;
	cr_assert_eq(kvrt_sched_lookup(g.s, &b, BS, &n, &as), 0);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &b, bblk, 3, KVRT_SCHED_FROM_LOOKUP, 24), -EINVAL);
	local_hit_step(&g);
	ne = kvrt_worker_load_errors(g.w, errs, 8);
	cr_assert_eq(ne, 2u, "blocks of [16, 40) reported, got %zu", ne);
	cr_assert(errs[0] == 8 && errs[1] == 9);

	/* No lookup at all. */
	struct kvrt_request z = req("Z", tok, NULL);
	cr_assert_eq(kvrt_sched_after_alloc(g.s, &z, bblk, 3, KVRT_SCHED_FROM_LOOKUP, 16), -EINVAL);
	local_hit_step(&g);
	cr_assert_eq(kvrt_worker_load_errors(g.w, errs, 8), 1u);
	cr_assert_eq(errs[0], 7);
	cr_assert_eq(kvrt_sched_finished(g.s, "B", 1, &delay), 0);
	cr_assert_eq(kvrt_sched_finished(g.s, "Z", 1, &delay), 0);
	cr_assert_eq(no_pins_left(&g).load_tokens, 0u);
	rig_down(&g);
}
