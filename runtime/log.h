/* runtime/log.h: kvrt's diagnostics on stderr.
 *
 * Level from KVRT_LOG (error|warn|info|debug; default warn), read once.
 * Thread-safe (one write(2) per line, no lock). Never on a per-token path.
 */
#ifndef KVRT_RUNTIME_LOG_H
#define KVRT_RUNTIME_LOG_H

#include "runtime/common.h"

enum kvrt_log_level {
	KVRT_LOG_ERROR = 0,
	KVRT_LOG_WARN = 1,
	KVRT_LOG_INFO = 2,
	KVRT_LOG_DEBUG = 3,
};

/* True when messages of this level are printed. */
bool kvrt_log_enabled(enum kvrt_log_level level);

/* Print "kvrt: <level>: <message>\n" when the level is enabled. */
void kvrt_log(enum kvrt_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define kvrt_error(...) kvrt_log(KVRT_LOG_ERROR, __VA_ARGS__)
#define kvrt_warn(...) kvrt_log(KVRT_LOG_WARN, __VA_ARGS__)
#define kvrt_info(...) kvrt_log(KVRT_LOG_INFO, __VA_ARGS__)
#define kvrt_debug(...) kvrt_log(KVRT_LOG_DEBUG, __VA_ARGS__)

#endif
