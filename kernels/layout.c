/* kernels/layout.c: KV layout descriptors and sets (see layout.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/layout.h"
#include "runtime/log.h"

/* Roles of a KV tensor's dimensions. */
enum { _R_LAYER, _R_KV, _R_BLOCK, _R_TOK, _R_HEAD, _R_DIM, _R_N };

/* Logical dimension of each role per layout (-1: absent), without the
 * cross-layer dimension. */
static const int8_t _roles[5][_R_N] = {
	[KVRT_KV_FLASH_ATTN] = {-1, 0, 1, 2, 3, 4},
	[KVRT_KV_FLASHINFER] = {-1, 1, 0, 2, 3, 4},
	[KVRT_KV_MLA] = {-1, -1, 0, 1, -1, 2},
	[KVRT_KV_CPU] = {-1, 0, 1, 3, 2, 4},
};
static const uint32_t _ndims[5] = {
	[KVRT_KV_FLASH_ATTN] = 5, [KVRT_KV_FLASHINFER] = 5, [KVRT_KV_MLA] = 3, [KVRT_KV_CPU] = 5};

const char *kvrt_kv_layout_name(enum kvrt_kv_layout l)
{
	switch (l) {
	case KVRT_KV_FLASH_ATTN: return "flash_attn";
	case KVRT_KV_FLASHINFER: return "flashinfer";
	case KVRT_KV_MLA: return "mla";
	case KVRT_KV_CPU: return "cpu";
	}
	return "?";
}

/* Log one line naming the tensor and the problem; -EINVAL. */
static int _bad(const struct kvrt_kv_tensor *t, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static int _bad(const struct kvrt_kv_tensor *t, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	kvrt_error("kernels: KV tensor %s (%s): %s", t->name ? t->name : "?",
		   kvrt_kv_layout_name(t->layout), msg);
	return -EINVAL;
}

#define _BAD(t, ...) return _bad((t), __VA_ARGS__)

/* One dimension for the overlap check. */
struct _dim {
	int64_t stride; /* bytes */
	int64_t size;
};

static int _dim_cmp(const void *a, const void *b)
{
	const struct _dim *x = a, *y = b;
	return (x->stride > y->stride) - (x->stride < y->stride);
}

int kvrt_kv_desc_init(struct kvrt_kv_desc *d, const struct kvrt_kv_tensor *t)
{
	memset(d, 0, sizeof(*d));
	if (t->layout < KVRT_KV_FLASH_ATTN || t->layout > KVRT_KV_CPU)
		_BAD(t, "unknown layout id %d (accepted: 1 flash_attn, 2 flashinfer, 3 mla, 4 cpu)",
		     (int)t->layout);
	if (!t->data)
		_BAD(t, "NULL data pointer");
	if (t->elem_size != 1 && t->elem_size != 2 && t->elem_size != 4 && t->elem_size != 8)
		_BAD(t, "element size %u (accepted: 1, 2, 4, 8)", t->elem_size);
	if ((uintptr_t)t->data % t->elem_size)
		_BAD(t, "data pointer %p not aligned to its element size %u", t->data,
		     t->elem_size);
	uint32_t off = t->cross_layer ? 1 : 0;
	uint32_t want = _ndims[t->layout] + off;
	if (t->ndim != want)
		_BAD(t, "%u dimensions, expected %u", t->ndim, want);

	int64_t size[_R_N], sb[_R_N]; /* per role: size and byte stride */
	for (int r = 0; r < _R_N; r++) {
		int dim = r == _R_LAYER ? (t->cross_layer ? 0 : -1)
					: (_roles[t->layout][r] < 0 ? -1 : _roles[t->layout][r] + (int)off);
		size[r] = 1;
		sb[r] = 0;
		if (dim < 0)
			continue;
		if (t->shape[dim] < 1)
			_BAD(t, "dimension %d has size %lld", dim, (long long)t->shape[dim]);
		if (t->stride[dim] < 0)
			_BAD(t, "dimension %d has negative stride %lld", dim,
			     (long long)t->stride[dim]);
		size[r] = t->shape[dim];
		if (__builtin_mul_overflow(t->stride[dim], (int64_t)t->elem_size, &sb[r]))
			_BAD(t, "stride of dimension %d overflows", dim);
		if (size[r] > 1 && sb[r] == 0)
			_BAD(t, "dimension %d (size %lld) has stride 0", dim, (long long)size[r]);
	}
	if (_roles[t->layout][_R_KV] >= 0 && size[_R_KV] != 2)
		_BAD(t, "the K/V dimension has size %lld, expected 2", (long long)size[_R_KV]);
	if (size[_R_DIM] > 1 && sb[_R_DIM] != t->elem_size)
		_BAD(t, "the head_size dimension must be contiguous (stride 1), got stride %lld",
		     (long long)(sb[_R_DIM] / t->elem_size));
	if (size[_R_LAYER] > KVRT_COPY_MAX_LAYERS)
		_BAD(t, "%lld layers (at most %u)", (long long)size[_R_LAYER],
		     KVRT_COPY_MAX_LAYERS);
	if (size[_R_BLOCK] > UINT32_MAX || size[_R_TOK] > 65536 || size[_R_HEAD] > 65536 ||
	    size[_R_DIM] > 65536)
		_BAD(t, "shape too large (blocks %lld, block_size %lld, heads %lld, head_size %lld)",
		     (long long)size[_R_BLOCK], (long long)size[_R_TOK], (long long)size[_R_HEAD],
		     (long long)size[_R_DIM]);
	uint64_t head_bytes = (uint64_t)size[_R_DIM] * t->elem_size;
	uint64_t token_bytes = head_bytes * (uint64_t)size[_R_HEAD] * (uint64_t)size[_R_KV];
	if (token_bytes > (1u << 30))
		_BAD(t, "%llu bytes per token (at most 1 GiB)", (unsigned long long)token_bytes);

	/* No two elements may share an address: sort the dimensions by stride;
	 * each must step over everything the smaller ones span. The head run
	 * (head_bytes, contiguous) is the innermost extent. */
	struct _dim dims[_R_N];
	int nd = 0;
	for (int r = 0; r < _R_N; r++)
		if (r != _R_DIM && size[r] > 1)
			dims[nd++] = (struct _dim){sb[r], size[r]};
	qsort(dims, (size_t)nd, sizeof(dims[0]), _dim_cmp);
	int64_t extent = (int64_t)head_bytes;
	for (int i = 0; i < nd; i++) {
		if (dims[i].stride < extent)
			_BAD(t, "strides overlap (a dimension of size %lld has byte stride %lld "
				"inside a span of %lld bytes)",
			     (long long)dims[i].size, (long long)dims[i].stride, (long long)extent);
		int64_t span;
		if (__builtin_mul_overflow(dims[i].stride, dims[i].size - 1, &span) ||
		    __builtin_add_overflow(span, extent, &extent))
			_BAD(t, "the tensor spans more than 2^63 bytes");
	}
	int64_t slots;
	if (__builtin_mul_overflow(size[_R_BLOCK], size[_R_TOK], &slots))
		_BAD(t, "num_blocks * block_size overflows");

	d->layout = t->layout;
	d->elem_size = t->elem_size;
	d->num_blocks = (uint32_t)size[_R_BLOCK];
	d->block_size = (uint32_t)size[_R_TOK];
	d->num_heads = (uint32_t)size[_R_HEAD];
	d->head_size = (uint32_t)size[_R_DIM];
	d->num_kv = (uint32_t)size[_R_KV];
	d->num_layers = (uint32_t)size[_R_LAYER];
	d->s_layer = size[_R_LAYER] > 1 ? sb[_R_LAYER] : 0;
	d->hnd = size[_R_HEAD] > 1 && size[_R_TOK] > 1 && sb[_R_HEAD] > sb[_R_TOK];
	d->row.base = (uint64_t)(uintptr_t)t->data;
	d->row.s_kv = size[_R_KV] > 1 ? sb[_R_KV] : 0;
	d->row.s_block = sb[_R_BLOCK];
	d->row.s_tok = sb[_R_TOK];
	d->row.s_head = size[_R_HEAD] > 1 ? sb[_R_HEAD] : 0;
	/* Normalise strides of size-1 dimensions so that a packed layout is
	 * recognised as packed whatever stride torch reports for them. */
	if (size[_R_HEAD] == 1)
		d->row.s_head = (int64_t)head_bytes;
	if (size[_R_TOK] == 1)
		d->row.s_tok = (int64_t)(head_bytes * (uint64_t)size[_R_HEAD]);
	d->span = (uint64_t)extent;
	return 0;
}

void kvrt_kv_desc_layer(const struct kvrt_kv_desc *d, uint32_t l, struct kvrt_kv_desc *out)
{
	KVRT_ASSERT(l < d->num_layers || (l == 0 && d->num_layers == 0));
	*out = *d;
	out->row.base = d->row.base + (uint64_t)l * (uint64_t)d->s_layer;
	out->num_layers = 1;
	out->s_layer = 0;
	if (d->num_layers > 1) {
		/* One layer's span: everything but the layer dimension. Bounded
		 * by the whole tensor's; used only for overlap checks between
		 * different inputs, where the whole tensor's span is right. */
		out->span = d->span - (uint64_t)l * (uint64_t)d->s_layer;
	}
}

static bool _same_geom(const struct kvrt_kv_desc *a, const struct kvrt_kv_desc *b)
{
	return a->num_kv == b->num_kv && a->num_heads == b->num_heads &&
	       a->head_size * a->elem_size == b->head_size * b->elem_size &&
	       a->elem_size == b->elem_size && a->block_size == b->block_size &&
	       a->num_blocks == b->num_blocks;
}

static bool _same_storage(const struct kvrt_kv_desc *a, const struct kvrt_kv_desc *b)
{
	return a->row.base == b->row.base && a->row.s_kv == b->row.s_kv &&
	       a->row.s_block == b->row.s_block && a->row.s_tok == b->row.s_tok &&
	       a->row.s_head == b->row.s_head;
}

void kvrt_kv_set_destroy(struct kvrt_kv_set *s)
{
	if (!s)
		return;
	free(s->input_layer);
	free(s->desc);
	free(s->layer);
	free(s);
}

int kvrt_kv_set_create(struct kvrt_kv_set **out, const struct kvrt_kv_tensor *t, uint32_t n)
{
	*out = NULL;
	if (n == 0 || !t) {
		kvrt_error("kernels: a KV set needs at least one tensor");
		return -EINVAL;
	}
	int rc = -ENOMEM;
	struct kvrt_kv_desc *whole = calloc(n, sizeof(*whole));
	uint32_t *origin = NULL; /* distinct layer -> input tensor index */
	struct kvrt_kv_set *s = calloc(1, sizeof(*s));
	if (!whole || !s)
		goto err;
	uint64_t inputs = 0;
	for (uint32_t i = 0; i < n; i++) {
		if ((rc = kvrt_kv_desc_init(&whole[i], &t[i])) < 0)
			goto err;
		inputs += whole[i].num_layers;
		s->whole_blocks |= t[i].whole_blocks;
		if (i > 0 && !_same_geom(&whole[0], &whole[i])) {
			kvrt_error("kernels: KV tensor %s has a different geometry from %s "
				   "(K/V, heads, head bytes, block size or num_blocks)",
				   t[i].name ? t[i].name : "?", t[0].name ? t[0].name : "?");
			rc = -EINVAL;
			goto err;
		}
	}
	if (inputs > KVRT_COPY_MAX_LAYERS) {
		kvrt_error("kernels: %llu layers (at most %u)", (unsigned long long)inputs,
			   KVRT_COPY_MAX_LAYERS);
		rc = -EINVAL;
		goto err;
	}
	rc = -ENOMEM;
	s->input_layer = calloc(inputs, sizeof(*s->input_layer));
	s->desc = calloc(inputs, sizeof(*s->desc));
	s->layer = calloc(inputs, sizeof(*s->layer));
	origin = calloc(inputs, sizeof(*origin));
	if (!s->input_layer || !s->desc || !s->layer || !origin)
		goto err;
	uint32_t in = 0;
	for (uint32_t i = 0; i < n; i++) {
		for (uint32_t l = 0; l < whole[i].num_layers; l++, in++) {
			struct kvrt_kv_desc one;
			kvrt_kv_desc_layer(&whole[i], l, &one);
			uint32_t found = s->num_layers;
			for (uint32_t u = 0; u < s->num_layers; u++) {
				const struct kvrt_kv_desc *o = &s->desc[u];
				if (_same_storage(o, &one)) {
					found = u;
					break;
				}
				/* Layers of one tensor never overlap (its strides
				 * were checked); across tensors, overlapping spans
				 * that are not the same storage are a caller bug. */
				if (origin[u] != i && one.row.base < o->row.base + o->span &&
				    o->row.base < one.row.base + one.span) {
					kvrt_error("kernels: KV tensors %s and %s overlap in memory without "
						   "being the same storage (a cross-layer tensor must be "
						   "passed whole, with cross_layer set)",
						   t[origin[u]].name ? t[origin[u]].name : "?",
						   t[i].name ? t[i].name : "?");
					rc = -EINVAL;
					goto err;
				}
			}
			if (found == s->num_layers) {
				s->desc[found] = one;
				s->layer[found] = one.row;
				origin[found] = i;
				s->num_layers++;
			}
			s->input_layer[in] = found;
		}
	}
	s->num_inputs = in;
	const struct kvrt_kv_desc *d0 = &s->desc[0];
	s->layout = d0->layout;
	s->elem_size = d0->elem_size;
	s->geom.num_kv = d0->num_kv;
	s->geom.num_heads = d0->num_heads;
	s->geom.head_bytes = d0->head_size * d0->elem_size;
	s->geom.kv_bytes = s->geom.head_bytes * d0->num_heads;
	s->geom.token_bytes = s->geom.kv_bytes * d0->num_kv;
	s->geom.block_size = d0->block_size;
	s->geom.num_slots = (int64_t)d0->num_blocks * d0->block_size;
	s->align_bits = kvrt_copy_layers_bits(s->layer, s->num_layers, &s->geom);
	free(whole);
	free(origin);
	*out = s;
	return 0;
err:
	free(whole);
	free(origin);
	kvrt_kv_set_destroy(s);
	return rc;
}
