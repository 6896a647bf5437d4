/* tests/gpu/test_gpu_copy.c: the CUDA gather/scatter kernel against the host
 * reference engine, byte for byte. Exit 0 pass, 1 fail, 77 skip (no CUDA
 * device: the library then selects the host backend, which this program
 * reports).
 *
 * For every layout, physical order, element size, cross-layer and
 * per-layer tensors, padded strides, random slot tables with -1 holes, and
 * chunks in device memory, in pinned host memory read in place (zero-copy),
 * and at a misaligned address (narrower accesses): the GPU gathers all
 * layers in one launch and scatters layer by layer; the host engine does
 * the same on host copies; the chunk bytes and the whole tensors (outside
 * the slots too) must be identical.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "tests/test_kern_util.h"

static int failures;

#define CHECK(c, ...)                                                          \
	do {                                                                   \
		if (!(c)) {                                                    \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #c); \
			fprintf(stderr, __VA_ARGS__);                          \
			fprintf(stderr, "\n");                                 \
			failures++;                                            \
			return;                                                \
		}                                                              \
	} while (0)

enum chunk_mem { MEM_DEVICE, MEM_PINNED, MEM_PINNED_SKEWED };

static void run_case(struct kvrt_device *d, const struct kt_spec *s, enum chunk_mem cm, uint64_t seed)
{
	char name[200];
	kt_spec_name(s, name, sizeof(name));
	strcat(name, cm == MEM_DEVICE ? " chunks:device" : cm == MEM_PINNED ? " chunks:pinned" : " chunks:pinned+2");
	uint64_t rng = seed;
	struct kvrt_stream *ls = kvrt_device_load_stream(d);
	struct kt_model hm, dm; /* host reference tensors, device tensors */
	kt_model_init(&hm, s);
	kt_model_init(&dm, s);
	for (uint32_t i = 0; i < hm.ntensors; i++) {
		hm.base[i] = malloc(hm.bytes);
		kt_fill(hm.base[i], hm.bytes, &rng);
		CHECK(kvrt_device_alloc(d, dm.bytes, (void **)&dm.base[i]) == 0, "%s", name);
		CHECK(kvrt_stream_memcpy(ls, dm.base[i], hm.base[i], hm.bytes) == 0, "%s", name);
	}
	CHECK(kvrt_stream_sync(ls) == 0, "%s", name);
	kt_model_bind(&hm);
	kt_model_bind(&dm);
	struct kvrt_kv_set *hs, *ds;
	CHECK(kvrt_kv_set_create(&hs, hm.t, hm.ntensors) == 0, "%s", name);
	CHECK(kvrt_kv_set_create(&ds, dm.t, dm.ntensors) == 0, "%s", name);
	struct kt_chunks c;
	kt_chunks_init(&c, 6, 3 * s->bs, hs, s->nb, s->bs, &rng);
	unsigned char **hc = calloc(c.num, sizeof(*hc));   /* host engine's chunks */
	unsigned char **mem = calloc(c.num, sizeof(*mem)); /* GPU side allocations */
	unsigned char **gc = calloc(c.num, sizeof(*gc));   /* GPU side chunk addresses */
	unsigned char *back = NULL;
	size_t maxb = hm.bytes;
	for (uint32_t i = 0; i < c.num; i++)
		maxb = c.bytes[i] > maxb ? c.bytes[i] : maxb;
	back = malloc(maxb);
	size_t skew = cm == MEM_PINNED_SKEWED ? 2 : 0;
	for (uint32_t i = 0; i < c.num; i++) {
		hc[i] = malloc(c.bytes[i]);
		memset(hc[i], 0xA7, c.bytes[i]);
		if (cm == MEM_DEVICE) {
			CHECK(kvrt_device_alloc(d, c.bytes[i], (void **)&mem[i]) == 0, "%s", name);
			gc[i] = mem[i];
		} else {
			CHECK(kvrt_device_alloc_pinned(d, c.bytes[i] + 16, (void **)&mem[i]) == 0, "%s", name);
			void *dp;
			CHECK(kvrt_device_map_host(d, mem[i], &dp) == 0, "%s", name);
			gc[i] = (unsigned char *)dp + skew;
		}
		CHECK(kvrt_stream_memcpy(ls, gc[i], hc[i], c.bytes[i]) == 0, "%s", name);
	}
	/* Plans: the host's over host chunks, the GPU's over GPU chunks. */
	struct kvrt_copy_tok *rows = calloc(c.total + 1, sizeof(*rows));
	struct kvrt_copy_plan hp;
	kvrt_copy_plan_init(&hp, &hs->geom, rows, c.total);
	struct kvrt_device_layers *dl;
	struct kvrt_device_plan *dp;
	CHECK(kvrt_device_layers_create(d, ds, &dl) == 0, "%s", name);
	CHECK(kvrt_device_plan_create(d, ds, c.total + 1, &dp) == 0, "%s", name);
	for (uint32_t i = 0; i < c.num; i++) {
		const int64_t *sl = c.slots + c.slot_off[i];
		CHECK(kvrt_copy_plan_add(&hp, hc[i], c.n[i], c.first[i], c.count[i], sl) == 0, "%s", name);
		CHECK(kvrt_device_plan_add(dp, gc[i], c.n[i], c.first[i], c.count[i], sl) == 0, "%s", name);
	}
	CHECK(kvrt_device_plan_upload(dp, ls) == 0, "%s", name);
	CHECK(kvrt_stream_sync(ls) == 0, "%s", name); /* staging copies of hc[] done */
	uint32_t L = hs->num_layers;

	/* Gather: all layers, one launch. */
	CHECK(kvrt_device_gather(ls, dl, dp, 0, L) == 0, "%s", name);
	kvrt_copy_host(hs->layer, &hs->geom, hp.tok, hp.num, 0, L, KVRT_COPY_GATHER);
	CHECK(kvrt_stream_sync(ls) == 0, "%s", name);
	for (uint32_t i = 0; i < c.num; i++) {
		CHECK(kvrt_stream_memcpy(ls, back, gc[i], c.bytes[i]) == 0, "%s", name);
		CHECK(kvrt_stream_sync(ls) == 0, "%s", name);
		CHECK(memcmp(back, hc[i], c.bytes[i]) == 0, "%s: gather: chunk %u differs", name, i);
	}

	/* Scatter into fresh random tensors: GPU layer by layer, host at once. */
	for (uint32_t i = 0; i < hm.ntensors; i++) {
		kt_fill(hm.base[i], hm.bytes, &rng);
		CHECK(kvrt_stream_memcpy(ls, dm.base[i], hm.base[i], hm.bytes) == 0, "%s", name);
	}
	for (uint32_t l = 0; l < L; l++)
		CHECK(kvrt_device_scatter(ls, dl, dp, l, 1) == 0, "%s", name);
	kvrt_copy_host(hs->layer, &hs->geom, hp.tok, hp.num, 0, L, KVRT_COPY_SCATTER);
	CHECK(kvrt_stream_sync(ls) == 0, "%s", name);
	for (uint32_t i = 0; i < hm.ntensors; i++) {
		CHECK(kvrt_stream_memcpy(ls, back, dm.base[i], hm.bytes) == 0, "%s", name);
		CHECK(kvrt_stream_sync(ls) == 0, "%s", name);
		CHECK(memcmp(back, hm.base[i], hm.bytes) == 0, "%s: scatter: tensor %u differs", name, i);
	}

	kvrt_device_plan_destroy(dp);
	kvrt_device_layers_destroy(dl);
	for (uint32_t i = 0; i < c.num; i++) {
		free(hc[i]);
		if (cm == MEM_DEVICE)
			kvrt_device_free(d, mem[i]);
		else
			kvrt_device_free_pinned(d, mem[i]);
	}
	for (uint32_t i = 0; i < hm.ntensors; i++) {
		free(hm.base[i]);
		kvrt_device_free(d, dm.base[i]);
	}
	free(rows);
	free(back);
	free(hc);
	free(mem);
	free(gc);
	kt_chunks_fini(&c);
	kvrt_kv_set_destroy(hs);
	kvrt_kv_set_destroy(ds);
	kt_model_fini(&hm);
	kt_model_fini(&dm);
}

int main(void)
{
	struct kvrt_device *d;
	int rc = kvrt_device_open(&d, 0);
	/* KVRT_GPU_TEST_ON_HOST=1 runs the program on the host backend: a check
	 * of this program itself on machines without a GPU. */
	bool on_host = getenv("KVRT_GPU_TEST_ON_HOST") != NULL;
	if (rc < 0 || (kvrt_device_kind(d) != KVRT_DEVICE_CUDA && !on_host)) {
		printf("skip: no CUDA device (backend: %s)\n", rc < 0 ? "none" : kvrt_device_name(d));
		if (rc == 0)
			kvrt_device_close(d);
		return 77;
	}
	printf("device: %s\n", kvrt_device_name(d));
	struct kt_spec specs[160];
	uint32_t n = kt_specs(specs, 128);
	/* Llama-like and MLA-like shapes at full size too. */
	specs[n++] = (struct kt_spec){.layout = KVRT_KV_FLASH_ATTN, .order = KT_BFIRST, .layers = 4,
				      .nb = 64, .bs = 16, .heads = 8, .hs = 128, .elem = 2};
	specs[n++] = (struct kt_spec){.layout = KVRT_KV_FLASHINFER, .order = KT_HND, .layers = 4,
				      .nb = 64, .bs = 16, .heads = 8, .hs = 128, .elem = 2};
	specs[n++] = (struct kt_spec){.layout = KVRT_KV_FLASH_ATTN, .cross = true, .layers = 4,
				      .nb = 64, .bs = 16, .heads = 8, .hs = 128, .elem = 1};
	specs[n++] = (struct kt_spec){.layout = KVRT_KV_MLA, .layers = 4, .nb = 64, .bs = 64,
				      .hs = 576, .elem = 2};
	uint32_t cases = 0;
	for (uint32_t i = 0; i < n; i++)
		for (int cm = 0; cm < 3; cm++) {
			int before = failures;
			run_case(d, &specs[i], (enum chunk_mem)cm, 100 + i * 3 + (uint64_t)cm);
			cases++;
			if (failures > before && failures > 10)
				goto out;
		}
out:
	kvrt_device_close(d);
	printf("%u cases, %d failed\n", cases, failures);
	return failures ? 1 : 0;
}
