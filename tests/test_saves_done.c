/* tests/test_saves_done.c: connector/saves_done.h, the saves-done files a
 * scheduler in another process reads: the path beside a rank's socket, a
 * published value seen through a read-only view, the minimum over ranks,
 * a missing or foreign file read as 0 (never "done"), a stale file replaced
 * by a new worker, unlink only of the file this worker created. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connector/saves_done.h"

static void tmpdir(char *d, size_t cap)
{
	snprintf(d, cap, "/tmp/kvrt-test-saves-XXXXXX");
	cr_assert(mkdtemp(d));
}

Test(saves_done, path_beside_the_socket)
{
	char p[64];
	cr_assert_eq(kvrt_saves_path(p, sizeof p, "/run/kvrt/e1/rank3.sock"), 0);
	cr_assert_str_eq(p, "/run/kvrt/e1/rank3.saves");
	char in_place[64] = "/x/rank0.sock";
	cr_assert_eq(kvrt_saves_path(in_place, sizeof in_place, in_place), 0);
	cr_assert_str_eq(in_place, "/x/rank0.saves");
	cr_assert_eq(kvrt_saves_path(p, 10, "/run/kvrt/e1/rank3.sock"), -ENAMETOOLONG);
}

Test(saves_done, published_min_over_ranks_missing_is_zero)
{
	char d[64], p0[128], p1[128];
	tmpdir(d, sizeof d);
	snprintf(p0, sizeof p0, "%s/rank0.saves", d);
	snprintf(p1, sizeof p1, "%s/rank1.saves", d);
	/* A file from a dead worker, and a foreign one: replaced / not read. */
	int fd = open(p0, O_CREAT | O_WRONLY, 0600);
	cr_assert(fd >= 0);
	cr_assert_eq(write(fd, "garbage!", 8), 8);
	close(fd);
	const char *paths[2] = {p0, p1};
	struct kvrt_saves_view *v;
	cr_assert_eq(kvrt_saves_view_create(&v, paths, 2), 0);
	cr_assert_eq(kvrt_saves_view_min(v), 0u, "no rank published");
	struct kvrt_saves_pub *a, *b;
	_Atomic uint64_t *sa, *sb;
	cr_assert_eq(kvrt_saves_pub_create(&a, p0, &sa), 0);
	atomic_store(sa, 7);
	cr_assert_eq(kvrt_saves_view_min(v), 0u, "rank 1 missing counts as 0");
	cr_assert_eq(kvrt_saves_pub_create(&b, p1, &sb), 0);
	atomic_store(sb, 9);
	usleep(120000); /* a missing rank is looked for again after 100 ms */
	cr_assert_eq(kvrt_saves_view_min(v), 7u);
	atomic_store(sa, 12);
	cr_assert_eq(kvrt_saves_view_min(v), 9u);
	/* Unlink removes only the file this pub created. */
	kvrt_saves_pub_unlink(a);
	cr_assert_neq(access(p0, F_OK), 0);
	struct kvrt_saves_pub *c;
	_Atomic uint64_t *sc;
	cr_assert_eq(kvrt_saves_pub_create(&c, p1, &sc), 0); /* replaces b's file */
	kvrt_saves_pub_unlink(b);
	cr_assert_eq(access(p1, F_OK), 0, "b unlinked a file it did not create");
	cr_assert_eq(kvrt_saves_view_min(v), 9u, "a mapped file keeps its value after unlink");
	kvrt_saves_view_destroy(v);
	kvrt_saves_pub_close(a);
	kvrt_saves_pub_close(b);
	kvrt_saves_pub_close(c);
	cr_assert_neq(access(p1, F_OK), 0);
	cr_assert_eq(rmdir(d), 0, "files left behind");
}
