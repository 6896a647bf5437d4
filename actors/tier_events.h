/* actors/tier_events.h: what became loadable from which tier, and what
 * stopped being, as a bounded queue of events (KV events for routers).
 *
 * Owns: a single-producer single-consumer ring of struct kvrt_tier_event
 * (ck_ring SPSC) and the count of events dropped because it was full.
 *
 * Threads: the evict actor pushes (it is the index's only writer, so it
 * sees every tier change in order); one consumer thread takes (the
 * connector's worker thread, once a step). A full ring drops the new
 * event and counts it: the producer never waits.
 */
#ifndef KVRT_ACTORS_TIER_EVENTS_H
#define KVRT_ACTORS_TIER_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/chunk.h"

enum kvrt_tier_event_kind {
	KVRT_TIER_EVENT_STORED = 1,  /* the chunk is now loadable from the tier */
	KVRT_TIER_EVENT_REMOVED = 2, /* ... no longer is */
};

/* Media bits: where a chunk is loadable from. */
enum {
	KVRT_MEDIUM_CPU = 1u << 0,    /* the CPU pool */
	KVRT_MEDIUM_DISK = 1u << 1,   /* the local disk tier */
	KVRT_MEDIUM_REMOTE = 1u << 2, /* Redis */
};

struct kvrt_tier_event {
	uint64_t key_lo, key_hi; /* the chunk's key */
	uint8_t kind;            /* enum kvrt_tier_event_kind */
	uint8_t medium;          /* one KVRT_MEDIUM_* bit */
	uint8_t pad[6];          /* zero */
};

struct kvrt_tier_events;

/* size: entries, rounded up to a power of two (>= 64), one of them kept
 * free by the ring. 0, -EINVAL, -ENOMEM. */
int kvrt_tier_events_create(struct kvrt_tier_events **out, uint32_t size);
/* NULL ok. No push or take in flight. */
void kvrt_tier_events_destroy(struct kvrt_tier_events *te);

/* Producer: one event per medium bit that differs between was and now
 * (STORED for bits gained, REMOVED for bits lost). te NULL: nothing. */
void kvrt_tier_events_diff(struct kvrt_tier_events *te, struct kvrt_chunk_key key, uint8_t was,
			   uint8_t now);

/* Consumer: up to max events, oldest first; how many were taken. */
size_t kvrt_tier_events_take(struct kvrt_tier_events *te, struct kvrt_tier_event *out, size_t max);

/* Events dropped because the ring was full (any thread, relaxed). */
uint64_t kvrt_tier_events_dropped(const struct kvrt_tier_events *te);

#endif
