/* tests/gpu/bench_gpu_copy.c: gather/scatter GB/s on a GPU next to the
 * pinned cudaMemcpyAsync peaks measured in the same run (kvrt_stream_memcpy
 * is cudaMemcpyAsync). Run by perf/gpu-check.sh; exit 77 without a GPU,
 * 1 when the round trip it measures is not byte-exact, else 0 (a missed
 * speed target is reported as MISS, not as a failure).
 *
 *   bench_gpu_copy [layers heads head_size elem block_size chunk_tokens chunks reps]
 *   defaults:       32     8     128       2    16         256          32     5
 *
 * Shapes are Llama-3.1-8B's (FlashAttention NHD layout, one tensor per
 * layer). A prompt of chunks * chunk_tokens tokens sits in shuffled blocks
 * (as vLLM's allocator leaves them); the chunks are in pinned host memory
 * (read and written in place by the kernel: zero-copy) or in device memory.
 * Figures: best of `reps` timed runs after one warm-up, wall clock around
 * enqueue + stream sync.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "tests/test_kern_util.h"

struct fig {
	char name[64];
	double gbs;
	const char *limit_name;
	double limit;
	double target;
};

static struct fig figs[32];
static int nfigs;

static void add_fig(const char *name, double gbs, const char *limit_name, double limit, double target)
{
	struct fig *f = &figs[nfigs++];
	snprintf(f->name, sizeof(f->name), "%s", name);
	f->gbs = gbs;
	f->limit_name = limit_name;
	f->limit = limit;
	f->target = target;
	printf("  %-40s %8.2f GB/s\n", name, gbs);
	fflush(stdout);
}

static int fail(const char *what, int rc)
{
	fprintf(stderr, "bench_gpu_copy: %s failed: %d\n", what, rc);
	exit(1);
}

#define TRY(x) do { int _rc = (x); if (_rc < 0) fail(#x, _rc); } while (0)

typedef void (*work_fn)(void *);

/* Best GB/s of reps runs of fn(arg) (which enqueues on s), bytes each. */
static double best_gbs(struct kvrt_stream *s, work_fn fn, void *arg, double bytes, int reps)
{
	fn(arg);
	TRY(kvrt_stream_sync(s));
	double best = 0;
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = kvrt_now_ns();
		fn(arg);
		TRY(kvrt_stream_sync(s));
		double gbs = bytes / (double)(kvrt_now_ns() - t0);
		best = gbs > best ? gbs : best;
	}
	return best;
}

struct ctx {
	struct kvrt_device *d;
	struct kvrt_stream *s;
	struct kvrt_device_layers *L;
	struct kvrt_device_plan *plan_pinned, *plan_dev;
	struct kvrt_event **ev;
	uint32_t layers;
	void *dst, *src;
	size_t n;
	/* for the per-block baseline */
	struct kt_model *m;
	unsigned char *chunks;
	uint32_t nchunks, chunk_tokens;
	int64_t *slots;
	size_t kv_bytes;
};

static void do_memcpy(void *p)
{
	struct ctx *c = p;
	TRY(kvrt_stream_memcpy(c->s, c->dst, c->src, c->n));
}

static void scatter_all(void *p)
{
	struct ctx *c = p;
	TRY(kvrt_device_scatter(c->s, c->L, c->plan_pinned, 0, c->layers));
}

static void gather_all(void *p)
{
	struct ctx *c = p;
	TRY(kvrt_device_gather(c->s, c->L, c->plan_pinned, 0, c->layers));
}

static void scatter_layers(void *p)
{
	struct ctx *c = p;
	for (uint32_t l = 0; l < c->layers; l++) {
		TRY(kvrt_device_scatter(c->s, c->L, c->plan_pinned, l, 1));
		TRY(kvrt_event_record(c->ev[l], c->s));
	}
}

static void gather_layers(void *p)
{
	struct ctx *c = p;
	for (uint32_t l = 0; l < c->layers; l++) {
		TRY(kvrt_device_gather(c->s, c->L, c->plan_pinned, l, 1));
		TRY(kvrt_event_record(c->ev[l], c->s));
	}
}

static void scatter_dev(void *p)
{
	struct ctx *c = p;
	TRY(kvrt_device_scatter(c->s, c->L, c->plan_dev, 0, c->layers));
}

static void gather_dev(void *p)
{
	struct ctx *c = p;
	TRY(kvrt_device_gather(c->s, c->L, c->plan_dev, 0, c->layers));
}

/* The approach kvrt replaces: one cudaMemcpyAsync per (chunk, layer, K/V,
 * block run) -- contiguous runs of a block's tokens in NHD. */
static void scatter_per_block(void *p)
{
	struct ctx *c = p;
	uint32_t bs = c->m->s.bs, n = c->chunk_tokens;
	size_t chunk_bytes = (size_t)c->layers * 2 * n * c->kv_bytes;
	for (uint32_t ch = 0; ch < c->nchunks; ch++)
		for (uint32_t l = 0; l < c->layers; l++)
			for (uint32_t kv = 0; kv < 2; kv++)
				for (uint32_t t = 0; t < n; t += bs) {
					int64_t slot = c->slots[(size_t)ch * n + t];
					unsigned char *dst = kt_at(c->m, l, kv, slot, 0);
					unsigned char *src = c->chunks + ch * chunk_bytes +
							     ((size_t)(l * 2 + kv) * n + t) * c->kv_bytes;
					TRY(kvrt_stream_memcpy(c->s, dst, src, bs * c->kv_bytes));
				}
}

int main(int argc, char **argv)
{
	uint32_t a[8] = {32, 8, 128, 2, 16, 256, 32, 5};
	for (int i = 1; i < argc && i <= 8; i++)
		a[i - 1] = (uint32_t)strtoul(argv[i], NULL, 10);
	uint32_t layers = a[0], heads = a[1], hs = a[2], elem = a[3], bs = a[4], ctok = a[5],
		 nchunks = a[6];
	int reps = (int)a[7];
	struct kvrt_device *d;
	int rc = kvrt_device_open(&d, 0);
	/* KVRT_GPU_TEST_ON_HOST=1: run on the host backend (checks this
	 * program on machines without a GPU; the figures mean nothing). */
	if (rc < 0 || (kvrt_device_kind(d) != KVRT_DEVICE_CUDA && !getenv("KVRT_GPU_TEST_ON_HOST"))) {
		printf("skip: no CUDA device\n");
		return 77;
	}
	uint32_t ntok = ctok * nchunks;
	uint32_t nb = 2 * ((ntok + bs - 1) / bs); /* half the blocks used */
	struct kt_spec spec = {.layout = KVRT_KV_FLASH_ATTN, .order = KT_NHD, .layers = layers, .nb = nb,
			       .bs = bs, .heads = heads, .hs = hs, .elem = elem};
	struct kt_model m;
	kt_model_init(&m, &spec);
	for (uint32_t l = 0; l < layers; l++)
		TRY(kvrt_device_alloc(d, m.bytes, (void **)&m.base[l]));
	kt_model_bind(&m);
	struct kvrt_kv_set *set;
	TRY(kvrt_kv_set_create(&set, m.t, m.ntensors));
	size_t chunk_bytes = kvrt_kv_set_chunk_bytes(set, ctok);
	size_t total = chunk_bytes * nchunks;
	printf("device: %s\n", kvrt_device_name(d));
	printf("shape: %u layers x %u KV heads x %u, %u-byte elements, block %u, %u chunks x %u tokens "
	       "= %.2f GiB per pass\n",
	       layers, heads, hs, elem, bs, nchunks, ctok, (double)total / (1u << 30));

	/* The prompt's slots: shuffled blocks, filled in order. */
	uint64_t rng = 42;
	uint32_t *perm = malloc(nb * sizeof(*perm));
	for (uint32_t i = 0; i < nb; i++)
		perm[i] = i;
	for (uint32_t i = nb - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(kvrt_test_rand(&rng) % (i + 1)), x = perm[i];
		perm[i] = perm[j];
		perm[j] = x;
	}
	int64_t *slots = malloc((size_t)ntok * sizeof(*slots));
	for (uint32_t t = 0; t < ntok; t++)
		slots[t] = (int64_t)perm[t / bs] * bs + t % bs;

	struct kvrt_stream *s = kvrt_device_load_stream(d);
	unsigned char *pin_a, *pin_b, *dev_buf, *dev_chunks;
	TRY(kvrt_device_alloc_pinned(d, total, (void **)&pin_a));
	TRY(kvrt_device_alloc_pinned(d, total, (void **)&pin_b));
	TRY(kvrt_device_alloc(d, total, (void **)&dev_buf));
	TRY(kvrt_device_alloc(d, total, (void **)&dev_chunks));
	kt_fill(pin_a, total, &rng);
	memset(pin_b, 0xA7, total);

	struct kvrt_device_layers *L;
	struct kvrt_device_plan *pp, *pd, *pb;
	TRY(kvrt_device_layers_create(d, set, &L));
	TRY(kvrt_device_plan_create(d, set, ntok, &pp));
	TRY(kvrt_device_plan_create(d, set, ntok, &pd));
	TRY(kvrt_device_plan_create(d, set, ntok, &pb));
	void *map_a, *map_b;
	TRY(kvrt_device_map_host(d, pin_a, &map_a));
	TRY(kvrt_device_map_host(d, pin_b, &map_b));
	for (uint32_t ch = 0; ch < nchunks; ch++) {
		const int64_t *sl = slots + (size_t)ch * ctok;
		TRY(kvrt_device_plan_add(pp, (unsigned char *)map_a + ch * chunk_bytes, ctok, 0, ctok, sl));
		TRY(kvrt_device_plan_add(pb, (unsigned char *)map_b + ch * chunk_bytes, ctok, 0, ctok, sl));
		TRY(kvrt_device_plan_add(pd, dev_chunks + ch * chunk_bytes, ctok, 0, ctok, sl));
	}
	TRY(kvrt_device_plan_upload(pp, s));
	TRY(kvrt_device_plan_upload(pb, s));
	TRY(kvrt_device_plan_upload(pd, s));
	struct kvrt_event **ev = calloc(layers, sizeof(*ev));
	for (uint32_t l = 0; l < layers; l++)
		TRY(kvrt_event_create(d, &ev[l]));
	TRY(kvrt_stream_sync(s));

	/* Correctness at these shapes: scatter pinned A -> GPU, gather GPU ->
	 * pinned B, B must equal A byte for byte. */
	TRY(kvrt_device_scatter(s, L, pp, 0, layers));
	TRY(kvrt_device_gather(s, L, pb, 0, layers));
	TRY(kvrt_stream_sync(s));
	int exact = memcmp(pin_a, pin_b, total) == 0;
	printf("round trip pinned -> GPU -> pinned: %s\n", exact ? "byte-exact" : "DIFFERS");

	struct ctx c = {.d = d, .s = s, .L = L, .plan_pinned = pp, .plan_dev = pd, .ev = ev,
			.layers = layers, .m = &m, .chunks = pin_a, .nchunks = nchunks,
			.chunk_tokens = ctok, .slots = slots, .kv_bytes = set->geom.kv_bytes};
	printf("measuring (best of %d):\n", reps);
	c.dst = dev_buf, c.src = pin_a, c.n = total;
	double h2d = best_gbs(s, do_memcpy, &c, (double)total, reps);
	add_fig("memcpy pinned -> GPU", h2d, NULL, 0, 0);
	c.dst = pin_b, c.src = dev_buf;
	double d2h = best_gbs(s, do_memcpy, &c, (double)total, reps);
	add_fig("memcpy GPU -> pinned", d2h, NULL, 0, 0);
	c.dst = dev_chunks, c.src = dev_buf;
	double d2d = best_gbs(s, do_memcpy, &c, (double)total, reps);
	add_fig("memcpy GPU -> GPU", d2d, NULL, 0, 0);
	add_fig("scatter pinned -> GPU, all layers", best_gbs(s, scatter_all, &c, (double)total, reps),
		"memcpy pinned -> GPU", h2d, 0.9);
	add_fig("scatter pinned -> GPU, per layer+event", best_gbs(s, scatter_layers, &c, (double)total, reps),
		"memcpy pinned -> GPU", h2d, 0.9);
	add_fig("gather GPU -> pinned, all layers", best_gbs(s, gather_all, &c, (double)total, reps),
		"memcpy GPU -> pinned", d2h, 0.9);
	add_fig("gather GPU -> pinned, per layer+event", best_gbs(s, gather_layers, &c, (double)total, reps),
		"memcpy GPU -> pinned", d2h, 0.9);
	add_fig("scatter GPU chunks -> GPU", best_gbs(s, scatter_dev, &c, (double)total, reps),
		"memcpy GPU -> GPU", d2d, 0);
	add_fig("gather GPU -> GPU chunks", best_gbs(s, gather_dev, &c, (double)total, reps),
		"memcpy GPU -> GPU", d2d, 0);
	add_fig("per-block cudaMemcpyAsync scatter", best_gbs(s, scatter_per_block, &c, (double)total, 2),
		"memcpy pinned -> GPU", h2d, 0);

	int misses = 0;
	printf("\n%-40s %9s  %-22s %9s %6s %6s  %s\n", "figure", "GB/s", "limit", "GB/s", "ratio",
	       "target", "");
	for (int i = 0; i < nfigs; i++) {
		struct fig *f = &figs[i];
		if (!f->limit_name) {
			printf("%-40s %9.2f  %-22s %9s %6s %6s\n", f->name, f->gbs, "-", "-", "-", "-");
			continue;
		}
		double ratio = f->gbs / f->limit;
		const char *verdict = f->target == 0 ? "" : ratio >= f->target ? "PASS" : "MISS";
		misses += f->target != 0 && ratio < f->target;
		char tgt[16];
		if (f->target)
			snprintf(tgt, sizeof(tgt), ">=%.2f", f->target);
		else
			snprintf(tgt, sizeof(tgt), "-");
		printf("%-40s %9.2f  %-22s %9.2f %6.2f %6s  %s\n", f->name, f->gbs, f->limit_name, f->limit,
		       ratio, tgt, verdict);
	}
	printf("round trip: %s; speed targets missed: %d\n", exact ? "byte-exact" : "DIFFERS", misses);

	for (uint32_t l = 0; l < layers; l++) {
		kvrt_event_destroy(ev[l]);
		kvrt_device_free(d, m.base[l]);
	}
	free(ev);
	kvrt_device_plan_destroy(pp);
	kvrt_device_plan_destroy(pd);
	kvrt_device_plan_destroy(pb);
	kvrt_device_layers_destroy(L);
	kvrt_device_free_pinned(d, pin_a);
	kvrt_device_free_pinned(d, pin_b);
	kvrt_device_free(d, dev_buf);
	kvrt_device_free(d, dev_chunks);
	kvrt_kv_set_destroy(set);
	kt_model_fini(&m);
	free(slots);
	free(perm);
	kvrt_device_close(d);
	return exact ? 0 : 1;
}
