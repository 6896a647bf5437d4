/* actors/redis_key.h: how kvrt names a chunk in Redis, and which Redis
 * Cluster hash slot a key falls in (CRC16-XMODEM of the key, or of its
 * {hash tag}, modulo 16384), as the cluster specifies.
 *
 * Threads: pure functions, any thread (the CRC table is built once,
 * published with release/acquire).
 */
#ifndef KVRT_ACTORS_REDIS_KEY_H
#define KVRT_ACTORS_REDIS_KEY_H

#include <stddef.h>
#include <stdint.h>

#include "actors/chunk.h"

/* Length of a Redis key (without terminator) and the buffer that holds one. */
#define KVRT_REMOTE_KEY_LEN 56u
#define KVRT_REMOTE_KEY_BUF 64u
/* Redis Cluster's hash slots. */
#define KVRT_REDIS_SLOTS 16384u

/* The Redis key of a chunk: KVRT_REMOTE_KEY_LEN characters and a NUL. */
void kvrt_remote_key_name(uint64_t namespace_hash, struct kvrt_chunk_key key,
			  char out[KVRT_REMOTE_KEY_BUF]);

/* The cluster hash slot (0..16383) of a key of len bytes ({tag} rules). */
uint32_t kvrt_remote_key_slot(const char *key, size_t len);

#endif
