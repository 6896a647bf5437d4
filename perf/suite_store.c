/* perf/suite_store.c: `kvrt-perf store`, the cache core's speed.
 *
 * Figures, each next to a limit measured in the same run:
 * - memcpy of a chunk-sized buffer (the limit of put and get);
 * - chunk put through the pool (take a slab from the ring, copy the chunk
 *   in, admit it to the evict actor, which evicts to make room) and chunk
 *   get (lookup with a pin, copy out, unpin): target >= 0.8x memcpy;
 * - lookup latency of prompts of 1k..128k tokens whose chunks are all
 *   present (hash the prompt + walk the index, pinning and touching), next
 *   to the XXH3-128 floor over the same token bytes: target <= 3x.
 * Options: --opt chunk_mb=N (chunk bytes, default 32: Llama-3-8B, 256
 * tokens, bf16), --opt entries=N (index size for lookups, default 1M).
 * The disk tier's figures are `kvrt-perf disk`.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "actors/evict.h"
#include "actors/key.h"
#include "perf/perf.h"

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0;
}

static void fill_random(void *p, size_t n, uint64_t seed)
{
	uint64_t *w = p;
	for (size_t i = 0; i < n / 8; i++) {
		seed ^= seed << 13;
		seed ^= seed >> 7;
		seed ^= seed << 17;
		w[i] = seed;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v, size_t n)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	return v[n / 2];
}

/* memcpy GB/s of chunk-sized buffers, median of reps (pages faulted in). */
static double memcpy_gbps(void *dst, const void *src, size_t n, int reps)
{
	uint64_t t[64];
	if (reps > 64)
		reps = 64;
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = kvrt_now_ns();
		memcpy(dst, src, n);
		__asm__ __volatile__("" ::: "memory");
		t[r] = kvrt_now_ns() - t0;
	}
	return gbps(n, median(t, (size_t)reps));
}

int kvrt_perf_index_fill(struct kvrt_perf *p, struct kvrt_index *idx, const struct kvrt_chunk_key *keys,
			 uint64_t nk, uint64_t filler, const char *what)
{
	for (uint64_t i = 0; i < filler + nk; i++) {
		struct kvrt_chunk_key k = i < nk ? keys[i]
						 : (struct kvrt_chunk_key){.lo = i * 0x9e3779b97f4a7c15ull,
									   .hi = ~i};
		struct kvrt_index_entry *e = kvrt_index_entry_new(idx, k, KVRT_TIER_CPU);
		if (!e || kvrt_index_insert(idx, e)) {
			kvrt_index_entry_free(idx, e);
			return -ENOMEM;
		}
		if ((i & 65535) == 0)
			kvrt_perf_progress(p, what, i, filler + nk);
	}
	kvrt_perf_progress(p, what, filler + nk, filler + nk);
	return 0;
}

int kvrt_perf_cpu_put_get(struct kvrt_perf *p, size_t bytes, uint32_t tokens, double *put, double *get,
			  uint64_t *refused)
{
	int rc;
	const uint32_t slabs = 8;
	struct kvrt_chunk_shape shape = {.num_layers = 32, .token_bytes = (uint32_t)(bytes / 32 / tokens),
					 .elem_size = 2};
	void *src = aligned_alloc(4096, bytes), *dst = aligned_alloc(4096, bytes);
	struct kvrt_index *idx = NULL;
	struct kvrt_pool *pool = NULL;
	struct kvrt_evict *ev = NULL;
	struct kvrt_index_reader *r = NULL;
	*refused = 0;
	if (!src || !dst) {
		rc = -ENOMEM;
		goto out;
	}
	fill_random(src, bytes, 1);
	memset(dst, 1, bytes);
	int reps = kvrt_perf_quick(p) ? 5 : 20;
	if ((rc = kvrt_index_create(&idx, &(struct kvrt_index_config){.capacity = 1024})) ||
	    (rc = kvrt_pool_create(&pool, &(struct kvrt_pool_config){.budget_bytes = slabs * bytes,
								     .slab_bytes = bytes,
								     .ring_size = 4,
								     .populate = true})) ||
	    (rc = kvrt_evict_create(&ev, &(struct kvrt_evict_config){.index = idx,
								      .pool = pool,
								      .shape = shape,
								      .high_watermark = 0.75,
								      .low_watermark = 0.5})))
		goto out;
	r = kvrt_index_reader_open(idx);
	if (!r) {
		rc = -ENOMEM;
		goto out;
	}
	/* Touch every slab once so page faults are not measured. */
	for (uint32_t i = 0; i < slabs * 2; i++) {
		uint32_t s;
		while (!kvrt_pool_take(pool, &s))
			kvrt_evict_sync(ev);
		memset(kvrt_pool_addr(pool, s), 0, bytes);
		kvrt_evict_return_slabs(ev, &s, 1);
		kvrt_evict_sync(ev);
	}
	uint64_t n = (uint64_t)(reps * 3);
	uint64_t put_t[64], get_t[64];
	for (uint64_t i = 0; i < n; i++) {
		struct kvrt_chunk_key k = {.lo = i * 0x9e3779b97f4a7c15ull + 1, .hi = i};
		uint32_t s;
		uint64_t t0 = kvrt_now_ns();
		while (!kvrt_pool_take(pool, &s)) {
			(*refused)++;
			kvrt_cpu_relax();
		}
		memcpy(kvrt_pool_addr(pool, s), src, bytes);
		while (kvrt_evict_admit(ev, k, s, tokens, 0))
			kvrt_cpu_relax();
		put_t[i] = kvrt_now_ns() - t0;
		kvrt_evict_sync(ev); /* not timed: the admit is asynchronous */

		struct kvrt_index_hit h;
		t0 = kvrt_now_ns();
		size_t got = kvrt_index_lookup(r, &k, 1, 1, KVRT_INDEX_PIN | KVRT_INDEX_TOUCH, &h);
		if (got == 1) {
			memcpy(dst, kvrt_pool_addr(pool, h.slab), bytes);
			kvrt_index_unpin_owner(idx, 1);
		}
		get_t[i] = kvrt_now_ns() - t0;
		if (got != 1) {
			kvrt_perf_note(p, "get missed a chunk just put: a bug");
			rc = -EIO;
			goto out;
		}
		kvrt_perf_progress(p, "put/get", i + 1, n);
	}
	if (memcmp(src, dst, bytes)) {
		kvrt_perf_note(p, "get returned different bytes: a bug");
		rc = -EIO;
		goto out;
	}
	*put = gbps(bytes, median(put_t, n));
	*get = gbps(bytes, median(get_t, n));
out:
	kvrt_index_reader_close(r);
	kvrt_evict_destroy(ev);
	kvrt_pool_destroy(pool);
	kvrt_index_destroy(idx);
	free(src);
	free(dst);
	return rc;
}

static int run_put_get(struct kvrt_perf *p, size_t chunk)
{
	struct kvrt_chunk_shape shape = {.num_layers = 32, .token_bytes = (uint32_t)(chunk / 32 / 256),
					 .elem_size = 2};
	size_t bytes = kvrt_chunk_payload_bytes(&shape, 256);
	void *src = aligned_alloc(4096, bytes), *dst = aligned_alloc(4096, bytes);
	if (!src || !dst) {
		free(src);
		free(dst);
		return -ENOMEM;
	}
	fill_random(src, bytes, 1);
	memset(dst, 1, bytes);
	double lim = memcpy_gbps(dst, src, bytes, kvrt_perf_quick(p) ? 5 : 20);
	free(src);
	free(dst);
	double put = 0, get = 0;
	uint64_t refused = 0;
	int rc = kvrt_perf_cpu_put_get(p, bytes, 256, &put, &get, &refused);
	if (rc)
		return rc;
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = "memcpy chunk (median)", .value = lim, .unit = "GB/s"});
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = "chunk put (take+copy+admit)", .value = put,
						    .unit = "GB/s", .limit_name = "memcpy chunk (median)",
						    .limit = lim, .target = 0.8});
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = "chunk get (lookup+pin+copy+unpin)", .value = get,
						    .unit = "GB/s", .limit_name = "memcpy chunk (median)",
						    .limit = lim, .target = 0.8});
	kvrt_perf_note(p, "medians; chunk %zu bytes, 8 slabs, puts waited for the ring %llu times", bytes,
		       (unsigned long long)refused);
	return 0;
}

static int run_lookup(struct kvrt_perf *p)
{
	const uint32_t cs = 256;
	const size_t max_tokens = 128 * 1024;
	uint64_t entries = strtoull(kvrt_perf_opt(p, "entries", kvrt_perf_quick(p) ? "65536" : "1048576"),
				    NULL, 0);
	uint32_t *tokens = malloc(max_tokens * sizeof(*tokens));
	struct kvrt_chunk_key *keys = malloc((max_tokens / cs) * sizeof(*keys));
	struct kvrt_index_hit *hits = malloc((max_tokens / cs) * sizeof(*hits));
	struct kvrt_index *idx = NULL;
	struct kvrt_index_reader *r = NULL;
	int rc = -ENOMEM;
	if (!tokens || !keys || !hits)
		goto out;
	uint64_t s = 7;
	for (size_t i = 0; i < max_tokens; i++) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		tokens[i] = (uint32_t)(s % 151936);
	}
	struct kvrt_key_namespace ns = {.model_id = "perf", .dtype = "bfloat16", .tp_size = 1, .pp_size = 1};
	uint64_t seed = kvrt_key_namespace_hash(&ns);
	size_t nk = kvrt_key_prompt(seed, tokens, max_tokens, cs, false, keys, max_tokens / cs);
	if ((rc = kvrt_index_create(&idx, &(struct kvrt_index_config){.capacity = entries + nk})))
		goto out;
	/* The prompt's chunks plus filler entries. */
	if ((rc = kvrt_perf_index_fill(p, idx, keys, nk, entries, "index fill")))
		goto out;
	r = kvrt_index_reader_open(idx);
	if (!r)
		goto out;
	static const size_t sizes[] = {1024, 8192, 32768, 131072};
	int iters = kvrt_perf_quick(p) ? 50 : 400;
	uint64_t *t_look = malloc(iters * sizeof(uint64_t)), *t_floor = malloc(iters * sizeof(uint64_t));
	if (!t_look || !t_floor) {
		free(t_look);
		free(t_floor);
		goto out;
	}
	for (size_t si = 0; si < KVRT_ARRAY_LEN(sizes); si++) {
		size_t n = sizes[si], want = n / cs;
		volatile uint64_t sink = 0;
		for (int it = 0; it < iters; it++) {
			uint64_t t0 = kvrt_now_ns();
			XXH128_hash_t h = XXH3_128bits_withSeed(tokens, n * 4, seed);
			t_floor[it] = kvrt_now_ns() - t0;
			sink += h.low64;

			t0 = kvrt_now_ns();
			size_t m = kvrt_key_prompt(seed, tokens, n, cs, false, keys, want);
			size_t found = kvrt_index_lookup(r, keys, m, 99, KVRT_INDEX_PIN | KVRT_INDEX_TOUCH, hits);
			t_look[it] = kvrt_now_ns() - t0;
			if (found != want) {
				kvrt_perf_note(p, "lookup found %zu of %zu chunks: a bug", found, want);
				rc = -EIO;
				goto out_t;
			}
			kvrt_index_unpin_owner(idx, 99);
		}
		(void)sink;
		qsort(t_look, iters, sizeof(uint64_t), cmp_u64);
		qsort(t_floor, iters, sizeof(uint64_t), cmp_u64);
		char name[64];
		snprintf(name, sizeof(name), "lookup %zuk tokens (p50)", n / 1024);
		kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = name,
							    .value = (double)t_look[iters / 2] / 1e3,
							    .unit = "us",
							    .limit_name = "XXH3-128 of the tokens",
							    .limit = (double)t_floor[iters / 2] / 1e3,
							    .target = 3.0,
							    .better = KVRT_PERF_LOWER});
	}
	kvrt_perf_note(p, "lookups hash the prompt, then walk, pin and touch every chunk in an index of %llu entries",
		       (unsigned long long)(entries + nk));
	rc = 0;
out_t:
	free(t_look);
	free(t_floor);
out:
	kvrt_index_reader_close(r);
	kvrt_index_destroy(idx);
	free(tokens);
	free(keys);
	free(hits);
	return rc;
}

static int run(struct kvrt_perf *p)
{
	size_t mb = strtoull(kvrt_perf_opt(p, "chunk_mb", kvrt_perf_quick(p) ? "4" : "32"), NULL, 0);
	if (!mb)
		mb = 1;
	int rc = run_put_get(p, mb << 20);
	if (rc)
		return rc;
	return run_lookup(p);
}

KVRT_API const struct kvrt_perf_suite kvrt_perf_suite_store = {
	.name = "store",
	.what = "chunk pool put/get vs memcpy, prompt lookup vs the XXH3 floor",
	.run = run,
};
