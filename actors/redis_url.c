/* actors/redis_url.c: see redis_url.h. */
#include "actors/redis_url.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"

static int _hex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode [p, p+n) into a new string; NULL on a bad escape / ENOMEM. */
static char *_pct_decode(const char *p, size_t n, bool *bad)
{
	char *o = malloc(n + 1);
	size_t j = 0;
	if (!o)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '%') {
			int h1 = i + 1 < n ? _hex(p[i + 1]) : -1;
			int h2 = i + 2 < n ? _hex(p[i + 2]) : -1;
			if (h1 < 0 || h2 < 0) {
				*bad = true;
				free(o);
				return NULL;
			}
			o[j++] = (char)(h1 << 4 | h2);
			i += 2;
		} else {
			o[j++] = p[i];
		}
	}
	o[j] = 0;
	return o;
}

/* Parse "host[:port]" of n bytes (IPv6 in brackets). */
static int _parse_hostport(const char *p, size_t n, char host[256], int *port)
{
	const char *colon = NULL;
	const char *hs = p, *he;
	if (n && p[0] == '[') {
		const char *rb = memchr(p, ']', n);
		if (!rb) {
			kvrt_error("remote_url: unterminated '[' in an IPv6 host");
			return -EINVAL;
		}
		hs = p + 1;
		he = rb;
		if (rb + 1 < p + n) {
			if (rb[1] != ':') {
				kvrt_error("remote_url: expected ':' after ']'");
				return -EINVAL;
			}
			colon = rb + 1;
		}
	} else {
		colon = memchr(p, ':', n);
		he = colon ? colon : p + n;
	}
	if (he == hs || (size_t)(he - hs) >= 256) {
		kvrt_error("remote_url: a host is empty or too long");
		return -EINVAL;
	}
	memcpy(host, hs, (size_t)(he - hs));
	host[he - hs] = 0;
	*port = 6379;
	if (colon) {
		const char *ps = colon + 1, *pe = p + n;
		long v = 0;
		if (ps == pe || pe - ps > 5) {
			kvrt_error("remote_url: port of %s must be 1..65535", host);
			return -EINVAL;
		}
		for (const char *q = ps; q < pe; q++) {
			if (*q < '0' || *q > '9') {
				kvrt_error("remote_url: port of %s must be a number 1..65535", host);
				return -EINVAL;
			}
			v = v * 10 + (*q - '0');
		}
		if (v < 1 || v > 65535) {
			kvrt_error("remote_url: port of %s must be 1..65535", host);
			return -EINVAL;
		}
		*port = (int)v;
	}
	return 0;
}

int kvrt_redis_url_parse(struct kvrt_redis_url *u, const char *url)
{
	memset(u, 0, sizeof(*u));
	if (!url || !*url) {
		kvrt_error("remote_url is empty: expected redis://host:port or redis-cluster://host:port,...");
		return -EINVAL;
	}
	const char *p;
	if (!strncmp(url, "rediss://", 9)) {
		kvrt_error("remote_url: rediss:// (TLS) is not supported: this kvrt is built with hiredis %d.%d, which has no TLS (hiredis_ssl needs hiredis >= 1.0); use redis:// on a trusted network or a TLS tunnel",
			   HIREDIS_MAJOR, HIREDIS_MINOR);
		return -EPROTONOSUPPORT;
	} else if (!strncmp(url, "redis-cluster://", 16)) {
		p = url + 16;
		u->cluster = true;
	} else if (!strncmp(url, "redis://", 8)) {
		p = url + 8;
	} else {
		kvrt_error("remote_url: unknown scheme (expected redis://, redis-cluster://; rediss:// is not supported)");
		return -EINVAL;
	}
	if (strpbrk(p, "?#")) {
		kvrt_error("remote_url: query options (?...) are not supported");
		return -EINVAL;
	}
	/* credentials */
	const char *at = strrchr(p, '@');
	if (at) {
		const char *colon = memchr(p, ':', (size_t)(at - p));
		bool bad = false;
		if (colon) {
			if (colon > p)
				u->user = _pct_decode(p, (size_t)(colon - p), &bad);
			if (!bad)
				u->pass = _pct_decode(colon + 1, (size_t)(at - colon - 1), &bad);
		} else {
			/* redis://password@host: a password alone (as redis-cli -u does) */
			u->pass = _pct_decode(p, (size_t)(at - p), &bad);
		}
		if (bad) {
			kvrt_error("remote_url: bad %%XX escape in the user or password");
			return -EINVAL;
		}
		if ((colon && colon > p && !u->user) || !u->pass)
			return -ENOMEM;
		p = at + 1;
	}
	/* hosts, then /db */
	const char *slash = strchr(p, '/');
	size_t hl = slash ? (size_t)(slash - p) : strlen(p);
	u->db = 0;
	if (slash) {
		const char *d = slash + 1;
		long v = 0;
		if (!*d || strlen(d) > 5) {
			kvrt_error("remote_url: database after '/' must be a number 0..65535");
			return -EINVAL;
		}
		for (; *d; d++) {
			if (*d < '0' || *d > '9') {
				kvrt_error("remote_url: database after '/' must be a number 0..65535");
				return -EINVAL;
			}
			v = v * 10 + (*d - '0');
		}
		u->db = (int)v;
	}
	const char *e = p + hl;
	while (p < e) {
		const char *comma = memchr(p, ',', (size_t)(e - p));
		const char *he = comma ? comma : e;
		if (u->nhosts == KVRT_REDIS_URL_MAX_HOSTS) {
			kvrt_error("remote_url: more than %u hosts", KVRT_REDIS_URL_MAX_HOSTS);
			return -EINVAL;
		}
		int rc = _parse_hostport(p, (size_t)(he - p), u->host[u->nhosts], &u->port[u->nhosts]);
		if (rc)
			return rc;
		u->nhosts++;
		p = comma ? comma + 1 : e;
		if (comma && p == e) {
			kvrt_error("remote_url: trailing ',' after the hosts");
			return -EINVAL;
		}
	}
	if (!u->nhosts) {
		kvrt_error("remote_url: no host");
		return -EINVAL;
	}
	if (u->nhosts > 1)
		u->cluster = true;
	if (u->cluster && u->db) {
		kvrt_error("remote_url: Redis Cluster has only database 0 (drop the /%d)", u->db);
		return -EINVAL;
	}
	return 0;
}

void kvrt_redis_url_clear(struct kvrt_redis_url *u)
{
	if (u->pass)
		memset(u->pass, 0, strlen(u->pass));
	free(u->user);
	free(u->pass);
	u->user = u->pass = NULL;
}
