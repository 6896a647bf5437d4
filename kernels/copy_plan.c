/* kernels/copy_plan.c: building copy plans (see copy.h). Validates every slot
 * as it is added, so the engines that run a plan trust it. */
#include <errno.h>
#include <string.h>

#include "kernels/copy.h"
#include "runtime/common.h"

void kvrt_copy_plan_init(struct kvrt_copy_plan *p, const struct kvrt_copy_geom *g,
			 struct kvrt_copy_tok *storage, uint32_t cap)
{
	memset(p, 0, sizeof(*p));
	p->tok = storage;
	p->cap = storage ? cap : 0;
	p->geom = *g;
}

void kvrt_copy_plan_reset(struct kvrt_copy_plan *p)
{
	p->num = 0;
	p->skipped = 0;
	p->addr_bits = 0;
}

int kvrt_copy_plan_add(struct kvrt_copy_plan *p, const void *chunk, uint32_t chunk_tokens,
		       uint32_t first, uint32_t count, const int64_t *slots)
{
	if (count == 0)
		return 0;
	if (!chunk || !slots || chunk_tokens == 0 || first > chunk_tokens ||
	    count > chunk_tokens - first)
		return -EINVAL;
	uint32_t keep = 0;
	for (uint32_t i = 0; i < count; i++) {
		if (slots[i] < -1 || slots[i] >= p->geom.num_slots)
			return -EINVAL;
		keep += slots[i] >= 0;
	}
	if (keep > p->cap - p->num)
		return -ENOSPC;
	uint64_t kvb = p->geom.kv_bytes;
	uint64_t base = (uint64_t)(uintptr_t)chunk;
	struct kvrt_copy_tok *out = p->tok + p->num;
	for (uint32_t i = 0; i < count; i++) {
		if (slots[i] < 0)
			continue;
		out->slot = slots[i];
		out->chunk = base + (uint64_t)(first + i) * kvb;
		out->chunk_tokens = chunk_tokens;
		out->_pad = 0;
		out++;
	}
	p->num += keep;
	p->skipped += count - keep;
	/* Every address the engines form on the chunk side is the base plus
	 * multiples of kv_bytes (itself a multiple of head_bytes, which the
	 * layer bits hold): the base's bits decide the access width. */
	p->addr_bits |= base | kvb;
	return 0;
}
