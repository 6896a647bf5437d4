/* perf/suite_kernels.c: `kvrt-perf kernels`: the host gather/scatter engine
 * (the engine of machines without a GPU) over a realistic slot table, next
 * to memcpy of the same bytes measured in the same run. Target: >= 0.7x
 * memcpy (the gather is strided: 2 KiB-to-32 KiB runs scattered over the
 * paged tensors).
 *
 * Shapes: Llama-3.1-8B's (32 layers, 8 KV heads, head size 128, bf16,
 * block 16, FlashAttention NHD), a prompt of 256-token chunks in shuffled
 * blocks, as vLLM's allocator leaves them. Also: the same through the
 * device layer's host backend (a stream, one launch and one event per
 * layer, the load actor's pattern), and an HND layout (256-byte runs), for
 * information.
 *
 * Options (--opt KEY=VALUE): chunks=N (default 4, --quick 1), reps=N.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/copy.h"
#include "kernels/device.h"
#include "kernels/layout.h"
#include "perf/perf.h"

#define LAYERS 32
#define HEADS 8
#define HEAD_SIZE 128
#define ELEM 2
#define BLOCK 16
#define CHUNK 256

struct bench {
	struct kvrt_kv_set *set;
	unsigned char *layer_mem[LAYERS];
	unsigned char *chunks;     /* all chunks back to back */
	size_t chunk_bytes;        /* one chunk, all layers */
	uint32_t nchunks;
	int64_t *slots;            /* the prompt's slots, chunk after chunk */
	struct kvrt_copy_tok *rows;
	struct kvrt_copy_plan plan;
};

static uint64_t _rand(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

static void _fill(unsigned char *p, size_t n, uint64_t *rng)
{
	for (size_t i = 0; i + 8 <= n; i += 8) {
		uint64_t r = _rand(rng);
		memcpy(p + i, &r, 8);
	}
}

/* hnd: FlashInfer logical (nb, 2, bs, h, d) stored (nb, 2, h, bs, d);
 * else FlashAttention (2, nb, bs, h, d) contiguous. */
static int bench_init(struct bench *b, uint32_t nchunks, bool hnd, uint64_t seed)
{
	memset(b, 0, sizeof(*b));
	uint64_t rng = seed;
	uint32_t ntok = nchunks * CHUNK;
	int64_t nb = 2 * ntok / BLOCK; /* half the blocks hold this prompt */
	size_t layer_bytes = (size_t)2 * nb * BLOCK * HEADS * HEAD_SIZE * ELEM;
	struct kvrt_kv_tensor t[LAYERS];
	for (int l = 0; l < LAYERS; l++) {
		b->layer_mem[l] = aligned_alloc(4096, layer_bytes);
		if (!b->layer_mem[l])
			return -ENOMEM;
		_fill(b->layer_mem[l], layer_bytes, &rng);
		memset(&t[l], 0, sizeof(t[l]));
		t[l].data = b->layer_mem[l];
		t[l].elem_size = ELEM;
		t[l].ndim = 5;
		t[l].name = "bench";
		if (hnd) {
			t[l].layout = KVRT_KV_FLASHINFER;
			int64_t shape[5] = {nb, 2, BLOCK, HEADS, HEAD_SIZE};
			int64_t stride[5] = {2 * HEADS * BLOCK * HEAD_SIZE, HEADS * BLOCK * HEAD_SIZE,
					     HEAD_SIZE, BLOCK * HEAD_SIZE, 1};
			memcpy(t[l].shape, shape, sizeof(shape));
			memcpy(t[l].stride, stride, sizeof(stride));
		} else {
			t[l].layout = KVRT_KV_FLASH_ATTN;
			int64_t shape[5] = {2, nb, BLOCK, HEADS, HEAD_SIZE};
			int64_t stride[5] = {nb * BLOCK * HEADS * HEAD_SIZE, BLOCK * HEADS * HEAD_SIZE,
					     HEADS * HEAD_SIZE, HEAD_SIZE, 1};
			memcpy(t[l].shape, shape, sizeof(shape));
			memcpy(t[l].stride, stride, sizeof(stride));
		}
	}
	int rc = kvrt_kv_set_create(&b->set, t, LAYERS);
	if (rc < 0)
		return rc;
	b->nchunks = nchunks;
	b->chunk_bytes = kvrt_kv_set_chunk_bytes(b->set, CHUNK);
	b->chunks = aligned_alloc(4096, b->chunk_bytes * nchunks);
	b->rows = calloc(ntok, sizeof(*b->rows));
	if (!b->chunks || !b->rows)
		return -ENOMEM;
	_fill(b->chunks, b->chunk_bytes * nchunks, &rng);
	/* Shuffled blocks, filled in prompt order. */
	uint32_t *perm = malloc((size_t)nb * sizeof(*perm));
	int64_t *slots = b->slots = malloc((size_t)ntok * sizeof(*slots));
	if (!perm || !slots) {
		free(perm);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < nb; i++)
		perm[i] = i;
	for (uint32_t i = (uint32_t)nb - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(_rand(&rng) % (i + 1)), x = perm[i];
		perm[i] = perm[j];
		perm[j] = x;
	}
	for (uint32_t i = 0; i < ntok; i++)
		slots[i] = (int64_t)perm[i / BLOCK] * BLOCK + i % BLOCK;
	kvrt_copy_plan_init(&b->plan, &b->set->geom, b->rows, ntok);
	for (uint32_t c = 0; c < nchunks && rc == 0; c++)
		rc = kvrt_copy_plan_add(&b->plan, b->chunks + c * b->chunk_bytes, CHUNK, 0, CHUNK,
					slots + (size_t)c * CHUNK);
	free(perm);
	return rc;
}

static void bench_fini(struct bench *b)
{
	for (int l = 0; l < LAYERS; l++)
		free(b->layer_mem[l]);
	free(b->chunks);
	free(b->rows);
	free(b->slots);
	kvrt_kv_set_destroy(b->set);
}

/* Best GB/s over reps runs (first run untimed: warms pages and caches). */
#define BEST_GBS(bytes, reps, stmt)                                           \
	({                                                                    \
		double _best = 0;                                             \
		for (int _r = 0; _r <= (reps); _r++) {                        \
			uint64_t _t0 = kvrt_now_ns();                         \
			stmt;                                                 \
			double _g = (double)(bytes) / (double)(kvrt_now_ns() - _t0); \
			if (_r > 0 && _g > _best)                             \
				_best = _g;                                   \
		}                                                             \
		_best;                                                        \
	})

static void fig(struct kvrt_perf *p, const char *name, double v, const char *lname, double lim,
		double target)
{
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = name, .value = v, .unit = "GB/s",
						     .limit_name = lname, .limit = lim,
						     .target = target, .better = KVRT_PERF_HIGHER});
}

static int run(struct kvrt_perf *p)
{
	uint32_t nchunks = (uint32_t)atoi(kvrt_perf_opt(p, "chunks", kvrt_perf_quick(p) ? "1" : "4"));
	int reps = atoi(kvrt_perf_opt(p, "reps", "0"));
	if (reps <= 0)
		reps = (int)(5 * kvrt_perf_scale(p)) < 2 ? 2 : (int)(5 * kvrt_perf_scale(p));
	if (nchunks == 0)
		nchunks = 1;
	struct bench b;
	int rc = bench_init(&b, nchunks, false, 1);
	if (rc < 0) {
		kvrt_perf_note(p, "kernels: setup failed (%d)", rc);
		bench_fini(&b);
		return rc;
	}
	size_t total = b.chunk_bytes * nchunks; /* bytes moved per pass */
	unsigned char *src = aligned_alloc(4096, total);
	if (!src) {
		bench_fini(&b);
		return -ENOMEM;
	}
	uint64_t rng = 7;
	_fill(src, total, &rng);
	const struct kvrt_copy_geom *g = &b.set->geom;
	kvrt_perf_note(p, "Llama-3.1-8B shapes: %d layers x %d KV heads x %d, bf16, block %d; %u chunks x %d "
			  "tokens in shuffled blocks = %.0f MiB per pass; best of %d",
		       LAYERS, HEADS, HEAD_SIZE, BLOCK, nchunks, CHUNK, (double)total / (1 << 20), reps);

	double mc = BEST_GBS(total, reps, memcpy(b.chunks, src, total));
	double ga = BEST_GBS(total, reps,
			     kvrt_copy_host(b.set->layer, g, b.plan.tok, b.plan.num, 0, LAYERS,
					    KVRT_COPY_GATHER));
	double sc = BEST_GBS(total, reps,
			     kvrt_copy_host(b.set->layer, g, b.plan.tok, b.plan.num, 0, LAYERS,
					    KVRT_COPY_SCATTER));
	fig(p, "memcpy (same bytes)", mc, NULL, 0, 0);
	fig(p, "gather, all layers", ga, "memcpy", mc, 0.7);
	fig(p, "scatter, all layers", sc, "memcpy", mc, 0.7);

	/* Through the device layer: the load actor's pattern on the host
	 * backend (upload, one scatter + one event per layer, wait). */
	struct kvrt_device *d = NULL;
	struct kvrt_device_layers *dl = NULL;
	struct kvrt_device_plan *dp = NULL;
	struct kvrt_event *ev[LAYERS] = {0};
	rc = kvrt_device_open(&d, 0);
	if (rc == 0 && kvrt_device_kind(d) != KVRT_DEVICE_HOST) {
		kvrt_perf_note(p, "kernels: a GPU is present; the device-layer figures use the host "
				  "backend only with KVRT_DEVICE=host");
		kvrt_device_close(d);
		d = NULL;
	}
	if (d) {
		rc = kvrt_device_layers_create(d, b.set, &dl);
		if (rc == 0)
			rc = kvrt_device_plan_create(d, b.set, b.plan.num, &dp);
		for (uint32_t c = 0; rc == 0 && c < nchunks; c++)
			rc = kvrt_device_plan_add(dp, b.chunks + c * b.chunk_bytes, CHUNK, 0, CHUNK,
						  b.slots + (size_t)c * CHUNK);
		struct kvrt_stream *s = kvrt_device_load_stream(d);
		for (int l = 0; rc == 0 && l < LAYERS; l++)
			rc = kvrt_event_create(d, &ev[l]);
		if (rc == 0)
			rc = kvrt_device_plan_upload(dp, s);
		if (rc == 0)
			rc = kvrt_stream_sync(s);
		if (rc == 0) {
			double ds = BEST_GBS(total, reps, ({
				for (int l = 0; l < LAYERS; l++) {
					kvrt_device_scatter(s, dl, dp, (uint32_t)l, 1);
					kvrt_event_record(ev[l], s);
				}
				kvrt_event_wait(ev[LAYERS - 1], UINT64_MAX);
			}));
			double dg = BEST_GBS(total, reps, ({
				for (int l = 0; l < LAYERS; l++) {
					kvrt_device_gather(s, dl, dp, (uint32_t)l, 1);
					kvrt_event_record(ev[l], s);
				}
				kvrt_event_wait(ev[LAYERS - 1], UINT64_MAX);
			}));
			fig(p, "scatter, host stream, layer+event", ds, "memcpy", mc, 0.7);
			fig(p, "gather, host stream, layer+event", dg, "memcpy", mc, 0.7);
		} else {
			kvrt_perf_note(p, "kernels: device-layer figures skipped (%d)", rc);
		}
		for (int l = 0; l < LAYERS; l++)
			kvrt_event_destroy(ev[l]);
		kvrt_device_plan_destroy(dp);
		kvrt_device_layers_destroy(dl);
		kvrt_device_close(d);
	}
	bench_fini(&b);

	/* HND: each head is its own 256-byte run. */
	if (bench_init(&b, nchunks, true, 2) == 0) {
		g = &b.set->geom;
		double hg = BEST_GBS(total, reps,
				     kvrt_copy_host(b.set->layer, g, b.plan.tok, b.plan.num, 0, LAYERS,
						    KVRT_COPY_GATHER));
		double hs = BEST_GBS(total, reps,
				     kvrt_copy_host(b.set->layer, g, b.plan.tok, b.plan.num, 0, LAYERS,
						    KVRT_COPY_SCATTER));
		fig(p, "gather, HND (256 B runs)", hg, "memcpy", mc, 0);
		fig(p, "scatter, HND (256 B runs)", hs, "memcpy", mc, 0);
	}
	bench_fini(&b);
	free(src);
	return 0;
}

const struct kvrt_perf_suite kvrt_perf_suite_kernels = {
	.name = "kernels",
	.what = "host gather/scatter GB/s vs memcpy of the same bytes (Llama-8B shapes)",
	.run = run,
};
