/* kernels/copy.h: what a gather/scatter moves, and the host engine that
 * moves it.
 *
 * Gather copies the tokens at given slots of vLLM's paged KV tensors into
 * chunk buffers in kvrt's chunk layout; scatter is the reverse. The same
 * three tables drive the host engine here (copy_host.c: the reference, and
 * the engine on machines without a GPU) and the CUDA kernel (copy_cuda.cu):
 *
 *   struct kvrt_copy_layer[]  one row per layer: its paged tensor's base and
 *                             byte strides (built by kernels/layout.h)
 *   struct kvrt_copy_geom     what every layer shares: K/V count, heads,
 *                             bytes per head, tokens per block
 *   struct kvrt_copy_tok[]    the plan: one row per token to move: its slot
 *                             in the paged tensor and its place in a chunk
 *
 * Chunk layout (kvrt's, see actors/chunk.h), for a chunk of n tokens:
 *   layer-major: layer l's range starts at l * n * token_bytes;
 *   inside a layer range: K of all n tokens, then V of all n tokens
 *   (MLA: the n latent vectors); inside a token: heads in order, each
 *   head_bytes long (logical order, whatever the paged layout: NHD and HND
 *   tensors of one model give the same chunk bytes).
 *   So token t, layer l, kv k, head h, byte b sits at
 *   ((l * num_kv + k) * n + t) * kv_bytes + h * head_bytes + b.
 *
 * The kernels move bytes: element size only shows in head_bytes.
 *
 * This header is C and C++ (nvcc includes it): it includes no kvrt header.
 *
 * Threads: the plan functions work on a plan its one owner thread holds;
 * kvrt_copy_host() is reentrant (it touches only what its arguments name).
 */
#ifndef KVRT_KERNELS_COPY_H
#define KVRT_KERNELS_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Most layers a set may hold (vLLM's largest models have < 200). */
#define KVRT_COPY_MAX_LAYERS 4096u

/* One layer's paged tensor as the kernels read it. All strides in bytes. */
struct kvrt_copy_layer {
	uint64_t base;    /* address of element 0 (a device address under CUDA) */
	int64_t s_kv;     /* K -> V (0 for MLA) */
	int64_t s_block;  /* block b -> b+1 */
	int64_t s_tok;    /* token offset o -> o+1 inside a block */
	int64_t s_head;   /* head h -> h+1 (0 for MLA) */
};

/* Geometry every layer of a set shares. */
struct kvrt_copy_geom {
	uint32_t num_kv;      /* 2 (K and V) or 1 (MLA latent) */
	uint32_t num_heads;   /* KV heads (1 for MLA) */
	uint32_t head_bytes;  /* head_size * elem_size: one contiguous run */
	uint32_t kv_bytes;    /* num_heads * head_bytes: one token's K (or V) */
	uint32_t token_bytes; /* num_kv * kv_bytes: one token of one layer */
	uint32_t block_size;  /* tokens per paged block */
	int64_t num_slots;    /* num_blocks * block_size: slots are < this */
};

/* One token of a plan. */
struct kvrt_copy_tok {
	int64_t slot;          /* block * block_size + offset; < 0: skip */
	uint64_t chunk;        /* address (device-visible under CUDA) of this
				* token's K in layer 0 of its chunk, i.e.
				* chunk base + t * kv_bytes */
	uint32_t chunk_tokens; /* n of its chunk: layer l, kv k starts at
				* (l * num_kv + k) * n * kv_bytes */
	uint32_t _pad;         /* zero */
};

enum kvrt_copy_dir {
	KVRT_COPY_GATHER = 0,  /* paged tensor -> chunks (save) */
	KVRT_COPY_SCATTER = 1, /* chunks -> paged tensor (load) */
};

/* A plan under construction: a caller-owned array of tokens. */
struct kvrt_copy_plan {
	struct kvrt_copy_tok *tok; /* [cap] storage the caller provides */
	uint32_t num;              /* rows used */
	uint32_t cap;              /* rows available */
	uint32_t skipped;          /* slots of -1 left out since the last reset */
	uint32_t _pad;
	uint64_t addr_bits;        /* OR of every chunk address added (alignment) */
	struct kvrt_copy_geom geom; /* the set's geometry (a copy) */
};

/* Start an empty plan over storage[cap] for layers of geometry *g. */
void kvrt_copy_plan_init(struct kvrt_copy_plan *p, const struct kvrt_copy_geom *g,
			 struct kvrt_copy_tok *storage, uint32_t cap);

/* Forget every row (the storage is reused). */
void kvrt_copy_plan_reset(struct kvrt_copy_plan *p);

/* Add tokens first .. first+count-1 of a chunk of chunk_tokens tokens whose
 * payload starts at chunk (a device-visible address under CUDA), to move
 * from/to slots[0 .. count-1]. Slots of -1 are skipped (not added).
 * 0; -EINVAL (a slot < -1 or >= num_slots, first + count > chunk_tokens, a
 * NULL chunk; nothing added); -ENOSPC (not enough room; nothing added). */
int kvrt_copy_plan_add(struct kvrt_copy_plan *p, const void *chunk, uint32_t chunk_tokens,
		       uint32_t first, uint32_t count, const int64_t *slots);

/* Largest power of two <= 16 that divides every bit pattern in bits
 * (addresses and strides ORed together): the widest access allowed. */
static inline uint32_t kvrt_copy_width(uint64_t bits)
{
	uint32_t w = 16;
	while (w > 1 && (bits & (w - 1)))
		w >>= 1;
	return w;
}

/* Alignment bits of a layer table (bases and strides ORed with head_bytes). */
uint64_t kvrt_copy_layers_bits(const struct kvrt_copy_layer *layers, uint32_t num_layers,
			       const struct kvrt_copy_geom *g);

/* The host engine: move layers [layer_first, layer_first + layer_count) of
 * every token of tok[0 .. ntok-1] in direction dir. Arguments are trusted
 * (kvrt_copy_plan_add validated the slots, layout.c the layers). Copies runs
 * of contiguous bytes with memcpy: a token's K of an NHD layout at once, and
 * consecutive slots of one block as one run when the layout allows. */
void kvrt_copy_host(const struct kvrt_copy_layer *layers, const struct kvrt_copy_geom *g,
		    const struct kvrt_copy_tok *tok, uint32_t ntok, uint32_t layer_first,
		    uint32_t layer_count, enum kvrt_copy_dir dir);

#ifdef __cplusplus
}
#endif

#endif
