/* tests/test_redis_proto.c: what kvrt reads of Redis without a server
 * (actors/redis_cluster.h, redis_url.h): MOVED / ASK redirects, CLUSTER
 * SLOTS replies (built by hiredis' own reader from RESP bytes, as on the
 * wire), remote_url. Malformed input is refused or skipped, never
 * trusted. */
#include <criterion/criterion.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <string.h>

#include "actors/redis_cluster.h"
#include "actors/redis_key.h"
#include "actors/redis_url.h"

Test(redis_proto, redirects)
{
	uint32_t slot;
	char host[256];
	int port;
	cr_assert(kvrt_redis_parse_redirect("MOVED 3999 127.0.0.1:6381", "MOVED", &slot, host, &port));
	cr_assert(slot == 3999 && port == 6381 && !strcmp(host, "127.0.0.1"));
	cr_assert(kvrt_redis_parse_redirect("ASK 16383 [::1]:7000", "ASK", &slot, host, &port));
	cr_assert(slot == 16383 && port == 7000 && !strcmp(host, "::1"));
	static const char *bad[] = {
		"MOVED 16384 h:1",      /* slot out of range */
		"MOVED 1 h:0",          /* port 0 */
		"MOVED 1 h:65536",      /* port too large */
		"MOVED 1 h:12x",        /* trailing garbage */
		"MOVED 1 :6379",        /* empty host */
		"MOVED 1 []:6379",      /* empty bracketed host */
		"MOVED 1 h",            /* no port */
		"MOVED x h:1",          /* no slot */
		"MOVEDX 1 h:1",         /* another word */
		"ASK 1 h:1",            /* not the word asked for */
		"",
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
		cr_assert_not(kvrt_redis_parse_redirect(bad[i], "MOVED", &slot, host, &port), "%s", bad[i]);
	char longhost[400] = "MOVED 1 ";
	memset(longhost + 8, 'a', 300);
	strcpy(longhost + 308, ":1");
	cr_assert_not(kvrt_redis_parse_redirect(longhost, "MOVED", &slot, host, &port));
}

struct ranges {
	uint32_t n, lo[8], hi[8];
	char host[8][256];
	int port[8];
};

static bool take(void *ctx, uint32_t lo, uint32_t hi, const char *host, int port)
{
	struct ranges *r = ctx;
	r->lo[r->n] = lo;
	r->hi[r->n] = hi;
	strcpy(r->host[r->n], host);
	r->port[r->n++] = port;
	return true;
}

/* A reply object from RESP bytes, through hiredis' reader. */
static redisReply *reply_of(const char *resp)
{
	redisReader *rd = redisReaderCreate();
	cr_assert_not_null(rd);
	cr_assert_eq(redisReaderFeed(rd, resp, strlen(resp)), REDIS_OK);
	void *rep = NULL;
	cr_assert_eq(redisReaderGetReply(rd, &rep), REDIS_OK);
	cr_assert_not_null(rep, "incomplete RESP in the test");
	redisReaderFree(rd);
	return rep;
}

Test(redis_proto, cluster_slots)
{
	/* Two good ranges (one with an unknown endpoint "?"), then entries a
	 * broken or hostile node could send: each is skipped. */
	redisReply *rep = reply_of(
		"*7\r\n"
		"*3\r\n:0\r\n:8191\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n"
		"*3\r\n:8192\r\n:16383\r\n*3\r\n$1\r\n?\r\n:7001\r\n$3\r\nabc\r\n"
		"*3\r\n:5\r\n:16384\r\n*2\r\n$1\r\nh\r\n:7002\r\n"   /* hi out of range */
		"*3\r\n:9\r\n:3\r\n*2\r\n$1\r\nh\r\n:7002\r\n"       /* lo > hi */
		"*3\r\n:1\r\n:2\r\n*2\r\n$1\r\nh\r\n:0\r\n"          /* port 0 */
		"*2\r\n:1\r\n:2\r\n"                                  /* no node */
		":42\r\n");                                           /* not an array */
	struct ranges r = {0};
	cr_assert_eq(kvrt_redis_parse_slots(rep, "asked.host", take, &r), KVRT_REDIS_SLOTS);
	cr_assert_eq(r.n, 2u);
	cr_assert(r.lo[0] == 0 && r.hi[0] == 8191 && !strcmp(r.host[0], "127.0.0.1") && r.port[0] == 7000);
	cr_assert(r.lo[1] == 8192 && r.hi[1] == 16383 && !strcmp(r.host[1], "asked.host") &&
		  r.port[1] == 7001);
	freeReplyObject(rep);
	rep = reply_of("-ERR This instance has cluster support disabled\r\n");
	cr_assert_eq(kvrt_redis_parse_slots(rep, "h", take, &r), 0u);
	freeReplyObject(rep);
}

Test(redis_proto, urls)
{
	struct kvrt_redis_url u;
	cr_assert_eq(kvrt_redis_url_parse(&u, "redis://us%40er:p%3Ass@[::1]:7000/3"), 0);
	cr_assert(!u.cluster && u.db == 3 && u.nhosts == 1 && u.port[0] == 7000);
	cr_assert(!strcmp(u.host[0], "::1") && !strcmp(u.user, "us@er") && !strcmp(u.pass, "p:ss"));
	kvrt_redis_url_clear(&u);
	cr_assert_eq(kvrt_redis_url_parse(&u, "redis-cluster://a:1,b,c:3"), 0);
	cr_assert(u.cluster && u.nhosts == 3 && u.port[1] == 6379 && !strcmp(u.host[2], "c"));
	kvrt_redis_url_clear(&u);
	static const char *bad[] = {"", "http://h", "redis://", "redis://h:0", "redis://h:99999",
				    "redis://h:1/x", "redis://h?x=1", "redis://a,b/2", "redis://[::1",
				    "redis://%zz@h", "redis://h,", "redis-cluster://a:1,,b:2"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		cr_assert_neq(kvrt_redis_url_parse(&u, bad[i]), 0, "%s accepted", bad[i]);
		kvrt_redis_url_clear(&u);
	}
	cr_assert_eq(kvrt_redis_url_parse(&u, "rediss://h:1"), -EPROTONOSUPPORT);
	kvrt_redis_url_clear(&u);
}

/* A reply announcing a huge array is refused before hiredis allocates its
 * pointers (remote.c's reader hook applies kvrt_redis_array_ok): found by
 * fuzz_redis, "*616380312" made the reader allocate 4.9 GB. */
static void *(*orig_array)(const redisReadTask *, int);

static void *bounded_array(const redisReadTask *t, int elements)
{
	return kvrt_redis_array_ok(elements) ? orig_array(t, elements) : NULL;
}

Test(redis_proto, huge_arrays_refused)
{
	cr_assert(kvrt_redis_array_ok(-1) && kvrt_redis_array_ok(0) &&
		  kvrt_redis_array_ok(KVRT_REDIS_MAX_ARRAY));
	cr_assert_not(kvrt_redis_array_ok(KVRT_REDIS_MAX_ARRAY + 1));
	cr_assert_not(kvrt_redis_array_ok(616380312));
	redisReader *rd = redisReaderCreate();
	cr_assert_not_null(rd);
	redisReplyObjectFunctions fns = *rd->fn;
	orig_array = fns.createArray;
	fns.createArray = bounded_array;
	rd->fn = &fns;
	const char *hostile = "*616380312\r\n";
	cr_assert_eq(redisReaderFeed(rd, hostile, strlen(hostile)), REDIS_OK);
	void *rep = NULL;
	cr_assert_eq(redisReaderGetReply(rd, &rep), REDIS_ERR, "the huge array was accepted");
	cr_assert_null(rep);
	redisReaderFree(rd);
}
