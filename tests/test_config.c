/* tests/test_config.c: kvrt's configuration (connector/config.h): every key,
 * LMCache's names, strict values, environment precedence, the YAML subset. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connector/config.h"
#include "tests/test_util.h"

#define ERRLEN 512

/* A config filled with garbage, then defaults: nothing may stay poisoned. */
static void fresh(struct kvrt_config *c)
{
	memset(c, 0xa5, sizeof(*c));
	kvrt_config_defaults(c);
}

static bool has(const char *hay, const char *needle)
{
	return strstr(hay, needle) != NULL;
}

/* set must fail, leave c as it was, and say key and accepted values. */
static void expect_refused(const char *key, const char *value, const char *says)
{
	struct kvrt_config c, before;
	fresh(&c);
	before = c;
	char err[ERRLEN];
	memset(err, 'x', sizeof(err));
	int rc = kvrt_config_set(&c, key, value, err, sizeof(err));
	cr_expect_eq(rc, -EINVAL, "%s=%s accepted", key, value);
	cr_expect(!memcmp(&c, &before, sizeof(c)), "%s=%s changed the config", key, value);
	cr_expect(memchr(err, '\0', sizeof(err)) != NULL, "err not terminated");
	cr_expect(has(err, key) || has(err, strchr(key, '.') ? strchr(key, '.') + 1 : key),
		  "message does not name the key: %s", err);
	if (says)
		cr_expect(has(err, says), "message for %s=%s lacks '%s': %s", key, value, says, err);
}

static void expect_set(struct kvrt_config *c, const char *key, const char *value)
{
	char err[ERRLEN] = "";
	int rc = kvrt_config_set(c, key, value, err, sizeof(err));
	cr_assert_eq(rc, 0, "%s=%s refused: %s", key, value, err);
}

static void expect_get(const struct kvrt_config *c, const char *key, const char *want)
{
	char buf[KVRT_CONFIG_STR_MAX + 32];
	cr_assert_eq(kvrt_config_get(c, key, buf, sizeof(buf)), 0, "get %s", key);
	cr_expect_str_eq(buf, want, "%s: got %s, want %s", key, buf, want);
}

Test(config, defaults)
{
	struct kvrt_config c;
	fresh(&c);
	cr_expect_eq(c.chunk_size, 256);
	cr_expect(c.local_cpu);
	cr_expect_eq(c.max_local_cpu_size, 5.0);
	cr_expect_str_eq(c.local_disk, "");
	cr_expect_eq(c.max_local_disk_size, 0.0);
	cr_expect_str_eq(c.remote_url, "");
	cr_expect(!c.save_unfull_chunk);
	cr_expect(!c.save_decode_cache);
	cr_expect(!c.use_layerwise);
	cr_expect(!c.enable_async_loading);
	cr_expect_eq(c.cache_policy, KVRT_POLICY_LRU);
	cr_expect_eq(c.lookup_timeout_ms, 3000);
	cr_expect_eq(c.min_retrieve_tokens, 0);
	cr_expect_eq(c.high_watermark, 0.95);
	cr_expect_eq(c.low_watermark, 0.85);
	cr_expect_eq(c.mailbox_size, 4096);
	cr_expect_eq(c.pin_timeout_ms, 600000);
	cr_expect(!c.disk_odirect);
	cr_expect_eq(c.device, KVRT_CONFIG_DEVICE_AUTO);
	cr_expect_str_eq(c.trace, "");
	cr_expect_eq(c.prefetch_wait_ms, 1000);
	cr_expect_eq(c.remote_lookup_wait_ms, 5);
	cr_expect_eq(c.consumer_wait_ms, 3000);
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
		cr_expect_eq(c.source[i], KVRT_CONFIG_SRC_DEFAULT);
	cr_expect(!kvrt_config_disk_enabled(&c));
	char err[ERRLEN];
	cr_expect_eq(kvrt_config_check(&c, err, sizeof(err)), 0);
}

Test(config, key_table)
{
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		const struct kvrt_config_key *k = &kvrt_config_keys[i];
		cr_assert_not_null(k->name);
		cr_expect(k->default_text && *k->default_text, "%s: no default text", k->name);
		cr_expect(k->accepted && *k->accepted, "%s: no accepted text", k->name);
		cr_expect(k->meaning && *k->meaning, "%s: no meaning", k->name);
		cr_expect_eq(kvrt_config_key_index(k->name), i);
		for (int j = 0; j < i; j++)
			cr_expect(strcmp(k->name, kvrt_config_keys[j].name) != 0, "%s twice", k->name);
		/* The documented default is the default: setting it changes nothing. */
		struct kvrt_config a, b;
		fresh(&a);
		fresh(&b);
		expect_set(&b, k->name, k->default_text);
		b.source[i] = KVRT_CONFIG_SRC_DEFAULT;
		cr_expect(!memcmp(&a, &b, sizeof(a)), "%s: default text differs", k->name);
	}
	/* The 13 keys of LMCache's table, all present under their own names. */
	static const char *const lmc[] = {
		"chunk_size", "local_cpu", "max_local_cpu_size", "local_disk",
		"max_local_disk_size", "remote_url", "save_unfull_chunk", "save_decode_cache",
		"use_layerwise", "enable_async_loading", "cache_policy", "lookup_timeout_ms",
		"min_retrieve_tokens"};
	int n = 0;
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
		n += kvrt_config_keys[i].lmcache != NULL;
	cr_expect_eq(n, (int)KVRT_ARRAY_LEN(lmc));
	for (size_t i = 0; i < KVRT_ARRAY_LEN(lmc); i++) {
		int ki = kvrt_config_key_index(lmc[i]);
		cr_assert_geq(ki, 0, "%s missing", lmc[i]);
		cr_expect_str_eq(kvrt_config_keys[ki].lmcache, lmc[i]);
	}
}

/* One valid value per key, its effect, and the get() text. */
Test(config, every_key)
{
	struct kvrt_config c;
	fresh(&c);
	expect_set(&c, "chunk_size", "512");
	cr_expect_eq(c.chunk_size, 512);
	expect_set(&c, "local_cpu", "false");
	cr_expect(!c.local_cpu);
	expect_set(&c, "max_local_cpu_size", "2.5");
	cr_expect_eq(c.max_local_cpu_size, 2.5);
	expect_set(&c, "local_disk", "file:///mnt/nvme/kvrt");
	cr_expect_str_eq(c.local_disk, "/mnt/nvme/kvrt");
	expect_set(&c, "max_local_disk_size", "100");
	cr_expect_eq(c.max_local_disk_size, 100.0);
	cr_expect(kvrt_config_disk_enabled(&c));
	expect_set(&c, "remote_url", "redis://10.0.0.5:6379");
	cr_expect_str_eq(c.remote_url, "redis://10.0.0.5:6379");
	expect_set(&c, "save_unfull_chunk", "true");
	cr_expect(c.save_unfull_chunk);
	expect_set(&c, "save_decode_cache", "yes");
	cr_expect(c.save_decode_cache);
	expect_set(&c, "use_layerwise", "1");
	cr_expect(c.use_layerwise);
	expect_set(&c, "enable_async_loading", "True");
	cr_expect(c.enable_async_loading);
	expect_set(&c, "cache_policy", "S3-FIFO");
	cr_expect_eq(c.cache_policy, KVRT_POLICY_S3FIFO);
	expect_set(&c, "lookup_timeout_ms", "250");
	cr_expect_eq(c.lookup_timeout_ms, 250);
	expect_set(&c, "min_retrieve_tokens", "1024");
	cr_expect_eq(c.min_retrieve_tokens, 1024);
	expect_set(&c, "high_watermark", "0.9");
	cr_expect_eq(c.high_watermark, 0.9);
	expect_set(&c, "low_watermark", "0.5");
	cr_expect_eq(c.low_watermark, 0.5);
	expect_set(&c, "mailbox_size", "65536");
	cr_expect_eq(c.mailbox_size, 65536);
	expect_set(&c, "pin_timeout_ms", "0");
	cr_expect_eq(c.pin_timeout_ms, 0);
	expect_set(&c, "disk_odirect", "on");
	cr_expect(c.disk_odirect);
	expect_set(&c, "device", "host");
	cr_expect_eq(c.device, KVRT_CONFIG_DEVICE_HOST);
	expect_set(&c, "trace", "/tmp/kvrt-%p.json");
	cr_expect_str_eq(c.trace, "/tmp/kvrt-%p.json");
	expect_set(&c, "prefetch_wait_ms", "0");
	cr_expect_eq(c.prefetch_wait_ms, 0);
	expect_set(&c, "remote_lookup_wait_ms", "50");
	cr_expect_eq(c.remote_lookup_wait_ms, 50);
	expect_set(&c, "consumer_wait_ms", "0");
	cr_expect_eq(c.consumer_wait_ms, 0);
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
		cr_expect_eq(c.source[i], KVRT_CONFIG_SRC_SET, "%s", kvrt_config_keys[i].name);

	expect_get(&c, "chunk_size", "512");
	expect_get(&c, "local_cpu", "false");
	expect_get(&c, "max_local_cpu_size", "2.5");
	expect_get(&c, "local_disk", "/mnt/nvme/kvrt");
	expect_get(&c, "remote_url", "redis://10.0.0.5:6379");
	expect_get(&c, "cache_policy", "S3-FIFO");
	expect_get(&c, "high_watermark", "0.9");
	expect_get(&c, "device", "host");
	expect_get(&c, "lmcache.chunk_size", "512");

	/* get() texts are accepted back by set() and give the same config. */
	struct kvrt_config d;
	fresh(&d);
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		char buf[KVRT_CONFIG_STR_MAX + 32];
		cr_assert_eq(kvrt_config_get(&c, kvrt_config_keys[i].name, buf, sizeof(buf)), 0);
		expect_set(&d, kvrt_config_keys[i].name, buf);
	}
	cr_expect(!memcmp(&c, &d, sizeof(c)), "get/set round trip differs");

	char small[4];
	cr_expect_eq(kvrt_config_get(&c, "local_disk", small, sizeof(small)), -ENOSPC);
	cr_expect_eq(kvrt_config_get(&c, "nope", small, sizeof(small)), -EINVAL);
}

Test(config, lmcache_and_kvrt_prefixes)
{
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		const struct kvrt_config_key *k = &kvrt_config_keys[i];
		char lname[128], kname[128];
		snprintf(lname, sizeof(lname), "lmcache.%s", k->name);
		snprintf(kname, sizeof(kname), "kvrt.%s", k->name);
		struct kvrt_config a, b;
		fresh(&a);
		fresh(&b);
		char err[ERRLEN] = "";
		cr_expect_eq(kvrt_config_set(&a, kname, k->default_text, err, sizeof(err)), 0,
			     "%s: %s", kname, err);
		int rc = kvrt_config_set(&b, lname, k->default_text, err, sizeof(err));
		if (k->lmcache) {
			cr_expect_eq(rc, 0, "%s refused: %s", lname, err);
		} else {
			/* kvrt's own keys are not LMCache's: say how to write them. */
			cr_expect_eq(rc, -EINVAL, "%s accepted", lname);
			cr_expect(has(err, lname) && has(err, "kvrt's own key"), "%s", err);
		}
	}
	/* The LMCache spelling reaches the same field. */
	struct kvrt_config c;
	fresh(&c);
	expect_set(&c, "lmcache.chunk_size", "128");
	expect_set(&c, "lmcache.local_disk", "file://relative/dir/");
	expect_set(&c, "lmcache.max_local_disk_size", "0.5");
	expect_set(&c, "lmcache.cache_policy", "lru");
	cr_expect_eq(c.chunk_size, 128);
	cr_expect_str_eq(c.local_disk, "relative/dir/");
	cr_expect_eq(c.max_local_disk_size, 0.5);
	cr_expect_eq(c.cache_policy, KVRT_POLICY_LRU);
	cr_expect(kvrt_config_disk_enabled(&c));
}

Test(config, booleans_strict)
{
	static const char *const yes[] = {"true", "TRUE", "True", "1", "yes", "YES", "on", " true "};
	static const char *const no[] = {"false", "FALSE", "0", "no", "No", "off"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(yes); i++) {
		struct kvrt_config c;
		fresh(&c);
		expect_set(&c, "save_unfull_chunk", yes[i]);
		cr_expect(c.save_unfull_chunk, "%s", yes[i]);
	}
	for (size_t i = 0; i < KVRT_ARRAY_LEN(no); i++) {
		struct kvrt_config c;
		fresh(&c);
		expect_set(&c, "local_cpu", no[i]);
		cr_expect(!c.local_cpu, "%s", no[i]);
	}
	static const char *const bad[] = {"", "2", "truee", "t", "y", "-1", "ja", "true false"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(bad); i++)
		expect_refused("use_layerwise", bad[i], "true/false, 1/0, yes/no");
}

Test(config, integers_strict)
{
	static const char *const bad[] = {"", "abc", "-1", "1.5", "0x10", "1e3", "12abc", "256 tokens",
					  "99999999999999999999999"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(bad); i++)
		expect_refused("chunk_size", bad[i], "an integer in [1, 65536]");
	expect_refused("chunk_size", "0", "[1, 65536]");
	expect_refused("chunk_size", "65537", "out of range");
	expect_refused("lookup_timeout_ms", "0", "[1, 3600000]");
	expect_refused("min_retrieve_tokens", "1073741825", "[0, 1073741824]");
	expect_refused("mailbox_size", "1000", "power of two");
	expect_refused("mailbox_size", "32", "power of two");
	expect_refused("pin_timeout_ms", "86400001", "[0, 86400000]");
	expect_refused("prefetch_wait_ms", "600001", "[0, 600000]");
	expect_refused("remote_lookup_wait_ms", "0", "[1, 3600000]");
	expect_refused("consumer_wait_ms", "600001", "[0, 600000]");
	struct kvrt_config c;
	fresh(&c);
	expect_set(&c, "chunk_size", "+16");
	cr_expect_eq(c.chunk_size, 16);
	expect_set(&c, "chunk_size", "65536");
	cr_expect_eq(c.chunk_size, 65536);
	expect_set(&c, "min_retrieve_tokens", "1073741824");
	cr_expect_eq(c.min_retrieve_tokens, 1073741824u);
}

Test(config, sizes_strict)
{
	struct kvrt_config c;
	fresh(&c);
	expect_set(&c, "max_local_cpu_size", "5");
	cr_expect_eq(c.max_local_cpu_size, 5.0);
	expect_set(&c, "max_local_cpu_size", "0.25");
	cr_expect_eq(c.max_local_cpu_size, 0.25);
	expect_set(&c, "max_local_cpu_size", "1e2");
	cr_expect_eq(c.max_local_cpu_size, 100.0);
	expect_set(&c, "max_local_cpu_size", ".5");
	cr_expect_eq(c.max_local_cpu_size, 0.5);
	static const char *const bad[] = {"", "inf", "nan", "-1", "0x1p3", "5GB", "5 GB", "1e",
					  "five", "1.2.3", "1e999"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(bad); i++)
		expect_refused("max_local_cpu_size", bad[i], "a number of GB");
	expect_refused("max_local_disk_size", "2000000", "out of range");
	expect_refused("high_watermark", "0", "(0, 1]");
	expect_refused("high_watermark", "1.01", "(0, 1]");
	expect_refused("low_watermark", "1", "(0, 1)");
	cr_expect_eq(kvrt_config_gb_bytes(5.0), 5ull << 30);
	cr_expect_eq(kvrt_config_gb_bytes(0.5), 1ull << 29);
	cr_expect_eq(kvrt_config_gb_bytes(0), 0);
	cr_expect_eq(kvrt_config_gb_bytes(1e30), UINT64_MAX);
}

Test(config, paths_urls_enums)
{
	struct kvrt_config c;
	fresh(&c);
	expect_set(&c, "local_disk", "/var/cache/kvrt");
	cr_expect_str_eq(c.local_disk, "/var/cache/kvrt");
	expect_set(&c, "local_disk", "none");
	cr_expect_str_eq(c.local_disk, "");
	expect_set(&c, "local_disk", "file:///x");
	expect_set(&c, "local_disk", "null");
	cr_expect_str_eq(c.local_disk, "");
	expect_refused("local_disk", "s3://bucket/kv", "file:///path");
	expect_refused("local_disk", "file://", "file:///path");
	char longp[KVRT_CONFIG_STR_MAX + 4];
	memset(longp, 'a', sizeof(longp) - 1);
	longp[0] = '/';
	longp[sizeof(longp) - 1] = '\0';
	expect_refused("local_disk", longp, "longer than");
	expect_refused("trace", longp, "longer than");

	expect_set(&c, "remote_url", "redis://:secret@cache.internal:6380/2");
	expect_set(&c, "remote_url", "redis-cluster://10.0.0.1:7000,10.0.0.2:7000");
	cr_expect_str_eq(c.remote_url, "redis-cluster://10.0.0.1:7000,10.0.0.2:7000");
	expect_set(&c, "remote_url", "None");
	cr_expect_str_eq(c.remote_url, "");
	expect_refused("remote_url", "lm://localhost:65432", "redis-cluster://host:port");
	expect_refused("remote_url", "mooncakestore://x", "redis://");
	expect_refused("remote_url", "redis://", "names no host");
	expect_refused("remote_url", "rediss://cache:6380", "TLS");
	expect_refused("remote_url", "unix:///run/redis.sock", "redis-cluster://");
	expect_refused("remote_url", "localhost:6379", "redis://");

	static const char *const s3[] = {"S3-FIFO", "s3fifo", "S3_FIFO", "s3-fifo"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(s3); i++) {
		expect_set(&c, "cache_policy", s3[i]);
		cr_expect_eq(c.cache_policy, KVRT_POLICY_S3FIFO);
		expect_set(&c, "cache_policy", "LRU");
		cr_expect_eq(c.cache_policy, KVRT_POLICY_LRU);
	}
	/* LMCache's other policies: refused, naming what kvrt has. */
	static const char *const lmc[] = {"LFU", "FIFO", "MRU", "lfu"};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(lmc); i++) {
		expect_refused("cache_policy", lmc[i], "LRU, S3-FIFO");
		expect_refused("cache_policy", lmc[i], "LMCache policy");
	}
	expect_refused("cache_policy", "random", "LRU, S3-FIFO");
	expect_set(&c, "device", "CUDA");
	cr_expect_eq(c.device, KVRT_CONFIG_DEVICE_CUDA);
	expect_set(&c, "device", "auto");
	cr_expect_eq(c.device, KVRT_CONFIG_DEVICE_AUTO);
	expect_refused("device", "gpu", "auto, cuda, host");
}

Test(config, unknown_keys)
{
	expect_refused("chunk_sise", "256", "did you mean 'chunk_size'");
	expect_refused("lmcache.remote_serde", "naive", "unknown config key 'lmcache.remote_serde'");
	expect_refused("Chunk_Size", "256", "unknown config key");
	expect_refused("", "1", "unknown config key ''");
	struct kvrt_config c;
	fresh(&c);
	char err[ERRLEN];
	cr_expect_eq(kvrt_config_set(&c, NULL, "1", err, sizeof(err)), -EINVAL);
	cr_expect_eq(kvrt_config_set(&c, "chunk_size", NULL, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "chunk_size"), "%s", err);
	/* A NULL or tiny error buffer is fine. */
	cr_expect_eq(kvrt_config_set(&c, "nope", "1", NULL, 0), -EINVAL);
	char one[1] = {'x'};
	cr_expect_eq(kvrt_config_set(&c, "nope", "1", one, 1), -EINVAL);
	cr_expect_eq(one[0], '\0');
}

Test(config, check_rules)
{
	struct kvrt_config c;
	char err[ERRLEN];
	fresh(&c);
	expect_set(&c, "low_watermark", "0.96");
	cr_expect_eq(kvrt_config_check(&c, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "low_watermark") && has(err, "high_watermark"), "%s", err);
	fresh(&c);
	expect_set(&c, "max_local_cpu_size", "0");
	cr_expect_eq(kvrt_config_check(&c, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "max_local_cpu_size"), "%s", err);
	fresh(&c);
	expect_set(&c, "max_local_disk_size", "10"); /* no local_disk: valid, warned */
	cr_expect_eq(kvrt_config_check(&c, err, sizeof(err)), 0);
	cr_expect(!kvrt_config_disk_enabled(&c));
}

Test(config, describe)
{
	struct kvrt_config c;
	fresh(&c);
	char buf[4096];
	size_t n = kvrt_config_describe(&c, buf, sizeof(buf));
	cr_assert_lt(n, sizeof(buf));
	cr_expect_eq(strlen(buf), n);
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++)
		cr_expect(has(buf, kvrt_config_keys[i].name), "%s missing: %s",
			  kvrt_config_keys[i].name, buf);
	cr_expect(has(buf, "chunk_size=256 "), "%s", buf);
	cr_expect(!has(buf, "["), "defaults carry no source: %s", buf);
	expect_set(&c, "chunk_size", "512");
	expect_set(&c, "trace", "/tmp/a b.json");
	n = kvrt_config_describe(&c, buf, sizeof(buf));
	cr_expect(has(buf, "chunk_size=512[set]"), "%s", buf);
	cr_expect(has(buf, "trace=\"/tmp/a b.json\"[set]"), "%s", buf);
	/* Truncation: the return says how much is needed, the buffer stays a string. */
	char small[16];
	memset(small, 'x', sizeof(small));
	cr_expect_eq(kvrt_config_describe(&c, small, sizeof(small)), n);
	cr_expect_eq(strlen(small), sizeof(small) - 1);
	cr_expect_eq(kvrt_config_describe(&c, NULL, 0), n);
}

/* --- environment ---------------------------------------------------------- */

static void env_clear(void)
{
	for (int i = 0; i < KVRT_CONFIG_NUM_KEYS; i++) {
		char a[64] = "KVRT_", b[64] = "LMCACHE_";
		for (const char *k = kvrt_config_keys[i].name; *k; k++) {
			size_t la = strlen(a), lb = strlen(b);
			a[la] = (char)(*k >= 'a' && *k <= 'z' ? *k - 32 : *k);
			a[la + 1] = '\0';
			b[lb] = a[la];
			b[lb + 1] = '\0';
		}
		unsetenv(a);
		unsetenv(b);
	}
	unsetenv("KVRT_CONFIG_FILE");
	unsetenv("LMCACHE_CONFIG_FILE");
}

Test(config, env_precedence)
{
	env_clear();
	struct kvrt_config c;
	char err[ERRLEN] = "";
	fresh(&c);
	cr_assert_eq(kvrt_config_from_env(&c, err, sizeof(err)), 0, "%s", err);
	struct kvrt_config d;
	fresh(&d);
	cr_expect(!memcmp(&c, &d, sizeof(c)), "empty environment changed the config");

	setenv("LMCACHE_CHUNK_SIZE", "128", 1);
	setenv("LMCACHE_LOCAL_DISK", "file:///data/lmc", 1);
	setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "20", 1);
	setenv("KVRT_LOCAL_DISK", "/data/kvrt", 1); /* KVRT_ wins over LMCACHE_ */
	setenv("KVRT_MAILBOX_SIZE", "1024", 1);
	setenv("LMCACHE_HIGH_WATERMARK", "0.5", 1); /* not an LMCache key: ignored */
	setenv("LMCACHE_CACHE_POLICY", "s3-fifo", 1);
	fresh(&c);
	cr_assert_eq(kvrt_config_from_env(&c, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(c.chunk_size, 128);
	cr_expect_str_eq(c.local_disk, "/data/kvrt");
	cr_expect_eq(c.max_local_disk_size, 20.0);
	cr_expect_eq(c.mailbox_size, 1024);
	cr_expect_eq(c.high_watermark, 0.95);
	cr_expect_eq(c.cache_policy, KVRT_POLICY_S3FIFO);
	cr_expect_eq(c.source[kvrt_config_key_index("chunk_size")], KVRT_CONFIG_SRC_ENV);
	cr_expect_eq(c.source[kvrt_config_key_index("trace")], KVRT_CONFIG_SRC_DEFAULT);
	char buf[4096];
	kvrt_config_describe(&c, buf, sizeof(buf));
	cr_expect(has(buf, "chunk_size=128[env]"), "%s", buf);

	/* A bad value names the variable, the key and what is accepted; c unchanged. */
	setenv("KVRT_SAVE_DECODE_CACHE", "maybe", 1);
	fresh(&c);
	d = c;
	cr_expect_eq(kvrt_config_from_env(&c, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "KVRT_SAVE_DECODE_CACHE") && has(err, "save_decode_cache") &&
			  has(err, "true/false"),
		  "%s", err);
	cr_expect(!memcmp(&c, &d, sizeof(c)));
	unsetenv("KVRT_SAVE_DECODE_CACHE");
	setenv("LMCACHE_LOOKUP_TIMEOUT_MS", "-5", 1);
	cr_expect_eq(kvrt_config_from_env(&c, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "LMCACHE_LOOKUP_TIMEOUT_MS") && has(err, "lookup_timeout_ms"), "%s", err);
	env_clear();
}

/* --- YAML ----------------------------------------------------------------- */

/* A temporary file with this text; *dir to remove after. */
static void write_file(char *dir, char *path, size_t plen, const char *text, size_t len)
{
	strcpy(dir, "/tmp/kvrt-test-config-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, plen, "%s/lmcache.yaml", dir);
	FILE *f = fopen(path, "wb");
	cr_assert_not_null(f);
	cr_assert_eq(fwrite(text, 1, len, f), len);
	fclose(f);
}

static void remove_file(const char *dir, const char *path)
{
	unlink(path);
	rmdir(dir);
}

/* Load text; return rc, message in err, the result in c (from defaults). */
static int load_text(const char *text, struct kvrt_config *c, char *err, size_t errlen)
{
	char dir[64], path[128];
	write_file(dir, path, sizeof(path), text, strlen(text));
	fresh(c);
	struct kvrt_config before = *c;
	memset(err, 'x', errlen);
	err[errlen - 1] = '\0';
	int rc = kvrt_config_load_yaml(c, path, err, errlen);
	if (rc)
		cr_expect(!memcmp(c, &before, sizeof(*c)), "failed load changed the config");
	cr_expect(rc != 0 || c->chunk_size != 0); /* touch */
	if (rc)
		cr_expect(has(err, path), "message lacks the path: %s", err);
	remove_file(dir, path);
	return rc;
}

Test(config, yaml_good_file)
{
	/* An LMCache-style file: comments, quotes, blank lines, CRLF, trailing comments. */
	const char *good =
		"\xEF\xBB\xBF# LMCache configuration\n"
		"---\n"
		"chunk_size: 512   # tokens\n"
		"\n"
		"local_cpu: False\r\n"
		"max_local_cpu_size: 2.5\n"
		"  # an indented comment is fine\n"
		"local_disk: \"file:///mnt/nvme/kv cache/\"\n"
		"max_local_disk_size: '10'\n"
		"remote_url: \"redis://host:6379\" # shared\n"
		"save_unfull_chunk: yes\n"
		"save_decode_cache: \"true\"\n"
		"use_layerwise: off\n"
		"enable_async_loading: 1\n"
		"cache_policy: S3-FIFO\n"
		"lookup_timeout_ms: 100\n"
		"min_retrieve_tokens: 64\n"
		"kvrt.trace: 'it''s #not a comment.json'\n"
		"\"device\": host\n"
		"low_watermark:    0.5\n"
		"pin_timeout_ms: 5000\n"
		"...\n"
		"this is after the document end and ignored\n";
	struct kvrt_config c;
	char err[ERRLEN];
	int rc = load_text(good, &c, err, sizeof(err));
	cr_assert_eq(rc, 0, "%s", err);
	cr_expect_eq(c.chunk_size, 512);
	cr_expect(!c.local_cpu);
	cr_expect_eq(c.max_local_cpu_size, 2.5);
	cr_expect_str_eq(c.local_disk, "/mnt/nvme/kv cache/");
	cr_expect_eq(c.max_local_disk_size, 10.0);
	cr_expect_str_eq(c.remote_url, "redis://host:6379");
	cr_expect(c.save_unfull_chunk && c.save_decode_cache && !c.use_layerwise &&
		  c.enable_async_loading);
	cr_expect_eq(c.cache_policy, KVRT_POLICY_S3FIFO);
	cr_expect_eq(c.lookup_timeout_ms, 100);
	cr_expect_eq(c.min_retrieve_tokens, 64);
	cr_expect_str_eq(c.trace, "it's #not a comment.json");
	cr_expect_eq(c.device, KVRT_CONFIG_DEVICE_HOST);
	cr_expect_eq(c.low_watermark, 0.5);
	cr_expect_eq(c.pin_timeout_ms, 5000);
	cr_expect_eq(c.source[0], KVRT_CONFIG_SRC_FILE);
	cr_expect_eq(c.source[kvrt_config_key_index("mailbox_size")], KVRT_CONFIG_SRC_DEFAULT);

	/* Escapes, empty (null) values, no final newline. */
	rc = load_text("trace: \"a\\tb\\\\c\\\"d\\/e\"\nlocal_disk:\nremote_url: ~\nchunk_size: 64",
		       &c, err, sizeof(err));
	cr_assert_eq(rc, 0, "%s", err);
	cr_expect_str_eq(c.trace, "a\tb\\c\"d/e");
	cr_expect_str_eq(c.local_disk, "");
	cr_expect_eq(c.chunk_size, 64);
	/* An empty file and a comments-only file are fine. */
	cr_expect_eq(load_text("", &c, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(load_text("# nothing\n\n   \n", &c, err, sizeof(err)), 0, "%s", err);
}

/* rc must be -EINVAL and err must hold every needle. */
static void yaml_refused(const char *text, const char *n1, const char *n2, const char *n3)
{
	struct kvrt_config c;
	char err[ERRLEN];
	int rc = load_text(text, &c, err, sizeof(err));
	cr_expect_eq(rc, -EINVAL, "accepted: %s", text);
	const char *n[3] = {n1, n2, n3};
	for (int i = 0; i < 3; i++)
		if (n[i])
			cr_expect(has(err, n[i]), "message lacks '%s': %s", n[i], err);
}

Test(config, yaml_rejects)
{
	/* Each text is refused with a message holding every non-NULL part. */
	static const struct {
		const char *text, *n1, *n2, *n3;
	} cases[] = {
		/* Nested structure: line number and the parent key. */
		{"chunk_size: 256\nextra_config:\n  use_odirect: true\n", "line 3", "nested structure under 'extra_config' (line 2)", NULL},
		{"chunk_size: 256\nlocal_disk:\n\n  # c\n  path: /x\n", "line 5", "nested", "'local_disk'"},
		{"chunk_size: 256\n  local_cpu: true\n", "line 2", "indentation", NULL},
		{"chunk_size: 256\n\tlocal_cpu: true\n", "line 2", NULL, NULL},
		{"- chunk_size\n", "line 1", "sequences", NULL},
		{"a: 1\nchunk_size: [1, 2]\n", "line 1", "unknown config key 'a'", NULL},
		{"chunk_size: [1, 2]\n", "line 1", "flow collections", NULL},
		{"chunk_size: {a: 1}\n", "line 1", "flow collections", NULL},
		{"chunk_size: &x 1\n", "line 1", "anchors", NULL},
		{"chunk_size: *x\n", "line 1", "aliases", NULL},
		{"chunk_size: !!int 1\n", "line 1", "tags", NULL},
		{"trace: |\n  x\n", "line 1", "block scalars", NULL},
		{"local_disk: a: b\n", "line 1", "nested mapping", NULL},
		{"%YAML 1.2\n---\n", "line 1", "directives", NULL},
		{"chunk_size: 1\n---\nchunk_size: 2\n", "line 2", "several", NULL},
		{"{chunk_size: 1}\n", "line 1", NULL, NULL},
		{"chunk_size 256\n", "line 1", "expected 'key: value'", NULL},
		{"chunk_size:256\n", "line 1", "expected 'key: value'", NULL},
		{"trace: \"abc\n", "line 1", "unterminated", NULL},
		{"trace: 'abc\n", "line 1", "unterminated", NULL},
		{"trace: \"a\\qb\"\n", "line 1", "escape", NULL},
		{"trace: \"abc\" tail\n", "line 1", "after the quoted value", NULL},
		{": 5\n", "line 1", "empty key", NULL},
		/* Unknown keys and bad values: line, key, accepted values. */
		{"# c\nchunk_size: 256\nremote_serde: naive\n", "line 3", "unknown config key 'remote_serde'", NULL},
		{"\n\nchunk_size: lots\n", "line 3", "chunk_size", "an integer in [1, 65536]"},
		{"cache_policy: LFU\n", "line 1", "cache_policy", "LRU, S3-FIFO"},
		{"local_cpu: maybe\n", "line 1", "local_cpu", "true/false"},
		{"max_local_cpu_size: 5GB\n", "line 1", "max_local_cpu_size", "number of GB"},
		{"chunk_size:\n", "line 1", "chunk_size", "an integer"},
		/* A key twice (also under another spelling). */
		{"chunk_size: 1\nlocal_cpu: true\nlmcache.chunk_size: 2\n", "line 3", "set twice (lines 1 and 3)", NULL},
	};
	for (size_t i = 0; i < KVRT_ARRAY_LEN(cases); i++)
		yaml_refused(cases[i].text, cases[i].n1, cases[i].n2, cases[i].n3);
	/* A line too long. */
	char *big = malloc(6000);
	cr_assert_not_null(big);
	memset(big, 'a', 5999);
	memcpy(big, "trace: ", 7);
	big[5999] = '\0';
	yaml_refused(big, "line 1", "longer than 4096", NULL);
	free(big);
}

Test(config, yaml_file_errors)
{
	struct kvrt_config c;
	char err[ERRLEN];
	fresh(&c);
	cr_expect_eq(kvrt_config_load_yaml(&c, "/nonexistent/kvrt.yaml", err, sizeof(err)), -ENOENT);
	cr_expect(has(err, "/nonexistent/kvrt.yaml"), "%s", err);
	cr_expect_eq(kvrt_config_load_yaml(&c, "/tmp", err, sizeof(err)), -EINVAL);
	cr_expect_eq(kvrt_config_load_yaml(&c, "", err, sizeof(err)), -EINVAL);
	/* NUL bytes: not a text file. */
	char dir[64], path[128];
	write_file(dir, path, sizeof(path), "chunk_size: 1\0\n", 15);
	cr_expect_eq(kvrt_config_load_yaml(&c, path, err, sizeof(err)), -EINVAL);
	cr_expect(has(err, "NUL"), "%s", err);
	remove_file(dir, path);
	/* Over 1 MiB. */
	size_t n = (1u << 20) + 1;
	char *big = malloc(n);
	cr_assert_not_null(big);
	memset(big, '#', n);
	write_file(dir, path, sizeof(path), big, n);
	free(big);
	cr_expect_eq(kvrt_config_load_yaml(&c, path, err, sizeof(err)), -EFBIG);
	remove_file(dir, path);
}

/* defaults < file < env < set, through kvrt_config_init. */
Test(config, init_precedence)
{
	env_clear();
	char kdir[64], kpath[128], ldir[64], lpath[128];
	const char *ktext = "chunk_size: 512\nlocal_cpu: false\nmax_local_cpu_size: 3\n"
			    "mailbox_size: 256\n";
	const char *ltext = "chunk_size: 1024\nsave_unfull_chunk: true\n";
	write_file(kdir, kpath, sizeof(kpath), ktext, strlen(ktext));
	write_file(ldir, lpath, sizeof(lpath), ltext, strlen(ltext));
	struct kvrt_config c;
	char err[ERRLEN] = "";

	/* LMCACHE_CONFIG_FILE alone is read. */
	setenv("LMCACHE_CONFIG_FILE", lpath, 1);
	memset(&c, 0x5a, sizeof(c));
	cr_assert_eq(kvrt_config_init(&c, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(c.chunk_size, 1024);
	cr_expect(c.save_unfull_chunk);

	/* KVRT_CONFIG_FILE wins over it (only one file is read). */
	setenv("KVRT_CONFIG_FILE", kpath, 1);
	cr_assert_eq(kvrt_config_init(&c, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(c.chunk_size, 512);
	cr_expect(!c.save_unfull_chunk);
	cr_expect(!c.local_cpu);
	cr_expect_eq(c.mailbox_size, 256);

	/* The environment overrides the file, the shim's set() overrides both. */
	setenv("LMCACHE_CHUNK_SIZE", "2048", 1);
	setenv("KVRT_MAX_LOCAL_CPU_SIZE", "7", 1);
	cr_assert_eq(kvrt_config_init(&c, err, sizeof(err)), 0, "%s", err);
	cr_expect_eq(c.chunk_size, 2048);
	cr_expect_eq(c.max_local_cpu_size, 7.0);
	cr_expect(!c.local_cpu); /* from the file */
	cr_expect_eq(c.source[kvrt_config_key_index("local_cpu")], KVRT_CONFIG_SRC_FILE);
	cr_expect_eq(c.source[kvrt_config_key_index("chunk_size")], KVRT_CONFIG_SRC_ENV);
	expect_set(&c, "lmcache.chunk_size", "64");
	cr_expect_eq(c.chunk_size, 64);
	cr_expect_eq(c.source[kvrt_config_key_index("chunk_size")], KVRT_CONFIG_SRC_SET);
	char buf[4096];
	kvrt_config_describe(&c, buf, sizeof(buf));
	cr_expect(has(buf, "chunk_size=64[set]") && has(buf, "local_cpu=false[file]") &&
			  has(buf, "max_local_cpu_size=7[env]") && has(buf, "device=auto "),
		  "%s", buf);

	/* A broken file fails init with its message. */
	remove_file(kdir, kpath);
	cr_expect_eq(kvrt_config_init(&c, err, sizeof(err)), -ENOENT);
	cr_expect(has(err, kpath), "%s", err);
	remove_file(ldir, lpath);
	env_clear();
}
