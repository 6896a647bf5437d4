/* tests/fuzz/fuzz_redis.c: libFuzzer target for what kvrt reads of Redis
 * (actors/redis_url.h, redis_cluster.h): the first byte picks remote_url
 * parsing, a MOVED/ASK redirect, or RESP bytes read by hiredis' own reader
 * and handed to the CLUSTER SLOTS parser. */
#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "actors/redis_cluster.h"
#include "actors/redis_url.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* hiredis' reader with the array bound kvrt's remote actor applies. */
static redisReplyObjectFunctions bounded;
static void *(*orig_array)(const redisReadTask *, int);

static void *bounded_array(const redisReadTask *t, int elements)
{
	return kvrt_redis_array_ok(elements) ? orig_array(t, elements) : NULL;
}

static bool take(void *ctx, uint32_t lo, uint32_t hi, const char *host, int port)
{
	(void)ctx;
	return lo <= hi && host[0] != '\0' && port > 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!size)
		return 0;
	char *s = malloc(size);
	if (!s)
		return 0;
	memcpy(s, data + 1, size - 1);
	s[size - 1] = '\0';
	switch (data[0] % 3) {
	case 0: {
		struct kvrt_redis_url u;
		(void)kvrt_redis_url_parse(&u, s);
		kvrt_redis_url_clear(&u);
		break;
	}
	case 1: {
		uint32_t slot;
		char host[256];
		int port;
		(void)kvrt_redis_parse_redirect(s, "MOVED", &slot, host, &port);
		(void)kvrt_redis_parse_redirect(s, "ASK", &slot, host, &port);
		break;
	}
	default: {
		redisReader *rd = redisReaderCreate();
		if (rd && !orig_array) {
			bounded = *rd->fn;
			orig_array = bounded.createArray;
			bounded.createArray = bounded_array;
		}
		if (rd)
			rd->fn = &bounded;
		if (rd && redisReaderFeed(rd, (const char *)data + 1, size - 1) == REDIS_OK) {
			void *rep = NULL;
			while (redisReaderGetReply(rd, &rep) == REDIS_OK && rep) {
				(void)kvrt_redis_parse_slots(rep, "asked", take, NULL);
				freeReplyObject(rep);
				rep = NULL;
			}
		}
		if (rd)
			redisReaderFree(rd);
		break;
	}
	}
	free(s);
	return 0;
}
