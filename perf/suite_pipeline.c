/* perf/suite_pipeline.c: `kvrt-perf pipeline`: the load pipeline inside a
 * simulated forward pass.
 *
 * A step is what vLLM's worker does: bind the plan, start_load, then per
 * layer wait_for_layer_load and a busy loop standing in for that layer's
 * attention. Every step loads the same cached prefix of `hit` tokens (the
 * chunks sit in the CPU pool) into the same blocks. Measured in the same run:
 *   copy     a load with no compute (all-at-once): the time the copies take;
 *   compute  a step with nothing to load: the attention alone;
 * then the step with both, layerwise (one event per layer: layer l+1's copy
 * overlaps layer l's attention) and all-at-once (start_load returns when
 * every layer is in). The ideal step is max(compute, copy); the target is
 * layerwise <= 1.2x the ideal. Stall = step - compute.
 *
 * Runs on the host backend (KVRT_DEVICE=host is set unless KVRT_DEVICE is
 * given): the "attention" is a CPU busy loop, so a CUDA compute stream's
 * asynchronous waits would not show as stall.
 *
 * Options (--opt KEY=VALUE): layers=N (16), hit=N tokens (1024),
 * busy_us=N per layer (default: copy time / layers, the hardest case for
 * overlap), steps=N (20; --quick 5).
 * Shapes per layer: 8 KV heads x 128 x bf16, block 16, FlashAttention NHD.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/engine.h"
#include "perf/perf.h"

#define HEADS 8
#define HEAD_SIZE 128
#define ELEM 2
#define BLOCK 16
#define CHUNK 256

struct bench {
	uint32_t layers, hit, steps;
	uint64_t busy_ns;
	unsigned char **mem;       /* [layers] tensors */
	struct kvrt_kv_tensor *t;  /* [layers] */
	uint32_t nb;               /* blocks per tensor */
	uint32_t *tok;             /* [hit] */
	int32_t *blk;              /* [hit / BLOCK] */
};

static uint64_t _rand(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

static int bench_init(struct bench *b)
{
	b->nb = b->hit / BLOCK + 8;
	size_t bytes = (size_t)2 * b->nb * BLOCK * HEADS * HEAD_SIZE * ELEM;
	b->mem = calloc(b->layers, sizeof(*b->mem));
	b->t = calloc(b->layers, sizeof(*b->t));
	b->tok = calloc(b->hit, sizeof(*b->tok));
	b->blk = calloc(b->nb, sizeof(*b->blk));
	if (!b->mem || !b->t || !b->tok || !b->blk)
		return -ENOMEM;
	uint64_t rng = 0x9e3779b97f4a7c15ull;
	for (uint32_t l = 0; l < b->layers; l++) {
		if (!(b->mem[l] = malloc(bytes)))
			return -ENOMEM;
		for (size_t i = 0; i + 8 <= bytes; i += 8) {
			uint64_t r = _rand(&rng);
			memcpy(b->mem[l] + i, &r, 8);
		}
		int64_t s_head = HEAD_SIZE, s_tok = HEADS * s_head, s_blk = BLOCK * s_tok,
			s_kv = (int64_t)b->nb * s_blk;
		b->t[l] = (struct kvrt_kv_tensor){
			.data = b->mem[l], .layout = KVRT_KV_FLASH_ATTN, .elem_size = ELEM, .ndim = 5,
			.shape = {2, b->nb, BLOCK, HEADS, HEAD_SIZE}, .stride = {s_kv, s_blk, s_tok, s_head, 1},
			.name = "perf"};
	}
	for (uint32_t i = 0; i < b->hit; i++)
		b->tok[i] = (uint32_t)(_rand(&rng) % 100000);
	/* Shuffled blocks, as vLLM's allocator leaves them. */
	for (uint32_t i = 0; i < b->nb; i++)
		b->blk[i] = (int32_t)i;
	for (uint32_t i = b->nb - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(_rand(&rng) % (i + 1));
		int32_t x = b->blk[i];
		b->blk[i] = b->blk[j];
		b->blk[j] = x;
	}
	return 0;
}

static void bench_fini(struct bench *b)
{
	for (uint32_t l = 0; b->mem && l < b->layers; l++)
		free(b->mem[l]);
	free(b->mem);
	free(b->t);
	free(b->tok);
	free(b->blk);
}

static struct kvrt_plan_req plan_of(struct bench *b)
{
	return (struct kvrt_plan_req){.req_id = 1, .ns_hash = 42, .tokens = b->tok, .num_tokens = b->hit,
				      .prompt_tokens = b->hit, .block_ids = b->blk, .num_blocks = b->nb};
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Median step time (ms) of `steps` steps: load (or not), per layer wait and
 * busy_ns of "attention". */
static int run_steps(struct kvrt_engine *e, struct bench *b, bool load, uint64_t busy_ns, double *ms)
{
	double *v = calloc(b->steps, sizeof(*v));
	if (!v)
		return -ENOMEM;
	struct kvrt_plan_req pr = plan_of(b);
	pr.load_end = pr.load_hit = b->hit;
	struct kvrt_step_plan p = {.reqs = &pr, .num_reqs = load ? 1 : 0};
	int rc = 0;
	for (uint32_t s = 0; s < b->steps + 1 && !rc; s++) {
		uint64_t t0 = kvrt_now_ns();
		if ((rc = kvrt_engine_bind_step(e, &p)) || (rc = kvrt_engine_start_load(e)))
			break;
		for (uint32_t l = 0; l < b->layers && !rc; l++) {
			rc = kvrt_engine_wait_layer(e, l);
			uint64_t c0 = kvrt_now_ns();
			while (kvrt_now_ns() - c0 < busy_ns)
				;
		}
		uint64_t t1 = kvrt_now_ns();
		int64_t errs[8];
		if (kvrt_engine_load_errors(e, errs, 8)) {
			fprintf(stderr, "pipeline: load errors in the benchmark\n");
			rc = -EIO;
		}
		if (s > 0) /* the first step warms up */
			v[s - 1] = (double)(t1 - t0) / 1e6;
	}
	qsort(v, b->steps, sizeof(*v), cmp_d);
	*ms = v[b->steps / 2];
	free(v);
	return rc;
}

/* An engine with the prefix saved; mode all_at_once or layerwise. */
static int engine_up(struct kvrt_engine **out, struct bench *b, bool all_at_once)
{
	uint64_t chunk = (uint64_t)CHUNK * b->layers * 2 * HEADS * HEAD_SIZE * ELEM;
	struct kvrt_engine_config cfg = {.chunk_size = CHUNK,
					 .cpu_bytes = ((b->hit + CHUNK - 1) / CHUNK * 4 + 16) * ((chunk + 4095) & ~4095ull),
					 .namespace_hash = 42,
					 .all_at_once = all_at_once,
					 .step_tokens = b->hit};
	struct kvrt_engine *e;
	int rc = kvrt_engine_create(&e, &cfg);
	if (rc)
		return rc;
	if ((rc = kvrt_engine_register(e, b->t, b->layers, NULL)))
		goto err;
	struct kvrt_plan_req pr = plan_of(b);
	pr.save_end = b->hit;
	struct kvrt_step_plan p = {.reqs = &pr, .num_reqs = 1};
	if ((rc = kvrt_engine_bind_step(e, &p)))
		goto err;
	for (uint32_t l = 0; l < b->layers; l++)
		kvrt_engine_save_layer(e, l);
	if ((rc = kvrt_engine_wait_save(e)) || (rc = kvrt_engine_flush(e)))
		goto err;
	struct kvrt_engine_stats st;
	kvrt_engine_stats(e, &st);
	if (st.save_chunks * CHUNK < b->hit) {
		fprintf(stderr, "pipeline: only %llu chunks saved\n", (unsigned long long)st.save_chunks);
		rc = -ENOSPC;
		goto err;
	}
	*out = e;
	return 0;
err:
	kvrt_engine_destroy(e);
	return rc;
}

static void fig(struct kvrt_perf *p, const char *name, double v, const char *lname, double lim, double target)
{
	kvrt_perf_fig(p, &(struct kvrt_perf_figure){.name = name, .value = v, .unit = "ms", .limit_name = lname,
						     .limit = lim, .target = target, .better = KVRT_PERF_LOWER});
}

static int run(struct kvrt_perf *p)
{
	setenv("KVRT_DEVICE", "host", 0);
	struct bench b = {0};
	b.layers = (uint32_t)atoi(kvrt_perf_opt(p, "layers", "16"));
	b.hit = (uint32_t)atoi(kvrt_perf_opt(p, "hit", "1024"));
	b.steps = (uint32_t)atoi(kvrt_perf_opt(p, "steps", kvrt_perf_quick(p) ? "5" : "20"));
	b.hit -= b.hit % CHUNK;
	if (!b.layers || b.hit < CHUNK || !b.steps) {
		kvrt_perf_note(p, "pipeline: need layers >= 1, hit >= %d, steps >= 1", CHUNK);
		return -EINVAL;
	}
	int rc = bench_init(&b);
	struct kvrt_engine *lw = NULL, *aao = NULL;
	if (rc || (rc = engine_up(&aao, &b, true)) || (rc = engine_up(&lw, &b, false)))
		goto out;
	double copy, compute, t_lw, t_aao, dummy;
	/* Warm-up, then the copy alone. */
	if ((rc = run_steps(aao, &b, true, 0, &dummy)) || (rc = run_steps(aao, &b, true, 0, &copy)))
		goto out;
	const char *busy = kvrt_perf_opt(p, "busy_us", NULL);
	b.busy_ns = busy ? (uint64_t)atoi(busy) * 1000 : (uint64_t)(copy * 1e6 / b.layers);
	if ((rc = run_steps(lw, &b, false, b.busy_ns, &compute)) ||
	    (rc = run_steps(lw, &b, true, b.busy_ns, &t_lw)) ||
	    (rc = run_steps(aao, &b, true, b.busy_ns, &t_aao)))
		goto out;
	double ideal = compute > copy ? compute : copy;
	fig(p, "copy: load alone (all layers)", copy, NULL, 0, 0);
	fig(p, "compute: step without loads", compute, NULL, 0, 0);
	fig(p, "layerwise step", t_lw, "ideal max(compute, copy)", ideal, 1.2);
	fig(p, "all-at-once step", t_aao, "ideal max(compute, copy)", ideal, 0);
	fig(p, "layerwise stall per step", t_lw - compute, "copy time", copy, 0);
	fig(p, "all-at-once stall per step", t_aao - compute, "copy time", copy, 0);
	double mb = (double)b.hit * b.layers * 2 * HEADS * HEAD_SIZE * ELEM / 1e6;
	kvrt_perf_note(p, "%u layers, %u-token hit (%.1f MB per step), %.0f us attention per layer, median of %u "
			  "steps, device %s",
		       b.layers, b.hit, mb, b.busy_ns / 1e3, b.steps, getenv("KVRT_DEVICE"));
out:
	if (rc)
		kvrt_perf_note(p, "pipeline: could not run (%d)", rc);
	kvrt_engine_destroy(lw);
	kvrt_engine_destroy(aao);
	bench_fini(&b);
	return rc;
}

const struct kvrt_perf_suite kvrt_perf_suite_pipeline = {
	.name = "pipeline",
	.what = "simulated forward pass: stall per step, layerwise vs all-at-once, vs max(compute, copy)",
	.run = run,
};
