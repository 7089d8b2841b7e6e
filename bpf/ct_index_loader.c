// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ct_index_loader.c - load, attach and drive ct_index.bpf.c.
 *
 * Built against libbpf >= 1.1 (Debian 12).  libbpf 1.1 predates
 * BPF_PROG_TYPE_NETFILTER, so the program type is set by hand and the
 * links are created with the raw bpf(BPF_LINK_CREATE) syscall.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <bpf/btf.h>

#include "ct_index.h"
#include "ct_index_loader.h"
#include "ct_index.skel.h"

/* the hook points and uapi values: ct_index.h */
#define CTI_NLINKS 4

/* BPF_LINK_CREATE attr prefix with the netfilter member (kernel 6.4+) */
struct cti_link_attr {
	__u32 prog_fd;
	__u32 target_fd;
	__u32 attach_type;
	__u32 flags;
	__u32 pf;
	__u32 hooknum;
	__s32 priority;
	__u32 nf_flags;
};

static const struct {
	const char *name;
	unsigned int pf, hook;
} cti_hooks[CTI_NLINKS] = {
	{ "link_ip4_pre", CTI_NFPROTO_IPV4, CTI_NF_INET_PRE_ROUTING },
	{ "link_ip4_out", CTI_NFPROTO_IPV4, CTI_NF_INET_LOCAL_OUT },
	{ "link_ip6_pre", CTI_NFPROTO_IPV6, CTI_NF_INET_PRE_ROUTING },
	{ "link_ip6_out", CTI_NFPROTO_IPV6, CTI_NF_INET_LOCAL_OUT },
};

struct cti {
	struct ct_index *skel;	/* NULL when opened from the pins (cti_open) */
	int netns_fd;
	/* the maps and the reaper: the skeleton's, or from the pins (owned) */
	int fd_records, fd_zones, fd_stats, fd_meta, fd_expired, fd_empty, fd_sweeper, fd_tuples,
	    fd_reap;
	int fd_walk;	/* the table walk: the skeleton's only (-1 from the pins) */
	int own_fds;
	long long max_records;
	int preallocated;	/* the record map has no BPF_F_NO_PREALLOC */
	char dir[PATH_MAX - 32];
};

static const char *const cti_map_pins[] = { "cti_records", "cti_zones", "cti_stats", "cti_meta",
					     "cti_expired", "cti_empty_chunk", "cti_sweeper",
					     "cti_tuples" };
#define CTI_NMAPS 8
/* the reaper is pinned as REAP_PIN_PREFIX<digest of this BPF object>: a pin
 * made by another build of the object is never run against these maps */
#define REAP_PIN_PREFIX "prog_reap_"

static __thread char cti_log[4096];

static int cti_libbpf_print(enum libbpf_print_level lvl, const char *fmt,
			    va_list ap)
{
	size_t len = strlen(cti_log), keep = sizeof(cti_log) / 2;
	char *msg = NULL;
	int n;

	if (lvl == LIBBPF_DEBUG)
		return 0;
	n = vasprintf(&msg, fmt, ap);
	if (n < 0)
		return 0;
	/* keep the tail of the log: the verifier's last lines matter */
	if ((size_t)n >= keep) {
		memcpy(cti_log, msg + n - keep + 1, keep);
	} else {
		if (len + n >= sizeof(cti_log)) {
			memmove(cti_log, cti_log + len - (keep - n - 1), keep - n);
			len = strlen(cti_log);
		}
		memcpy(cti_log + len, msg, n + 1);
	}
	free(msg);
	return 0;
}

int cti_preallocated(struct cti *c)
{
	return c->preallocated;
}

long long cti_max_records(struct cti *c)
{
	return c->max_records;
}

const char *cti_last_log(void)
{
	return cti_log;
}

static int dir_path(const char *dir, const char *name, char *buf, size_t len)
{
	int n = snprintf(buf, len, "%s/%s", dir, name);

	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

static int pin_path(const struct cti *c, const char *name, char *buf,
		    size_t len)
{
	return dir_path(c->dir, name, buf, len);
}

/* enter netns_fd (if >= 0), remembering the current one in *old */
static int netns_enter(int netns_fd, int *old)
{
	*old = -1;
	if (netns_fd < 0)
		return 0;
	*old = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (*old < 0)
		return -errno;
	if (setns(netns_fd, CLONE_NEWNET)) {
		int err = -errno;

		close(*old);
		*old = -1;
		return err;
	}
	return 0;
}

static int netns_leave(int old)
{
	int err = 0;

	if (old < 0)
		return 0;
	if (setns(old, CLONE_NEWNET))
		err = -errno;
	close(old);
	return err;
}

int cti_check_dir(const char *dir)
{
	struct stat st;

	/* never follow a symlink; only a root-owned 0700 directory will do */
	if (lstat(dir, &st))
		return -errno;
	if (!S_ISDIR(st.st_mode))
		return -ENOTDIR;
	if (st.st_uid != geteuid() || (st.st_mode & 07777) != 0700)
		return -EPERM;
	return 0;
}

static int *map_fd_slot(struct cti *c, int i)
{
	int *slots[CTI_NMAPS] = { &c->fd_records, &c->fd_zones, &c->fd_stats, &c->fd_meta,
				  &c->fd_expired, &c->fd_empty, &c->fd_sweeper, &c->fd_tuples };

	return slots[i];
}

/* FNV-1a over the embedded BPF object: names this build's reaper pin */
static int reap_pin_path(const struct cti *c, char *buf, size_t len)
{
	static unsigned long long digest;
	char name[64];

	if (!digest) {
		size_t sz = 0, i;
		const unsigned char *p = ct_index__elf_bytes(&sz);
		unsigned long long h = 1469598103934665603ULL;

		for (i = 0; i < sz; i++)
			h = (h ^ p[i]) * 1099511628211ULL;
		digest = h | 1;
	}
	snprintf(name, sizeof(name), REAP_PIN_PREFIX "%016llx", digest);
	return pin_path(c, name, buf, len);
}

/* Chunks of the record map for max_records records. A zone's records fill
 * chunks of its own, so a zone in use also holds one or two partly used
 * chunks (its window's ends): the records' full chunks, plus two for each
 * zone in use, for as many zones as there are CTI_RECORDS_PER_ZONE records
 * (all 65,536 zones from ~1.3M records). The record map only holds what is
 * used (unless preallocated): this is its bound. */
#define CTI_RECORDS_PER_ZONE 20
static __u64 chunks_for(__u64 max_records)
{
	__u64 full = (max_records + CTI_CHUNK_SLOTS - 1) / CTI_CHUNK_SLOTS;
	__u64 zones = (max_records + CTI_RECORDS_PER_ZONE - 1) / CTI_RECORDS_PER_ZONE;

	return full + 2 * (zones < CTI_MAX_ZONES ? zones : CTI_MAX_ZONES);
}

/* The records a record map of this many chunks is sized for: the most
 * records chunks_for() fits in them (chunks_for rises with records) */
static long long records_for(__u32 chunks)
{
	__u64 lo = 0, hi = (__u64)chunks * CTI_CHUNK_SLOTS;

	while (lo < hi) {
		__u64 mid = (lo + hi + 1) / 2;

		if (chunks_for(mid) <= chunks)
			lo = mid;
		else
			hi = mid - 1;
	}
	return (long long)lo;
}

/* Was the pinned record map (max_entries chunks) made with another size
 * (when one is asked for), or on demand when preallocation is asked for? */
static int other_layout(__u32 max_entries, __u32 map_flags, unsigned int max_records,
			unsigned int flags)
{
	return (max_records && max_entries != chunks_for(max_records)) ||
	       ((flags & CTI_OPEN_PREALLOC) && (map_flags & BPF_F_NO_PREALLOC));
}

/* Size the record map for this many chunks of slots, and the tuple map for
 * their tuples (two tuple chunks per chunk of slots: every record a walk's) */
static int set_chunks(struct cti *c, __u32 chunks)
{
	int err = bpf_map__set_max_entries(c->skel->maps.cti_records, chunks);

	if (!err)
		err = bpf_map__set_max_entries(c->skel->maps.cti_tuples,
			chunks * (CTI_CHUNK_SLOTS / CTI_TUPLE_SLOTS));
	return err;
}

/* Is map id read-only to BPF programs (an object's constants, .rodata)? */
static int read_only_to_programs(__u32 id)
{
	struct bpf_map_info info;
	__u32 len = sizeof(info);
	int fd = bpf_map_get_fd_by_id(id), ok;

	if (fd < 0)
		return 0;
	memset(&info, 0, sizeof(info));
	ok = !bpf_obj_get_info_by_fd(fd, &info, &len) && (info.map_flags & BPF_F_RDONLY_PROG);
	close(fd);
	return ok;
}

/* Open an attached index from its pins, without loading (and verifying) the
 * programs again: the pinned maps, and the reaper this build pinned when it
 * loaded them. Only if the links are pinned too (the index is attached) and
 * the pinned reaper uses exactly these maps. -ERANGE: another size was
 * asked for; any other error: load the object instead. */
static int open_pinned(struct cti *c, unsigned int max_records, unsigned int flags)
{
	struct bpf_prog_info pinfo;
	struct bpf_map_info minfo;
	__u32 prog_maps[16], ids[CTI_NMAPS], len, chunks = 0, records_flags = 0;
	char path[PATH_MAX];
	unsigned int i, j, mask;
	int err;

	for (i = 0; i < CTI_NLINKS; i++) {
		err = pin_path(c, cti_hooks[i].name, path, sizeof(path));
		if (err)
			return err;
		if (access(path, F_OK))
			return -ENOENT;
	}
	c->own_fds = 1;
	err = reap_pin_path(c, path, sizeof(path));
	if (err)
		return err;
	c->fd_reap = bpf_obj_get(path);
	if (c->fd_reap < 0)
		return -errno;
	for (i = 0; i < CTI_NMAPS; i++) {
		err = pin_path(c, cti_map_pins[i], path, sizeof(path));
		if (err)
			return err;
		*map_fd_slot(c, i) = bpf_obj_get(path);
		if (*map_fd_slot(c, i) < 0)
			return -errno;
		memset(&minfo, 0, sizeof(minfo));
		len = sizeof(minfo);
		if (bpf_obj_get_info_by_fd(*map_fd_slot(c, i), &minfo, &len))
			return -errno;
		ids[i] = minfo.id;
		if (i == 0) {
			chunks = minfo.max_entries;
			c->max_records = records_for(chunks);
			records_flags = minfo.map_flags;
			c->preallocated = !(records_flags & BPF_F_NO_PREALLOC);
		}
	}
	memset(&pinfo, 0, sizeof(pinfo));
	pinfo.nr_map_ids = sizeof(prog_maps) / sizeof(prog_maps[0]);
	pinfo.map_ids = (unsigned long)prog_maps;
	len = sizeof(pinfo);
	if (bpf_obj_get_info_by_fd(c->fd_reap, &pinfo, &len))
		return -errno;
	if (pinfo.type != BPF_PROG_TYPE_XDP || pinfo.nr_map_ids > sizeof(prog_maps) / sizeof(prog_maps[0]))
		return -ESTALE;
	/* every map it uses is ours or its constants, and it uses the records
	 * and the zones */
	for (i = 0, mask = 0; i < pinfo.nr_map_ids; i++) {
		for (j = 0; j < CTI_NMAPS && ids[j] != prog_maps[i]; j++)
			;
		if (j < CTI_NMAPS)
			mask |= 1u << j;
		else if (!read_only_to_programs(prog_maps[i]))
			return -ESTALE;
	}
	if ((mask & 3) != 3)
		return -ESTALE;
	return other_layout(chunks, records_flags, max_records, flags) ? -ERANGE : 0;
}

static void close_fds(struct cti *c)
{
	int i;

	if (c->own_fds) {
		for (i = 0; i < CTI_NMAPS; i++)
			if (*map_fd_slot(c, i) >= 0)
				close(*map_fd_slot(c, i));
		if (c->fd_reap >= 0)
			close(c->fd_reap);
	}
	c->own_fds = 0;
	c->fd_records = c->fd_zones = c->fd_stats = c->fd_meta = c->fd_expired = -1;
	c->fd_empty = c->fd_sweeper = c->fd_tuples = c->fd_reap = -1;
}

/* Remove reaper pins of other builds (after an upgrade) and pin ours. */
static int pin_reaper(struct cti *c)
{
	char path[PATH_MAX], mine[PATH_MAX];
	struct dirent *e;
	DIR *d;
	int err;

	err = reap_pin_path(c, mine, sizeof(mine));
	if (err)
		return err;
	d = opendir(c->dir);
	if (!d)
		return -errno;
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, REAP_PIN_PREFIX, strlen(REAP_PIN_PREFIX)) ||
		    pin_path(c, e->d_name, path, sizeof(path)) || !strcmp(path, mine))
			continue;
		unlink(path);
	}
	closedir(d);
	/* a pin under our name that open_pinned() did not accept is replaced */
	unlink(mine);
	if (bpf_obj_pin(c->fd_reap, mine) && errno != EEXIST)
		return -errno;
	return 0;
}

/* The id of a struct in the kernel's own BTF, 0 if it has none (a module's
 * BTF may) */
static __u32 vmlinux_struct_id(const char *name)
{
	struct btf *vmlinux = btf__load_vmlinux_btf();
	int id;

	if (!vmlinux)
		return 0;
	id = btf__find_by_name_kind(vmlinux, name, BTF_KIND_STRUCT);
	btf__free(vmlinux);
	return id > 0 ? (__u32)id : 0;
}

int cti_open(const char *pin_dir, unsigned int max_records, unsigned int flags,
	     struct cti **out)
{
	struct bpf_map *map;
	struct cti *c;
	char path[PATH_MAX];
	int err;

	*out = NULL;
	if (!pin_dir || strlen(pin_dir) >= sizeof(c->dir))
		return -EINVAL;
	libbpf_set_print(cti_libbpf_print);
	cti_log[0] = 0;

	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->netns_fd = -1;
	c->fd_walk = -1;
	c->fd_records = c->fd_zones = c->fd_stats = c->fd_meta = c->fd_expired = -1;
	c->fd_empty = c->fd_sweeper = c->fd_tuples = c->fd_reap = -1;
	strcpy(c->dir, pin_dir);
	if (mkdir(c->dir, 0700) && errno != EEXIST) {
		err = -errno;
		goto cleanup;
	}
	err = cti_check_dir(c->dir);
	if (err)
		goto cleanup;
	if (flags & ~CTI_OPEN_PREALLOC) {
		err = -EINVAL;
		goto cleanup;
	}
	err = open_pinned(c, max_records, flags);
	if (!err || err == -ERANGE) {
		if (err)
			goto cleanup;
		*out = c;
		return 0;
	}
	close_fds(c);

	c->skel = ct_index__open();
	if (!c->skel) {
		err = -errno ? -errno : -EINVAL;
		goto cleanup;
	}
	/* libbpf 1.1 does not know SEC("netfilter") */
	err = bpf_program__set_type(c->skel->progs.cti_record,
				    CTI_PROG_TYPE_NETFILTER);
	if (!err)
		err = bpf_program__set_expected_attach_type(
			c->skel->progs.cti_record, CTI_ATTACH_NETFILTER);
	if (!err)   /* a pinned map's own size wins below */
		err = set_chunks(c, chunks_for(max_records ? max_records : CTI_DEFAULT_MAX_RECORDS));
	if (!err && (flags & CTI_OPEN_PREALLOC))
		err = bpf_map__set_map_flags(c->skel->maps.cti_records,
			bpf_map__map_flags(c->skel->maps.cti_records) & ~BPF_F_NO_PREALLOC);
	if (err)
		goto cleanup;
	c->skel->rodata->nf_conn_btf_id = vmlinux_struct_id("nf_conn");
	bpf_object__for_each_map(map, c->skel->obj) {
		if (bpf_map__is_internal(map))
			continue;   /* the object's constants: loaded with it, never shared */
		err = pin_path(c, bpf_map__name(map), path, sizeof(path));
		if (!err)
			err = bpf_map__set_pin_path(map, path);
		if (err)
			goto cleanup;
	}
	/* reopening: adopt the pinned record map's size and layout; another size,
	 * or preallocation asked of an on-demand map, is an error */
	{
		struct bpf_map_info info;
		__u32 len = sizeof(info);
		int fd;

		pin_path(c, "cti_records", path, sizeof(path));
		fd = bpf_obj_get(path);
		if (fd >= 0) {
			memset(&info, 0, sizeof(info));
			err = bpf_obj_get_info_by_fd(fd, &info, &len);
			close(fd);
			if (!err && info.value_size != sizeof(struct cti_chunk))
				err = -EPROTO; /* attached by a build with another record layout */
			else if (!err && other_layout(info.max_entries, info.map_flags, max_records,
						 flags))
				err = -ERANGE; /* attached with another size or layout */
			else if (!err)
				err = set_chunks(c, info.max_entries);
			if (!err)
				err = bpf_map__set_map_flags(c->skel->maps.cti_records,
							     info.map_flags);
			if (err)
				goto cleanup;
		}
	}
	/* reuses compatible pinned maps, pins new ones */
	err = ct_index__load(c->skel);
	if (err)
		goto cleanup;
	c->fd_records = bpf_map__fd(c->skel->maps.cti_records);
	c->fd_zones = bpf_map__fd(c->skel->maps.cti_zones);
	c->fd_stats = bpf_map__fd(c->skel->maps.cti_stats);
	c->fd_meta = bpf_map__fd(c->skel->maps.cti_meta);
	c->fd_expired = bpf_map__fd(c->skel->maps.cti_expired);
	c->fd_empty = bpf_map__fd(c->skel->maps.cti_empty_chunk);
	c->fd_sweeper = bpf_map__fd(c->skel->maps.cti_sweeper);
	c->fd_tuples = bpf_map__fd(c->skel->maps.cti_tuples);
	c->fd_reap = bpf_program__fd(c->skel->progs.cti_reap);
	c->fd_walk = bpf_program__fd(c->skel->progs.cti_walk);
	c->max_records = records_for(bpf_map__max_entries(c->skel->maps.cti_records));
	c->preallocated = !(bpf_map__map_flags(c->skel->maps.cti_records) & BPF_F_NO_PREALLOC);
	err = pin_reaper(c);
	if (err)
		goto cleanup;
	*out = c;
	return 0;

cleanup:
	cti_close(c);
	return err < 0 ? err : -EINVAL;
}

void cti_close(struct cti *c)
{
	if (!c)
		return;
	close_fds(c);
	ct_index__destroy(c->skel);
	if (c->netns_fd >= 0)
		close(c->netns_fd);
	free(c);
}

int cti_set_netns(struct cti *c, int netns_fd)
{
	int fd = -1;

	if (netns_fd >= 0) {
		fd = fcntl(netns_fd, F_DUPFD_CLOEXEC, 0);
		if (fd < 0)
			return -errno;
	}
	if (c->netns_fd >= 0)
		close(c->netns_fd);
	c->netns_fd = fd;
	return 0;
}

static int run_reaper(struct cti *c, void *req, size_t size);

/* Start the sweeper (CTI_OP_SWEEP): it runs until the maps are unpinned and
 * closed; starting it again is a no-op. */
static int start_sweeper(struct cti *c)
{
	struct cti_reap_args a;

	memset(&a, 0, sizeof(a));
	a.op = CTI_OP_SWEEP;
	return run_reaper(c, &a, sizeof(a));   /* no kfunc is called: any netns */
}

int cti_attach(struct cti *c, int netns_fd)
{
	int fds[CTI_NLINKS] = { -1, -1, -1, -1 };
	char path[PATH_MAX];
	int old, err, i, prog_fd;

	err = cti_set_netns(c, netns_fd);
	if (err)
		return err;
	for (i = 0; i < CTI_NLINKS; i++) {
		err = pin_path(c, cti_hooks[i].name, path, sizeof(path));
		if (err)
			return err;
		if (access(path, F_OK) == 0)
			return -EEXIST;
	}
	/* opened from the pins of an index detached meanwhile: no program */
	prog_fd = c->skel ? bpf_program__fd(c->skel->progs.cti_record) : -1;
	if (prog_fd < 0)
		return -ESTALE;

	/* a netfilter link hooks the netns of the creating task */
	err = netns_enter(c->netns_fd, &old);
	if (err)
		return err;
	for (i = 0; i < CTI_NLINKS; i++) {
		struct cti_link_attr attr;

		memset(&attr, 0, sizeof(attr));
		attr.prog_fd = prog_fd;
		attr.attach_type = CTI_ATTACH_NETFILTER;
		attr.pf = cti_hooks[i].pf;
		attr.hooknum = cti_hooks[i].hook;
		attr.priority = CTI_PRIORITY;
		fds[i] = syscall(__NR_bpf, BPF_LINK_CREATE, &attr, sizeof(attr));
		if (fds[i] < 0) {
			err = -errno;
			break;
		}
	}
	i = netns_leave(old);
	if (!err)
		err = i;

	for (i = 0; !err && i < CTI_NLINKS; i++) {
		pin_path(c, cti_hooks[i].name, path, sizeof(path));
		if (bpf_obj_pin(fds[i], path))
			err = -errno;
	}
	if (!err)
		err = start_sweeper(c);
	for (i = 0; i < CTI_NLINKS; i++) {
		if (err) {
			pin_path(c, cti_hooks[i].name, path, sizeof(path));
			if (fds[i] >= 0)
				unlink(path); /* only pins we may have made */
		}
		if (fds[i] >= 0)
			close(fds[i]);
	}
	return err;
}

int cti_detach(struct cti *c)
{
	char path[PATH_MAX];
	int i, err = 0;

	for (i = 0; i < CTI_NLINKS; i++) {
		if (pin_path(c, cti_hooks[i].name, path, sizeof(path)))
			return -ENAMETOOLONG;
		if (unlink(path) && errno != ENOENT && !err)
			err = -errno;
	}
	return err;
}

int cti_remove_pins(const char *dir)
{
	char path[PATH_MAX];
	struct dirent *e;
	int err = 0, i;
	DIR *d;

	/* links first: that unhooks the programs and lets the namespace go */
	for (i = 0; i < CTI_NLINKS + CTI_NMAPS; i++) {
		const char *name = i < CTI_NLINKS ? cti_hooks[i].name
						  : cti_map_pins[i - CTI_NLINKS];

		if (dir_path(dir, name, path, sizeof(path)))
			return -ENAMETOOLONG;
		if (unlink(path) && errno != ENOENT && !err)
			err = -errno;
	}
	d = opendir(dir);
	while (d && (e = readdir(d))) {
		if (strncmp(e->d_name, REAP_PIN_PREFIX, strlen(REAP_PIN_PREFIX)))
			continue;
		if (!dir_path(dir, e->d_name, path, sizeof(path)) && unlink(path) &&
		    errno != ENOENT && !err)
			err = -errno;
	}
	if (d)
		closedir(d);
	if (!err && rmdir(dir) && errno != ENOENT)
		err = -errno;
	return err;
}

int cti_unpin(struct cti *c)
{
	return cti_remove_pins(c->dir);
}

/* Run the reaper on a request: its arguments, then size - sizeof(args) bytes
 * of payload (records, slots). The reply is written over the request (the
 * kernel copies it in before the run). Returns the reaper's status or -errno. */
static int run_reaper(struct cti *c, void *req, size_t size)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts,
		.data_in = req,
		.data_size_in = size,
		.data_out = req,
		.data_size_out = size,
		.repeat = 1,
	);
	int err;

	err = bpf_prog_test_run_opts(c->fd_reap, &opts);
	if (err)
		return err < 0 ? err : -EIO;
	if (opts.retval != XDP_PASS || opts.data_size_out != size)
		return -EIO;
	return ((struct cti_reap_args *)req)->status;
}

/* One run of the table walk on its arguments (written back in place). */
static int run_walk(struct cti *c, struct cti_walk_args *a)
{
	LIBBPF_OPTS(bpf_test_run_opts, opts,
		.data_in = a,
		.data_size_in = sizeof(*a),
		.data_out = a,
		.data_size_out = sizeof(*a),
		.repeat = 1,
	);
	int err;

	err = bpf_prog_test_run_opts(c->fd_walk, &opts);
	if (err)
		return err < 0 ? err : -EIO;
	if (opts.retval != XDP_PASS || opts.data_size_out != sizeof(*a))
		return -EIO;
	return a->status;
}

/* One thread's share of the table: buckets [from, end), in runs of up to
 * CTI_WALK_NODES chain nodes (each run holds the RCU read lock: short). */
struct walk_part {
	struct cti *c;
	unsigned long long table, net;
	unsigned int buckets, from, end;
	int err;
	struct cti_walk_result res;
};

static void *walk_part(void *arg)
{
	struct walk_part *p = arg;
	struct cti_walk_args a;
	unsigned int bucket = p->from;

	while (!p->err && bucket < p->end) {
		memset(&a, 0, sizeof(a));
		a.op = CTI_WALK_SCAN;
		a.buckets = p->buckets;
		a.table = p->table;
		a.net = p->net;
		a.bucket = bucket;
		a.end = p->end;
		a.max_nodes = CTI_WALK_NODES;
		a.max_retries = CTI_WALK_RETRIES;
		a.max_steps = CTI_WALK_PAUSE;
		p->err = run_walk(p->c, &a);
		p->res.runs++;
		p->res.entries += a.entries;
		p->res.recorded += a.recorded;
		p->res.lost += a.lost;
		p->res.foreign += a.foreign;
		p->res.skipped += a.skipped;
		p->res.restarts += a.restarts;
		p->res.nodes += a.nodes;
		if (!p->err && a.bucket <= bucket)
			p->err = -EIO;   /* no progress */
		bucket = a.bucket;
	}
	return NULL;
}

int cti_walk_table(struct cti *c, const struct cti_record *anchor, unsigned int buckets,
		   unsigned int threads, struct cti_walk_result *res)
{
	struct walk_part parts[8];
	pthread_t tids[8];
	int joined[8] = { 0 };
	struct cti_walk_args a;
	unsigned int i, made = 0;
	int err, old;

	memset(res, 0, sizeof(*res));
	if (c->fd_walk < 0)
		return -EOPNOTSUPP;
	if (!anchor || !buckets || threads < 1 || threads > 8)
		return -EINVAL;
	if (threads > buckets)
		threads = buckets;
	res->buckets = buckets;
	/* the anchor is looked up in the namespace the test run runs in */
	err = netns_enter(c->netns_fd, &old);
	if (err)
		return err;
	memset(&a, 0, sizeof(a));
	a.op = CTI_WALK_LOCATE;
	a.buckets = buckets;
	a.anchor = *anchor;
	err = run_walk(c, &a);
	res->runs = 1;
	if (!err && (!a.table || !a.net))
		err = -ESTALE;
	/* part 0 on this thread, the others on their own */
	for (i = 0; !err && i < threads; i++, made++) {
		parts[i] = (struct walk_part){
			.c = c, .table = a.table, .net = a.net, .buckets = buckets,
			.from = (unsigned int)((unsigned long long)buckets * i / threads),
			.end = (unsigned int)((unsigned long long)buckets * (i + 1) / threads),
		};
		if (i > 0) {
			err = -pthread_create(&tids[i], NULL, walk_part, &parts[i]);
			joined[i] = !err;
		}
	}
	if (made && !err)
		walk_part(&parts[0]);
	for (i = 0; i < made; i++) {
		if (joined[i])
			pthread_join(tids[i], NULL);
		if (parts[i].err && !err)
			err = parts[i].err;
		res->runs += parts[i].res.runs;
		res->entries += parts[i].res.entries;
		res->recorded += parts[i].res.recorded;
		res->lost += parts[i].res.lost;
		res->foreign += parts[i].res.foreign;
		res->skipped += parts[i].res.skipped;
		res->restarts += parts[i].res.restarts;
		res->nodes += parts[i].res.nodes;
	}
	old = netns_leave(old);
	return err ? err : old;
}

/* Hand n items (records to add, slots to drop) to the reaper, at most
 * max_batch per run behind the arguments. Returns the sum of the runs'
 * .failed (records lost) or -errno. */
static long long run_batches(struct cti *c, unsigned int op, unsigned int zone,
			     const void *items, unsigned int n, size_t item_size,
			     unsigned int max_batch)
{
	struct {
		struct cti_reap_args a;
		unsigned char items[CTI_ADD_MAX * sizeof(struct cti_record)];
	} req;
	long long failed = 0;
	unsigned int done = 0;

	_Static_assert(CTI_DROP_MAX * sizeof(unsigned long long) <= sizeof(req.items),
		       "a drop batch fits the request");
	if (zone >= CTI_MAX_ZONES || max_batch * item_size > sizeof(req.items))
		return -EINVAL;
	while (done < n) {
		unsigned int k = n - done < max_batch ? n - done : max_batch;
		int err;

		memset(&req.a, 0, sizeof(req.a));
		req.a.op = op;
		req.a.zone = zone;
		req.a.budget = k;
		memcpy(req.items, (const unsigned char *)items + (size_t)done * item_size,
		       k * item_size);
		err = run_reaper(c, &req, sizeof(req.a) + k * item_size);
		if (err)
			return err;
		failed += (long long)req.a.failed;
		done += k;
	}
	return failed;
}

static int reap_loop(struct cti *c, unsigned int op, unsigned int zone,
		     const struct cti_filter *filter, unsigned int batch,
		     unsigned int flags, struct cti_reap_result *res)
{
	struct cti_reap_args a;
	unsigned long long max_runs;
	int old, err, err2;

	memset(res, 0, sizeof(*res));
	if (zone >= CTI_MAX_ZONES)
		return -EINVAL;
	memset(&a, 0, sizeof(a));
	a.op = op;
	a.zone = zone;
	a.flags = flags;
	a.budget = batch && batch <= CTI_MAX_BATCH ? batch : CTI_MAX_BATCH;
	if (filter)
		a.filter = *filter;

	err = netns_enter(c->netns_fd, &old);
	if (err)
		return err;
	err = run_reaper(c, &a, sizeof(a));
	/* bound the retries: a pass of N slots needs about N / budget runs */
	max_runs = (a.end - a.tail) / a.budget + 64;
	res->runs = 1;
	for (;;) {
		while (!err && !a.pass_done && res->runs < max_runs) {
			err = run_reaper(c, &a, sizeof(a));
			res->runs++;
		}
		/* the hook moved records while the pass began: one more pass */
		if (err || !a.pass_done || !a.restart || res->runs >= max_runs)
			break;
		a.end = 0;
		a.pass_done = 0;
		err = run_reaper(c, &a, sizeof(a));
		res->runs++;
	}
	if (!err && !a.pass_done)
		err = -EAGAIN;
	err2 = netns_leave(old);

	res->deleted = a.deleted;
	res->gone = a.gone;
	res->kept = a.kept;
	res->unsupported = a.unsupported;
	res->still_there = a.still_there;
	res->errors = a.errors;
	res->visited = a.visited;
	res->foreign = a.foreign;
	return err ? err : err2;
}

int cti_reap_zone(struct cti *c, unsigned int zone,
		  const struct cti_filter *filter, unsigned int batch,
		  struct cti_reap_result *res)
{
	return reap_loop(c, CTI_OP_REAP, zone, filter, batch, 0, res);
}

int cti_reap_zone_flags(struct cti *c, unsigned int zone,
			const struct cti_filter *filter, unsigned int batch,
			unsigned int flags, struct cti_reap_result *res)
{
	return reap_loop(c, CTI_OP_REAP, zone, filter, batch, flags, res);
}

int cti_prune_zone(struct cti *c, unsigned int zone, unsigned int batch,
		   struct cti_reap_result *res)
{
	return reap_loop(c, CTI_OP_PRUNE, zone, NULL, batch, 0, res);
}

long long cti_clear_dirty(struct cti *c, unsigned int zone, unsigned long long expected)
{
	struct cti_reap_args a;
	int err;

	if (zone >= CTI_MAX_ZONES)
		return -EINVAL;
	memset(&a, 0, sizeof(a));
	a.op = CTI_OP_CLEAR_DIRTY;
	a.zone = zone;
	a.end = expected;
	/* no kfunc is called: any netns will do */
	err = run_reaper(c, &a, sizeof(a));
	return err ? err : (long long)a.failed;
}

long long cti_add_records(struct cti *c, unsigned int zone,
			  const struct cti_record *recs, unsigned int n)
{
	return run_batches(c, CTI_OP_ADD, zone, recs, n, sizeof(*recs), CTI_ADD_MAX);
}

/* One read of a zone's window (see cti_zone_records_at): the reaper lists
 * it (CTI_OP_LIST), CTI_LIST_MAX records a run; a hook record holds its
 * entry's address, and only the kernel can read the tuple there. */
static int read_zone_records(struct cti *c, unsigned int zone, const struct cti_zone *zs,
			     struct cti_record *buf, unsigned long long *slots, unsigned int n)
{
	struct {
		struct cti_reap_args a;
		struct cti_listed items[CTI_LIST_MAX];
	} req;
	unsigned long long pos = zs->tail;
	unsigned int cnt = 0, i;
	int err;

	while (pos < zs->head && cnt < n) {
		memset(&req.a, 0, sizeof(req.a));
		req.a.op = CTI_OP_LIST;
		req.a.zone = zone;
		req.a.tail = pos;
		req.a.end = zs->head;
		req.a.budget = n - cnt < CTI_LIST_MAX ? n - cnt : CTI_LIST_MAX;
		err = run_reaper(c, &req, sizeof(req));
		if (err)
			return err;
		if (req.a.visited > req.a.budget)
			return -EIO;
		for (i = 0; i < req.a.visited; i++, cnt++) {
			buf[cnt] = req.items[i].rec;
			if (slots)
				slots[cnt] = req.items[i].slot;
		}
		if (req.a.tail <= pos)
			break;   /* no progress: the zone was cleaned up to here */
		pos = req.a.tail;
	}
	return (int)cnt;
}

/* A live record the pruner or the sweeper moves goes to a slot past the
 * window read, and its old slot is emptied: a read that overlapped a move
 * may lack it. Moves are counted (cti_zone.moves, before the old slot is
 * emptied), so the window is read again until none overlapped; after
 * CTI_READ_TRIES reads of a zone that keeps moving, the last read is
 * returned as it is. */
#define CTI_READ_TRIES 16
int cti_zone_records_at(struct cti *c, unsigned int zone, struct cti_record *buf,
			unsigned long long *slots, unsigned int n)
{
	struct cti_zone before, after;
	int i, cnt = 0, err;

	err = cti_zone_stats(c, zone, &before);
	for (i = 0; !err && i < CTI_READ_TRIES; i++) {
		cnt = read_zone_records(c, zone, &before, buf, slots, n);
		if (cnt < 0)
			return cnt;
		err = cti_zone_stats(c, zone, &after);
		if (err || after.moves == before.moves)
			break;
		before = after;
	}
	return err ? err : cnt;
}

/* size of struct bpf_ct_opts in the kernel's (or nf_conntrack's) BTF */
static int ct_opts_size(void)
{
	struct btf *vmlinux, *mod = NULL;
	int id, size = -ENOENT;

	vmlinux = btf__load_vmlinux_btf();
	if (!vmlinux)
		return -errno;
	id = btf__find_by_name_kind(vmlinux, "bpf_ct_opts", BTF_KIND_STRUCT);
	if (id > 0) {
		size = btf__resolve_size(vmlinux, id);
	} else {
		mod = btf__parse_split("/sys/kernel/btf/nf_conntrack", vmlinux);
		if (mod) {
			id = btf__find_by_name_kind(mod, "bpf_ct_opts", BTF_KIND_STRUCT);
			if (id > 0)
				size = btf__resolve_size(mod, id);
			btf__free(mod);
		}
	}
	btf__free(vmlinux);
	return size;
}

int cti_probe(int *netfilter_bpf, int *zoned_kfuncs)
{
	/* r0 = NF_ACCEPT; exit */
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 1 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	LIBBPF_OPTS(bpf_prog_load_opts, opts,
		.expected_attach_type = CTI_ATTACH_NETFILTER,
	);
	int fd, size, err = 0;

	*netfilter_bpf = 0;
	*zoned_kfuncs = 0;
	fd = bpf_prog_load(CTI_PROG_TYPE_NETFILTER, "cti_probe", "GPL", insns, 2, &opts);
	if (fd >= 0) {
		*netfilter_bpf = 1;
		close(fd);
	} else {
		err = fd;   /* -EINVAL: no such program type; -EPERM: no CAP_BPF */
	}
	size = ct_opts_size();
	*zoned_kfuncs = size >= 16;
	return err;
}

int cti_zone_stats(struct cti *c, unsigned int zone, struct cti_zone *out)
{
	__u32 key = zone;

	if (zone >= CTI_MAX_ZONES)
		return -EINVAL;
	if (bpf_map_lookup_elem(c->fd_zones, &key, out))
		return -errno;
	return 0;
}

int cti_stats(struct cti *c, struct cti_stats *out)
{
	struct cti_stats *v;
	__u32 key = 0;
	int ncpu, i, err = 0;

	ncpu = libbpf_num_possible_cpus();
	if (ncpu < 0)
		return ncpu;
	v = calloc(ncpu, sizeof(*v));
	if (!v)
		return -ENOMEM;
	if (bpf_map_lookup_elem(c->fd_stats, &key, v)) {
		err = -errno;
		goto cleanup;
	}
	memset(out, 0, sizeof(*out));
	for (i = 0; i < ncpu; i++) {
		out->seen += v[i].seen;
		out->no_ct += v[i].no_ct;
		out->confirmed += v[i].confirmed;
		out->recorded += v[i].recorded;
		out->failed += v[i].failed;
		out->read_err += v[i].read_err;
		out->seeded += v[i].seeded;
		out->removed += v[i].removed;
		out->tuple_chunks += v[i].tuple_chunks;
	}
cleanup:
	free(v);
	return err;
}

int cti_zone_records(struct cti *c, unsigned int zone, struct cti_record *buf,
		     unsigned int n)
{
	return cti_zone_records_at(c, zone, buf, NULL, n);
}

int cti_netns_cookie(int netns_fd, unsigned long long *cookie)
{
	socklen_t len = sizeof(*cookie);
	int old, err, fd;

	*cookie = 0;
	err = netns_enter(netns_fd, &old);
	if (err)
		return err;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		err = -errno;
	else if (getsockopt(fd, SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, cookie, &len))
		err = -errno;
	if (fd >= 0)
		close(fd);
	old = netns_leave(old);
	return err ? err : old;
}

int cti_meta_get(struct cti *c, struct cti_meta *out)
{
	__u32 key = 0;

	if (bpf_map_lookup_elem(c->fd_meta, &key, out))
		return -errno;
	return 0;
}

int cti_meta_set(struct cti *c, const struct cti_meta *in)
{
	__u32 key = 0;

	if (bpf_map_update_elem(c->fd_meta, &key, in, BPF_ANY))
		return -errno;
	return 0;
}

long long cti_drop_records(struct cti *c, unsigned int zone, const unsigned long long *slots,
			   unsigned int n)
{
	struct cti_zone before, after;
	long long err;

	if (zone >= CTI_MAX_ZONES)
		return -EINVAL;
	err = cti_zone_stats(c, zone, &before);
	if (err)
		return err;
	err = run_batches(c, CTI_OP_DROP, zone, slots, n, sizeof(*slots), CTI_DROP_MAX);
	if (err < 0)
		return err;
	/* one reaper per zone: nothing else removes this zone's records meanwhile */
	err = cti_zone_stats(c, zone, &after);
	return err ? err : (long long)(after.removed - before.removed);
}

long long cti_expired_recent(struct cti *c)
{
	struct cti_expired_sec e;
	struct timespec ts;
	long long sum = 0;
	__u32 i;

	/* the hook's clock: bpf_ktime_get_ns() is CLOCK_MONOTONIC */
	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		return -errno;
	for (i = 0; i < CTI_EXPIRED_SECS; i++) {
		if (bpf_map_lookup_elem(c->fd_expired, &i, &e))
			return -errno;
		if (e.sec + CTI_EXPIRED_SECS > (unsigned long long)ts.tv_sec)
			sum += (long long)e.count;
	}
	return sum;
}
