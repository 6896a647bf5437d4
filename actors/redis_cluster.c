/* actors/redis_cluster.c: see redis_cluster.h. */
#include "actors/redis_cluster.h"

#include <stdlib.h>
#include <string.h>

#include "actors/redis_key.h"

/* "MOVED 3999 127.0.0.1:6381" / "ASK ...": true when parsed. */
bool kvrt_redis_parse_redirect(const char *s, const char *word, uint32_t *slot, char host[256],
			       int *port)
{
	size_t wl = strlen(word);
	if (strncmp(s, word, wl) || s[wl] != ' ')
		return false;
	char *end;
	unsigned long sl = strtoul(s + wl + 1, &end, 10);
	if (*end != ' ' || sl >= KVRT_REDIS_SLOTS)
		return false;
	const char *hp = end + 1;
	const char *colon = strrchr(hp, ':');
	if (!colon || colon == hp || (size_t)(colon - hp) >= 256)
		return false;
	const char *hs = hp, *he = colon;
	if (*hs == '[' && he[-1] == ']') {
		hs++;
		he--;
	}
	if (he <= hs)
		return false; /* an empty host ("[]:6379") */
	memcpy(host, hs, (size_t)(he - hs));
	host[he - hs] = 0;
	long p = strtol(colon + 1, &end, 10);
	if (*end || p < 1 || p > 65535)
		return false;
	*slot = (uint32_t)sl;
	*port = (int)p;
	return true;
}

uint32_t kvrt_redis_parse_slots(const redisReply *rep, const char *asked_host,
				bool (*range)(void *ctx, uint32_t lo, uint32_t hi, const char *host, int port),
				void *ctx)
{
	uint32_t covered = 0;
	if (!rep || rep->type != REDIS_REPLY_ARRAY)
		return 0;
	for (size_t i = 0; i < rep->elements; i++) {
		const redisReply *e = rep->element[i];
		if (!e || e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
		    e->element[0]->type != REDIS_REPLY_INTEGER ||
		    e->element[1]->type != REDIS_REPLY_INTEGER ||
		    e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
			continue;
		const redisReply *m = e->element[2];
		if (m->element[0]->type != REDIS_REPLY_STRING ||
		    m->element[1]->type != REDIS_REPLY_INTEGER)
			continue;
		long long lo = e->element[0]->integer, hi = e->element[1]->integer;
		long long port = m->element[1]->integer;
		const char *host = m->element[0]->str;
		if (!*host || !strcmp(host, "?"))
			host = asked_host; /* "unknown endpoint": the node we asked */
		if (lo < 0 || hi >= (long long)KVRT_REDIS_SLOTS || lo > hi || port < 1 || port > 65535 ||
		    strlen(host) >= 256)
			continue;
		if (range(ctx, (uint32_t)lo, (uint32_t)hi, host, (int)port))
			covered += (uint32_t)(hi - lo + 1);
	}
	return covered;
}
