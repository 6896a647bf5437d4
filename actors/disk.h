/* actors/disk.h: the local disk tier, one file per chunk in a directory.
 *
 * Owns: the directory (exclusively, through a lock file), the files in it,
 * the key -> file map, the tier's LRU order and byte budget, and the "disk"
 * actor that does every read, write, unlink and fsync. No I/O runs on the
 * caller's thread after kvrt_disk_open returns.
 *
 *   struct kvrt_disk *d;
 *   rc = kvrt_disk_open(&d, &(struct kvrt_disk_config){
 *           .dir = "/mnt/nvme/kvrt", .budget_bytes = 100ull << 30,
 *           .namespace_hash = ns, .notify = evict_actor, .msg_base = EV_DISK,
 *           .on_found = reindex, .ctx = idx });     // on_found: every chunk on disk
 *   rc = kvrt_disk_write(d, &hdr, slab, cookie);    // -> EV_DISK + KVRT_DISK_WRITTEN
 *   rc = kvrt_disk_read(d, key, slab, cap, cookie); // -> EV_DISK + KVRT_DISK_READ_DONE
 *   rc = kvrt_disk_remove(d, key);                  // -> EV_DISK + KVRT_DISK_REMOVED
 *   ...                                             // EV_DISK + KVRT_DISK_DROPPED any time
 *   kvrt_disk_close(d);                             // drains, then unlocks
 *
 * Threads: open and close on one owner thread, never the disk actor's; write,
 * read and remove from any thread, but requests about one key are ordered
 * only when they come from one thread (normally the evict actor: the single
 * writer of the index). stats from any thread. Close while the notify actor
 * still runs (e.g. before stopping it): close finishes the accepted work and
 * posts its completions there; a stopped notify actor loses them (counted).
 * Closing from the notify actor's own handler works too, but it cannot drain
 * its mailbox meanwhile: completions beyond its free room are lost after 5 s.
 *
 * Files
 *   <dir>/lock                       flock(LOCK_EX) while open
 *   <dir>/<xx>/<32 hex key>.kvc      a chunk; xx = first two hex digits
 *   <dir>/<xx>/<32 hex key>.tmp      a write in progress (removed at open)
 * The key is printed as hi then lo, %016llx%016llx. Up to 256 subdirectories
 * (made on first use) keep directories small at millions of chunks. A .kvc file is
 *     [0, 80)        the encoded chunk header (actors/chunk.h)
 *     [80, 4096)     zero
 *     [4096, +len)   the payload, payload_len bytes; file size 4096 + len
 * The payload starts on a 4 KiB boundary so that O_DIRECT can read it into
 * an aligned slab without a bounce copy. A file appears under its .kvc name
 * only by rename(2) of a fully written .tmp, so a crash never leaves a half
 * file under a valid name, and the checksum catches what a power loss may
 * still tear (see "Durability").
 *
 * Verification
 * - At open: each file's header is decoded and checked (magic, version,
 *   sizes, key == file name, namespace == config) and the file size must be
 *   4096 + payload_len. The payload checksum is not read at open: a 1 TB tier
 *   would take minutes to start. Files that fail are skipped with one
 *   kvrt_warn each; those that decode as this namespace's chunks (truncated,
 *   wrong size, wrong name) are deleted, foreign and undecodable ones are left
 *   alone (they may belong to someone else), and not counted in the budget.
 * - On every read: header again (key, namespace, payload_len <= cap, file
 *   size) and the XXH3-64 checksum over header and payload, computed while
 *   reading. A failure deletes the file.
 *
 * Durability: a cache, not a store. No fdatasync by default: losing a
 * recently written chunk in a power cut costs a recompute, and a torn or
 * zero-filled file fails its checksum (never served), while an fdatasync per
 * chunk halves write throughput on many SSDs. Set .fsync for the paranoid
 * (fdatasync before rename).
 *
 * Budget and LRU: budget_bytes bounds the sum of file sizes (payload + 4 KiB
 * each). Before a write the actor deletes least-recently-used chunks until the
 * new one fits and reports each with DROPPED. A successful read moves the
 * chunk to the most-recently-used end and sets the file's mtime, so the order
 * survives a restart (open orders the LRU by mtime). Chunks found at open
 * beyond the budget (it was lowered) are deleted oldest first and not
 * reported.
 *
 * Scheduling: one actor thread, plain pread/pwrite (no io_uring yet: one
 * large request per chunk keeps a device busy from one thread, and buffered
 * reads get queue depth from the kernel through POSIX_FADV_WILLNEED on the
 * next queued files, up to 8 files / 256 MiB ahead; io_uring would add depth
 * for small chunks and O_DIRECT, later). Removes are handled as they arrive.
 * Reads and writes are queued inside the actor and served one per loop
 * iteration, reads first; a write goes in steps of up to 8 MiB. So a
 * promotion (a read, on the load path) waits for at most one step of a
 * demotion (a write, in the background); a steady stream of reads delays
 * writes (they then back up to max_pending_writes and -EAGAIN).
 *
 * Completions: every accepted request gets exactly one message on
 * cfg->notify, type = msg_base + enum kvrt_disk_event, laid out as
 *     arg.u64[0], arg.u64[1]  key.lo, key.hi
 *     arg.i64[2]              status: 0 or -errno (see each event)
 *     arg.u64[3]              the request's cookie (0 for REMOVED, DROPPED)
 *     arg.u64[4]              bytes: payload bytes written / read, or file
 *                             bytes freed (REMOVED, DROPPED); 0 on failure
 *     arg32                   unused (0)
 * A full notify mailbox never loses a completion: the actor keeps undelivered
 * ones in order in a private queue and retries every 200 us from a timer
 * (it keeps serving requests meanwhile; counted in stats.notify_delayed).
 * At close it waits up to 5 s for room; only if the notify actor stopped or
 * stays full that long is a completion lost (stats.notify_lost, one
 * kvrt_error). Messages come in the order the actor produced them.
 */
#ifndef KVRT_ACTORS_DISK_H
#define KVRT_ACTORS_DISK_H

#include "actors/chunk.h"
#include "runtime/actor.h"

struct kvrt_disk;

/* Offset of the payload in a .kvc file (the header block's size). */
#define KVRT_DISK_DATA_OFFSET 4096u

/* Completion events; a message's type is cfg->msg_base + one of these. */
enum kvrt_disk_event {
	/* A write finished. status: 0 (on disk, or was already), -E2BIG (larger
	 * than the whole budget), -ECANCELED (a remove of the key came first),
	 * -ENOSPC / -EDQUOT / -EFBIG / -EIO / ... (the file system refused; no
	 * file remains). The payload may be reused once this arrives. */
	KVRT_DISK_WRITTEN = 0,
	/* A read finished. status 0: dst holds exactly the chunk's payload_len
	 * (arg.u64[4]) verified bytes. Nonzero: dst is garbage (whatever kvrt
	 * wrote into it is overwritten with 0xff, a NaN pattern in every float
	 * format, so a misuse is loud); -ENOENT (not on disk, or the file vanished), -EBADMSG
	 * (corrupt or truncated file: deleted), -EMSGSIZE (payload_len > cap; the
	 * file stays), -EIO and other read errors. ENOENT and EBADMSG are
	 * followed by nothing else: see DROPPED. */
	KVRT_DISK_READ_DONE = 1,
	/* A remove finished. status 0 (deleted; arg.u64[4] bytes freed) or
	 * -ENOENT (not on disk). */
	KVRT_DISK_REMOVED = 2,
	/* The tier forgot a key without a remove request: status 0 = evicted by
	 * the budget, -EBADMSG = corrupt file found by a read, -ENOENT = file
	 * vanished under us. Sent before the READ_DONE of the read that found
	 * it. The one message that tells the index a key left the disk on its
	 * own. */
	KVRT_DISK_DROPPED = 3,
	KVRT_DISK_EVENT_COUNT = 4,
};

struct kvrt_disk_config {
	const char *dir;          /* the tier's directory (created 0700; copied) */
	uint64_t budget_bytes;    /* most bytes of files kept (> 0) */
	uint64_t namespace_hash;  /* chunks of another namespace are foreign */
	struct kvrt_actor *notify; /* gets every completion (required) */
	uint32_t msg_base;        /* completion type = msg_base + kvrt_disk_event */
	/* Called once per valid chunk found at open, on the caller's thread,
	 * before kvrt_disk_open returns, oldest (least recently used) first.
	 * Optional. */
	void (*on_found)(void *ctx, const struct kvrt_chunk_header *h);
	void *ctx;                /* on_found's first argument */
	bool use_odirect;         /* O_DIRECT I/O (falls back with one info log
				   * when the file system refuses it, e.g. tmpfs) */
	bool fsync;               /* fdatasync each file before its rename */
	uint32_t max_pending_writes; /* writes accepted but not completed before
				      * kvrt_disk_write says -EAGAIN; 0 = 64 */
	uint32_t mailbox_size;    /* disk actor's mailbox (power of two); 0 = 1024 */
};

/* Counters; a racy snapshot (each field read atomically, not the set). */
struct kvrt_disk_stats {
	uint64_t files;          /* chunks on disk now */
	uint64_t bytes;          /* their file bytes */
	uint64_t budget;         /* budget_bytes */
	uint64_t writes;         /* writes completed with status 0 */
	uint64_t write_bytes;    /* payload bytes they wrote */
	uint64_t reads;          /* reads completed with status 0 */
	uint64_t read_bytes;     /* payload bytes they read */
	uint64_t found;          /* valid chunks found at open */
	uint64_t skipped;        /* invalid or foreign files skipped at open */
	uint64_t dropped;        /* chunks dropped for the budget */
	uint64_t removed;        /* chunks removed on request */
	uint64_t err_nospace;    /* writes failed with ENOSPC/EDQUOT/EFBIG/E2BIG */
	uint64_t err_io;         /* reads or writes failed with another errno */
	uint64_t err_corrupt;    /* reads that found a corrupt/truncated file */
	uint64_t err_missing;    /* reads of keys not on disk or vanished files */
	uint64_t rejected;       /* requests refused with -EAGAIN */
	uint64_t notify_delayed; /* completions queued because notify was full */
	uint64_t notify_lost;    /* completions that could not be delivered */
	bool odirect;            /* O_DIRECT in use */
};

/* Open (create) the tier at cfg->dir: mkdir 0700, lock, scan (on_found per
 * valid chunk), start the "disk" actor. Owner thread; does I/O.
 * 0, -EINVAL (bad config, one kvrt_error naming the field), -EBUSY (another
 * kvrt_disk holds the directory; kvrt_error names it), -ENOMEM, or the errno
 * of mkdir/open/flock. */
int kvrt_disk_open(struct kvrt_disk **out, const struct kvrt_disk_config *cfg);

/* Queue a write of h's chunk: its key, namespace (must equal the config's),
 * shape and num_tokens; h->payload_len must equal the shape's bytes; the
 * checksum is computed here (h->checksum is ignored). payload (payload_len
 * bytes) must stay valid and unchanged until WRITTEN arrives. Any thread;
 * never blocks. 0 (WRITTEN will come), -EAGAIN (max_pending_writes queued,
 * or the mailbox is full: retry later or skip), -EINVAL (bad header),
 * -ESHUTDOWN (closing), -ENOMEM. */
int kvrt_disk_write(struct kvrt_disk *d, const struct kvrt_chunk_header *h, const void *payload,
		    uint64_t cookie);

/* Queue a read of key's payload into dst (cap bytes). dst must stay valid
 * until READ_DONE and be treated as garbage unless its status is 0. With
 * O_DIRECT, a 4 KiB-aligned dst with cap >= payload_len rounded up to 4 KiB
 * is read without a bounce copy. Any thread; never blocks. 0 (READ_DONE will
 * come), -EAGAIN (mailbox full), -ESHUTDOWN. */
int kvrt_disk_read(struct kvrt_disk *d, struct kvrt_chunk_key key, void *dst, uint64_t cap,
		   uint64_t cookie);

/* Queue a removal of key's file (a queued write of it is cancelled). Any
 * thread; never blocks. 0 (REMOVED will come), -EAGAIN, -ESHUTDOWN. */
int kvrt_disk_remove(struct kvrt_disk *d, struct kvrt_chunk_key key);

void kvrt_disk_stats(struct kvrt_disk *d, struct kvrt_disk_stats *out);

/* Refuse new requests, finish every accepted one (queued writes included)
 * and deliver their completions, stop the actor, release the lock, free.
 * Owner thread; NULL is ignored. */
void kvrt_disk_close(struct kvrt_disk *d);

#endif
