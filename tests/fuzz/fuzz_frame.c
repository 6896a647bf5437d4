/* tests/fuzz/fuzz_frame.c: libFuzzer target for a worker's whole step
 * (connector/kvrt.h) on bytes that claim to be step metadata: bind (the
 * frame, the codec's message, its request table), then the step's calls as
 * vLLM makes them, on a registered host worker (2 layers, 32 blocks of 16
 * tokens). Bad bytes must be refused or turned into load errors; nothing
 * may touch memory outside the blocks, hang, or leak. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "connector/kvrt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NB 32u
#define BS 16u
#define H 2u
#define D 8u

static struct kvrt_worker *worker(void)
{
	static struct kvrt_worker *w;
	static float *kv[2];
	if (w)
		return w;
	static const char *k[] = {"chunk_size", "max_local_cpu_size", "device"};
	static const char *v[] = {"16", "0.01", "host"};
	struct kvrt_options o = {.instance = "fuzz-frame", .model_id = "tiny", .dtype = "float32",
				 .block_size = BS, .keys = k, .values = v, .num_keys = 3};
	char err[256];
	if (kvrt_worker_create(&w, &o, err, sizeof err))
		abort();
	struct kvrt_tensor t[2];
	for (int l = 0; l < 2; l++) {
		kv[l] = calloc((size_t)NB * H * BS * 2 * D, sizeof(float));
		t[l] = (struct kvrt_tensor){.data = kv[l], .layout = KVRT_LAYOUT_BHNC, .elem_size = 4,
					    .ndim = 4, .shape = {NB, H, BS, 2 * D},
					    .stride = {H * BS * 2 * D, BS * 2 * D, 2 * D, 1}};
	}
	if (kvrt_worker_register(w, t, 2))
		abort();
	return w;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kvrt_worker *w = worker();
	(void)kvrt_worker_bind(w, data, size);
	(void)kvrt_worker_start_load(w);
	for (uint32_t l = 0; l < 2; l++) {
		(void)kvrt_worker_wait_layer(w, l);
		(void)kvrt_worker_save_layer(w, l);
	}
	(void)kvrt_worker_wait_save(w);
	uint8_t buf[4096];
	uint32_t ns, nr, nf;
	(void)kvrt_worker_get_finished(w, buf, sizeof buf, &ns, &nr, &nf);
	int64_t errs[256];
	while (kvrt_worker_load_errors(w, errs, 256) == 256)
		;
	return 0;
}
