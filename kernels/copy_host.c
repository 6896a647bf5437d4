/* kernels/copy_host.c: the host gather/scatter engine (see copy.h): the
 * reference the CUDA kernel is checked against, and the engine of the host
 * device backend. Copies runs of contiguous bytes with memcpy:
 *  - a token's K (or V) at once when its heads are packed (NHD layouts:
 *    s_head == head_bytes), else head by head (HND: head_bytes per run);
 *  - consecutive slots of one block that are also consecutive in one chunk
 *    as one run, when tokens are packed too (s_tok == kv_bytes: NHD
 *    FlashAttention/FlashInfer, MLA), up to block_size tokens per memcpy.
 */
#include <string.h>

#include "kernels/copy.h"
#include "runtime/common.h"

uint64_t kvrt_copy_layers_bits(const struct kvrt_copy_layer *layers, uint32_t num_layers,
			       const struct kvrt_copy_geom *g)
{
	uint64_t bits = g->head_bytes;
	for (uint32_t l = 0; l < num_layers; l++) {
		const struct kvrt_copy_layer *L = &layers[l];
		bits |= L->base | (uint64_t)L->s_kv | (uint64_t)L->s_block | (uint64_t)L->s_tok |
			(uint64_t)L->s_head;
	}
	return bits;
}

/* Copy n bytes between the paged side p and the chunk side c. */
static inline void _move(enum kvrt_copy_dir dir, unsigned char *p, unsigned char *c, size_t n)
{
	if (dir == KVRT_COPY_GATHER)
		memcpy(c, p, n);
	else
		memcpy(p, c, n);
}

/* Tokens j, j+1, ... that continue tok[j] as one contiguous run on both
 * sides: next slot of the same block and next token of the same chunk. */
static uint32_t _run_length(const struct kvrt_copy_tok *tok, uint32_t j, uint32_t ntok,
			    const struct kvrt_copy_geom *g)
{
	const struct kvrt_copy_tok *e = &tok[j];
	uint32_t off = (uint32_t)(e->slot % g->block_size);
	uint32_t room = g->block_size - off; /* slots left in this block */
	uint32_t m = 1;
	while (m < room && j + m < ntok) {
		const struct kvrt_copy_tok *x = &tok[j + m];
		if (x->slot != e->slot + m || x->chunk_tokens != e->chunk_tokens ||
		    x->chunk != e->chunk + (uint64_t)m * g->kv_bytes)
			break;
		m++;
	}
	return m;
}

void kvrt_copy_host(const struct kvrt_copy_layer *layers, const struct kvrt_copy_geom *g,
		    const struct kvrt_copy_tok *tok, uint32_t ntok, uint32_t layer_first,
		    uint32_t layer_count, enum kvrt_copy_dir dir)
{
	const uint64_t kvb = g->kv_bytes, hb = g->head_bytes;
	for (uint32_t l = layer_first; l < layer_first + layer_count; l++) {
		const struct kvrt_copy_layer *L = &layers[l];
		const bool heads_packed = g->num_heads == 1 || L->s_head == (int64_t)hb;
		const bool toks_packed = heads_packed && L->s_tok == (int64_t)kvb;
		for (uint32_t j = 0; j < ntok;) {
			const struct kvrt_copy_tok *e = &tok[j];
			if (e->slot < 0) { /* plans never hold these; be safe */
				j++;
				continue;
			}
			uint32_t m = toks_packed ? _run_length(tok, j, ntok, g) : 1;
			int64_t blk = e->slot / g->block_size, off = e->slot % g->block_size;
			unsigned char *p = (unsigned char *)(uintptr_t)L->base + blk * L->s_block +
					   off * L->s_tok;
			uint64_t kv_stride = (uint64_t)e->chunk_tokens * kvb;
			unsigned char *c = (unsigned char *)(uintptr_t)(e->chunk +
									(uint64_t)l * g->num_kv * kv_stride);
			for (uint32_t k = 0; k < g->num_kv; k++) {
				unsigned char *pk = p + k * L->s_kv, *ck = c + k * kv_stride;
				if (heads_packed) {
					_move(dir, pk, ck, m * kvb);
					continue;
				}
				for (uint32_t h = 0; h < g->num_heads; h++)
					_move(dir, pk + h * L->s_head, ck + h * hb, hb);
			}
			j += m;
		}
	}
}
