/* connector/config.c: see config.h. */
#include "connector/config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/log.h"

#define YAML_MAX_BYTES (1u << 20) /* largest config file */
#define YAML_MAX_LINE 4096u       /* longest line */

/* The key table's parse rules, in the same order as kvrt_config_keys[]. */
struct _key_rule {
	size_t offset; /* of the field in struct kvrt_config */
	double min;    /* INT/GB/FLOAT: smallest accepted */
	double max;    /* INT/GB/FLOAT: largest accepted */
	bool min_open; /* FLOAT: min itself refused */
	bool pow2;     /* INT: must be a power of two */
};

#define OFF(f) offsetof(struct kvrt_config, f)

KVRT_API const struct kvrt_config_key kvrt_config_keys[KVRT_CONFIG_NUM_KEYS] = {
	{"chunk_size", KVRT_CONFIG_INT, "256", "an integer in [1, 65536]",
	 "tokens per chunk: the unit of keys, lookups, loads and saves", "chunk_size"},
	{"local_cpu", KVRT_CONFIG_BOOL, "true", "true/false, 1/0, yes/no, on/off",
	 "keep chunks in the CPU pool (false: the pool only stages chunks for disk/remote)",
	 "local_cpu"},
	{"max_local_cpu_size", KVRT_CONFIG_GB, "5.0", "a number of GB in [0, 1048576], e.g. 5 or 2.5",
	 "CPU pool size per worker, in GB (2^30 bytes)", "max_local_cpu_size"},
	{"local_disk", KVRT_CONFIG_PATH, "none", "a directory: file:///path, or a plain path; none",
	 "directory of the local disk tier", "local_disk"},
	{"max_local_disk_size", KVRT_CONFIG_GB, "0", "a number of GB in [0, 1048576], e.g. 100",
	 "disk tier budget in GB; the disk tier is on when > 0 and local_disk is set",
	 "max_local_disk_size"},
	{"remote_url", KVRT_CONFIG_URL, "none", "redis://[[user]:password@]host[:port][/db], redis-cluster://host:port[,host:port...]; none",
	 "remote tier shared by vLLM instances", "remote_url"},
	{"save_unfull_chunk", KVRT_CONFIG_BOOL, "false", "true/false, 1/0, yes/no, on/off",
	 "also save a prompt's last chunk when it has fewer than chunk_size tokens",
	 "save_unfull_chunk"},
	{"save_decode_cache", KVRT_CONFIG_BOOL, "false", "true/false, 1/0, yes/no, on/off",
	 "also save KV computed while decoding", "save_decode_cache"},
	{"use_layerwise", KVRT_CONFIG_BOOL, "false", "true/false, 1/0, yes/no, on/off",
	 "load and save layer by layer, overlapping copies with attention", "use_layerwise"},
	{"enable_async_loading", KVRT_CONFIG_BOOL, "false", "true/false, 1/0, yes/no, on/off",
	 "load while the request waits, outside the model's step", "enable_async_loading"},
	{"cache_policy", KVRT_CONFIG_ENUM, "LRU", "LRU, S3-FIFO (or S3FIFO)",
	 "eviction order of the CPU tier", "cache_policy"},
	{"lookup_timeout_ms", KVRT_CONFIG_INT, "3000", "an integer in [1, 3600000]",
	 "longest a lookup may take before it counts as a miss", "lookup_timeout_ms"},
	{"min_retrieve_tokens", KVRT_CONFIG_INT, "0", "an integer in [0, 1073741824]",
	 "hits of fewer tokens than this are not loaded", "min_retrieve_tokens"},
	{"high_watermark", KVRT_CONFIG_FLOAT, "0.95", "a number in (0, 1]",
	 "the CPU tier evicts when more than this share of the pool is used", NULL},
	{"low_watermark", KVRT_CONFIG_FLOAT, "0.85", "a number in (0, 1), below high_watermark",
	 "eviction stops at this share of the pool", NULL},
	{"mailbox_size", KVRT_CONFIG_INT, "4096", "a power of two in [64, 1048576]",
	 "slots of each actor's mailbox (full mailboxes push back)", NULL},
	{"pin_timeout_ms", KVRT_CONFIG_INT, "600000", "an integer in [0, 86400000]; 0 = never",
	 "a chunk promised by a lookup stays pinned at most this long", NULL},
	{"disk_odirect", KVRT_CONFIG_BOOL, "false", "true/false, 1/0, yes/no, on/off",
	 "open the disk tier's files with O_DIRECT", NULL},
	{"device", KVRT_CONFIG_ENUM, "auto", "auto, cuda, host",
	 "copy engine: CUDA when a GPU is usable (auto), CUDA only, or host copies", NULL},
	{"trace", KVRT_CONFIG_PATH, "none", "a file path (%p = process id); none",
	 "write a Chrome trace (Perfetto) of kvrt's actors to this file", NULL},
	{"prefetch_wait_ms", KVRT_CONFIG_INT, "1000", "an integer in [0, 600000]; 0 = never wait",
	 "without enable_async_loading: how long a request whose hit is partly on disk or in Redis "
	 "is asked about again (not scheduled) while those chunks come into the CPU tier",
	 NULL},
	{"remote_lookup_wait_ms", KVRT_CONFIG_INT, "5", "an integer in [1, 3600000]",
	 "how long a request that misses locally is asked about again (not scheduled) while Redis "
	 "says which chunks it holds (never more than lookup_timeout_ms)",
	 NULL},
	{"consumer_wait_ms", KVRT_CONFIG_INT, "3000", "an integer in [0, 600000]; 0 = never wait",
	 "kv_consumer only: how long a request whose prompt's chunks are not all in the shared "
	 "tier yet is asked about again (not scheduled) while its producer's writes land; then "
	 "what is missing is recomputed",
	 NULL},
};

static const struct _key_rule rules[KVRT_CONFIG_NUM_KEYS] = {
	{OFF(chunk_size), 1, 65536, false, false},
	{OFF(local_cpu), 0, 0, false, false},
	{OFF(max_local_cpu_size), 0, 1048576, false, false},
	{OFF(local_disk), 0, 0, false, false},
	{OFF(max_local_disk_size), 0, 1048576, false, false},
	{OFF(remote_url), 0, 0, false, false},
	{OFF(save_unfull_chunk), 0, 0, false, false},
	{OFF(save_decode_cache), 0, 0, false, false},
	{OFF(use_layerwise), 0, 0, false, false},
	{OFF(enable_async_loading), 0, 0, false, false},
	{OFF(cache_policy), 0, 0, false, false},
	{OFF(lookup_timeout_ms), 1, 3600000, false, false},
	{OFF(min_retrieve_tokens), 0, 1073741824, false, false},
	{OFF(high_watermark), 0, 1, true, false},
	{OFF(low_watermark), 0, 0.999999, true, false},
	{OFF(mailbox_size), 64, 1048576, false, true},
	{OFF(pin_timeout_ms), 0, 86400000, false, false},
	{OFF(disk_odirect), 0, 0, false, false},
	{OFF(device), 0, 0, false, false},
	{OFF(trace), 0, 0, false, false},
	{OFF(prefetch_wait_ms), 0, 600000, false, false},
	{OFF(remote_lookup_wait_ms), 1, 3600000, false, false},
	{OFF(consumer_wait_ms), 0, 600000, false, false},
};

_Static_assert(KVRT_ARRAY_LEN(rules) == KVRT_CONFIG_NUM_KEYS, "one rule per key");

enum { KEY_CACHE_POLICY = 10, KEY_DEVICE = 18, KEY_TRACE = 19, KEY_LOCAL_DISK = 3 };

static const char *const source_names[] = {"default", "file", "env", "set"};

/* --- errors --------------------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static void errf(char *err, size_t errlen, const char *fmt,
							...)
{
	if (!err || !errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Prefix err's message with "<prefix>: " (context of a file line, an env var). */
static void err_prefix(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void err_prefix(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || !errlen)
		return;
	char msg[512], pre[1200];
	snprintf(msg, sizeof(msg), "%s", err);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(pre, sizeof(pre), fmt, ap);
	va_end(ap);
	snprintf(err, errlen, "%s: %s", pre, msg);
}

/* --- keys ----------------------------------------------------------------- */

static const char *strip_prefix(const char *key, bool *lmcache_prefix)
{
	*lmcache_prefix = false;
	if (!strncmp(key, "lmcache.", 8)) {
		*lmcache_prefix = true;
		return key + 8;
	}
	if (!strncmp(key, "kvrt.", 5))
		return key + 5;
	return key;
}

int kvrt_config_key_index(const char *key)
{
	if (!key)
		return -1;
	bool lmc;
	const char *name = strip_prefix(key, &lmc);
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
		if (!strcmp(name, kvrt_config_keys[i].name))
			return (lmc && !kvrt_config_keys[i].lmcache) ? -1 : i;
	return -1;
}

/* Edit distance (bounded inputs) for "did you mean". */
static size_t edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 64 || lb > 64)
		return SIZE_MAX;
	size_t row[65];
	for (size_t j = 0; j <= lb; j++)
		row[j] = j;
	for (size_t i = 1; i <= la; i++) {
		size_t diag = row[0];
		row[0] = i;
		for (size_t j = 1; j <= lb; j++) {
			size_t up = row[j];
			size_t sub = diag + (tolower((unsigned char)a[i - 1]) !=
					     tolower((unsigned char)b[j - 1]));
			size_t best = up + 1 < row[j - 1] + 1 ? up + 1 : row[j - 1] + 1;
			row[j] = sub < best ? sub : best;
			diag = up;
		}
	}
	return row[lb];
}

static void err_unknown_key(const char *key, char *err, size_t errlen)
{
	bool lmc;
	const char *name = strip_prefix(key, &lmc);
	if (lmc) {
		for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
			if (!strcmp(name, kvrt_config_keys[i].name)) {
				errf(err, errlen,
				     "unknown config key '%s': '%s' is kvrt's own key, not LMCache's; "
				     "write it as '%s' or 'kvrt.%s'",
				     key, name, name, name);
				return;
			}
	}
	const char *best = NULL;
	size_t bd = SIZE_MAX;
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		size_t d = edit_distance(name, kvrt_config_keys[i].name);
		if (d < bd) {
			bd = d;
			best = kvrt_config_keys[i].name;
		}
	}
	char hint[96] = "";
	if (best && bd <= 3)
		snprintf(hint, sizeof(hint), " (did you mean '%s'?)", best);
	char known[600];
	size_t n = 0;
	known[0] = '\0';
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS && n < sizeof(known); i++)
		n += (size_t)snprintf(known + n, sizeof(known) - n, "%s%s", i ? ", " : "",
				      kvrt_config_keys[i].name);
	errf(err, errlen, "unknown config key '%s'%s; known keys: %s", key, hint, known);
}

/* --- value parsers -------------------------------------------------------- */

static int parse_bool(const char *v, bool *out)
{
	static const char *const yes[] = {"true", "1", "yes", "on"};
	static const char *const no[] = {"false", "0", "no", "off"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(yes); i++) {
		if (!strcasecmp(v, yes[i])) {
			*out = true;
			return 0;
		}
		if (!strcasecmp(v, no[i])) {
			*out = false;
			return 0;
		}
	}
	return -EINVAL;
}

/* Decimal digits only (optional '+'), no overflow. */
static int parse_u64(const char *v, uint64_t *out)
{
	const char *p = v;
	if (*p == '+')
		p++;
	if (!*p)
		return -EINVAL;
	uint64_t r = 0;
	for (; *p; p++) {
		if (*p < '0' || *p > '9')
			return -EINVAL;
		unsigned d = (unsigned)(*p - '0');
		if (r > (UINT64_MAX - d) / 10)
			return -ERANGE;
		r = r * 10 + d;
	}
	*out = r;
	return 0;
}

/* A plain decimal number: [+-]digits[.digits][e[+-]digits]; no inf, nan, hex. */
static int parse_number(const char *v, double *out)
{
	const char *p = v;
	bool digits = false;
	if (*p == '+' || *p == '-')
		p++;
	while (*p >= '0' && *p <= '9')
		p++, digits = true;
	if (*p == '.') {
		p++;
		while (*p >= '0' && *p <= '9')
			p++, digits = true;
	}
	if (!digits)
		return -EINVAL;
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return -EINVAL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p)
		return -EINVAL;
	char *end;
	double d = strtod(v, &end);
	if (*end || !isfinite(d))
		return -EINVAL;
	*out = d;
	return 0;
}

static bool is_none(const char *v)
{
	return !*v || !strcasecmp(v, "none") || !strcasecmp(v, "null") || !strcmp(v, "~");
}

static bool is_pow2(uint64_t x)
{
	return x && !(x & (x - 1));
}

/* Trim blanks into buf. -EINVAL when it does not fit. */
static int trim_copy(const char *v, char *buf, size_t len)
{
	while (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r')
		v++;
	size_t n = strlen(v);
	while (n && (v[n - 1] == ' ' || v[n - 1] == '\t' || v[n - 1] == '\n' || v[n - 1] == '\r'))
		n--;
	if (n >= len)
		return -EINVAL;
	memcpy(buf, v, n);
	buf[n] = '\0';
	return 0;
}

static int set_policy(const char *v, enum kvrt_policy_kind *out)
{
	if (!strcasecmp(v, "LRU")) {
		*out = KVRT_POLICY_LRU;
		return 0;
	}
	if (!strcasecmp(v, "S3-FIFO") || !strcasecmp(v, "S3FIFO") || !strcasecmp(v, "S3_FIFO")) {
		*out = KVRT_POLICY_S3FIFO;
		return 0;
	}
	return -EINVAL;
}

static int set_device(const char *v, enum kvrt_config_device *out)
{
	static const char *const names[] = {"auto", "cuda", "host"};
	for (int i = 0; i < 3; i++)
		if (!strcasecmp(v, names[i])) {
			*out = (enum kvrt_config_device)i;
			return 0;
		}
	return -EINVAL;
}

static int set_path(int ki, const char *v, char *dst, char *err, size_t errlen)
{
	const char *name = kvrt_config_keys[ki].name;
	if (is_none(v)) {
		dst[0] = '\0';
		return 0;
	}
	const char *path = v;
	if (ki == KEY_LOCAL_DISK) {
		if (!strncmp(v, "file://", 7)) {
			path = v + 7;
		} else if (strstr(v, "://")) {
			errf(err, errlen, "%s: '%s' has a scheme kvrt does not support; accepted: %s",
			     name, v, kvrt_config_keys[ki].accepted);
			return -EINVAL;
		}
		if (!*path) {
			errf(err, errlen, "%s: '%s' names no directory; accepted: %s", name, v,
			     kvrt_config_keys[ki].accepted);
			return -EINVAL;
		}
	}
	if (strlen(path) >= KVRT_CONFIG_STR_MAX) {
		errf(err, errlen, "%s: the path is longer than %u bytes", name,
		     KVRT_CONFIG_STR_MAX - 1);
		return -EINVAL;
	}
	strcpy(dst, path);
	return 0;
}

static int set_url(int ki, const char *v, char *dst, char *err, size_t errlen)
{
	static const char *const schemes[] = {"redis://", "redis-cluster://"};
	const char *name = kvrt_config_keys[ki].name;
	if (is_none(v)) {
		dst[0] = '\0';
		return 0;
	}
	const char *rest = NULL;
	for (size_t i = 0; i < KVRT_ARRAY_LEN(schemes) && !rest; i++)
		if (!strncasecmp(v, schemes[i], strlen(schemes[i])))
			rest = v + strlen(schemes[i]);
	if (!rest && !strncasecmp(v, "rediss://", 9)) {
		errf(err, errlen, "%s: '%s': TLS (rediss://) is not supported (hiredis without SSL); "
			"accepted: %s", name, v, kvrt_config_keys[ki].accepted);
		return -EINVAL;
	}
	if (!rest) {
		errf(err, errlen, "%s: '%s' is not a url kvrt supports; accepted: %s", name, v,
		     kvrt_config_keys[ki].accepted);
		return -EINVAL;
	}
	if (!*rest || strpbrk(v, " \t")) {
		errf(err, errlen, "%s: '%s' names no host or path; accepted: %s", name, v,
		     kvrt_config_keys[ki].accepted);
		return -EINVAL;
	}
	if (strlen(v) >= KVRT_CONFIG_STR_MAX) {
		errf(err, errlen, "%s: the url is longer than %u bytes", name, KVRT_CONFIG_STR_MAX - 1);
		return -EINVAL;
	}
	strcpy(dst, v);
	return 0;
}

/* Parse value into c's field for key ki. c unchanged on error. */
static int set_index(struct kvrt_config *c, int ki, const char *value, enum kvrt_config_source src,
		     char *err, size_t errlen)
{
	const struct kvrt_config_key *k = &kvrt_config_keys[ki];
	const struct _key_rule *r = &rules[ki];
	char *field = (char *)c + r->offset;
	if (!value) {
		errf(err, errlen, "%s: no value; accepted: %s", k->name, k->accepted);
		return -EINVAL;
	}
	char v[KVRT_CONFIG_STR_MAX + 8];
	if (trim_copy(value, v, sizeof(v))) {
		errf(err, errlen, "%s: the value is longer than %u bytes; accepted: %s", k->name,
		     KVRT_CONFIG_STR_MAX - 1, k->accepted);
		return -EINVAL;
	}
	int rc = 0;
	switch (k->type) {
	case KVRT_CONFIG_BOOL: {
		bool b;
		if ((rc = parse_bool(v, &b)))
			break;
		*(bool *)field = b;
		break;
	}
	case KVRT_CONFIG_INT: {
		uint64_t x;
		if ((rc = parse_u64(v, &x)))
			break;
		if ((double)x < r->min || (double)x > r->max || (r->pow2 && !is_pow2(x))) {
			rc = -ERANGE;
			break;
		}
		*(uint32_t *)field = (uint32_t)x;
		break;
	}
	case KVRT_CONFIG_GB:
	case KVRT_CONFIG_FLOAT: {
		double d;
		if ((rc = parse_number(v, &d)))
			break;
		if (d < r->min || d > r->max || (r->min_open && d <= r->min)) {
			rc = -ERANGE;
			break;
		}
		*(double *)field = d;
		break;
	}
	case KVRT_CONFIG_ENUM:
		if (ki == KEY_CACHE_POLICY) {
			rc = set_policy(v, (enum kvrt_policy_kind *)field);
			if (rc && (!strcasecmp(v, "LFU") || !strcasecmp(v, "FIFO") ||
				   !strcasecmp(v, "MRU"))) {
				errf(err, errlen,
				     "%s: '%s' is an LMCache policy kvrt does not have; accepted: %s",
				     k->name, v, k->accepted);
				return -EINVAL;
			}
		} else {
			rc = set_device(v, (enum kvrt_config_device *)field);
		}
		break;
	case KVRT_CONFIG_PATH:
		if ((rc = set_path(ki, v, field, err, errlen)))
			return rc;
		break;
	case KVRT_CONFIG_URL:
		if ((rc = set_url(ki, v, field, err, errlen)))
			return rc;
		break;
	}
	if (rc) {
		errf(err, errlen, "%s: '%s' is %s; accepted: %s", k->name, v,
		     rc == -ERANGE ? "out of range" : "not valid", k->accepted);
		return -EINVAL;
	}
	c->source[ki] = (uint8_t)src;
	return 0;
}

static int set_from(struct kvrt_config *c, const char *key, const char *value,
		    enum kvrt_config_source src, char *err, size_t errlen)
{
	int ki = kvrt_config_key_index(key);
	if (ki < 0) {
		err_unknown_key(key ? key : "(null)", err, errlen);
		return -EINVAL;
	}
	return set_index(c, ki, value, src, err, errlen);
}

/* --- public: defaults, set, get --------------------------------------------- */

void kvrt_config_defaults(struct kvrt_config *c)
{
	memset(c, 0, sizeof(*c));
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		int rc = set_index(c, i, kvrt_config_keys[i].default_text, KVRT_CONFIG_SRC_DEFAULT,
				   NULL, 0);
		KVRT_ASSERT(rc == 0); /* the table's defaults parse */
	}
}

int kvrt_config_set(struct kvrt_config *c, const char *key, const char *value, char *err,
		    size_t errlen)
{
	return set_from(c, key, value, KVRT_CONFIG_SRC_SET, err, errlen);
}

/* A double without trailing zeros ("5", "2.5", "0.95"), round-trippable. */
static void fmt_double(char *buf, size_t len, double d)
{
	for (int prec = 1; prec <= 17; prec++) {
		snprintf(buf, len, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

static void value_text(const struct kvrt_config *c, int ki, char *buf, size_t len)
{
	const char *field = (const char *)c + rules[ki].offset;
	switch (kvrt_config_keys[ki].type) {
	case KVRT_CONFIG_BOOL:
		snprintf(buf, len, "%s", *(const bool *)field ? "true" : "false");
		break;
	case KVRT_CONFIG_INT:
		snprintf(buf, len, "%u", *(const uint32_t *)field);
		break;
	case KVRT_CONFIG_GB:
	case KVRT_CONFIG_FLOAT:
		fmt_double(buf, len, *(const double *)field);
		break;
	case KVRT_CONFIG_ENUM:
		if (ki == KEY_CACHE_POLICY)
			snprintf(buf, len, "%s",
				 *(const enum kvrt_policy_kind *)field == KVRT_POLICY_S3FIFO ? "S3-FIFO"
											 : "LRU");
		else
			snprintf(buf, len, "%s",
				 (const char *[]){"auto", "cuda", "host"}[*(const enum kvrt_config_device *)field]);
		break;
	case KVRT_CONFIG_PATH:
	case KVRT_CONFIG_URL:
		snprintf(buf, len, "%s", *field ? field : "none");
		break;
	}
}

int kvrt_config_get(const struct kvrt_config *c, const char *key, char *buf, size_t len)
{
	int ki = kvrt_config_key_index(key);
	if (ki < 0)
		return -EINVAL;
	char tmp[KVRT_CONFIG_STR_MAX + 32];
	value_text(c, ki, tmp, sizeof(tmp));
	if (len)
		snprintf(buf, len, "%s", tmp);
	return strlen(tmp) < len ? 0 : -ENOSPC;
}

size_t kvrt_config_describe(const struct kvrt_config *c, char *buf, size_t len)
{
	size_t n = 0;
	if (len)
		buf[0] = '\0';
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		char v[KVRT_CONFIG_STR_MAX + 32], item[KVRT_CONFIG_STR_MAX + 128];
		value_text(c, i, v, sizeof(v));
		bool quote = strpbrk(v, " \t\"") != NULL;
		uint8_t s = c->source[i] < KVRT_ARRAY_LEN(source_names) ? c->source[i] : 0;
		int m = snprintf(item, sizeof(item), "%s%s=%s%s%s%s%s%s", i ? " " : "",
				 kvrt_config_keys[i].name, quote ? "\"" : "", v, quote ? "\"" : "",
				 s ? "[" : "", s ? source_names[s] : "", s ? "]" : "");
		if (m < 0)
			continue;
		if (n < len)
			snprintf(buf + n, len - n, "%s", item);
		n += (size_t)m;
	}
	return n;
}

uint64_t kvrt_config_gb_bytes(double gb)
{
	if (!(gb > 0))
		return 0;
	double b = gb * 1073741824.0;
	if (b >= 18446744073709551615.0)
		return UINT64_MAX;
	return (uint64_t)b;
}

int kvrt_config_check(const struct kvrt_config *c, char *err, size_t errlen)
{
	if (!(c->low_watermark < c->high_watermark)) {
		errf(err, errlen,
		     "low_watermark (%g) must be below high_watermark (%g); defaults 0.85 and 0.95",
		     c->low_watermark, c->high_watermark);
		return -EINVAL;
	}
	if (!(c->max_local_cpu_size > 0)) {
		errf(err, errlen,
		     "max_local_cpu_size: 0 GB; kvrt stages every chunk in CPU memory, give it a "
		     "number of GB > 0 (default 5.0)");
		return -EINVAL;
	}
	if (c->max_local_disk_size > 0 && !c->local_disk[0])
		kvrt_warn("config: max_local_disk_size=%g but local_disk is not set: no disk tier",
			  c->max_local_disk_size);
	if (c->local_disk[0] && !(c->max_local_disk_size > 0))
		kvrt_warn("config: local_disk=%s but max_local_disk_size is 0: no disk tier",
			  c->local_disk);
	if (!c->local_cpu && !kvrt_config_disk_enabled(c) && !c->remote_url[0])
		kvrt_warn("config: local_cpu=false and no disk or remote tier: nothing will be cached");
	return 0;
}

/* --- environment ------------------------------------------------------------ */

static void env_name(char *buf, size_t len, const char *prefix, const char *key)
{
	size_t n = (size_t)snprintf(buf, len, "%s", prefix);
	for (; *key && n + 1 < len; key++, n++)
		buf[n] = (char)toupper((unsigned char)*key);
	buf[n < len ? n : len - 1] = '\0';
}

int kvrt_config_from_env(struct kvrt_config *c, char *err, size_t errlen)
{
	struct kvrt_config t = *c;
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		char kn[64], ln[64];
		env_name(kn, sizeof(kn), "KVRT_", kvrt_config_keys[i].name);
		const char *kv = getenv(kn);
		const char *lv = NULL;
		if (kvrt_config_keys[i].lmcache) {
			env_name(ln, sizeof(ln), "LMCACHE_", kvrt_config_keys[i].lmcache);
			lv = getenv(ln);
		}
		const char *v = kv ? kv : lv;
		if (!v)
			continue;
		if (kv && lv && strcmp(kv, lv))
			kvrt_warn("config: %s=%s overrides %s=%s", kn, kv, ln, lv);
		int rc = set_index(&t, i, v, KVRT_CONFIG_SRC_ENV, err, errlen);
		if (rc) {
			err_prefix(err, errlen, "environment %s", kv ? kn : ln);
			return rc;
		}
	}
	*c = t;
	return 0;
}

/* --- YAML subset ------------------------------------------------------------ */

struct _yaml {
	const char *path;  /* for messages */
	char *err;         /* caller's buffer */
	size_t errlen;     /* its size */
	unsigned line;     /* current line number (1-based) */
};

#define YERR(y, ...)                                                        \
	do {                                                                \
		errf((y)->err, (y)->errlen, __VA_ARGS__);                   \
		err_prefix((y)->err, (y)->errlen, "%s line %u", (y)->path, (y)->line); \
	} while (0)

static bool is_blank(char ch)
{
	return ch == ' ' || ch == '\t';
}

/* What may follow a scalar on its line: blanks, then nothing or a comment. */
static bool rest_is_comment(const char *p)
{
	while (is_blank(*p))
		p++;
	return !*p || *p == '#';
}

/* Parse a scalar at s (the line's rest) into out (size outlen). quoted_key:
 * parsing a key (stop at ':'). Returns a pointer past the scalar, or NULL
 * with the error set. */
static const char *yaml_scalar(struct _yaml *y, const char *s, char *out, size_t outlen,
			       bool is_key)
{
	size_t n = 0;
	if (*s == '"' || *s == '\'') {
		char q = *s++;
		for (;;) {
			char ch = *s;
			if (!ch) {
				YERR(y, "unterminated %s-quoted string",
				     q == '"' ? "double" : "single");
				return NULL;
			}
			s++;
			if (ch == q) {
				if (q == '\'' && *s == '\'') { /* '' is a quote */
					s++;
				} else {
					break;
				}
			} else if (q == '"' && ch == '\\') {
				char e = *s++;
				switch (e) {
				case '\\': ch = '\\'; break;
				case '"': ch = '"'; break;
				case '/': ch = '/'; break;
				case 'n': ch = '\n'; break;
				case 't': ch = '\t'; break;
				case 'r': ch = '\r'; break;
				default:
					YERR(y, "unsupported escape '\\%c' (accepted: \\\\ \\\" \\/ \\n \\t \\r)",
					     e ? e : '0');
					return NULL;
				}
			}
			if (n + 1 >= outlen) {
				YERR(y, "string longer than %zu bytes", outlen - 1);
				return NULL;
			}
			out[n++] = ch;
		}
		out[n] = '\0';
		return s;
	}
	/* Plain scalar. */
	const char *start = s;
	if (is_key) {
		while (*s && *s != ':' && !is_blank(*s))
			s++;
	} else {
		while (*s && !(*s == '#' && s > start && is_blank(s[-1])))
			s++;
		while (s > start && is_blank(s[-1]))
			s--;
	}
	n = (size_t)(s - start);
	if (n + 1 > outlen) {
		YERR(y, "%s longer than %zu bytes", is_key ? "key" : "value", outlen - 1);
		return NULL;
	}
	memcpy(out, start, n);
	out[n] = '\0';
	return s;
}

/* Refuse YAML features outside the flat subset, seen at a value's start. */
static bool yaml_value_start_ok(struct _yaml *y, const char *key, const char *v)
{
	const char *what = NULL;
	switch (*v) {
	case '[': case '{': what = "flow collections ([...] / {...})"; break;
	case '&': what = "anchors (&)"; break;
	case '*': what = "aliases (*)"; break;
	case '!': what = "tags (!)"; break;
	case '|': case '>': what = "block scalars (| and >)"; break;
	case '-':
		if (v[1] == ' ' || !v[1])
			what = "sequences (- item)";
		break;
	default: break;
	}
	if (what) {
		YERR(y, "value of '%s': %s are not supported; kvrt reads flat 'key: value' files",
		     key, what);
		return false;
	}
	return true;
}

/* Apply one key: value read on line `line`. */
static int yaml_apply_kv(struct kvrt_config *c, struct _yaml *y, const char *key,
			 const char *val, unsigned line, unsigned *seen)
{
	unsigned cur = y->line;
	y->line = line;
	int rc = -EINVAL;
	int ki = kvrt_config_key_index(key);
	if (ki < 0) {
		err_unknown_key(key, y->err, y->errlen);
		err_prefix(y->err, y->errlen, "%s line %u", y->path, line);
		goto out;
	}
	if (seen[ki]) {
		YERR(y, "key '%s' is set twice (lines %u and %u)", kvrt_config_keys[ki].name,
		     seen[ki], line);
		goto out;
	}
	seen[ki] = line;
	rc = set_index(c, ki, val, KVRT_CONFIG_SRC_FILE, y->err, y->errlen);
	if (rc)
		err_prefix(y->err, y->errlen, "%s line %u", y->path, line);
out:
	y->line = cur;
	return rc;
}

static int yaml_apply(struct kvrt_config *c, struct _yaml *y, char *text, size_t size)
{
	unsigned seen[KVRT_CONFIG_NUM_KEYS] = {0}; /* line where each key was set */
	bool any_key = false, doc_started = false;
	/* A key with an empty value: null, unless indented lines follow (a
	 * nested map); decided at the next significant line. */
	char pending[256] = "";
	unsigned pending_line = 0;
	char *p = text, *end = text + size;
	int rc;
	if (size >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) /* UTF-8 byte order mark */
		p += 3;
	y->line = 0;
	while (p < end) {
		char *nl = memchr(p, '\n', (size_t)(end - p));
		char *le = nl ? nl : end;
		y->line++;
		if ((size_t)(le - p) > YAML_MAX_LINE) {
			YERR(y, "line longer than %u bytes", YAML_MAX_LINE);
			return -EINVAL;
		}
		if (le > p && le[-1] == '\r')
			le[-1] = '\0';
		*le = '\0';
		char *line = p;
		p = nl ? nl + 1 : end;

		const char *s = line;
		while (is_blank(*s))
			s++;
		if (!*s || *s == '#')
			continue; /* blank or comment: may be indented */
		if (s != line) {
			if (pending_line)
				YERR(y, "nested structure under '%s' (line %u) is not supported; kvrt "
					"reads flat 'key: value' files",
				     pending, pending_line);
			else
				YERR(y, "unexpected indentation; kvrt reads flat 'key: value' files");
			return -EINVAL;
		}
		if (pending_line) {
			if ((rc = yaml_apply_kv(c, y, pending, "", pending_line, seen)))
				return rc;
			pending_line = 0;
		}
		if (!strncmp(s, "---", 3) && rest_is_comment(s + 3)) {
			if (any_key || doc_started) {
				YERR(y, "several YAML documents ('---') are not supported");
				return -EINVAL;
			}
			doc_started = true;
			continue;
		}
		if (!strncmp(s, "...", 3) && rest_is_comment(s + 3))
			break; /* end of the document */
		if (*s == '%') {
			YERR(y, "YAML directives (%%) are not supported");
			return -EINVAL;
		}
		if (*s == '-' && (s[1] == ' ' || !s[1])) {
			YERR(y, "sequences (- item) are not supported; kvrt reads flat 'key: value' "
				"files");
			return -EINVAL;
		}
		if (*s == '[' || *s == '{' || *s == '?' || *s == '&' || *s == '*' || *s == '!') {
			YERR(y, "expected 'key: value'; flow collections, complex keys, anchors and "
				"tags are not supported");
			return -EINVAL;
		}
		char key[256];
		const char *q = yaml_scalar(y, s, key, sizeof(key), true);
		if (!q)
			return -EINVAL;
		while (is_blank(*q))
			q++;
		if (*q != ':' || !(q[1] == '\0' || is_blank(q[1]))) {
			YERR(y, "expected 'key: value', found '%.60s'", s);
			return -EINVAL;
		}
		q++;
		while (is_blank(*q))
			q++;
		if (!key[0]) {
			YERR(y, "empty key");
			return -EINVAL;
		}
		any_key = true;
		if (!*q || *q == '#') {
			snprintf(pending, sizeof(pending), "%s", key);
			pending_line = y->line;
			continue;
		}
		if (!yaml_value_start_ok(y, key, q))
			return -EINVAL;
		char val[KVRT_CONFIG_STR_MAX + 8];
		bool quoted = *q == '"' || *q == '\'';
		const char *r = yaml_scalar(y, q, val, sizeof(val), false);
		if (!r)
			return -EINVAL;
		if (quoted && !rest_is_comment(r)) {
			YERR(y, "unexpected text after the quoted value of '%s'", key);
			return -EINVAL;
		}
		if (!quoted && (strstr(val, ": ") || (val[0] && val[strlen(val) - 1] == ':'))) {
			YERR(y, "value of '%s' holds ': ' (a nested mapping?); quote it if it is a "
				"string",
			     key);
			return -EINVAL;
		}
		if ((rc = yaml_apply_kv(c, y, key, val, y->line, seen)))
			return rc;
	}
	if (pending_line)
		return yaml_apply_kv(c, y, pending, "", pending_line, seen);
	return 0;
}

int kvrt_config_load_yaml(struct kvrt_config *c, const char *path, char *err, size_t errlen)
{
	if (!path || !*path) {
		errf(err, errlen, "config file: no path given");
		return -EINVAL;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		errf(err, errlen, "config file %s: cannot open (%s)", path, strerror(e));
		return -e;
	}
	int rc = 0;
	char *text = NULL;
	struct stat st;
	if (fstat(fd, &st)) {
		rc = -errno;
		errf(err, errlen, "config file %s: cannot stat (%s)", path, strerror(-rc));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = -EINVAL;
		errf(err, errlen, "config file %s: not a regular file", path);
		goto out;
	}
	if (st.st_size > YAML_MAX_BYTES) {
		rc = -EFBIG;
		errf(err, errlen, "config file %s: larger than %u bytes", path, YAML_MAX_BYTES);
		goto out;
	}
	size_t size = (size_t)st.st_size;
	text = malloc(size + 1);
	if (!text) {
		rc = -ENOMEM;
		errf(err, errlen, "config file %s: out of memory", path);
		goto out;
	}
	size_t got = 0;
	while (got < size) {
		ssize_t r = read(fd, text + got, size - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = -errno;
			errf(err, errlen, "config file %s: read failed (%s)", path, strerror(-rc));
			goto out;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	text[got] = '\0';
	if (memchr(text, '\0', got)) {
		rc = -EINVAL;
		errf(err, errlen, "config file %s: holds a NUL byte (not a text file)", path);
		goto out;
	}
	struct kvrt_config t = *c;
	struct _yaml y = {.path = path, .err = err, .errlen = errlen};
	rc = yaml_apply(&t, &y, text, got);
	if (!rc)
		*c = t;
out:
	free(text);
	close(fd);
	return rc;
}

int kvrt_config_init(struct kvrt_config *c, char *err, size_t errlen)
{
	kvrt_config_defaults(c);
	struct kvrt_config t = *c;
	const char *kf = getenv("KVRT_CONFIG_FILE");
	const char *lf = getenv("LMCACHE_CONFIG_FILE");
	if (kf && !*kf)
		kf = NULL;
	if (lf && !*lf)
		lf = NULL;
	if (kf && lf && strcmp(kf, lf))
		kvrt_warn("config: KVRT_CONFIG_FILE=%s is read, LMCACHE_CONFIG_FILE=%s is not", kf, lf);
	const char *file = kf ? kf : lf;
	int rc = 0;
	if (file && (rc = kvrt_config_load_yaml(&t, file, err, errlen)))
		return rc;
	if ((rc = kvrt_config_from_env(&t, err, errlen)))
		return rc;
	*c = t;
	return 0;
}
