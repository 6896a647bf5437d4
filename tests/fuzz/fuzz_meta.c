/* tests/fuzz/fuzz_meta.c: libFuzzer target for the step metadata codec
 * (connector/meta.h): any bytes decode to a view or -EBADMSG, and every
 * item of an accepted view can be walked (its keys and blocks read) within
 * the buffer. */
#include <stddef.h>
#include <stdint.h>

#include "connector/meta.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kvrt_meta_view v;
	if (kvrt_meta_decode(data, size, &v))
		return 0;
	uint64_t sink = 0;
	for (int l = 0; l < 4; l++) {
		struct kvrt_meta_iter it;
		struct kvrt_meta_item item;
		for (kvrt_meta_iter_init(&it, &v, (enum kvrt_meta_list)l); kvrt_meta_iter_next(&it, &item);) {
			sink += item.id_hash + item.token_start + item.token_end;
			for (uint32_t k = 0; k < item.num_keys; k++)
				sink += kvrt_meta_item_key(&item, k).lo;
			for (uint32_t b = 0; b < item.num_blocks; b++)
				sink += kvrt_meta_item_block(&item, b);
			if (item.id_len)
				sink += (uint8_t)item.id[item.id_len - 1];
		}
	}
	return sink == 42 ? 0 : 0;
}
