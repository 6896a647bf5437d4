/* connector/config.h: kvrt's configuration, every key, its default, and the
 * four places a value can come from.
 *
 * Owns: struct kvrt_config (a plain value: copy it, keep it on the stack, no
 * allocation, nothing to free) and the key table kvrt_config_keys[].
 *
 * Keys. kvrt accepts LMCache's keys under the same names and meanings, so a
 * user switching from LMCache edits one line (the connector name), and adds a
 * few of its own. The full table, with defaults and accepted values, is
 * kvrt_config_keys[] (the README and the Python shim print it):
 *
 *   key                   default  LMCache  meaning
 *   chunk_size            256      same     tokens per chunk (the key chain's unit)
 *   local_cpu             true     same     keep chunks in the CPU pool (false:
 *                                           the pool only stages for disk/remote)
 *   max_local_cpu_size    5.0      same     CPU pool per worker, GB (2^30 bytes)
 *   local_disk            none     same     disk tier directory ("file:///path" or a path)
 *   max_local_disk_size   0        same     disk tier budget, GB; on when > 0 and local_disk set
 *   remote_url            none     same     remote tier ("redis://host:port", ...)
 *   save_unfull_chunk     false    same     also save a prompt's last partial chunk
 *   save_decode_cache     false    same     also save KV made while decoding
 *   use_layerwise         false    same     load and save layer by layer
 *   enable_async_loading  false    same     loads run while the request waits
 *   cache_policy          LRU      same     CPU eviction: LRU or S3-FIFO (LMCache's
 *                                           LFU, FIFO, MRU are refused with a message)
 *   lookup_timeout_ms     3000     same     longest a lookup may take
 *   min_retrieve_tokens   0        same     hits shorter than this are not loaded
 *   high_watermark        0.95     -        evict above this share of the CPU pool
 *   low_watermark         0.85     -        ... down to this share
 *   mailbox_size          4096     -        actor mailbox slots (power of two)
 *   pin_timeout_ms        600000   -        a lookup's pin is dropped after this (0 = never)
 *   disk_odirect          false    -        O_DIRECT for the disk tier
 *   device                auto     -        copy engine: auto, cuda or host
 *   trace                 none     -        Chrome trace output path (%p = pid)
 *   prefetch_wait_ms      1000     -        without enable_async_loading: how long a
 *                                           request whose hit is partly on disk or in
 *                                           Redis waits (vLLM asks again each pass)
 *                                           for those chunks to reach the CPU tier
 *   remote_lookup_wait_ms 5        -        how long a request missing locally waits
 *                                           (asked again each pass, nothing blocks) for
 *                                           Redis to say what it holds (at most
 *                                           lookup_timeout_ms)
 *   consumer_wait_ms      3000     -        kv_consumer only: how long a request whose
 *                                           prompt's chunks are not all in the shared
 *                                           tier yet is asked about again (not
 *                                           scheduled) while its producer's writes
 *                                           land; then what is missing is recomputed
 *
 * Names. A key may be written bare ("chunk_size"), or prefixed "kvrt." or
 * "lmcache." (as LMCache's kv_connector_extra_config spells them); the
 * "lmcache." prefix and the LMCACHE_ environment variables reach only the
 * keys LMCache has. Keys are lower case, exact.
 *
 * Values are parsed strictly; a bad one changes nothing and gives -EINVAL with
 * one message naming the key, the value and what is accepted:
 *   booleans  true/false, 1/0, yes/no, on/off (any case)
 *   integers  decimal digits only, range-checked per key
 *   GB sizes  a plain decimal number (5, 2.5, 1e2), finite, range-checked
 *   paths     local_disk: "file:///abs", "file://rel" or a plain path;
 *             "", "none", "null" or "~" = unset
 *   urls      remote_url: redis:// or redis-cluster:// (actors/remote.h parses the
 *             rest when the tier starts); "none" = unset
 * Surrounding blanks are ignored.
 *
 * Precedence, lowest first (each source overrides the ones above it):
 *   1. defaults                           kvrt_config_defaults
 *   2. one YAML file: KVRT_CONFIG_FILE, or LMCACHE_CONFIG_FILE when
 *      KVRT_CONFIG_FILE is unset          kvrt_config_load_yaml
 *   3. environment: KVRT_<KEY>, or LMCACHE_<KEY> when KVRT_<KEY> is unset
 *      (KEY upper case: KVRT_CHUNK_SIZE)  kvrt_config_from_env
 *   4. kv_connector_extra_config entries, passed by the Python shim one by one
 *                                         kvrt_config_set
 * kvrt_config_init does 1-3; the shim then does 4 and calls
 * kvrt_config_check for the rules that span keys.
 *
 * YAML. LMCache's files are flat maps; kvrt reads that subset: `key: value`
 * lines, comments (# to end of line, after a blank), blank lines, an opening
 * `---`, plain, 'single-' and "double-quoted" scalars (\\ \" \n \t \r \/
 * escapes), CRLF line ends. Anything nested or YAML-only (indented lines, a
 * key with an empty value followed by indented lines, `- ` items, [ ] { }
 * collections, anchors, tags, block scalars, directives, several documents)
 * is refused with the file name and line number. A key given twice is an
 * error. At most 1 MiB, lines of at most 4096 bytes.
 *
 * Errors are written into the caller's err buffer (truncated to errlen, always
 * NUL-terminated when errlen > 0; err may be NULL). Nothing here logs except
 * kvrt_config_from_env/kvrt_config_init (a warning when KVRT_ and LMCACHE_
 * disagree) and kvrt_config_check (warnings for valid but odd combinations).
 * A failing call leaves the config as it was.
 *
 * Threads: every function works on the caller's struct only: any thread,
 * one writer per struct. kvrt_config_from_env/init read the environment
 * (getenv): do not setenv concurrently.
 */
#ifndef KVRT_CONNECTOR_CONFIG_H
#define KVRT_CONNECTOR_CONFIG_H

#include "actors/policy.h"
#include "runtime/common.h"

/* Longest path or url stored, NUL included. */
#define KVRT_CONFIG_STR_MAX 1024

/* Number of keys in kvrt_config_keys[] (and in the source[] array). */
#define KVRT_CONFIG_NUM_KEYS 23

/* The copy engine to use. */
enum kvrt_config_device {
	KVRT_CONFIG_DEVICE_AUTO = 0, /* CUDA when a GPU is usable, else host */
	KVRT_CONFIG_DEVICE_CUDA = 1, /* CUDA or fail at start */
	KVRT_CONFIG_DEVICE_HOST = 2, /* host copies (CPU KV tensors, tests) */
};

/* Where a key's value came from (kvrt_config_describe shows it). */
enum kvrt_config_source {
	KVRT_CONFIG_SRC_DEFAULT = 0, /* kvrt_config_defaults */
	KVRT_CONFIG_SRC_FILE = 1,    /* the YAML file */
	KVRT_CONFIG_SRC_ENV = 2,     /* KVRT_<KEY> or LMCACHE_<KEY> */
	KVRT_CONFIG_SRC_SET = 3,     /* kvrt_config_set (kv_connector_extra_config) */
};

struct kvrt_config {
	/* LMCache's keys, same meaning. */
	uint32_t chunk_size;          /* tokens per chunk; 256 */
	bool local_cpu;               /* CPU pool keeps chunks; true */
	double max_local_cpu_size;    /* CPU pool per worker, GB (2^30 B); 5.0 */
	char local_disk[KVRT_CONFIG_STR_MAX]; /* disk tier directory, file:// removed; "" = none */
	double max_local_disk_size;   /* disk tier budget, GB; 0 = off */
	char remote_url[KVRT_CONFIG_STR_MAX]; /* remote tier url; "" = none */
	bool save_unfull_chunk;       /* save a prompt's last partial chunk; false */
	bool save_decode_cache;       /* save decode-phase KV; false */
	bool use_layerwise;           /* layer-by-layer load and save; false */
	bool enable_async_loading;    /* loads overlap the request's wait; false */
	enum kvrt_policy_kind cache_policy; /* CPU tier eviction; LRU */
	uint32_t lookup_timeout_ms;   /* longest lookup; 3000 */
	uint32_t min_retrieve_tokens; /* shorter hits are not loaded; 0 */
	/* kvrt's own. */
	double high_watermark;        /* evict above this pool share; 0.95 */
	double low_watermark;         /* ... down to this share; 0.85 */
	uint32_t mailbox_size;        /* actor mailbox slots, power of two; 4096 */
	uint32_t pin_timeout_ms;      /* lookup pins expire after this; 0 = never; 600000 */
	bool disk_odirect;            /* O_DIRECT on the disk tier; false */
	enum kvrt_config_device device; /* copy engine; auto */
	char trace[KVRT_CONFIG_STR_MAX]; /* trace output path; "" = off */
	uint32_t prefetch_wait_ms;    /* sync loads: wait for disk/Redis chunks; 1000 */
	uint32_t remote_lookup_wait_ms; /* wait for Redis' EXISTS answer; 5 */
	uint32_t consumer_wait_ms;    /* kv_consumer: wait for a producer's chunks; 3000 */
	/* Bookkeeping. */
	uint8_t source[KVRT_CONFIG_NUM_KEYS]; /* enum kvrt_config_source per key */
};

/* How a key's value is written. */
enum kvrt_config_type {
	KVRT_CONFIG_BOOL = 1,  /* true/false, 1/0, yes/no, on/off */
	KVRT_CONFIG_INT = 2,   /* decimal integer in a range */
	KVRT_CONFIG_GB = 3,    /* decimal number of GB (2^30 bytes) */
	KVRT_CONFIG_FLOAT = 4, /* decimal number in a range */
	KVRT_CONFIG_ENUM = 5,  /* one of a few names */
	KVRT_CONFIG_PATH = 6,  /* a path (file:// allowed) or none */
	KVRT_CONFIG_URL = 7,   /* a url or none */
};

/* One row of the key table. */
struct kvrt_config_key {
	const char *name;          /* the key, as written in files and set() */
	enum kvrt_config_type type;/* how its value is written */
	const char *default_text;  /* the default, as text */
	const char *accepted;      /* accepted values, as the error messages say it */
	const char *meaning;       /* one sentence */
	const char *lmcache;       /* LMCache's key of the same meaning, or NULL */
};

/* Every key, in struct order. Any thread (constant). */
KVRT_API extern const struct kvrt_config_key kvrt_config_keys[KVRT_CONFIG_NUM_KEYS];

/* Reset every key to its default (source DEFAULT). */
KVRT_API void kvrt_config_defaults(struct kvrt_config *c);

/* Set one key from text ("chunk_size", "512"); key may carry the "kvrt." or
 * "lmcache." prefix. 0, or -EINVAL (unknown key, bad value: message in err,
 * c unchanged). Source SET. */
KVRT_API int kvrt_config_set(struct kvrt_config *c, const char *key, const char *value,
			     char *err, size_t errlen);

/* Apply KVRT_<KEY> / LMCACHE_<KEY> for every key (see precedence above).
 * 0 or -EINVAL (message names the variable; c unchanged). */
KVRT_API int kvrt_config_from_env(struct kvrt_config *c, char *err, size_t errlen);

/* Apply a flat YAML file (see above). 0, -EINVAL (syntax or value: message
 * with path and line; c unchanged), or the open/read error (-ENOENT, -EACCES,
 * -EFBIG over 1 MiB, ...) with a message. */
KVRT_API int kvrt_config_load_yaml(struct kvrt_config *c, const char *path, char *err,
				   size_t errlen);

/* Defaults, then the file of KVRT_CONFIG_FILE (or LMCACHE_CONFIG_FILE), then
 * the environment. 0 or the first failing step's error (c then holds the
 * defaults). */
KVRT_API int kvrt_config_init(struct kvrt_config *c, char *err, size_t errlen);

/* Rules across keys, to call once every source is applied:
 * low_watermark < high_watermark, and max_local_cpu_size > 0 (every chunk
 * passes through CPU memory). 0 or -EINVAL with a message. Logs a warning for
 * valid but likely unintended settings (a disk budget without local_disk;
 * local_cpu false without a lower tier: nothing would be kept). */
KVRT_API int kvrt_config_check(const struct kvrt_config *c, char *err, size_t errlen);

/* One key's effective value as text (the form set() accepts back).
 * 0, -EINVAL (unknown key), -ENOSPC (truncated). */
KVRT_API int kvrt_config_get(const struct kvrt_config *c, const char *key, char *buf,
			     size_t len);

/* The effective config on one line for logs: "chunk_size=256 local_cpu=true
 * ... trace=none", values not from the defaults followed by their source in
 * brackets: "chunk_size=512[env]". Returns the length the whole line needs
 * (like snprintf); writes at most len bytes, NUL-terminated when len > 0. */
KVRT_API size_t kvrt_config_describe(const struct kvrt_config *c, char *buf, size_t len);

/* GB (as LMCache counts: 2^30 bytes) to bytes, saturating. */
KVRT_API uint64_t kvrt_config_gb_bytes(double gb);

/* True when the disk tier is on: local_disk set and max_local_disk_size > 0. */
static inline bool kvrt_config_disk_enabled(const struct kvrt_config *c)
{
	return c->local_disk[0] != '\0' && c->max_local_disk_size > 0;
}

/* The index of key (prefix allowed) in kvrt_config_keys[], or -1. */
KVRT_API int kvrt_config_key_index(const char *key);

#endif
