/* tests/fuzz/fuzz_lsock.c: libFuzzer target for the lookup-socket wire
 * (connector/lookup_socket.h), as the server and the client read frames off
 * a stream: sized, then decoded, frame after frame; a malformed one ends
 * the stream (the connection would close). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "connector/lookup_socket.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t off = 0;
	while (off < size) {
		size_t total = 0;
		int rc = kvrt_lsock_frame_size(data + off, size - off, &total);
		if (rc || total == 0 || total > size - off)
			break; /* malformed, or needs more bytes */
		struct kvrt_lsock_frame f;
		if (kvrt_lsock_decode(data + off, total, &f))
			break;
		if (f.type == KVRT_LSOCK_LOOKUP && f.num_tokens) {
			uint32_t last;
			memcpy(&last, f.tokens + 4 * (size_t)(f.num_tokens - 1), 4);
			(void)last;
		}
		off += total;
	}
	return 0;
}
