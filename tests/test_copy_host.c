/* tests/test_copy_host.c: the host gather/scatter engine (kernels/copy.h)
 * against a naive per-head reference, for every layout, physical order,
 * element size, cross-layer and per-layer tensors, padded strides, random
 * slot tables with -1 holes, partial chunks, odd chunk alignment, and
 * launches of one layer, some layers and all layers.
 *
 * The same checks run the CUDA kernel's own per-thread code on this CPU
 * (copy_cuda.cu's emulation, over the grids its launcher makes, with
 * small grid limits too so that the kernel's grid-stride loop and the
 * launcher's splits run): the kernel's addressing is tested on machines
 * without a GPU. Builds without nvcc (the sanitizer variants) skip those. */
#include <criterion/criterion.h>
#include <errno.h>

#include "kernels/copy.h"
#include "kernels/device_impl.h"
#include "kernels/layout.h"
#include "tests/test_kern_util.h"

/* A gather/scatter engine under test: the host engine, or the CUDA
 * kernel's code emulated with grid limits (units, blocks). */
struct engine {
	bool cuda;
	uint64_t max_units;
	uint32_t max_blocks;
};

static const struct engine HOST = {false, 0, 0};
static const struct engine CUDA_GPU_LIMITS = {true, (1u << 31) - 1, 65535};

static void run_copy(const struct engine *e, const struct kvrt_copy_layer *layers,
		     const struct kvrt_copy_geom *g, const struct kvrt_copy_plan *p, uint32_t l0,
		     uint32_t nl, enum kvrt_copy_dir dir, const char *name)
{
	if (!e->cuda) {
		kvrt_copy_host(layers, g, p->tok, p->num, l0, nl, dir);
		return;
	}
	/* The width device.c's launcher picks for these tables. */
	uint32_t w = kvrt_copy_width(kvrt_copy_layers_bits(layers, l0 + nl, g) | p->addr_bits);
	struct _kvrt_copy_launch l = {.layers = layers, .tok = p->tok, .ntok = p->num, .layer_first = l0,
				      .layer_count = nl, .width = w, .geom = *g, .dir = (int)dir};
	int rc = _kvrt_cuda_copy_emulate(&l, e->max_units, e->max_blocks);
	cr_assert_eq(rc, 0, "%s: the CUDA kernel's code (width %u) failed: %d", name, w, rc);
}

/* Skip unless this build has the CUDA kernel (nvcc). */
static void need_cuda_kernel(void)
{
	struct _kvrt_copy_launch l = {.width = 1};
	if (_kvrt_cuda_copy_emulate(&l, 1, 1) == -ENODEV)
		cr_skip_test("built without nvcc: the CUDA kernel is a stub here");
}

#define POISON 0xA7

struct fixture {
	struct kt_model m;
	struct kvrt_kv_set *set;
	struct kt_chunks c;
	unsigned char **got;  /* engine's chunk images */
	unsigned char **want; /* reference chunk images */
	unsigned char **mem;  /* allocations behind got (misaligned on purpose) */
	struct kvrt_copy_plan plan;
	struct kvrt_copy_tok *rows;
	char name[160];
};

static void fixture_init(struct fixture *f, const struct kt_spec *s, uint64_t seed)
{
	uint64_t rng = seed;
	kt_spec_name(s, f->name, sizeof(f->name));
	kt_model_init(&f->m, s);
	for (uint32_t i = 0; i < f->m.ntensors; i++) {
		f->m.base[i] = malloc(f->m.bytes);
		kt_fill(f->m.base[i], f->m.bytes, &rng);
	}
	kt_model_bind(&f->m);
	cr_assert_eq(kvrt_kv_set_create(&f->set, f->m.t, f->m.ntensors), 0, "%s", f->name);
	cr_assert_eq(f->set->num_layers, s->layers, "%s", f->name);
	kt_chunks_init(&f->c, 5, 2 * s->bs + 3, f->set, s->nb, s->bs, &rng);
	f->got = calloc(f->c.num, sizeof(*f->got));
	f->want = calloc(f->c.num, sizeof(*f->want));
	f->mem = calloc(f->c.num, sizeof(*f->mem));
	uint32_t skew = (uint32_t)(seed % 3); /* 0, 1 or 2 bytes off alignment */
	for (uint32_t i = 0; i < f->c.num; i++) {
		f->mem[i] = malloc(f->c.bytes[i] + 16);
		f->got[i] = f->mem[i] + skew;
		f->want[i] = malloc(f->c.bytes[i]);
		memset(f->got[i], POISON, f->c.bytes[i]);
		memset(f->want[i], POISON, f->c.bytes[i]);
	}
	f->rows = calloc(f->c.total + 1, sizeof(*f->rows));
	kvrt_copy_plan_init(&f->plan, &f->set->geom, f->rows, f->c.total);
	uint32_t holes = 0;
	for (uint32_t i = 0; i < f->c.num; i++) {
		cr_assert_eq(kvrt_copy_plan_add(&f->plan, f->got[i], f->c.n[i], f->c.first[i],
						f->c.count[i], f->c.slots + f->c.slot_off[i]),
			     0, "%s", f->name);
		for (uint32_t j = 0; j < f->c.count[i]; j++)
			holes += f->c.slots[f->c.slot_off[i] + j] < 0;
	}
	cr_assert_eq(f->plan.num, f->c.total - holes, "%s", f->name);
	cr_assert_eq(f->plan.skipped, holes, "%s", f->name);
}

static void fixture_fini(struct fixture *f)
{
	for (uint32_t i = 0; i < f->c.num; i++) {
		free(f->mem[i]);
		free(f->want[i]);
	}
	for (uint32_t i = 0; i < f->m.ntensors; i++)
		free(f->m.base[i]);
	free(f->got);
	free(f->want);
	free(f->mem);
	free(f->rows);
	kt_chunks_fini(&f->c);
	kvrt_kv_set_destroy(f->set);
	kt_model_fini(&f->m);
}

static void assert_chunks_equal(struct fixture *f, const char *what)
{
	for (uint32_t i = 0; i < f->c.num; i++)
		cr_assert(memcmp(f->got[i], f->want[i], f->c.bytes[i]) == 0, "%s: %s: chunk %u differs",
			  f->name, what, i);
}

/* Gather (all layers at once, or layer by layer, or a middle range), check
 * against the reference; then scatter the chunks into a fresh random
 * tensor and check every byte of it: the plan's slots now equal the
 * original tensor's, and nothing else changed. */
static void run_spec_on(const struct engine *e, const struct kt_spec *s, uint64_t seed, int mode)
{
	struct fixture f;
	fixture_init(&f, s, seed);
	const struct kvrt_copy_geom *g = &f.set->geom;
	uint32_t L = f.set->num_layers;
	uint32_t l0 = mode == 2 ? 1 : 0, nl = mode == 2 ? L - 2 : L;
	if (mode == 1) {
		for (uint32_t l = 0; l < L; l++)
			run_copy(e, f.set->layer, g, &f.plan, l, 1, KVRT_COPY_GATHER, f.name);
	} else {
		run_copy(e, f.set->layer, g, &f.plan, l0, nl, KVRT_COPY_GATHER, f.name);
	}
	kt_reference(&f.m, &f.c, f.want, l0, nl, true);
	assert_chunks_equal(&f, "gather");

	/* Keep the original, overwrite the tensor with other random bytes. */
	uint64_t rng = seed * 7 + 1;
	unsigned char **orig = calloc(f.m.ntensors, sizeof(*orig));
	unsigned char **expect = calloc(f.m.ntensors, sizeof(*expect));
	for (uint32_t i = 0; i < f.m.ntensors; i++) {
		orig[i] = malloc(f.m.bytes);
		memcpy(orig[i], f.m.base[i], f.m.bytes);
		kt_fill(f.m.base[i], f.m.bytes, &rng);
		expect[i] = malloc(f.m.bytes);
		memcpy(expect[i], f.m.base[i], f.m.bytes);
	}
	run_copy(e, f.set->layer, g, &f.plan, l0, nl, KVRT_COPY_SCATTER, f.name);
	/* Reference scatter into the expected images. */
	struct kt_model em = f.m;
	em.base = expect;
	kt_reference(&em, &f.c, f.got, l0, nl, false);
	for (uint32_t i = 0; i < f.m.ntensors; i++)
		cr_assert(memcmp(f.m.base[i], expect[i], f.m.bytes) == 0,
			  "%s: scatter: tensor %u differs from the reference", f.name, i);
	/* Identity: every planned slot holds the original bytes again. */
	struct kt_model om = f.m;
	om.base = orig;
	uint32_t nkv = g->num_kv;
	for (uint32_t i = 0; i < f.c.num; i++)
		for (uint32_t j = 0; j < f.c.count[i]; j++) {
			int64_t slot = f.c.slots[f.c.slot_off[i] + j];
			if (slot < 0)
				continue;
			for (uint32_t l = l0; l < l0 + nl; l++)
				for (uint32_t kv = 0; kv < nkv; kv++)
					for (uint32_t h = 0; h < g->num_heads; h++)
						cr_assert(memcmp(kt_at(&f.m, l, kv, slot, h),
								 kt_at(&om, l, kv, slot, h),
								 g->head_bytes) == 0,
							  "%s: gather+scatter not identity at slot %lld",
							  f.name, (long long)slot);
		}
	for (uint32_t i = 0; i < f.m.ntensors; i++) {
		free(orig[i]);
		free(expect[i]);
	}
	free(orig);
	free(expect);
	fixture_fini(&f);
}

static void run_spec(const struct kt_spec *s, uint64_t seed, int mode)
{
	run_spec_on(&HOST, s, seed, mode);
}

Test(copy_host, every_layout_all_layers_one_launch)
{
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	cr_assert_gt(n, 60);
	for (uint32_t i = 0; i < n; i++)
		run_spec(&specs[i], 1000 + i, 0);
}

Test(copy_host, every_layout_layer_by_layer)
{
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	for (uint32_t i = 0; i < n; i++)
		run_spec(&specs[i], 2000 + i, 1);
}

Test(copy_host, every_layout_middle_layers)
{
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	for (uint32_t i = 0; i < n; i++)
		run_spec(&specs[i], 3000 + i, 2);
}

/* Many random seeds over a few shapes: slot tables differ every time. */
Test(copy_host, random_slot_tables)
{
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	uint64_t rounds = kvrt_test_scaled(200, 20);
	for (uint64_t r = 0; r < rounds; r++)
		run_spec(&specs[(r * 13) % n], 9000 + r, (int)(r % 3));
}

/* Llama-like geometry (8 heads x 128, bf16, block 16): the runs the engine
 * merges (whole blocks in NHD) must still land byte-exact. */
Test(copy_host, llama_shape_nhd_and_hnd)
{
	for (int order = 0; order < 3; order++) {
		struct kt_spec s = {.layout = order == 2 ? KVRT_KV_FLASHINFER : KVRT_KV_FLASH_ATTN,
				    .order = order == 1 ? KT_HND : KT_NHD, .layers = 2, .nb = 48, .bs = 16,
				    .heads = 8, .hs = 128, .elem = 2};
		run_spec(&s, 77 + (uint64_t)order, 0);
	}
}

static struct kvrt_copy_geom small_geom(void)
{
	return (struct kvrt_copy_geom){.num_kv = 2, .num_heads = 2, .head_bytes = 16, .kv_bytes = 32,
				       .token_bytes = 64, .block_size = 4, .num_slots = 40};
}

Test(copy_plan, rejects_bad_input_and_adds_nothing)
{
	struct kvrt_copy_geom g = small_geom();
	struct kvrt_copy_tok rows[8];
	struct kvrt_copy_plan p;
	kvrt_copy_plan_init(&p, &g, rows, 8);
	char chunk[64 * 16];
	int64_t ok[4] = {0, 1, -1, 39};
	int64_t low[2] = {3, -2}, high[2] = {3, 40};
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 16, 0, 2, low), -EINVAL);
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 16, 0, 2, high), -EINVAL);
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 4, 1, 4, ok), -EINVAL, "past the chunk's end");
	cr_assert_eq(kvrt_copy_plan_add(&p, NULL, 4, 0, 4, ok), -EINVAL);
	cr_assert_eq(p.num, 0);
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 4, 0, 4, ok), 0);
	cr_assert_eq(p.num, 3);
	cr_assert_eq(p.skipped, 1);
	cr_assert_eq(p.tok[2].slot, 39);
	cr_assert_eq(p.tok[2].chunk, (uint64_t)(uintptr_t)chunk + 3 * 32, "token 3's K");
	cr_assert_eq(p.tok[2].chunk_tokens, 4);
	int64_t five[6] = {10, 11, 12, 13, 14, 15};
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 16, 0, 6, five), -ENOSPC);
	cr_assert_eq(p.num, 3, "a refused add adds nothing");
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 16, 0, 5, five), 0);
	cr_assert_eq(p.num, 8);
	kvrt_copy_plan_reset(&p);
	cr_assert_eq(p.num, 0);
	cr_assert_eq(p.skipped, 0);
}

Test(copy_plan, access_width)
{
	cr_assert_eq(kvrt_copy_width(0), 16);
	cr_assert_eq(kvrt_copy_width(0x1000 | 256), 16);
	cr_assert_eq(kvrt_copy_width(0x1008), 8);
	cr_assert_eq(kvrt_copy_width(0x1004), 4);
	cr_assert_eq(kvrt_copy_width(0x1002), 2);
	cr_assert_eq(kvrt_copy_width(0x1003), 1);
	struct kvrt_copy_geom g = small_geom();
	struct kvrt_copy_tok rows[4];
	struct kvrt_copy_plan p;
	kvrt_copy_plan_init(&p, &g, rows, 4);
	_Alignas(16) char chunk[64 * 4 + 16];
	int64_t s[1] = {5};
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk, 4, 0, 1, s), 0);
	cr_assert_eq(kvrt_copy_width(p.addr_bits), 16);
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk + 2, 4, 0, 1, s), 0);
	cr_assert_eq(kvrt_copy_width(p.addr_bits), 2, "one misaligned chunk narrows the launch");
}

/* --- the CUDA kernel's code, emulated on this CPU ------------------------ */

Test(copy_cuda_emulated, every_layout_all_modes)
{
	need_cuda_kernel();
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	for (uint32_t i = 0; i < n; i++)
		run_spec_on(&CUDA_GPU_LIMITS, &specs[i], 5000 + i, (int)(i % 3));
}

/* One block across (the kernel's grid-stride loop does all the work) and
 * grids of a few hundred units (the launcher splits the tokens). */
Test(copy_cuda_emulated, small_grids_stride_and_split)
{
	need_cuda_kernel();
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	const struct engine tiny[] = {{true, (1u << 31) - 1, 1}, {true, 300, 65535}, {true, 97, 2}};
	for (uint32_t i = 0; i < n; i++)
		run_spec_on(&tiny[i % 3], &specs[i], 6000 + i, (int)((i / 3) % 3));
}

/* Llama-like geometry (16-byte accesses) in the three physical orders. */
Test(copy_cuda_emulated, llama_shape_nhd_and_hnd)
{
	need_cuda_kernel();
	for (int order = 0; order < 3; order++) {
		struct kt_spec s = {.layout = order == 2 ? KVRT_KV_FLASHINFER : KVRT_KV_FLASH_ATTN,
				    .order = order == 1 ? KT_HND : KT_NHD, .layers = 2, .nb = 48, .bs = 16,
				    .heads = 8, .hs = 128, .elem = 2};
		run_spec_on(&CUDA_GPU_LIMITS, &s, 177 + (uint64_t)order, 0);
	}
}

/* A width wider than the addresses allow is caught, not executed: the
 * emulation checks the alignment device.c's choice promises the GPU. */
Test(copy_cuda_emulated, misaligned_width_is_refused)
{
	need_cuda_kernel();
	struct kvrt_copy_geom g = small_geom();
	_Alignas(16) unsigned char tensor[2 * 10 * 4 * 64];
	_Alignas(16) unsigned char chunk[4 * 2 * 64 + 16];
	struct kvrt_copy_layer layer = {.base = (uint64_t)(uintptr_t)tensor, .s_kv = 10 * 4 * 32,
					.s_block = 4 * 32, .s_tok = 32, .s_head = 16};
	struct kvrt_copy_tok rows[4];
	struct kvrt_copy_plan p;
	kvrt_copy_plan_init(&p, &g, rows, 4);
	for (size_t i = 0; i < sizeof(tensor); i++)
		tensor[i] = (unsigned char)(i * 7 + 1);
	memset(chunk, 0xA7, sizeof(chunk));
	int64_t s[2] = {5, 9};
	cr_assert_eq(kvrt_copy_plan_add(&p, chunk + 2, 2, 0, 2, s), 0);
	struct _kvrt_copy_launch l = {.layers = &layer, .tok = p.tok, .ntok = p.num, .layer_first = 0,
				      .layer_count = 1, .width = 16, .geom = g, .dir = KVRT_COPY_GATHER};
	cr_assert_eq(_kvrt_cuda_copy_emulate(&l, (1u << 31) - 1, 65535), -EFAULT);
	l.width = kvrt_copy_width(kvrt_copy_layers_bits(&layer, 1, &g) | p.addr_bits);
	cr_assert_eq(l.width, 2);
	cr_assert_eq(_kvrt_cuda_copy_emulate(&l, (1u << 31) - 1, 65535), 0);
	cr_assert_eq(memcmp(chunk + 2, tensor + 5 / 4 * 128 + 5 % 4 * 32, 32), 0, "slot 5's K");
	l.width = 3;
	cr_assert_eq(_kvrt_cuda_copy_emulate(&l, 1, 1), -EINVAL);
}
