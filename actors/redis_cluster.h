/* actors/redis_cluster.h: Redis Cluster's protocol as kvrt reads it: the
 * redirects a node answers (MOVED / ASK) and the CLUSTER SLOTS reply, parsed
 * with every field checked (hostile or broken replies are skipped, never
 * trusted). The remote actor (remote.c) acts on the result.
 *
 * Threads: pure functions, any thread.
 */
#ifndef KVRT_ACTORS_REDIS_CLUSTER_H
#define KVRT_ACTORS_REDIS_CLUSTER_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stdint.h>

/* Most elements of an array reply kvrt accepts (CLUSTER SLOTS of a full
 * cluster has at most 16384 ranges): hiredis' reader allocates an array's
 * pointers from its announced length, so "*616380312" alone would make it
 * allocate 4.9 GB; a longer array is refused (the connection drops). */
#define KVRT_REDIS_MAX_ARRAY 65536
static inline bool kvrt_redis_array_ok(long long elements)
{
	return elements >= -1 && elements <= KVRT_REDIS_MAX_ARRAY;
}

/* An error reply "WORD <slot> <host>:<port>" (WORD: "MOVED" or "ASK"; IPv6
 * hosts may be in brackets): true and the fields when it is one. */
bool kvrt_redis_parse_redirect(const char *s, const char *word, uint32_t *slot, char host[256],
			       int *port);

/* Call range(ctx, lo, hi, host, port) for each well-formed range of a
 * CLUSTER SLOTS reply (an empty or "?" host is asked_host, the node that
 * answered); malformed entries are skipped. Returns the slots covered by
 * ranges range() accepted (it returns false to refuse one). */
uint32_t kvrt_redis_parse_slots(const redisReply *rep, const char *asked_host,
				bool (*range)(void *ctx, uint32_t lo, uint32_t hi, const char *host, int port),
				void *ctx);

#endif
