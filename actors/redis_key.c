/* actors/redis_key.c: see redis_key.h. */
#include "actors/redis_key.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>

void kvrt_remote_key_name(uint64_t ns, struct kvrt_chunk_key k, char out[KVRT_REMOTE_KEY_BUF])
{
	snprintf(out, KVRT_REMOTE_KEY_BUF, "kvrt:1:%016" PRIx64 ":%016" PRIx64 "%016" PRIx64, ns,
		 k.hi, k.lo);
}

/* CRC16-CCITT (XMODEM: poly 0x1021, init 0), as Redis Cluster specifies;
 * byte-wise with a table built on first use (racing builders write the same
 * values; the flag is release/acquire so a reader sees a complete table). */
static uint16_t _crc_tab[256];
static _Atomic bool _crc_ready;

static uint16_t _crc16(const char *p, size_t n)
{
	if (!atomic_load_explicit(&_crc_ready, memory_order_acquire)) {
		for (unsigned v = 0; v < 256; v++) {
			uint16_t c = (uint16_t)(v << 8);
			for (int b = 0; b < 8; b++)
				c = (c & 0x8000) ? (uint16_t)(c << 1 ^ 0x1021) : (uint16_t)(c << 1);
			__atomic_store_n(&_crc_tab[v], c, __ATOMIC_RELAXED);
		}
		atomic_store_explicit(&_crc_ready, true, memory_order_release);
	}
	uint16_t crc = 0;
	for (size_t i = 0; i < n; i++)
		crc = (uint16_t)(crc << 8) ^
		      __atomic_load_n(&_crc_tab[(uint8_t)(crc >> 8 ^ (uint8_t)p[i])], __ATOMIC_RELAXED);
	return crc;
}

uint32_t kvrt_remote_key_slot(const char *key, size_t len)
{
	/* Hash tag: the bytes between the first '{' and the next '}' when that
	 * is not empty. */
	size_t s = 0;
	while (s < len && key[s] != '{')
		s++;
	if (s < len) {
		size_t e = s + 1;
		while (e < len && key[e] != '}')
			e++;
		if (e < len && e > s + 1)
			return _crc16(key + s + 1, e - s - 1) & (KVRT_REDIS_SLOTS - 1);
	}
	return _crc16(key, len) & (KVRT_REDIS_SLOTS - 1);
}
