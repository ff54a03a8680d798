/*
 * guestrec: the mirrorfs test guest's disk exerciser. Compiled with `gcc -static` by
 * tests/guest/build.py and run by the guest's /init; busybox has no tool that writes a
 * checksummed 4 KiB block with O_DIRECT, so this small program does it.
 *
 * Usage: guestrec mode=MODE [dev=/dev/vda] [port=/dev/vportNpM] [key=value ...]
 *
 *   mode=writer   Writes self-checking 4 KiB records, one at a time with O_DIRECT, to
 *                 consecutive slots of DEV (slot i holds sequence number i+1) until "stop"
 *                 arrives on PORT (or count= records are written), then fsyncs.
 *                 Keys: run=ID (u64; default random), count=N, interval_us=U (pause after
 *                 each record), sync=1 (O_DSYNC: every record is flushed), resume=1 (continue
 *                 after the records already on DEV, with their run id).
 *   mode=verify   Reads DEV back and demands an unbroken run of valid records from slot 0
 *                 followed only by zeroes. Prints one line:
 *                   VERIFY ok records=N first=F last=L run=R
 *                   VERIFY fail slot=S records=N reason=...
 *   mode=marker   Writes the marker pattern for token=T at the regions listed below.
 *
 * Record layout (little endian; tests/guest/records.py is the host-side twin):
 *   0    8  magic "MFSREC01"
 *   8    8  run id
 *   16   8  sequence number (1, 2, 3, ...)
 *   24   8  slot index (byte offset / 4096)
 *   32 4060 payload: xorshift64* stream seeded from run id and sequence number
 *   4092 4  CRC-32 (zlib's) of bytes 0..4091
 *
 * Marker regions for a disk of SIZE bytes (offset, length): (0, 4096), (61440, 8192) which
 * straddles a 64 KiB cluster boundary, (1 MiB, 128 KiB), (SIZE - 4096, 4096). Every 512-byte
 * sector at absolute offset O holds "MFSMARK <token> <O as 16 hex digits>\n" followed by the
 * byte (O / 512) & 0xff up to the end of the sector.
 *
 * Console lines start with WRITER / VERIFY / MARKER so the host can wait for them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 4096
#define CRC_OFF (REC_SIZE - 4)
#define PAYLOAD_OFF 32
#define MAGIC "MFSREC01"
#define CHUNK (1 << 20)
#define SECTOR 512

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32_buf(const uint8_t *p, size_t n)
{
	uint32_t c = 0xFFFFFFFFu;
	while (n--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* key=value options from argv; missing keys give NULL. */
static int g_argc;
static char **g_argv;

static const char *opt(const char *key)
{
	size_t n = strlen(key);
	for (int i = 1; i < g_argc; i++)
		if (strncmp(g_argv[i], key, n) == 0 && g_argv[i][n] == '=')
			return g_argv[i] + n + 1;
	return NULL;
}

static uint64_t opt_u64(const char *key, uint64_t dflt)
{
	const char *v = opt(key);
	return v ? strtoull(v, NULL, 0) : dflt;
}

static void *aligned(size_t n)
{
	void *p;
	if (posix_memalign(&p, 4096, n) != 0) {
		perror("posix_memalign");
		exit(3);
	}
	memset(p, 0, n);
	return p;
}

static uint64_t dev_size(int fd)
{
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
		off_t end = lseek(fd, 0, SEEK_END);
		size = end < 0 ? 0 : (uint64_t)end;
	}
	return size;
}

static void make_record(uint8_t *b, uint64_t run, uint64_t seq, uint64_t slot)
{
	memcpy(b, MAGIC, 8);
	put64(b + 8, run);
	put64(b + 16, seq);
	put64(b + 24, slot);
	uint64_t x = run ^ (seq * 0x9E3779B97F4A7C15ull) ^ 0xD1B54A32D192ED03ull;
	if (x == 0)
		x = 1;
	for (int off = PAYLOAD_OFF; off + 8 <= CRC_OFF; off += 8) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		put64(b + off, x * 0x2545F4914F6CDD1Dull);
	}
	/* CRC_OFF - PAYLOAD_OFF = 4060 is not a multiple of 8: fill the last 4 bytes too. */
	memset(b + CRC_OFF - 4, 0xA5, 4);
	uint32_t crc = crc32_buf(b, CRC_OFF);
	for (int i = 0; i < 4; i++)
		b[CRC_OFF + i] = (uint8_t)(crc >> (8 * i));
}

static int is_zero(const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (b[i])
			return 0;
	return 1;
}

/* Returns NULL when the block is a valid record for SLOT, else why it is not. */
static const char *check_record(const uint8_t *b, uint64_t slot)
{
	if (memcmp(b, MAGIC, 8) != 0)
		return "bad-magic";
	uint32_t want = crc32_buf(b, CRC_OFF);
	uint32_t have = b[CRC_OFF] | b[CRC_OFF + 1] << 8 | b[CRC_OFF + 2] << 16 |
			(uint32_t)b[CRC_OFF + 3] << 24;
	if (want != have)
		return "bad-checksum";
	if (get64(b + 24) != slot)
		return "misplaced";
	return NULL;
}

/* ---- stop channel -------------------------------------------------------------------- */

static int port_fd = -1;
static char port_buf[128];
static size_t port_len;

/* Returns 1 once "stop" has arrived on the control port. timeout_ms as poll(2). */
static int stop_requested(int timeout_ms)
{
	if (port_fd < 0)
		return 0;
	struct pollfd p = { .fd = port_fd, .events = POLLIN };
	int r = poll(&p, 1, timeout_ms);
	if (r <= 0)
		return 0;
	if (!(p.revents & POLLIN)) {
		/* POLLHUP: no host connected yet. Do not spin when asked to block. */
		if (timeout_ms != 0)
			usleep(100 * 1000);
		return 0;
	}
	ssize_t n = read(port_fd, port_buf + port_len, sizeof(port_buf) - 1 - port_len);
	if (n > 0) {
		port_len += (size_t)n;
		port_buf[port_len] = 0;
		if (strstr(port_buf, "stop"))
			return 1;
		if (port_len > sizeof(port_buf) / 2) {
			/* Keep the tail so a "stop" split across reads is still seen. */
			memmove(port_buf, port_buf + port_len - 8, 8);
			port_len = 8;
		}
	}
	return 0;
}

static void port_reply(const char *msg)
{
	if (port_fd >= 0) {
		ssize_t r = write(port_fd, msg, strlen(msg));
		(void)r;
	}
}

/* ---- modes --------------------------------------------------------------------------- */

static uint64_t random_run(void)
{
	uint64_t r = 0;
	int fd = open("/dev/urandom", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, &r, sizeof(r));
		(void)n;
		close(fd);
	}
	return r ? r : (uint64_t)time(NULL);
}

/* Finds the end of the records already on the device (for resume=1). */
static uint64_t find_end(int fd, uint64_t slots, uint64_t *run)
{
	uint8_t *buf = aligned(REC_SIZE);
	uint64_t slot = 0;
	for (; slot < slots; slot++) {
		if (pread(fd, buf, REC_SIZE, (off_t)(slot * REC_SIZE)) != REC_SIZE)
			break;
		if (check_record(buf, slot) != NULL || get64(buf + 16) != slot + 1)
			break;
		if (slot == 0)
			*run = get64(buf + 8);
		else if (get64(buf + 8) != *run)
			break;
	}
	free(buf);
	return slot;
}

static int writer(const char *dev)
{
	int flags = O_RDWR | O_DIRECT | (opt_u64("sync", 0) ? O_DSYNC : 0);
	int fd = open(dev, flags);
	if (fd < 0) {
		printf("WRITER error open %s: %s\n", dev, strerror(errno));
		return 2;
	}
	uint64_t slots = dev_size(fd) / REC_SIZE;
	uint64_t run = opt_u64("run", 0);
	uint64_t count = opt_u64("count", 0);
	uint64_t interval_us = opt_u64("interval_us", 0);
	uint64_t slot = 0;
	if (opt_u64("resume", 0))
		slot = find_end(fd, slots, &run);
	if (run == 0)
		run = random_run();
	uint64_t first = slot + 1;
	uint8_t *buf = aligned(REC_SIZE);
	printf("WRITER started run=%llu first=%llu slots=%llu\n", (unsigned long long)run,
	       (unsigned long long)first, (unsigned long long)slots);
	fflush(stdout);

	int rc = 0, stopped = 0;
	uint64_t written = 0;
	double last_print = now();
	while (!(stopped = stop_requested(0))) {
		if (count && written >= count)
			break;
		if (slot >= slots) {
			printf("WRITER full last=%llu\n", (unsigned long long)slot);
			fflush(stdout);
			/* The disk is sized by the test; wait for the stop it will send. */
			while (count == 0 && !(stopped = stop_requested(1000)))
				;
			break;
		}
		make_record(buf, run, slot + 1, slot);
		ssize_t n = pwrite(fd, buf, REC_SIZE, (off_t)(slot * REC_SIZE));
		if (n != REC_SIZE) {
			printf("WRITER error seq=%llu: %s\n", (unsigned long long)(slot + 1),
			       n < 0 ? strerror(errno) : "short write");
			rc = 2;
			break;
		}
		slot++;
		written++;
		double t = now();
		if (t - last_print >= 0.5) {
			printf("WRITER progress seq=%llu\n", (unsigned long long)slot);
			fflush(stdout);
			last_print = t;
		}
		if (interval_us)
			usleep((useconds_t)interval_us);
	}
	if (fsync(fd) != 0) {
		printf("WRITER error fsync: %s\n", strerror(errno));
		rc = 2;
	}
	close(fd);
	printf("WRITER stopped records=%llu first=%llu last=%llu run=%llu by=%s\n",
	       (unsigned long long)written, (unsigned long long)first, (unsigned long long)slot,
	       (unsigned long long)run, stopped ? "stop" : (rc ? "error" : "count"));
	fflush(stdout);
	char reply[96];
	snprintf(reply, sizeof(reply), "stopped last=%llu\n", (unsigned long long)slot);
	port_reply(reply);
	free(buf);
	return rc;
}

static int verify(const char *dev)
{
	int fd = open(dev, O_RDONLY | O_DIRECT);
	if (fd < 0) {
		printf("VERIFY fail slot=0 records=0 reason=open-%s\n", strerror(errno));
		return 2;
	}
	uint64_t slots = dev_size(fd) / REC_SIZE;
	uint8_t *buf = aligned(CHUNK);
	uint64_t records = 0, run = 0, end = 0;
	int ended = 0;
	const char *why = NULL;
	uint64_t bad = 0;
	for (uint64_t base = 0; base < slots && !why; base += CHUNK / REC_SIZE) {
		uint64_t n = slots - base < CHUNK / REC_SIZE ? slots - base : CHUNK / REC_SIZE;
		ssize_t got = pread(fd, buf, n * REC_SIZE, (off_t)(base * REC_SIZE));
		if (got != (ssize_t)(n * REC_SIZE)) {
			why = "read-error";
			bad = base;
			break;
		}
		for (uint64_t i = 0; i < n; i++) {
			uint64_t slot = base + i;
			const uint8_t *b = buf + i * REC_SIZE;
			if (is_zero(b, REC_SIZE)) {
				if (!ended) {
					ended = 1;
					end = slot;
				}
				continue;
			}
			if (ended) {
				why = "data-after-end";
				bad = slot;
				break;
			}
			if ((why = check_record(b, slot)) != NULL) {
				bad = slot;
				break;
			}
			if (get64(b + 16) != slot + 1) {
				why = "sequence-gap";
				bad = slot;
				break;
			}
			if (slot == 0)
				run = get64(b + 8);
			else if (get64(b + 8) != run) {
				why = "run-id-mismatch";
				bad = slot;
				break;
			}
			records++;
		}
	}
	(void)end;
	close(fd);
	free(buf);
	if (why) {
		printf("VERIFY fail slot=%llu records=%llu reason=%s\n", (unsigned long long)bad,
		       (unsigned long long)records, why);
		return 1;
	}
	printf("VERIFY ok records=%llu first=%llu last=%llu run=%llu\n",
	       (unsigned long long)records, (unsigned long long)(records ? 1 : 0),
	       (unsigned long long)records, (unsigned long long)run);
	return 0;
}

static void marker_fill(uint8_t *b, size_t len, uint64_t off, const char *token)
{
	for (size_t s = 0; s < len; s += SECTOR) {
		uint64_t o = off + s;
		memset(b + s, (int)((o / SECTOR) & 0xff), SECTOR);
		char head[SECTOR];
		int n = snprintf(head, sizeof(head), "MFSMARK %s %016llx\n", token,
				 (unsigned long long)o);
		memcpy(b + s, head, (size_t)n);
	}
}

static int marker(const char *dev)
{
	const char *token = opt("token");
	if (!token || strlen(token) > 64) {
		printf("MARKER error token= missing or longer than 64\n");
		return 2;
	}
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0) {
		printf("MARKER error open %s: %s\n", dev, strerror(errno));
		return 2;
	}
	uint64_t size = dev_size(fd);
	if (size < (2u << 20)) {
		printf("MARKER error disk smaller than 2 MiB\n");
		return 2;
	}
	uint64_t regions[4][2] = {
		{ 0, 4096 }, { 61440, 8192 }, { 1u << 20, 128u << 10 }, { size - 4096, 4096 },
	};
	uint8_t *buf = aligned(128u << 10);
	for (int i = 0; i < 4; i++) {
		marker_fill(buf, regions[i][1], regions[i][0], token);
		ssize_t n = pwrite(fd, buf, regions[i][1], (off_t)regions[i][0]);
		if (n != (ssize_t)regions[i][1]) {
			printf("MARKER error region=%d: %s\n", i, n < 0 ? strerror(errno) : "short");
			return 2;
		}
	}
	if (fsync(fd) != 0) {
		printf("MARKER error fsync: %s\n", strerror(errno));
		return 2;
	}
	close(fd);
	free(buf);
	printf("MARKER ok token=%s regions=4 size=%llu\n", token, (unsigned long long)size);
	return 0;
}

int main(int argc, char **argv)
{
	g_argc = argc;
	g_argv = argv;
	setvbuf(stdout, NULL, _IOLBF, 0);
	crc_init();
	const char *mode = opt("mode");
	const char *dev = opt("dev") ? opt("dev") : "/dev/vda";
	const char *port = opt("port");
	if (port && *port)
		port_fd = open(port, O_RDWR | O_NONBLOCK);
	if (!mode) {
		printf("guestrec: mode= missing\n");
		return 2;
	}
	if (strcmp(mode, "writer") == 0)
		return writer(dev);
	if (strcmp(mode, "verify") == 0)
		return verify(dev);
	if (strcmp(mode, "write-marker") == 0 || strcmp(mode, "marker") == 0)
		return marker(dev);
	printf("guestrec: unknown mode %s\n", mode);
	return 2;
}
