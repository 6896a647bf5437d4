/* kernels/layout.h: KV layout descriptors. Turns the facts of vLLM's KV
 * tensors (base pointer, shape, strides, element size: what a torch tensor
 * tells) into the kernels' layer table (struct kvrt_copy_layer, copy.h),
 * validating them first.
 *
 * Layouts vLLM hands a connector (logical shapes, per layer):
 *
 *   KVRT_KV_FLASH_ATTN  (2, num_blocks, block_size, num_kv_heads, head_size)
 *   KVRT_KV_FLASHINFER  (num_blocks, 2, block_size, num_kv_heads, head_size)
 *                       (also Triton)
 *   KVRT_KV_MLA         (num_blocks, block_size, head_size)
 *   KVRT_KV_CPU         (2, num_blocks, num_kv_heads, block_size, head_size)
 *
 * HND variants keep the logical shape and permute block_size and heads
 * physically: the strides say so, and nothing here assumes contiguity. Only
 * the head_size dimension must have stride 1 (every vLLM backend has it so);
 * the kernels copy head_bytes = head_size * elem_size as one run.
 *
 * Cross-layer (register_cross_layers_kv_cache): one tensor for all layers,
 * logical shape (num_layers, <one of the shapes above>), whatever its
 * physical order (vLLM puts num_blocks first). It expands into num_layers
 * layers.
 *
 * A set (struct kvrt_kv_set) is the layers of one model on one device:
 * layers that share storage (same base and strides: KV sharing between
 * layers) are kept once, in the order they first appear; that order is the
 * chunk's layer order. Every layer of a set has the same geometry (K/V
 * count, heads, head bytes, block size, num_blocks); strides may differ.
 *
 * Bad input (impossible shapes, overlapping strides, layers of different
 * geometry, layers that overlap without being the same storage) returns
 * -EINVAL after one kvrt_error line naming the tensor and the problem.
 *
 * Threads: pure functions, any thread. A set is immutable once created.
 */
#ifndef KVRT_KERNELS_LAYOUT_H
#define KVRT_KERNELS_LAYOUT_H

#include "kernels/copy.h"
#include "runtime/common.h"

enum kvrt_kv_layout {
	KVRT_KV_FLASH_ATTN = 1, /* (2, nb, bs, h, d) */
	KVRT_KV_FLASHINFER = 2, /* (nb, 2, bs, h, d), FlashInfer and Triton */
	KVRT_KV_MLA = 3,        /* (nb, bs, d) */
	KVRT_KV_CPU = 4,        /* (2, nb, h, bs, d), vLLM's CPU attention */
};

#define KVRT_KV_MAX_DIMS 6

/* A KV tensor as vLLM (torch) describes it. */
struct kvrt_kv_tensor {
	void *data;                       /* data_ptr(): element [0, 0, ...] */
	enum kvrt_kv_layout layout;       /* its backend's logical shape */
	bool cross_layer;                 /* shape[0] is num_layers */
	uint32_t elem_size;               /* element_size(): 1, 2, 4 or 8 */
	uint32_t ndim;                    /* len(shape): 3/5, +1 when cross_layer */
	int64_t shape[KVRT_KV_MAX_DIMS];  /* logical shape */
	int64_t stride[KVRT_KV_MAX_DIMS]; /* stride(), in elements */
	const char *name;                 /* layer name for messages, or NULL */
	bool whole_blocks;                /* the backend lays out a block's interior its
					   * own way (vLLM's CPU attention: every K row
					   * of a block and head, then every V row, packed
					   * per ISA): the shape only tells where blocks
					   * are, so only whole blocks may be copied */
};

/* One layer, validated. */
struct kvrt_kv_desc {
	enum kvrt_kv_layout layout; /* logical layout it came from */
	bool hnd;                   /* heads outside tokens physically (informational) */
	uint32_t elem_size;         /* bytes per element */
	uint32_t num_blocks;        /* blocks in the tensor */
	uint32_t block_size;        /* tokens per block */
	uint32_t num_heads;         /* KV heads (1 for MLA) */
	uint32_t head_size;         /* elements per head */
	uint32_t num_kv;            /* 2, or 1 for MLA */
	uint32_t num_layers;        /* > 1 only for a cross-layer tensor's desc */
	int64_t s_layer;            /* bytes between layers (cross-layer), else 0 */
	struct kvrt_copy_layer row; /* base and byte strides (of layer 0) */
	uint64_t span;              /* bytes from base to one past the last byte */
};

/* Validate t and describe it: 0 or -EINVAL (logged). */
int kvrt_kv_desc_init(struct kvrt_kv_desc *d, const struct kvrt_kv_tensor *t);

/* Layer l of a (cross-layer) descriptor, as a one-layer descriptor. */
void kvrt_kv_desc_layer(const struct kvrt_kv_desc *d, uint32_t l, struct kvrt_kv_desc *out);

/* The layers of one model. */
struct kvrt_kv_set {
	uint32_t num_layers;           /* distinct layers: the chunk's layers */
	uint32_t num_inputs;           /* layers as named (cross-layer expanded) */
	uint32_t *input_layer;         /* [num_inputs]: input -> distinct layer */
	struct kvrt_kv_desc *desc;     /* [num_layers] */
	struct kvrt_copy_layer *layer; /* [num_layers]: the kernels' table */
	struct kvrt_copy_geom geom;    /* shared geometry */
	enum kvrt_kv_layout layout;    /* of the first layer (informational) */
	bool whole_blocks;             /* some layer's block interior is opaque
					* (kvrt_kv_tensor.whole_blocks): copies of
					* a block must cover all of it */
	uint32_t elem_size;            /* bytes per element */
	uint64_t align_bits;           /* kvrt_copy_layers_bits() of the table */
};

/* Describe n tensors (in vLLM's layer order) as one set.
 * 0, -EINVAL (logged), -ENOMEM. Free with kvrt_kv_set_destroy. */
int kvrt_kv_set_create(struct kvrt_kv_set **out, const struct kvrt_kv_tensor *t, uint32_t n);

void kvrt_kv_set_destroy(struct kvrt_kv_set *s);

/* Bytes of a chunk of n tokens of this set (all layers). */
static inline uint64_t kvrt_kv_set_chunk_bytes(const struct kvrt_kv_set *s, uint32_t n)
{
	return (uint64_t)s->num_layers * n * s->geom.token_bytes;
}

/* "flash_attn", "flashinfer", "mla", "cpu", or "?". */
const char *kvrt_kv_layout_name(enum kvrt_kv_layout l);

#endif
