/* tests/test_kvrt_config_api.c: every config key a user sets through
 * connector/kvrt.h reaches the engine or refuses to start with the key
 * named: a remote_url of another scheme fails kvrt_worker_create and
 * kvrt_sched_create; the trace key writes a trace file when the worker
 * goes; the stats report the CPU pool's size once registered. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connector/kvrt.h"
#include "runtime/common.h"
#include "tests/test_util.h"

static struct kvrt_options opts(const char *inst, const char **k, const char **v, uint32_t n)
{
	return (struct kvrt_options){.instance = inst, .model_id = "tiny", .dtype = "float32",
				     .block_size = 16, .keys = k, .values = v, .num_keys = n};
}

Test(kvrt_config_api, bad_remote_scheme_refused_with_key_named)
{
	const char *k[] = {"device", "remote_url"};
	const char *bad[] = {"http://127.0.0.1:6379", "memcached://h:1", "redis:/x"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		const char *v[] = {"host", bad[i]};
		struct kvrt_options o = opts("cfg-bad-remote", k, v, 2);
		char err[512];
		memset(err, 'x', sizeof err);
		struct kvrt_worker *w = (void *)1;
		cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), -EINVAL, "%s", bad[i]);
		cr_assert_null(w);
		cr_assert(strstr(err, "remote_url") != NULL, "worker: '%s'", err);
		struct kvrt_sched *s = (void *)1;
		memset(err, 'x', sizeof err);
		cr_assert_eq(kvrt_sched_create(&s, &o, err, sizeof err), -EINVAL, "%s", bad[i]);
		cr_assert_null(s);
		cr_assert(strstr(err, "remote_url") != NULL, "sched: '%s'", err);
	}
	/* The name is free again: nothing was left in the registry. */
	const char *v[] = {"host", "none"};
	struct kvrt_options o = opts("cfg-bad-remote", k, v, 2);
	char err[512];
	struct kvrt_worker *w;
	cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), 0, "%s", err);
	kvrt_worker_destroy(w);
}

Test(kvrt_config_api, trace_key_writes_a_trace)
{
	if (getenv("KVRT_TRACE"))
		cr_skip_test("KVRT_TRACE is set: tracing is the environment's");
	char path[128];
	snprintf(path, sizeof path, "/tmp/kvrt-cfg-trace-%d-%llu.json", (int)getpid(),
		 (unsigned long long)kvrt_now_ns());
	unlink(path);
	const char *k[] = {"device", "trace", "chunk_size", "max_local_cpu_size"};
	const char *v[] = {"host", path, "16", "0.01"};
	struct kvrt_options o = opts("cfg-trace", k, v, 4);
	char err[512];
	struct kvrt_worker *w;
	cr_assert_eq(kvrt_worker_create(&w, &o, err, sizeof err), 0, "%s", err);
	float *kv = malloc(8u * 2 * 16 * 16 * sizeof(float));
	cr_assert_not_null(kv);
	struct kvrt_tensor t = {.data = kv, .layout = KVRT_LAYOUT_BHNC, .elem_size = 4, .ndim = 4,
				.shape = {8, 2, 16, 16}, .stride = {2 * 16 * 16, 16 * 16, 16, 1}};
	cr_assert_eq(kvrt_worker_register(w, &t, 1), 0);
	struct kvrt_stats st;
	memset(&st, 0xa5, sizeof st);
	cr_assert_eq(kvrt_worker_stats(w, &st), 0);
	cr_assert_gt(st.pool_bytes, 0);
	cr_assert_leq(st.pool_used_bytes, st.pool_bytes);
	cr_assert_eq(st.disk_chunks, 0);
	cr_assert_eq(st.chunks, 0);
	cr_assert_eq(access(path, F_OK), -1, "written only when the worker goes");
	kvrt_worker_destroy(w);
	free(kv);
	FILE *f = fopen(path, "r");
	cr_assert_not_null(f, "trace %s not written", path);
	char head[64] = {0};
	size_t n = fread(head, 1, sizeof head - 1, f);
	fclose(f);
	unlink(path);
	cr_assert_gt(n, 0);
	cr_assert(strchr(head, '{') || strchr(head, '['), "not JSON: %s", head);
}
