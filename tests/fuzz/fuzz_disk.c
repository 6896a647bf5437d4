/* tests/fuzz/fuzz_disk.c: libFuzzer target for the disk tier's restart
 * scan (actors/disk.c: kvrt_disk_open reads a directory another run left):
 * the input is a set of files, written into a fresh tier directory, then
 * the tier is opened (scan, re-index through on_found, over-budget
 * deletion) and closed.
 *
 * Input: records of [kind:1][len:2 LE][bytes]. kind % 6 names the file:
 *   0  <xx>/<key>.kvc, the key and subdirectory taken from the header the
 *      bytes carry (a chunk file as the tier writes it, or close to it);
 *   1  the same name in another subdirectory;
 *   2  <xx>/<key>.tmp (a write a crash interrupted);
 *   3  a .kvc name from the bytes' first 16 bytes, hex (any key);
 *   4  a file at the top level named by the bytes (sanitised);
 *   5  a directory where a chunk file would be.
 * The namespace hash is the first header's, so headers can match it. */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "actors/chunk.h"
#include "actors/disk.h"
#include "runtime/actor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char root[128];
static struct kvrt_actor *sink;
static uint64_t found;

static void sink_handle(struct kvrt_actor *a, struct kvrt_msg *m)
{
	(void)a;
	(void)m;
}

static const struct kvrt_actor_ops sink_ops = {.handle = sink_handle};

static void on_found(void *ctx, const struct kvrt_chunk_header *h)
{
	(void)ctx;
	found += h->num_tokens;
}

static void rm_tree(const char *path)
{
	DIR *d = opendir(path);
	if (!d) {
		unlink(path);
		return;
	}
	struct dirent *e;
	char p[512];
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(p, sizeof p, "%s/%s", path, e->d_name);
		struct stat st;
		if (!lstat(p, &st) && S_ISDIR(st.st_mode))
			rm_tree(p);
		else
			unlink(p);
	}
	closedir(d);
	rmdir(path);
}

static void put(const char *dir, const char *sub, const char *name, const uint8_t *b, size_t n, bool as_dir)
{
	char p[512];
	if (sub) {
		snprintf(p, sizeof p, "%s/%s", dir, sub);
		mkdir(p, 0700);
		snprintf(p, sizeof p, "%s/%s/%s", dir, sub, name);
	} else {
		snprintf(p, sizeof p, "%s/%s", dir, name);
	}
	if (as_dir) {
		mkdir(p, 0700);
		return;
	}
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		return;
	if (n && write(fd, b, n) < 0) {
		/* a short file is an input like any other */
	}
	close(fd);
}

static void cleanup(void)
{
	rm_tree(root);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!sink) {
		/* $TMPDIR: a tmpfs (/dev/shm) runs several times faster than a
		 * disk, since every input is a directory of files. */
		const char *tmp = getenv("TMPDIR");
		snprintf(root, sizeof root, "%s/kvrt-fuzz-disk-%d", tmp && tmp[0] ? tmp : "/tmp",
			 (int)getpid());
		mkdir(root, 0700);
		atexit(cleanup);
		if (kvrt_actor_create(&sink, &(struct kvrt_actor_config){.name = "sink", .mailbox_size = 1024,
									      .ops = &sink_ops}))
			abort();
	}
	char dir[160];
	snprintf(dir, sizeof dir, "%s/tier", root);
	rm_tree(dir);
	mkdir(dir, 0700);
	uint64_t ns = 0;
	bool have_ns = false;
	for (size_t i = 0; i + 3 <= size && i < 64 * 1024;) {
		uint8_t kind = data[i] % 6;
		size_t n = (size_t)data[i + 1] | (size_t)data[i + 2] << 8;
		i += 3;
		if (n > size - i)
			n = size - i;
		const uint8_t *b = data + i;
		i += n;
		struct kvrt_chunk_header h;
		bool hdr = kvrt_chunk_header_decode(b, n, &h) == 0;
		if (hdr && !have_ns) {
			ns = h.namespace_hash;
			have_ns = true;
		}
		char sub[8], name[64];
		uint64_t hi = hdr ? h.key.hi : 0, lo = hdr ? h.key.lo : 0;
		if (kind == 3 && n >= 16) {
			memcpy(&hi, b, 8);
			memcpy(&lo, b + 8, 8);
		}
		snprintf(sub, sizeof sub, "%02x", (unsigned)((hi >> 56) ^ (kind == 1 ? 1u : 0u)));
		snprintf(name, sizeof name, "%016" PRIx64 "%016" PRIx64 "%s", hi, lo, kind == 2 ? ".tmp" : ".kvc");
		if (kind == 4) {
			size_t k = 0;
			for (; k < n && k < 40; k++)
				name[k] = (b[k] >= 'a' && b[k] <= 'z') || (b[k] >= '0' && b[k] <= '9') || b[k] == '.' ? (char)b[k] : 'x';
			name[k] = 0;
			if (!k || !strcmp(name, ".") || !strcmp(name, ".."))
				continue;
			put(dir, NULL, name, b, n, false);
		} else {
			put(dir, sub, name, b, n, kind == 5);
		}
	}
	struct kvrt_disk *d = NULL;
	struct kvrt_disk_config cfg = {.dir = dir, .budget_bytes = 1u << 20, .namespace_hash = ns,
				       .notify = sink, .msg_base = 100, .on_found = on_found};
	if (kvrt_disk_open(&d, &cfg) == 0)
		kvrt_disk_close(d);
	return 0;
}
