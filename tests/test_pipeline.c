/* tests/test_pipeline.c: the engine's save and load pipelines on the host
 * backend: round trips in every layout, layer ordering and overlap, many
 * requests at once, abort, preemption, chunks evicted or corrupted between
 * lookup and load, async loads (from the CPU tier and from disk), the save
 * policy flags, delayed frees, saves still copying while later steps run
 * (and a preemption's barrier); every test ends with no pin held. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "actors/pipeline.h"
#include "tests/test_pipeline_util.h"

static struct kvrt_engine_config base_cfg(uint32_t cs)
{
	return (struct kvrt_engine_config){.chunk_size = cs, .cpu_bytes = 8u << 20, .save_unfull_chunk = true,
					   .step_tokens = 64};
}

static void lookup_all(struct prig *g, struct preq **r, uint32_t n, uint32_t *hit)
{
	for (uint32_t i = 0; i < n; i++) {
		struct kvrt_lookup_result res;
		cr_assert_eq(kvrt_engine_lookup(g->e, r[i]->id, g->ns, r[i]->tok, r[i]->T, &res), 0);
		hit[i] = res.tokens;
		cr_assert_eq(res.tokens_now, res.tokens, "all in the CPU tier");
	}
}

/* Load reqs (already looked up: hit[]) into fresh poisoned blocks,
 * tokens [from[i], to[i]); check; no errors expected. */
static void load_and_check(struct prig *g, struct preq **r, uint32_t n, const uint32_t *hit,
			   const uint32_t *from, const uint32_t *to)
{
	struct kvrt_plan_req *pr = calloc(n, sizeof(*pr));
	for (uint32_t i = 0; i < n; i++)
		preq_relocate(g, r[i]);
	prig_poison(g);
	for (uint32_t i = 0; i < n; i++) {
		pr[i] = preq_plan(g, r[i]);
		pr[i].load_start = from[i];
		pr[i].load_end = to[i];
		pr[i].load_hit = hit[i];
	}
	prig_step(g, pr, n, NULL, NULL);
	int64_t errs[16];
	cr_assert_eq(prig_errors(g, errs, 16), 0, "unexpected load errors");
	prig_check(g, r, from, to, n);
	free(pr);
}

Test(pipeline, roundtrip_every_layout)
{
	struct kt_spec specs[64];
	uint32_t ns = kt_specs(specs, 64);
	uint32_t stride = (uint32_t)(64 / kvrt_test_scaled(64, 8));
	for (uint32_t si = 0; si < ns; si += stride) {
		struct kt_spec s = specs[si];
		struct prig g;
		prig_up(&g, &s, base_cfg(2 * s.bs), 1000 + si);
		struct preq a, b, c;
		uint32_t cs = g.cs;
		preq_make(&g, &a, 1, 3 * cs + 1 + (uint32_t)(kvrt_test_rand(&g.rng) % (cs - 1)), NULL, 0);
		preq_make(&g, &b, 2, 2 * cs, &a, cs); /* shares chunk 0 with a */
		preq_share_kv(&g, &b, &a, cs);
		preq_make(&g, &c, 3, cs + 3, NULL, 0);
		struct preq *r[] = {&a, &b, &c};
		prig_save(&g, r, 3);
		uint32_t hit[3];
		lookup_all(&g, r, 3, hit);
		cr_assert_eq(hit[0], a.T);
		cr_assert_eq(hit[1], b.T);
		cr_assert_eq(hit[2], c.T);
		/* a: all; b: vLLM had its first block; c: all but its last token. */
		uint32_t from[] = {0, g.bs, 0}, to[] = {a.T, b.T, c.T - 1};
		load_and_check(&g, r, 3, hit, from, to);
		for (int i = 0; i < 3; i++)
			kvrt_engine_release(g.e, r[i]->id);
		cr_assert_eq(kvrt_engine_flush(g.e), 0);
		cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
		preq_fini(&g, &a);
		preq_fini(&g, &b);
		preq_fini(&g, &c);
		prig_down(&g);
	}
}

/* --- layer ordering ------------------------------------------------------- */

struct order {
	struct prig *g;
	struct preq *r;
	uint32_t L;
	_Atomic uint64_t hook_ns[16]; /* when layer l's scatter was done */
	uint64_t call_ns[16];         /* when wait_layer(l) was called */
	uint64_t busy_ns;             /* simulated attention per layer */
	bool check;                   /* check data per layer */
};

static void on_loaded(void *ctx, uint32_t l)
{
	struct order *o = ctx;
	atomic_store(&o->hook_ns[l], kvrt_now_ns());
}

Test(pipeline, layer_order_and_overlap)
{
	struct kt_spec s = {.layout = KVRT_KV_FLASH_ATTN, .order = KT_NHD, .layers = 8, .nb = 160, .bs = 16,
			    .heads = 8, .hs = 64, .elem = 2};
	/* 2 ms of "attention" per layer; longer under the sanitizers
	 * (KVRT_TEST_SCALE < 1), whose copies are several times slower. */
	struct order o = {.L = 8, .busy_ns = 2000000 * (kvrt_test_scaled(100, 10) < 100 ? 5 : 1)};
	struct kvrt_engine_config cfg = base_cfg(64);
	cfg.cpu_bytes = 64u << 20;
	cfg.on_layer_loaded = on_loaded;
	cfg.hook_ctx = &o;
	struct prig g;
	prig_up(&g, &s, cfg, 7);
	struct preq a;
	preq_make(&g, &a, 11, 1024, NULL, 0);
	struct preq *r[] = {&a};
	prig_save(&g, r, 1);
	uint32_t hit;
	lookup_all(&g, r, 1, &hit);
	preq_relocate(&g, &a);
	prig_poison(&g);
	for (uint32_t l = 0; l < o.L; l++)
		atomic_store(&o.hook_ns[l], 0);
	struct kvrt_plan_req pr = preq_plan(&g, &a);
	pr.load_end = pr.load_hit = a.T;
	struct kvrt_step_plan p = {.reqs = &pr, .num_reqs = 1};
	cr_assert_eq(kvrt_engine_bind_step(g.e, &p), 0);
	cr_assert_eq(kvrt_engine_start_load(g.e), 0);
	for (uint32_t l = 0; l < o.L; l++) {
		o.call_ns[l] = kvrt_now_ns();
		cr_assert_eq(kvrt_engine_wait_layer(g.e, l), 0);
		uint64_t ret = kvrt_now_ns();
		uint64_t h = atomic_load(&o.hook_ns[l]);
		cr_assert(h != 0 && h <= ret, "wait_for_layer_load(%u) returned before its layer was in place", l);
		/* Layer l is in place now, bit for bit. */
		for (uint32_t t = 0; t < a.T; t++)
			for (uint32_t kv = 0; kv < 2; kv++)
				for (uint32_t hh = 0; hh < 8; hh++)
					cr_assert(!memcmp(kt_at(&g.m, l, kv, preq_slot(&g, &a, t), hh),
							  preq_ref(&g, &a, t, l, kv, hh), g.hb),
						  "layer %u token %u not loaded at its wait", l, t);
		/* attention of layer l */
		while (kvrt_now_ns() - ret < o.busy_ns)
			kvrt_cpu_relax();
	}
	cr_assert_eq(kvrt_engine_wait_save(g.e), 0);
	/* Loads ran ahead of the waits: layers whose copy was done before
	 * their wait was even called (they overlapped earlier attention). */
	uint32_t ahead = 0;
	for (uint32_t l = 1; l < o.L; l++)
		ahead += atomic_load(&o.hook_ns[l]) < o.call_ns[l];
	/* At least one: how many depends on how the scheduler shares the
	 * cores with other work, which a test must not assume. */
	cr_assert_geq(ahead, 1, "none of %u layers was loaded ahead of its wait: no overlap", o.L - 1);
	uint32_t from = 0, to = a.T;
	prig_check(&g, r, &from, &to, 1);
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0);
	preq_fini(&g, &a);
	prig_down(&g);
}

/* --- many requests ---------------------------------------------------------- */

Test(pipeline, many_concurrent_requests)
{
	struct kt_spec s = {.layout = KVRT_KV_FLASHINFER, .order = KT_HND, .layers = 4, .nb = 1024, .bs = 4,
			    .heads = 2, .hs = 16, .elem = 2, .pad = 3};
	struct prig g;
	prig_up(&g, &s, base_cfg(8), 99);
	enum { N = 48 };
	struct preq q[N], *r[N];
	for (uint32_t i = 0; i < N; i++) {
		uint32_t T = 1 + (uint32_t)(kvrt_test_rand(&g.rng) % 50);
		bool share = i > 0 && q[i - 1].T >= 8 && T > 8 && i % 3;
		preq_make(&g, &q[i], 100 + i, T, share ? &q[i - 1] : NULL, share ? 8 : 0);
		if (share)
			preq_share_kv(&g, &q[i], &q[i - 1], 8);
		r[i] = &q[i];
	}
	prig_save(&g, r, N / 2);
	prig_save(&g, r + N / 2, N - N / 2);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_gt(st.save_dup, 0, "shared prefixes were saved twice");
	uint32_t hit[N], from[N], to[N];
	lookup_all(&g, r, N, hit);
	for (uint32_t i = 0; i < N; i++) {
		cr_assert_eq(hit[i], q[i].T, "request %u: hit %u of %u", i, hit[i], q[i].T);
		uint32_t blocks_local = (uint32_t)(kvrt_test_rand(&g.rng) % (hit[i] / g.bs + 1));
		from[i] = blocks_local * g.bs;
		to[i] = hit[i];
		if (from[i] >= to[i])
			from[i] = to[i] = 0; /* nothing to load */
	}
	load_and_check(&g, r, N, hit, from, to);
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.load_failed_chunks, 0);
	for (uint32_t i = 0; i < N; i++) {
		kvrt_engine_release(g.e, q[i].id);
		preq_fini(&g, &q[i]);
	}
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	prig_down(&g);
}

/* --- abort, preemption -------------------------------------------------------- */

static struct kt_spec small_spec(void)
{
	return (struct kt_spec){.layout = KVRT_KV_FLASH_ATTN, .order = KT_BFIRST, .layers = 3, .nb = 128,
				.bs = 8, .heads = 2, .hs = 8, .elem = 4};
}

Test(pipeline, abort_mid_load)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 5);
	struct preq a, b;
	preq_make(&g, &a, 21, 70, NULL, 0);
	preq_make(&g, &b, 22, 64, NULL, 0);
	struct preq *r[] = {&a, &b};
	prig_save(&g, r, 2);
	uint32_t hit[2];
	lookup_all(&g, r, 2, hit);
	preq_relocate(&g, &a);
	preq_relocate(&g, &b);
	prig_poison(&g);
	struct kvrt_plan_req pr[2] = {preq_plan(&g, &a), preq_plan(&g, &b)};
	pr[0].load_end = pr[0].load_hit = hit[0];
	pr[1].load_end = pr[1].load_hit = hit[1];
	pr[1].flags = KVRT_PLAN_ASYNC_LOAD;
	struct kvrt_step_plan p = {.reqs = pr, .num_reqs = 2};
	cr_assert_eq(kvrt_engine_bind_step(g.e, &p), 0);
	cr_assert_eq(kvrt_engine_start_load(g.e), 0);
	/* The scheduler aborts both while their loads are in flight. */
	kvrt_engine_release(g.e, a.id);
	kvrt_engine_release(g.e, b.id);
	for (uint32_t l = 0; l < g.L; l++)
		cr_assert_eq(kvrt_engine_wait_layer(g.e, l), 0);
	/* The async one is reported finished-receiving once its KV is in. */
	uint64_t sending[4], recving[4], failed[4];
	struct kvrt_finished fin = {.sending = sending, .sending_cap = 4, .recving = recving, .recving_cap = 4,
				    .failed = failed, .failed_cap = 4};
	uint64_t t0 = kvrt_now_ns();
	do {
		cr_assert_eq(kvrt_engine_get_finished(g.e, NULL, 0, &fin), 0);
		cr_assert_lt(kvrt_now_ns() - t0, 10000000000ull, "async load never finished");
		if (!fin.num_recving)
			usleep(200);
	} while (!fin.num_recving);
	cr_assert_eq(fin.num_recving, 1);
	cr_assert_eq(recving[0], b.id);
	cr_assert_eq(fin.num_failed, 0);
	int64_t errs[8];
	cr_assert_eq(prig_errors(&g, errs, 8), 0);
	uint32_t from[] = {0, 0}, to[] = {hit[0], hit[1]};
	prig_check(&g, r, from, to, 2);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	preq_fini(&g, &b);
	prig_down(&g);
}

Test(pipeline, preempt_and_resume)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 6);
	struct preq a;
	preq_make(&g, &a, 31, 64, NULL, 0);
	struct preq *r[] = {&a};
	prig_save(&g, r, 1);
	uint32_t hit;
	/* vLLM asks every step while the request waits: idempotent pins. */
	for (int i = 0; i < 5; i++) {
		lookup_all(&g, r, 1, &hit);
		cr_assert_eq(kvrt_engine_flush(g.e), 0);
		cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 4, "pins must not pile up");
	}
	uint32_t from = 0, to = hit;
	load_and_check(&g, r, 1, &hit, &from, &to);
	/* Preempted: its blocks are gone; on resume it is looked up again. */
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0);
	lookup_all(&g, r, 1, &hit);
	cr_assert_eq(hit, a.T);
	load_and_check(&g, r, 1, &hit, &from, &to);
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
}

/* --- chunks gone or corrupt between lookup and load ------------------------------- */

/* Load a whole, expecting errors from token fail_tok on: those blocks
 * untouched, the tokens before loaded. */
static void load_expect_failure(struct prig *g, struct preq *a, uint32_t hit, uint32_t fail_tok)
{
	preq_relocate(g, a);
	prig_poison(g);
	struct kvrt_plan_req pr = preq_plan(g, a);
	pr.load_end = pr.load_hit = hit;
	prig_step(g, &pr, 1, NULL, NULL);
	int64_t errs[64];
	size_t n = prig_errors(g, errs, 64);
	uint32_t b0 = fail_tok / g->bs, b1 = (hit + g->bs - 1) / g->bs;
	cr_assert_eq(n, b1 - b0, "%zu error blocks, expected %u", n, b1 - b0);
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(errs[i], a->blk[b0 + i], "error block %zu", i);
	uint32_t from = 0, to = b0 * g->bs;
	struct preq *r[] = {a};
	prig_check(g, r, &from, &to, 1);
}

Test(pipeline, chunk_evicted_between_lookup_and_load)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	/* 16 tokens x 3 layers x 128 bytes = 6 KiB per chunk: 2 pages; 24 slabs. */
	cfg.cpu_bytes = 24 * 8192;
	cfg.high_watermark = 0.6;
	cfg.low_watermark = 0.3;
	struct prig g;
	prig_up(&g, &s, cfg, 8);
	struct preq a;
	preq_make(&g, &a, 41, 64, NULL, 0);
	struct preq *ra[] = {&a};
	prig_save(&g, ra, 1);
	uint32_t hit;
	lookup_all(&g, ra, 1, &hit);
	cr_assert_eq(hit, 64);
	/* The pins time out (or the request goes away) and newer KV pushes
	 * a's chunks out. */
	kvrt_engine_release(g.e, a.id);
	struct kvrt_index_reader *rd = kvrt_index_reader_open(kvrt_engine_index(g.e));
	struct kvrt_chunk_key keys[4];
	kvrt_key_prompt(g.ns, a.tok, a.T, 16, false, keys, 4);
	uint32_t round = 0;
	while (kvrt_index_lookup(rd, keys, 4, 0, 0, NULL) == 4) {
		cr_assert_lt(round++, 64u, "a's chunks never left the cache");
		struct preq x;
		preq_make(&g, &x, 1000 + round, 32, NULL, 0);
		struct preq *rx[] = {&x};
		prig_save(&g, rx, 1);
		kvrt_evict_run(kvrt_engine_evict(g.e));
		preq_fini(&g, &x);
	}
	size_t left = kvrt_index_lookup(rd, keys, 4, 0, 0, NULL);
	kvrt_index_reader_close(rd);
	load_expect_failure(&g, &a, hit, (uint32_t)left * 16);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
}

Test(pipeline, chunk_corrupted_between_lookup_and_load)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	cfg.verify_checksums = true;
	struct prig g;
	prig_up(&g, &s, cfg, 9);
	struct preq a;
	preq_make(&g, &a, 51, 64, NULL, 0);
	struct preq *ra[] = {&a};
	prig_save(&g, ra, 1);
	uint32_t hit;
	lookup_all(&g, ra, 1, &hit);
	/* Flip one byte of chunk 2 in the CPU tier. */
	struct kvrt_index_reader *rd = kvrt_index_reader_open(kvrt_engine_index(g.e));
	struct kvrt_chunk_key keys[4];
	kvrt_key_prompt(g.ns, a.tok, a.T, 16, false, keys, 4);
	struct kvrt_index_hit h[4];
	cr_assert_eq(kvrt_index_lookup(rd, keys, 4, 0, 0, h), 4);
	cr_assert_eq(h[2].tier, KVRT_TIER_CPU);
	unsigned char *p = kvrt_pool_addr(kvrt_engine_pool(g.e), h[2].slab);
	p[1000] ^= 0x40;
	kvrt_index_reader_close(rd);
	load_expect_failure(&g, &a, hit, 32);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.checksum_failures, 1);
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
}

/* A plan whose keys do not match its tokens (a request id collision, a
 * scheduler bug) loads nothing of the mismatched chain. */
Test(pipeline, key_mismatch_is_a_load_error)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 10);
	struct preq a;
	preq_make(&g, &a, 61, 48, NULL, 0);
	struct preq *ra[] = {&a};
	prig_save(&g, ra, 1);
	struct kvrt_chunk_key keys[3];
	kvrt_key_prompt(g.ns, a.tok, a.T, 16, false, keys, 3);
	keys[1].lo ^= 1;
	preq_relocate(&g, &a);
	prig_poison(&g);
	struct kvrt_plan_req pr = preq_plan(&g, &a);
	pr.load_end = pr.load_hit = 48;
	pr.keys = keys;
	pr.num_keys = 3;
	prig_step(&g, &pr, 1, NULL, NULL);
	int64_t errs[16];
	cr_assert_eq(prig_errors(&g, errs, 16), 4, "blocks of chunks 1 and 2");
	uint32_t from = 0, to = 16;
	prig_check(&g, ra, &from, &to, 1);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
}

/* --- save policy, delayed free -------------------------------------------------- */

Test(pipeline, save_policy_flags)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	cfg.save_unfull_chunk = false;
	struct prig g;
	prig_up(&g, &s, cfg, 11);
	struct preq a;
	preq_make(&g, &a, 71, 60, NULL, 0);
	/* Prefill of 40 prompt tokens in two steps (chunked), then decode to 60. */
	struct kvrt_plan_req pr = preq_plan(&g, &a);
	pr.prompt_tokens = 40;
	pr.num_tokens = 24;
	pr.save_start = 0;
	pr.save_end = 24;
	prig_step(&g, &pr, 1, NULL, NULL);
	pr.num_tokens = 40;
	pr.save_start = 24;
	pr.save_end = 40;
	prig_step(&g, &pr, 1, NULL, NULL);
	pr.num_tokens = 60;
	pr.save_start = 40;
	pr.save_end = 60;
	prig_step(&g, &pr, 1, NULL, NULL);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	struct kvrt_lookup_result res;
	cr_assert_eq(kvrt_engine_lookup(g.e, a.id, g.ns, a.tok, 60, &res), 0);
	cr_assert_eq(res.tokens, 32, "full prompt chunks only: no tail, no decode chunk");
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.save_chunks, 2);
	kvrt_engine_release(g.e, a.id);
	preq_fini(&g, &a);
	prig_down(&g);

	cfg.save_unfull_chunk = true;
	cfg.save_decode_cache = true;
	prig_up(&g, &s, cfg, 12);
	preq_make(&g, &a, 72, 60, NULL, 0);
	pr = preq_plan(&g, &a);
	pr.prompt_tokens = 40;
	pr.save_end = 40;
	prig_step(&g, &pr, 1, NULL, NULL);
	pr.save_start = 40;
	pr.save_end = 60;
	prig_step(&g, &pr, 1, NULL, NULL);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_engine_lookup(g.e, a.id, g.ns, a.tok, 40, &res), 0);
	cr_assert_eq(res.tokens, 40, "the prompt's tail was saved");
	cr_assert_eq(kvrt_engine_lookup(g.e, a.id, g.ns, a.tok, 48, &res), 0);
	cr_assert_eq(res.tokens, 48, "the decode chunk was saved");
	kvrt_engine_release(g.e, a.id);
	preq_fini(&g, &a);
	prig_down(&g);
}

Test(pipeline, delayed_free_reported_once)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 13);
	struct preq a, b;
	preq_make(&g, &a, 81, 32, NULL, 0);
	preq_make(&g, &b, 82, 32, NULL, 0);
	struct preq *r[] = {&a};
	prig_save(&g, r, 1); /* a saved; b never saves */
	uint64_t delayed[] = {a.id, b.id};
	uint64_t sending[4], recving[4], failed[4];
	struct kvrt_finished fin = {.sending = sending, .sending_cap = 4, .recving = recving, .recving_cap = 4,
				    .failed = failed, .failed_cap = 4};
	cr_assert_eq(kvrt_engine_get_finished(g.e, delayed, 2, &fin), 0);
	uint32_t seen_a = 0, seen_b = 0;
	for (int round = 0; round < 3; round++) {
		for (uint32_t i = 0; i < fin.num_sending; i++) {
			seen_a += sending[i] == a.id;
			seen_b += sending[i] == b.id;
		}
		cr_assert_eq(kvrt_engine_get_finished(g.e, NULL, 0, &fin), 0);
	}
	cr_assert_eq(seen_a, 1);
	cr_assert_eq(seen_b, 1);
	preq_fini(&g, &a);
	preq_fini(&g, &b);
	prig_down(&g);
}

/* --- saves in flight across steps ---------------------------------------------------- */

/* A gate on the save stream: work queued behind it waits until it opens
 * (or 20 s pass, so a broken engine fails the test instead of hanging). */
struct gate {
	atomic_int open;
	_Atomic uint64_t opened_ns;
};

static void gate_fn(void *arg)
{
	struct gate *gt = arg;
	uint64_t t0 = kvrt_now_ns();
	while (!atomic_load(&gt->open) && kvrt_now_ns() - t0 < 20000000000ull) {
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
}

static void *gate_opener(void *arg)
{
	struct gate *gt = arg;
	usleep(200000);
	atomic_store(&gt->opened_ns, kvrt_now_ns());
	atomic_store(&gt->open, 1);
	return NULL;
}

Test(pipeline, saves_overlap_later_steps_and_preemption_orders_them)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 21);
	struct preq a;
	preq_make(&g, &a, 91, 64, NULL, 0);
	preq_snapshot(&g, &a);
	struct gate gt = {0};
	cr_assert_eq(kvrt_stream_host_fn(g.e->sstream, gate_fn, &gt), 0);
	/* The step that saves a: wait_save returns with its copies queued. */
	struct kvrt_plan_req pr = preq_save_plan(&g, &a);
	uint64_t t0 = kvrt_now_ns();
	prig_step(&g, &pr, 1, NULL, NULL);
	cr_assert(!atomic_load(&gt.open));
	cr_assert_lt(kvrt_now_ns() - t0, 5000000000ull, "the step waited for its saves' copies");
	/* a finished with delay_free: not reported while its copies wait. */
	uint64_t delayed[] = {a.id}, sending[4], recving[4], failed[4];
	struct kvrt_finished fin = {.sending = sending, .sending_cap = 4, .recving = recving, .recving_cap = 4,
				    .failed = failed, .failed_cap = 4};
	cr_assert_eq(kvrt_engine_get_finished(g.e, delayed, 1, &fin), 0);
	cr_assert_eq(fin.num_sending, 0, "reported before its saves read its blocks");
	/* Preempted instead: vLLM freed a's blocks and this step's forward
	 * writes them. The bind must not return before the copies ran. */
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, gate_opener, &gt), 0);
	struct kvrt_step_plan p = {.preempted = true};
	cr_assert_eq(kvrt_engine_bind_step(g.e, &p), 0);
	uint64_t back = kvrt_now_ns();
	pthread_join(th, NULL);
	cr_assert_geq(back, atomic_load(&gt.opened_ns), "bind returned before the saves' copies could run");
	prig_poison(&g); /* the forward rewrites every block, a's included */
	cr_assert_eq(kvrt_engine_start_load(g.e), 0);
	cr_assert_eq(kvrt_engine_wait_save(g.e), 0);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	/* What was saved is a's KV from before the rewrite. */
	uint32_t hit, from = 0;
	struct preq *r[] = {&a};
	lookup_all(&g, r, 1, &hit);
	cr_assert_eq(hit, a.T);
	load_and_check(&g, r, 1, &hit, &from, &hit);
	cr_assert_eq(kvrt_engine_get_finished(g.e, NULL, 0, &fin), 0);
	cr_assert_eq(fin.num_sending, 1);
	cr_assert_eq(sending[0], a.id);
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
}

/* --- async load of chunks that only the disk tier holds ---------------------------- */

Test(pipeline, async_load_from_disk)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	char dir[64] = "/tmp/kvrt-test-pipeline-XXXXXX";
	cr_assert(mkdtemp(dir));
	cfg.cpu_bytes = 24 * 8192;
	cfg.high_watermark = 0.6;
	cfg.low_watermark = 0.3;
	cfg.disk_dir = dir;
	cfg.disk_bytes = 8u << 20;
	struct prig g;
	prig_up(&g, &s, cfg, 14);
	struct preq a;
	preq_make(&g, &a, 91, 64, NULL, 0);
	struct preq *ra[] = {&a};
	prig_save(&g, ra, 1);
	/* Newer KV pushes a's chunks down to disk. */
	struct kvrt_index_reader *rd = kvrt_index_reader_open(kvrt_engine_index(g.e));
	struct kvrt_chunk_key keys[4];
	kvrt_key_prompt(g.ns, a.tok, a.T, 16, false, keys, 4);
	struct kvrt_index_hit h[4];
	uint32_t round = 0;
	for (;;) {
		cr_assert_eq(kvrt_index_lookup(rd, keys, 4, 0, 0, h), 4, "a left the disk too");
		if (h[0].tier == KVRT_TIER_DISK)
			break;
		cr_assert_lt(round++, 200u, "a's chunks never reached the disk");
		struct preq x;
		preq_make(&g, &x, 2000 + round, 32, NULL, 0);
		struct preq *rx[] = {&x};
		prig_save(&g, rx, 1);
		kvrt_evict_run(kvrt_engine_evict(g.e));
		preq_fini(&g, &x);
		usleep(1000);
	}
	kvrt_index_reader_close(rd);
	struct kvrt_lookup_result res;
	cr_assert_eq(kvrt_engine_lookup(g.e, a.id, g.ns, a.tok, a.T, &res), 0);
	cr_assert_eq(res.tokens, 64, "found on disk");
	cr_assert_eq(res.tokens_now, 0, "chunk 0 is not in the CPU tier");
	preq_relocate(&g, &a);
	prig_poison(&g);
	struct kvrt_plan_req pr = preq_plan(&g, &a);
	pr.load_end = pr.load_hit = 64;
	pr.flags = KVRT_PLAN_ASYNC_LOAD;
	prig_step(&g, &pr, 1, NULL, NULL);
	uint64_t sending[2], recving[2], failed[2];
	struct kvrt_finished fin = {.sending = sending, .sending_cap = 2, .recving = recving, .recving_cap = 2,
				    .failed = failed, .failed_cap = 2};
	uint64_t t0 = kvrt_now_ns();
	do {
		cr_assert_eq(kvrt_engine_get_finished(g.e, NULL, 0, &fin), 0);
		cr_assert_lt(kvrt_now_ns() - t0, 20000000000ull, "async load never finished");
		if (!fin.num_recving)
			usleep(500);
	} while (!fin.num_recving);
	cr_assert_eq(recving[0], a.id);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(fin.num_failed, 0, "promoted %llu, failed %llu, prefetches %llu, failed chunks %llu",
		     (unsigned long long)st.evict.promoted, (unsigned long long)st.evict.promote_failed,
		     (unsigned long long)st.prefetches, (unsigned long long)st.load_failed_chunks);
	int64_t errs[8];
	cr_assert_eq(prig_errors(&g, errs, 8), 0);
	uint32_t from = 0, to = 64;
	prig_check(&g, ra, &from, &to, 1);
	kvrt_engine_stats(g.e, &st);
	cr_assert_geq(st.evict.promoted, 1);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	preq_fini(&g, &a);
	prig_down(&g);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	cr_expect_eq(system(cmd), 0);
}

/* --- direct lookups (caller's thread) answer as the lookup actor does ---------------- */

#include "actors/pipeline.h"

/* What one pass of lookups saw: answers and pins after each step. */
struct lk_trace {
	struct kvrt_lookup_result res[6];
	uint64_t pinned[6];
	size_t released[2];
	uint64_t lookups, lookup_tokens;
};

static void lk_pass(struct prig *g, struct preq **r, uint32_t n, struct lk_trace *t)
{
	struct kvrt_engine_stats st0, st1;
	kvrt_engine_stats(g->e, &st0);
	memset(t->res, 0x5a, sizeof(t->res));
	struct kvrt_index *idx = kvrt_engine_index(g->e);
	for (uint32_t i = 0; i < n; i++) {
		cr_assert_eq(kvrt_engine_lookup(g->e, r[i]->id, g->ns, r[i]->tok, r[i]->T, &t->res[i]), 0);
		t->pinned[i] = kvrt_index_pinned(idx);
	}
	/* A re-lookup replaces the request's pins; a release drops them. */
	cr_assert_eq(kvrt_engine_lookup(g->e, r[0]->id, g->ns, r[0]->tok, r[0]->T, &t->res[n]), 0);
	t->pinned[n] = kvrt_index_pinned(idx);
	t->released[0] = kvrt_engine_release(g->e, r[0]->id);
	t->pinned[n + 1] = kvrt_index_pinned(idx);
	t->released[1] = 0;
	for (uint32_t i = 1; i < n; i++)
		t->released[1] += kvrt_engine_release(g->e, r[i]->id);
	cr_assert_eq(kvrt_index_pinned(idx), 0, "pins leaked");
	kvrt_engine_stats(g->e, &st1);
	t->lookups = st1.lookups - st0.lookups;
	t->lookup_tokens = st1.lookup_tokens - st0.lookup_tokens;
}

Test(pipeline, direct_lookup_matches_actor)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 15);
	struct preq a, b, c, d;
	preq_make(&g, &a, 101, 64, NULL, 0);   /* saved: 4 full chunks */
	preq_make(&g, &b, 102, 40, NULL, 0);   /* saved: 2 full chunks and a tail of 8 */
	preq_make(&g, &c, 103, 48, NULL, 0);   /* never saved: a miss */
	preq_make(&g, &d, 104, 80, &a, 40);    /* shares 2.5 chunks of a: 2 chunks hit */
	struct preq *saved[] = {&a, &b};
	prig_save(&g, saved, 2);
	struct preq *all[] = {&a, &b, &c, &d};
	struct lk_trace direct, actor;
	lk_pass(&g, all, 4, &direct);
	_kvrt_engine_set_direct_lookup(g.e, false);
	lk_pass(&g, all, 4, &actor);
	_kvrt_engine_set_direct_lookup(g.e, true);
	/* What the cache holds, so the comparison is not of two empty answers. */
	cr_assert_eq(direct.res[0].tokens, 64);
	cr_assert_eq(direct.res[1].tokens, 40);
	cr_assert_eq(direct.res[2].tokens, 0);
	cr_assert_eq(direct.res[3].tokens, 32);
	for (uint32_t i = 0; i < 5; i++) {
		cr_assert_eq(direct.res[i].tokens, actor.res[i].tokens, "lookup %u", i);
		cr_assert_eq(direct.res[i].tokens_now, actor.res[i].tokens_now, "lookup %u", i);
		cr_assert_eq(direct.res[i].chunks, actor.res[i].chunks, "lookup %u", i);
		cr_assert_eq(direct.res[i].chunks_now, actor.res[i].chunks_now, "lookup %u", i);
	}
	for (uint32_t i = 0; i < 6; i++)
		cr_assert_eq(direct.pinned[i], actor.pinned[i], "pins after step %u", i);
	cr_assert_eq(direct.pinned[3], 4 + 3 + 0 + 2, "every chunk found is pinned");
	cr_assert_eq(direct.pinned[4], direct.pinned[3], "a re-lookup replaces the pins");
	cr_assert_eq(direct.released[0], actor.released[0]);
	cr_assert_eq(direct.released[0], 4);
	cr_assert_eq(direct.released[1], actor.released[1]);
	cr_assert_eq(direct.lookups, actor.lookups);
	cr_assert_eq(direct.lookup_tokens, actor.lookup_tokens);
	preq_fini(&g, &a);
	preq_fini(&g, &b);
	preq_fini(&g, &c);
	preq_fini(&g, &d);
	prig_down(&g);
}

/* handle_preemptions may come after the step's bind (some vLLM builds call
 * it there): the bound step's saves still run. */
Test(pipeline, preemption_barrier_after_bind_keeps_the_step)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 23);
	struct preq a;
	preq_make(&g, &a, 92, 48, NULL, 0);
	preq_snapshot(&g, &a);
	struct kvrt_plan_req pr = preq_save_plan(&g, &a);
	cr_assert_eq(kvrt_engine_bind_step(g.e, &(struct kvrt_step_plan){.reqs = &pr, .num_reqs = 1}), 0);
	cr_assert_eq(kvrt_engine_save_barrier(g.e), 0);
	cr_assert_eq(kvrt_engine_step_work(g.e), KVRT_STEP_SAVES | KVRT_STEP_SAVE_LAYERS,
		     "the step's saves were ended");
	cr_assert_eq(kvrt_engine_start_load(g.e), 0);
	for (uint32_t l = 0; l < g.L; l++)
		cr_assert_eq(kvrt_engine_save_layer(g.e, l), 0);
	cr_assert_eq(kvrt_engine_wait_save(g.e), 0);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	uint32_t hit, from = 0;
	struct preq *r[] = {&a};
	lookup_all(&g, r, 1, &hit);
	cr_assert_eq(hit, a.T, "the step saved %u of %u tokens", hit, a.T);
	load_and_check(&g, r, 1, &hit, &from, &hit);
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	preq_fini(&g, &a);
	prig_down(&g);
}

/* All at once (the default outside tests): save_layer is never called (as
 * under vLLM's full CUDA graphs, where the per-layer hooks do not run), and
 * the step's KV is written by the "forward" on the compute stream after
 * wait_save returned on the CPU: the chunk saved must hold that KV, so the
 * gathers ran behind the forward's end, not at wait_save's call. */
struct fwd_write {
	struct prig *g;
	struct preq *r;
	uint64_t seed;
};

static void forward_writes(void *arg)
{
	struct fwd_write *fw = arg;
	uint64_t rng = fw->seed;
	for (uint32_t i = 0; i < fw->g->m.ntensors; i++)
		kt_fill(fw->g->m.base[i], fw->g->m.bytes, &rng);
	preq_snapshot(fw->g, fw->r);
}

Test(pipeline, all_at_once_saves_behind_the_forward)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	cfg.all_at_once = true;
	struct prig g;
	prig_up(&g, &s, cfg, 24);
	/* a compute stream that runs apart from this thread, as a GPU's does
	 * (the host backend's default one is this thread: work runs inline) */
	kvrt_stream_destroy(g.e->compute);
	cr_assert_eq(kvrt_stream_create(g.e->dev, "forward", &g.e->compute), 0);
	struct preq a;
	preq_make(&g, &a, 93, 56, NULL, 0);
	struct kvrt_plan_req pr = preq_save_plan(&g, &a);
	cr_assert_eq(kvrt_engine_bind_step(g.e, &(struct kvrt_step_plan){.reqs = &pr, .num_reqs = 1}), 0);
	cr_assert_eq(kvrt_engine_step_work(g.e), KVRT_STEP_SAVES, "no per-layer save calls wanted");
	cr_assert_eq(kvrt_engine_start_load(g.e), 0);
	/* the forward, queued on the compute stream behind a gate */
	struct gate gt = {0};
	struct fwd_write fw = {&g, &a, 0xf0e1d2c3b4a59687ull};
	cr_assert_eq(kvrt_stream_host_fn(g.e->compute, gate_fn, &gt), 0);
	cr_assert_eq(kvrt_stream_host_fn(g.e->compute, forward_writes, &fw), 0);
	cr_assert_eq(kvrt_engine_wait_save(g.e), 0);
	cr_assert(!atomic_load(&gt.open), "wait_save waited for the forward");
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, gate_opener, &gt), 0);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	pthread_join(th, NULL);
	/* back to the caller-thread compute stream: the check below reads the
	 * tensors as the forward would, after the load's wait */
	kvrt_stream_destroy(g.e->compute);
	cr_assert_eq(kvrt_stream_wrap(g.e->dev, NULL, &g.e->compute), 0);
	uint32_t hit, from = 0;
	struct preq *r[] = {&a};
	lookup_all(&g, r, 1, &hit);
	cr_assert_eq(hit, a.T, "saved %u of %u tokens", hit, a.T);
	load_and_check(&g, r, 1, &hit, &from, &hit); /* the forward's KV, exact */
	kvrt_engine_release(g.e, a.id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.save_abandoned, 0);
	preq_fini(&g, &a);
	prig_down(&g);
}

/* The pool hands the save actor free slabs through a ring that holds at
 * most half of them. A step that saves more chunks than the ring holds
 * asks the evict actor for room instead of dropping them; when the pool is
 * full the oldest unpinned chunks make way; when pins hold the pool the
 * rest is skipped, counted, and the step does not hang. */
Test(pipeline, saves_beyond_the_ring_and_a_full_pool)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	cfg.cpu_bytes = 24 * 8192; /* 16 tokens x 384 bytes -> 8 KiB slabs: 24 */
	cfg.room_wait_us = 20000000; /* a loaded CI machine: no late answer here */
	struct prig g;
	prig_up(&g, &s, cfg, 25);
	struct kvrt_pool_stats ps;
	kvrt_pool_stats(g.e->pool, &ps);
	cr_assert_eq(ps.slabs, 24);
	struct preq r[12];
	struct preq *rr[12];
	for (uint32_t i = 0; i < 12; i++) {
		preq_make(&g, &r[i], 300 + i, 64, NULL, 0); /* 4 chunks each */
		rr[i] = &r[i];
	}
	/* 1. 16 chunks in one step, 7 slabs in the ring: all saved. */
	prig_save(&g, rr, 4);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.save_skipped_pool, 0, "%llu chunks dropped", (unsigned long long)st.save_skipped_pool);
	cr_assert_eq(st.save_chunks, 16);
	uint32_t hit[4], from[4] = {0};
	lookup_all(&g, rr, 4, hit);
	for (uint32_t i = 0; i < 4; i++)
		cr_assert_eq(hit[i], 64);
	load_and_check(&g, rr, 4, hit, from, hit);
	for (uint32_t i = 0; i < 4; i++)
		kvrt_engine_release(g.e, r[i].id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	/* 2. 16 more with 8 slabs free: the first ones make way. */
	prig_save(&g, rr + 4, 4);
	kvrt_engine_stats(g.e, &st);
	cr_assert_eq(st.save_skipped_pool, 0);
	cr_assert_eq(st.save_chunks, 32);
	cr_assert_geq(st.evict.evicted, 8);
	lookup_all(&g, rr + 4, 4, hit); /* pins all 16 of them */
	for (uint32_t i = 0; i < 4; i++)
		cr_assert_eq(hit[i], 64, "a new chunk was evicted");
	/* 3. Pins hold 16 of 24 slabs: of 16 more, at most 8 fit. */
	uint64_t t0 = kvrt_now_ns();
	prig_save(&g, rr + 8, 4);
	cr_assert_lt(kvrt_now_ns() - t0, 5000000000ull, "the save waited for the pinned pool");
	kvrt_engine_stats(g.e, &st);
	cr_assert_geq(st.save_skipped_pool, 8, "%llu skipped", (unsigned long long)st.save_skipped_pool);
	cr_assert_eq(st.save_chunks + st.save_skipped_pool, 48);
	uint32_t hit2[4];
	lookup_all(&g, rr + 4, 4, hit2);
	for (uint32_t i = 0; i < 4; i++)
		cr_assert_eq(hit2[i], 64, "a pinned chunk was evicted");
	for (uint32_t i = 4; i < 12; i++)
		kvrt_engine_release(g.e, r[i].id);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(kvrt_index_pinned(kvrt_engine_index(g.e)), 0, "pins leaked");
	for (uint32_t i = 0; i < 12; i++)
		preq_fini(&g, &r[i]);
	prig_down(&g);
}

/* The evict actor is slow to answer a room request (1 s): the save of
 * a step that ran the ring dry gives up after room_wait_us, skips the rest
 * (counted), and the next bind is not held behind the evict actor; the
 * late answer is taken before the engine goes, and a later step asks
 * again and saves everything. */
static void slow_room(void *ctx)
{
	atomic_fetch_add((_Atomic uint32_t *)ctx, 1);
	usleep(1000000);
}

Test(pipeline, a_slow_evict_actor_does_not_hold_the_step)
{
	struct kt_spec s = small_spec();
	struct kvrt_engine_config cfg = base_cfg(16);
	_Atomic uint32_t rooms = 0;
	cfg.cpu_bytes = 24 * 8192;
	cfg.room_wait_us = 2000;
	cfg.on_room = slow_room;
	cfg.hook_ctx = (void *)&rooms;
	struct prig g;
	prig_up(&g, &s, cfg, 26);
	struct preq r[8];
	struct kvrt_plan_req pr[8];
	for (uint32_t i = 0; i < 8; i++) {
		preq_make(&g, &r[i], 400 + i, 64, NULL, 0); /* 4 chunks each */
		pr[i] = preq_save_plan(&g, &r[i]);
	}
	/* 16 chunks, 7 in the ring: the rest waits on the slow answer */
	uint64_t t0 = kvrt_now_ns();
	prig_step(&g, pr, 4, NULL, NULL);
	prig_step(&g, NULL, 0, NULL, NULL); /* its bind waits for the save actor */
	uint64_t dt = kvrt_now_ns() - t0;
	cr_assert_lt(dt, 600000000ull, "two steps took %llu ms behind a slow evict actor",
		     (unsigned long long)(dt / 1000000));
	cr_assert_eq(atomic_load(&rooms), 1);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	struct kvrt_engine_stats st;
	kvrt_engine_stats(g.e, &st);
	cr_assert_gt(st.save_skipped_pool, 0);
	cr_assert_eq(st.save_chunks + st.save_skipped_pool, 16);
	/* the answer came meanwhile: the next dry ring asks again */
	prig_step(&g, pr + 4, 4, NULL, NULL);
	cr_assert_eq(kvrt_engine_flush(g.e), 0);
	cr_assert_eq(atomic_load(&rooms), 2);
	/* and the engine goes while an answer is late (ASan: no write after
	 * free when it comes) */
	struct preq x;
	preq_make(&g, &x, 499, 128, NULL, 0); /* 8 chunks */
	struct kvrt_plan_req px = preq_save_plan(&g, &x);
	prig_step(&g, &px, 1, NULL, NULL);
	for (uint32_t i = 0; i < 8; i++)
		preq_fini(&g, &r[i]);
	preq_fini(&g, &x);
	prig_down(&g);
}

/* Every step saves a request and reports the one before (delay_free): the
 * last-save map must not fill with deleted slots (a miss would walk them
 * all: bind and get_finished look up every request, every step). */
Test(pipeline, last_save_map_stays_sparse)
{
	struct kt_spec s = small_spec();
	struct prig g;
	prig_up(&g, &s, base_cfg(16), 22);
	uint64_t sending[4], recving[4], failed[4];
	struct kvrt_finished fin = {.sending = sending, .sending_cap = 4, .recving = recving, .recving_cap = 4,
				    .failed = failed, .failed_cap = 4};
	uint32_t steps = kvrt_test_scaled(300, 30), reported = 0;
	for (uint32_t i = 0; i < steps; i++) {
		struct preq a;
		preq_make(&g, &a, 1000 + i, 16, NULL, 0);
		struct kvrt_plan_req pr = preq_save_plan(&g, &a);
		prig_step(&g, &pr, 1, NULL, NULL);
		uint64_t prev = 1000 + i - 1;
		cr_assert_eq(kvrt_engine_get_finished(g.e, i ? &prev : NULL, i ? 1 : 0, &fin), 0);
		reported += fin.num_sending;
		cr_assert_leq((g.e->ls_n + g.e->ls_tombs) * 2, g.e->ls_cap, "step %u: %u live + %u deleted in %u slots",
			      i, g.e->ls_n, g.e->ls_tombs, g.e->ls_cap);
		cr_assert_eq(kvrt_engine_flush(g.e), 0); /* the request's blocks are reused */
		preq_fini(&g, &a);
	}
	cr_assert_eq(kvrt_engine_get_finished(g.e, NULL, 0, &fin), 0);
	reported += fin.num_sending;
	cr_assert_eq(reported, steps - 1, "every delayed request reported once");
	prig_down(&g);
}
