/* tests/fuzz/fuzz_chunk.c: libFuzzer target for chunk files as the disk tier
 * and Redis values read them (actors/chunk.h): a header decodes or is
 * refused, and verify checks the payload that follows it. */
#include <stddef.h>
#include <stdint.h>

#include "actors/chunk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kvrt_chunk_header h;
	if (kvrt_chunk_header_decode(data, size, &h))
		return 0;
	if (size >= KVRT_CHUNK_HEADER_SIZE)
		(void)kvrt_chunk_verify(data, data + KVRT_CHUNK_HEADER_SIZE, size - KVRT_CHUNK_HEADER_SIZE,
					&h);
	return 0;
}
