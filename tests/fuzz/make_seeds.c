/* tests/fuzz/make_seeds.c: seed corpora for the fuzz targets, made by kvrt
 * itself as a real run makes them: make_seeds DIR writes DIR/<target>/<n>.
 * frame and meta: the step metadata a scheduler built for a worker of this
 * process (a save, then a load with a delayed free and a preemption);
 * lsock: lookup, release, answer and reset frames; chunk: a header and payload as
 * the disk tier writes them; config: key=value lines and a YAML file;
 * redis: a URL, a redirect, a CLUSTER SLOTS reply. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "actors/chunk.h"
#include "connector/kvrt.h"
#include "connector/lookup_socket.h"

static const char *dir;

static void put(const char *target, int n, const void *p, size_t len)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, target);
	mkdir(path, 0755);
	snprintf(path, sizeof path, "%s/%s/%d", dir, target, n);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(p, 1, len, f) != len) {
		perror(path);
		exit(1);
	}
	fclose(f);
}

static void put_str(const char *target, int n, const char *s)
{
	put(target, n, s, strlen(s));
}

#define BS 16u
#define T 40u

static void frames(void)
{
	static float kv[2][32 * 2 * BS * 16];
	static const char *k[] = {"chunk_size", "max_local_cpu_size", "device"};
	static const char *v[] = {"16", "0.01", "host"};
	struct kvrt_options o = {.instance = "seeds", .model_id = "tiny", .dtype = "float32",
				 .block_size = BS, .keys = k, .values = v, .num_keys = 3};
	char err[256];
	struct kvrt_worker *w;
	struct kvrt_sched *s;
	if (kvrt_worker_create(&w, &o, err, sizeof err) || kvrt_sched_create(&s, &o, err, sizeof err)) {
		fprintf(stderr, "make_seeds: %s\n", err);
		exit(1);
	}
	struct kvrt_tensor t[2];
	for (int l = 0; l < 2; l++)
		t[l] = (struct kvrt_tensor){.data = kv[l], .layout = KVRT_LAYOUT_BHNC, .elem_size = 4,
					    .ndim = 4, .shape = {32, 2, BS, 16},
					    .stride = {2 * BS * 16, BS * 16, 16, 1}};
	if (kvrt_worker_register(w, t, 2))
		exit(1);
	uint32_t tok[T];
	for (uint32_t i = 0; i < T; i++)
		tok[i] = 100 + i;
	int32_t ablk[3] = {1, 2, 3}, bblk[3] = {7, 8, 9};
	struct kvrt_request a = {.id = "A", .id_len = 1, .tokens = tok, .num_tokens = T,
				 .total_tokens = T, .prompt_tokens = T};
	uint32_t n;
	bool as, delay;
	kvrt_sched_lookup(s, &a, 0, &n, &as);
	kvrt_sched_after_alloc(s, &a, ablk, 3, 0, 0);
	struct kvrt_sched_req sr = {.req = a, .num_computed = T, .block_ids = ablk, .num_blocks = 3};
	const void *m;
	size_t len;
	int seed = 0;
	if (!kvrt_sched_build_meta(s, &(struct kvrt_sched_step){&sr, 1, NULL, 0}, &m, &len)) {
		put("frame", seed, m, len);
		put("meta", seed++, (const uint8_t *)m + 16, len - 16);
		kvrt_worker_bind(w, m, len);
		kvrt_worker_wait_save(w);
	}
	kvrt_worker_flush(w);
	kvrt_sched_finished(s, "A", 1, &delay);
	struct kvrt_request b = a;
	b.id = "B";
	kvrt_sched_lookup(s, &b, 0, &n, &as);
	kvrt_sched_after_alloc(s, &b, bblk, 3, 0, n);
	struct kvrt_bytes pre = {"C", 1};
	if (!kvrt_sched_build_meta(s, &(struct kvrt_sched_step){NULL, 0, &pre, 1}, &m, &len)) {
		put("frame", seed, m, len);
		put("meta", seed++, (const uint8_t *)m + 16, len - 16);
		kvrt_worker_bind(w, m, len);
		kvrt_worker_start_load(w);
	}
	kvrt_worker_flush(w);
	kvrt_sched_finished(s, "B", 1, &delay);
	kvrt_sched_destroy(s);
	kvrt_worker_destroy(w);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: make_seeds DIR\n");
		return 2;
	}
	dir = argv[1];
	mkdir(dir, 0755);
	frames();
	uint8_t buf[1024];
	uint32_t tok[5] = {1, 2, 3, 4, 5};
	size_t l1 = kvrt_lsock_encode_lookup(buf, sizeof buf, 7, 42, 99, tok, 5);
	size_t l2 = kvrt_lsock_encode_release(buf + l1, sizeof buf - l1, 42);
	struct kvrt_lookup_result res = {.tokens_now = 16, .tokens = 32, .chunks = 2, .chunks_now = 1};
	size_t l3 = kvrt_lsock_encode_answer(buf + l1 + l2, sizeof buf - l1 - l2, 7, 0, &res);
	size_t l4 = kvrt_lsock_encode_reset(buf + l1 + l2 + l3, sizeof buf - l1 - l2 - l3, 8);
	put("lsock", 0, buf, l1 + l2 + l3 + l4);
	struct kvrt_chunk_header h = {.format_version = KVRT_CHUNK_FORMAT_VERSION,
				      .header_size = KVRT_CHUNK_HEADER_SIZE, .namespace_hash = 5,
				      .key = {1, 2}, .shape = {.num_layers = 2, .token_bytes = 8,
							      .elem_size = 2, .layout = 2},
				      .num_tokens = 4};
	h.payload_len = kvrt_chunk_payload_bytes(&h.shape, h.num_tokens);
	uint8_t chunk[KVRT_CHUNK_HEADER_SIZE + 64] = {0};
	kvrt_chunk_header_encode(&h, chunk);
	for (size_t i = 0; i < h.payload_len; i++)
		chunk[KVRT_CHUNK_HEADER_SIZE + i] = (uint8_t)i;
	kvrt_chunk_header_set_checksum(chunk, kvrt_chunk_checksum(chunk, chunk + KVRT_CHUNK_HEADER_SIZE,
								   h.payload_len));
	put("chunk", 0, chunk, KVRT_CHUNK_HEADER_SIZE + h.payload_len);
	/* disk: a tier directory (tests/fuzz/fuzz_disk.c's records): the chunk
	 * under its name, the same as a crashed write's .tmp, a stray file */
	uint8_t tier[3 * (KVRT_CHUNK_HEADER_SIZE + 64 + 3)];
	size_t dl = 0, cl = KVRT_CHUNK_HEADER_SIZE + h.payload_len;
	for (uint8_t kind = 0; kind <= 4; kind += 2) {
		const uint8_t *b = kind == 4 ? (const uint8_t *)"lock" : chunk;
		size_t n = kind == 4 ? 4 : cl;
		tier[dl++] = kind;
		tier[dl++] = (uint8_t)n;
		tier[dl++] = (uint8_t)(n >> 8);
		memcpy(tier + dl, b, n);
		dl += n;
	}
	put("disk", 0, tier, dl);
	put_str("config", 0, "chunk_size=256\nmax_local_cpu_size=2.5\ncache_policy=S3-FIFO\n"
			     "local_disk=file:///tmp/x\nremote_url=redis://h:6379/1\nmailbox_size=1024\n");
	put_str("config", 1, "# kvrt\nchunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n"
			     "lmcache.save_unfull_chunk: false\ntrace: \"/tmp/t-%p.json\"\n");
	put_str("redis", 0, "\x03redis://us%40er:pw@[::1]:7000/3");
	put_str("redis", 1, "\x01MOVED 3999 127.0.0.1:6381");
	put_str("redis", 2, "\x02*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n");
	return 0;
}
