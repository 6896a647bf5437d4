/* actors/redis_url.h: remote_url, parsed. redis://[user:password@]host[:port][/db]
 * (a password alone: redis://password@host, as redis-cli -u takes it),
 * redis-cluster://host:port,host:port,... (several hosts also mean a
 * cluster); credentials %XX-decoded; IPv6 hosts in brackets; port 6379 by
 * default. rediss:// (TLS), query options and other schemes are refused
 * with one message naming what is wrong.
 *
 * Threads: pure functions, any thread.
 */
#ifndef KVRT_ACTORS_REDIS_URL_H
#define KVRT_ACTORS_REDIS_URL_H

#include <stdbool.h>
#include <stdint.h>

#define KVRT_REDIS_URL_MAX_HOSTS 64u

struct kvrt_redis_url {
	bool cluster;              /* redis-cluster:// or several hosts */
	char *user, *pass;         /* decoded credentials, or NULL */
	int db;                    /* database (0 for a cluster) */
	uint32_t nhosts;           /* hosts given (the cluster's seeds) */
	char host[KVRT_REDIS_URL_MAX_HOSTS][256];
	int port[KVRT_REDIS_URL_MAX_HOSTS];
};

/* Parse url into *u (zeroed first). 0, -EINVAL or -EPROTONOSUPPORT (one
 * kvrt_error line), -ENOMEM. Clear *u afterwards in every case. */
int kvrt_redis_url_parse(struct kvrt_redis_url *u, const char *url);
/* Wipe the password and free the strings. */
void kvrt_redis_url_clear(struct kvrt_redis_url *u);

#endif
