/* tests/test_layout.c: KV layout descriptors and sets (kernels/layout.h):
 * what each vLLM layout turns into, and that impossible tensors are refused
 * with -EINVAL instead of being copied wrong. */
#include <criterion/criterion.h>
#include <errno.h>

#include "kernels/layout.h"
#include "tests/test_kern_util.h"

static _Alignas(64) unsigned char mem[1 << 20];

/* A contiguous tensor of the given logical shape (element strides). */
static struct kvrt_kv_tensor contig(enum kvrt_kv_layout l, uint32_t elem, uint32_t ndim,
				    const int64_t *shape)
{
	struct kvrt_kv_tensor t = {.data = mem, .layout = l, .elem_size = elem, .ndim = ndim,
				   .name = "t"};
	int64_t s = 1;
	for (int i = (int)ndim - 1; i >= 0; i--) {
		t.shape[i] = shape[i];
		t.stride[i] = s;
		s *= shape[i];
	}
	return t;
}

Test(layout, flash_attn_nhd)
{
	int64_t shape[5] = {2, 10, 16, 8, 128};
	struct kvrt_kv_tensor t = contig(KVRT_KV_FLASH_ATTN, 2, 5, shape);
	struct kvrt_kv_desc d;
	cr_assert_eq(kvrt_kv_desc_init(&d, &t), 0);
	cr_assert_eq(d.num_kv, 2);
	cr_assert_eq(d.num_blocks, 10);
	cr_assert_eq(d.block_size, 16);
	cr_assert_eq(d.num_heads, 8);
	cr_assert_eq(d.head_size, 128);
	cr_assert_not(d.hnd);
	cr_assert_eq(d.row.s_head, 256);
	cr_assert_eq(d.row.s_tok, 8 * 256);
	cr_assert_eq(d.row.s_block, 16 * 8 * 256);
	cr_assert_eq(d.row.s_kv, 10 * 16 * 8 * 256);
	cr_assert_eq(d.span, 2ull * 10 * 16 * 8 * 256);
}

Test(layout, flashinfer_hnd_by_strides)
{
	/* Logical (nb, 2, bs, h, d), physical (nb, 2, h, bs, d). */
	int64_t nb = 4, bs = 16, h = 2, hd = 64;
	struct kvrt_kv_tensor t = {.data = mem, .layout = KVRT_KV_FLASHINFER, .elem_size = 2, .ndim = 5,
				   .shape = {nb, 2, bs, h, hd},
				   .stride = {2 * h * bs * hd, h * bs * hd, hd, bs * hd, 1}};
	struct kvrt_kv_desc d;
	cr_assert_eq(kvrt_kv_desc_init(&d, &t), 0);
	cr_assert(d.hnd);
	cr_assert_eq(d.row.s_tok, hd * 2);
	cr_assert_eq(d.row.s_head, bs * hd * 2);
	cr_assert_eq(d.row.s_kv, h * bs * hd * 2);
	cr_assert_eq(d.row.s_block, 2 * h * bs * hd * 2);
}

Test(layout, mla_and_cpu)
{
	int64_t mshape[3] = {7, 16, 576};
	struct kvrt_kv_tensor t = contig(KVRT_KV_MLA, 2, 3, mshape);
	struct kvrt_kv_desc d;
	cr_assert_eq(kvrt_kv_desc_init(&d, &t), 0);
	cr_assert_eq(d.num_kv, 1);
	cr_assert_eq(d.num_heads, 1);
	cr_assert_eq(d.row.s_tok, 576 * 2);
	cr_assert_eq(d.row.s_head, 576 * 2, "one head: packed");
	int64_t cshape[5] = {2, 5, 4, 16, 32};
	t = contig(KVRT_KV_CPU, 4, 5, cshape);
	cr_assert_eq(kvrt_kv_desc_init(&d, &t), 0);
	cr_assert_eq(d.num_heads, 4);
	cr_assert_eq(d.block_size, 16);
	cr_assert(d.hnd, "vLLM's CPU layout is HND");
	cr_assert_eq(d.row.s_tok, 32 * 4);
	cr_assert_eq(d.row.s_head, 16 * 32 * 4);
}

static void expect_bad(struct kvrt_kv_tensor t, const char *why)
{
	struct kvrt_kv_desc d;
	cr_assert_eq(kvrt_kv_desc_init(&d, &t), -EINVAL, "accepted: %s", why);
}

Test(layout, refuses_impossible_tensors)
{
	int64_t shape[5] = {2, 10, 16, 8, 128};
	struct kvrt_kv_tensor good = contig(KVRT_KV_FLASH_ATTN, 2, 5, shape), t;
	t = good; t.layout = (enum kvrt_kv_layout)9; expect_bad(t, "unknown layout");
	t = good; t.data = NULL; expect_bad(t, "NULL data");
	t = good; t.elem_size = 3; expect_bad(t, "element size 3");
	t = good; t.data = mem + 1; expect_bad(t, "misaligned data");
	t = good; t.ndim = 4; expect_bad(t, "wrong rank");
	t = good; t.shape[0] = 3; expect_bad(t, "K/V dimension of 3");
	t = good; t.shape[1] = 0; expect_bad(t, "zero blocks");
	t = good; t.stride[1] = -t.stride[1]; expect_bad(t, "negative stride");
	t = good; t.stride[2] = 0; expect_bad(t, "stride 0");
	t = good; t.stride[4] = 2; expect_bad(t, "non-contiguous head_size");
	t = good; t.stride[1] = 100; expect_bad(t, "blocks overlapping tokens");
	t = good; t.stride[3] = 64; expect_bad(t, "heads overlapping");
	t = good; t.stride[0] = t.stride[1]; expect_bad(t, "K and V overlapping");
	t = good; t.cross_layer = true; expect_bad(t, "cross-layer without the layer dimension");
	t = good; t.stride[1] = INT64_MAX / 4; expect_bad(t, "span overflowing");
	/* And the same good tensor passes. */
	struct kvrt_kv_desc d;
	cr_assert_eq(kvrt_kv_desc_init(&d, &good), 0);
}

Test(layout, set_dedupes_shared_layers)
{
	int64_t shape[5] = {2, 4, 16, 2, 32};
	struct kvrt_kv_tensor t[4];
	t[0] = contig(KVRT_KV_FLASH_ATTN, 2, 5, shape);
	t[1] = t[0];
	t[1].data = mem + 65536;
	t[2] = t[0]; /* a layer sharing layer 0's KV */
	t[3] = t[1];
	struct kvrt_kv_set *s;
	cr_assert_eq(kvrt_kv_set_create(&s, t, 4), 0);
	cr_assert_eq(s->num_layers, 2);
	cr_assert_eq(s->num_inputs, 4);
	cr_assert_eq(s->input_layer[0], 0);
	cr_assert_eq(s->input_layer[1], 1);
	cr_assert_eq(s->input_layer[2], 0);
	cr_assert_eq(s->input_layer[3], 1);
	cr_assert_eq(s->geom.token_bytes, 2 * 2 * 32 * 2);
	cr_assert_eq(s->geom.num_slots, 64);
	cr_assert_eq(kvrt_kv_set_chunk_bytes(s, 256), 2ull * 256 * 256);
	kvrt_kv_set_destroy(s);
}

Test(layout, set_refuses_mixed_geometry_and_overlap)
{
	int64_t shape[5] = {2, 4, 16, 2, 32};
	struct kvrt_kv_tensor t[2];
	t[0] = contig(KVRT_KV_FLASH_ATTN, 2, 5, shape);
	t[1] = t[0];
	t[1].data = mem + 65536;
	t[1].shape[3] = 1; /* one head fewer */
	struct kvrt_kv_set *s;
	cr_assert_eq(kvrt_kv_set_create(&s, t, 2), -EINVAL);
	cr_assert_null(s);
	t[1] = t[0];
	t[1].data = mem + 64; /* overlaps layer 0 without being it */
	cr_assert_eq(kvrt_kv_set_create(&s, t, 2), -EINVAL);
	cr_assert_eq(kvrt_kv_set_create(&s, t, 0), -EINVAL);
}

Test(layout, cross_layer_expands)
{
	struct kt_spec sp = {.layout = KVRT_KV_FLASH_ATTN, .cross = true, .layers = 5, .nb = 6, .bs = 16,
			     .heads = 2, .hs = 16, .elem = 2};
	struct kt_model m;
	kt_model_init(&m, &sp);
	cr_assert_leq(m.bytes, sizeof(mem));
	m.base[0] = mem;
	kt_model_bind(&m);
	struct kvrt_kv_set *s;
	cr_assert_eq(kvrt_kv_set_create(&s, m.t, 1), 0);
	cr_assert_eq(s->num_layers, 5);
	cr_assert_eq(s->num_inputs, 5);
	for (uint32_t l = 0; l < 5; l++) {
		cr_assert_eq(s->layer[l].base, (uint64_t)(uintptr_t)mem + l * m.stride[KT_L] * 2);
		cr_assert_eq(s->layer[l].s_block, m.stride[KT_B] * 2);
	}
	kvrt_kv_set_destroy(s);
	kt_model_fini(&m);
}

Test(layout, every_fixture_spec_is_valid)
{
	struct kt_spec specs[128];
	uint32_t n = kt_specs(specs, 128);
	for (uint32_t i = 0; i < n; i++) {
		struct kt_model m;
		kt_model_init(&m, &specs[i]);
		for (uint32_t k = 0; k < m.ntensors; k++)
			m.base[k] = mem + 64 * k; /* never dereferenced */
		if (m.ntensors > 1) /* keep layers apart for the overlap check */
			for (uint32_t k = 0; k < m.ntensors; k++)
				m.base[k] = (unsigned char *)(uintptr_t)(0x100000000ull + k * (m.bytes + 4096));
		kt_model_bind(&m);
		struct kvrt_kv_set *s;
		char name[160];
		cr_assert_eq(kvrt_kv_set_create(&s, m.t, m.ntensors), 0, "%s",
			     kt_spec_name(&specs[i], name, sizeof(name)));
		cr_assert_eq(s->num_layers, specs[i].layers);
		kvrt_kv_set_destroy(s);
		kt_model_fini(&m);
	}
}
