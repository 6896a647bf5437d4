/* tests/fuzz/fuzz_config.c: libFuzzer target for configuration
 * (connector/config.h) as vLLM's extra_config, the environment and a YAML
 * file hand it over: the input is "key=value" lines (kvrt_config_set on
 * each, then check) and, whole, the text of a YAML file
 * (kvrt_config_load_yaml through a memfd). Every answer is 0 or a message. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "connector/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[512];
	struct kvrt_config c;
	kvrt_config_defaults(&c);
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	char *save = NULL;
	for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *eq = strchr(line, '=');
		if (!eq)
			continue;
		*eq = '\0';
		(void)kvrt_config_set(&c, line, eq + 1, err, sizeof err);
	}
	(void)kvrt_config_check(&c, err, sizeof err);
	free(text);
	static int fd = -1; /* one memfd, rewritten per input */
	static char path[64];
	if (fd < 0) {
		if ((fd = memfd_create("kvrt-fuzz-yaml", 0)) < 0)
			return 0;
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	}
	if (ftruncate(fd, 0) == 0 && pwrite(fd, data, size, 0) == (ssize_t)size) {
		kvrt_config_defaults(&c);
		(void)kvrt_config_load_yaml(&c, path, err, sizeof err);
	}
	return 0;
}
