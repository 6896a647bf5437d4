/* connector/saves_done.c: see saves_done.h. */
#include "connector/saves_done.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/common.h"

#define _MAGIC 0x317661737472766bull /* "kvrtsav1" read as a little-endian u64 */
#define _FILE_BYTES 4096u
#define _RETRY_NS 100000000ull /* a missing rank's file is looked for again after 100 ms */

struct _file {
	_Atomic uint64_t magic; /* _MAGIC once ready (release) */
	_Atomic uint64_t step;
};

struct kvrt_saves_pub {
	struct _file *map;
	char *path;
	dev_t dev;
	ino_t ino;
};

struct _rank {
	char *path;
	const struct _file *map; /* NULL: not mapped yet */
	uint64_t next_try_ns;
};

struct kvrt_saves_view {
	uint32_t n;
	struct _rank r[];
};

int kvrt_saves_path(char *buf, size_t cap, const char *sock_path)
{
	size_t n = strlen(sock_path);
	size_t base = n >= 5 && !strcmp(sock_path + n - 5, ".sock") ? n - 5 : n;
	if (base + sizeof(".saves") > cap)
		return -ENAMETOOLONG;
	memmove(buf, sock_path, base); /* buf may be sock_path */
	memcpy(buf + base, ".saves", sizeof(".saves"));
	return 0;
}

int kvrt_saves_pub_create(struct kvrt_saves_pub **out, const char *path, _Atomic uint64_t **slot)
{
	*out = NULL;
	struct kvrt_saves_pub *p = calloc(1, sizeof(*p));
	if (!p || !(p->path = strdup(path))) {
		free(p);
		return -ENOMEM;
	}
	/* A new inode: a scheduler that mapped a stale file keeps that one. */
	if (unlink(path) && errno != ENOENT) {
		int rc = -errno;
		free(p->path);
		free(p);
		return rc;
	}
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	int rc = fd < 0 ? -errno : 0;
	struct stat st;
	if (!rc && (ftruncate(fd, _FILE_BYTES) || fstat(fd, &st)))
		rc = -errno;
	void *m = MAP_FAILED;
	if (!rc && (m = mmap(NULL, _FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED)
		rc = -errno;
	if (fd >= 0)
		close(fd);
	if (rc) {
		if (fd >= 0)
			unlink(path);
		free(p->path);
		free(p);
		return rc;
	}
	p->map = m;
	p->dev = st.st_dev;
	p->ino = st.st_ino;
	atomic_store_explicit(&p->map->step, 0, memory_order_relaxed);
	/* release: a reader that sees the magic sees the step's zero. */
	atomic_store_explicit(&p->map->magic, _MAGIC, memory_order_release);
	*slot = &p->map->step;
	*out = p;
	return 0;
}

void kvrt_saves_pub_unlink(struct kvrt_saves_pub *p)
{
	if (!p || !p->path)
		return;
	struct stat st;
	if (!lstat(p->path, &st) && st.st_dev == p->dev && st.st_ino == p->ino)
		unlink(p->path);
	free(p->path);
	p->path = NULL;
}

void kvrt_saves_pub_close(struct kvrt_saves_pub *p)
{
	if (!p)
		return;
	kvrt_saves_pub_unlink(p);
	munmap(p->map, _FILE_BYTES);
	free(p);
}

int kvrt_saves_view_create(struct kvrt_saves_view **out, const char *const *paths, uint32_t n)
{
	*out = NULL;
	struct kvrt_saves_view *v = calloc(1, sizeof(*v) + n * sizeof(v->r[0]));
	if (!v)
		return -ENOMEM;
	v->n = n;
	for (uint32_t i = 0; i < n; i++) {
		if (!(v->r[i].path = strdup(paths[i]))) {
			kvrt_saves_view_destroy(v);
			return -ENOMEM;
		}
	}
	*out = v;
	return 0;
}

/* Map rank r's file when it is there and kvrt's (a regular file of this
 * user, full size, the magic). */
static void try_map(struct _rank *r)
{
	uint64_t now = kvrt_now_ns();
	if (now < r->next_try_ns)
		return;
	r->next_try_ns = now + _RETRY_NS;
	int fd = open(r->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return;
	struct stat st;
	void *m = MAP_FAILED;
	if (!fstat(fd, &st) && S_ISREG(st.st_mode) && st.st_uid == geteuid() &&
	    st.st_size >= (off_t)_FILE_BYTES)
		m = mmap(NULL, _FILE_BYTES, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED)
		return;
	struct _file *f = m;
	if (atomic_load_explicit(&f->magic, memory_order_acquire) != _MAGIC) {
		munmap(m, _FILE_BYTES); /* not kvrt's, or not ready yet */
		return;
	}
	r->map = f;
}

uint64_t kvrt_saves_view_min(struct kvrt_saves_view *v)
{
	uint64_t lo = UINT64_MAX;
	for (uint32_t i = 0; i < v->n; i++) {
		struct _rank *r = &v->r[i];
		if (!r->map)
			try_map(r);
		if (!r->map)
			return 0;
		uint64_t s = atomic_load_explicit(&((struct _file *)r->map)->step, memory_order_acquire);
		if (s < lo)
			lo = s;
	}
	return v->n ? lo : 0;
}

void kvrt_saves_view_destroy(struct kvrt_saves_view *v)
{
	if (!v)
		return;
	for (uint32_t i = 0; i < v->n; i++) {
		if (v->r[i].map)
			munmap((void *)v->r[i].map, _FILE_BYTES);
		free(v->r[i].path);
	}
	free(v);
}
