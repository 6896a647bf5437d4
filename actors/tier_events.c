/* actors/tier_events.c: the tier-event ring (see tier_events.h).
 *
 * Threads: kvrt_tier_events_diff on the evict actor's thread only,
 * kvrt_tier_events_take on one consumer thread at a time.
 */
#include "actors/tier_events.h"

#include <ck_ring.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>


CK_RING_PROTOTYPE(kvrt_tier_event, kvrt_tier_event)

struct kvrt_tier_events {
	struct ck_ring ring;           /* SPSC indices (ck pads its own heads) */
	struct kvrt_tier_event *slots; /* ring storage */
	_Atomic uint64_t dropped;      /* full-ring drops */
};

int kvrt_tier_events_create(struct kvrt_tier_events **out, uint32_t size)
{
	*out = NULL;
	if (size > (1u << 24))
		return -EINVAL;
	uint32_t n = 64;
	while (n < size)
		n <<= 1;
	struct kvrt_tier_events *te = calloc(1, sizeof(*te));
	if (!te)
		return -ENOMEM;
	te->slots = calloc(n, sizeof(*te->slots));
	if (!te->slots) {
		free(te);
		return -ENOMEM;
	}
	ck_ring_init(&te->ring, n);
	*out = te;
	return 0;
}

void kvrt_tier_events_destroy(struct kvrt_tier_events *te)
{
	if (!te)
		return;
	free(te->slots);
	free(te);
}

void kvrt_tier_events_diff(struct kvrt_tier_events *te, struct kvrt_chunk_key key, uint8_t was,
			   uint8_t now)
{
	if (!te || was == now)
		return;
	for (uint8_t bit = 1; bit <= KVRT_MEDIUM_REMOTE; bit <<= 1) {
		if ((was ^ now) & bit) {
			struct kvrt_tier_event ev = {.key_lo = key.lo, .key_hi = key.hi,
						     .kind = (now & bit) ? KVRT_TIER_EVENT_STORED
									 : KVRT_TIER_EVENT_REMOVED,
						     .medium = bit};
			if (!ck_ring_enqueue_spsc_kvrt_tier_event(&te->ring, te->slots, &ev))
				atomic_fetch_add_explicit(&te->dropped, 1, memory_order_relaxed);
		}
	}
}

size_t kvrt_tier_events_take(struct kvrt_tier_events *te, struct kvrt_tier_event *out, size_t max)
{
	size_t n = 0;
	while (te && n < max && ck_ring_dequeue_spsc_kvrt_tier_event(&te->ring, te->slots, &out[n]))
		n++;
	return n;
}

uint64_t kvrt_tier_events_dropped(const struct kvrt_tier_events *te)
{
	return te ? atomic_load_explicit(&te->dropped, memory_order_relaxed) : 0;
}
