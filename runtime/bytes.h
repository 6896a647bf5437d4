/* runtime/bytes.h: little-endian loads and stores at any alignment.
 *
 * Every encoding kvrt writes (chunk headers, keys' hash input, the step
 * metadata, the lookup-socket frames) is little-endian by specification;
 * these helpers make that true on any host, and compile to a single move
 * on little-endian ones. Pure functions, any thread.
 */
#ifndef KVRT_RUNTIME_BYTES_H
#define KVRT_RUNTIME_BYTES_H

#include <stdint.h>

static inline void kvrt_put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static inline void kvrt_put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline void kvrt_put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint16_t kvrt_get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}

static inline uint32_t kvrt_get_le32(const uint8_t *p)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)p[i] << (8 * i);
	return v;
}

static inline uint64_t kvrt_get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

#endif
