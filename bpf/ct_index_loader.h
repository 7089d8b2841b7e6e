/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * ct_index_loader.h - userspace API of the per-zone conntrack index.
 *
 * Every function returns 0 (or a count) on success and -errno on failure.
 * Nothing is printed; the last libbpf message (e.g. a verifier log tail)
 * can be read with cti_last_log().
 *
 * One struct cti = one network namespace: the maps hold zones of the
 * namespace the netfilter hooks were attached in.  Use one pin directory
 * per namespace.  Only one process/thread may reap a given zone at a time.
 */
#ifndef __CT_INDEX_LOADER_H
#define __CT_INDEX_LOADER_H

#include "ct_index.h"

/* ---- CFFI-CDEF-BEGIN ---- */

struct cti;

struct cti_reap_result {
	unsigned long long deleted;     /* entries expired and removed */
	unsigned long long gone;        /* records whose entry was already gone */
	unsigned long long kept;        /* records kept (filter / alive) */
	unsigned long long unsupported; /* non TCP/UDP records, left in place */
	unsigned long long still_there; /* expired but not yet unlinked */
	unsigned long long errors;
	unsigned long long visited;
	unsigned long long runs;        /* BPF_PROG_TEST_RUN calls */
	unsigned long long foreign;     /* records whose tuple now belongs to
	                                   another entry (left untouched) */
};

/* What a walk of the table (cti_walk_table) found and did. */
struct cti_walk_result {
	unsigned long long entries;   /* the namespace's live entries found */
	unsigned long long recorded;  /* records stored for them */
	unsigned long long lost;      /* records lost: their zones are dirty */
	unsigned long long foreign;   /* other namespaces' entries passed over */
	unsigned long long skipped;   /* expired, dying or freed as they were read */
	unsigned long long restarts;  /* buckets walked again (an entry reused) */
	unsigned long long nodes;     /* chain nodes visited (two per entry) */
	unsigned long long runs;      /* BPF_PROG_TEST_RUN calls */
	unsigned int buckets;         /* the table's size */
};

/*
 * Load the programs. Maps are pinned in pin_dir (created with mode 0700; an
 * existing one must be a root-owned 0700 directory, not a symlink); pinned
 * maps found there are reused.  max_records = 0 uses the default, or the
 * pinned size; another size than the pinned one is -ERANGE.  flags:
 * CTI_OPEN_PREALLOC creates the record map with all its memory up front
 * (cheaper inserts and deletes on the packet path); pinned maps keep the
 * layout they were made with, and asking a pinned on-demand map for
 * CTI_OPEN_PREALLOC is -ERANGE.
 */
#define CTI_OPEN_PREALLOC 1
int cti_open(const char *pin_dir, unsigned int max_records, unsigned int flags,
	     struct cti **out);
/* Close fds. Pinned maps and links stay (and keep recording). */
void cti_close(struct cti *c);
/*
 * Create the 4 netfilter links (IPv4/IPv6 x PRE_ROUTING/LOCAL_OUT, priority
 * -199) inside netns_fd (-1: the caller's namespace) and pin them.  The
 * namespace is remembered for the reaper runs.  -EEXIST if already pinned.
 */
int cti_attach(struct cti *c, int netns_fd);
/* Use netns_fd for reaper runs without attaching (links already pinned). */
int cti_set_netns(struct cti *c, int netns_fd);
/* Unpin and release the links. */
int cti_detach(struct cti *c);
/* Remove the pinned maps (after cti_detach). */
int cti_unpin(struct cti *c);
/* Remove every pin the loader makes in dir (links first, then the maps and
 * reaper pins) and dir itself; missing pins are fine. For the index of a
 * namespace that is gone, which cannot be opened. */
int cti_remove_pins(const char *dir);

/*
 * Expire every recorded TCP/UDP entry of zone matching filter (NULL: all),
 * prune records of dead entries.  Loops BPF_PROG_TEST_RUN until the pass
 * is complete.  Returns 0 or -errno; counts in *res.
 */
int cti_reap_zone(struct cti *c, unsigned int zone,
		  const struct cti_filter *filter, unsigned int batch,
		  struct cti_reap_result *res);
/* Same with CTI_RF_* flags (experiments). */
int cti_reap_zone_flags(struct cti *c, unsigned int zone,
			const struct cti_filter *filter, unsigned int batch,
			unsigned int flags, struct cti_reap_result *res);
/* Drop records whose entry no longer exists (entries are not touched). */
int cti_prune_zone(struct cti *c, unsigned int zone, unsigned int batch,
		   struct cti_reap_result *res);
/* Reset the zone's failed (dirty) counter if it still equals expected;
 * returns the value it had (== expected means it is clean now). */
long long cti_clear_dirty(struct cti *c, unsigned int zone, unsigned long long expected);
/* Append records (all of this zone) found by a walk; duplicates are
 * harmless. Returns how many were lost (map full: the zone is dirty). */
long long cti_add_records(struct cti *c, unsigned int zone,
			  const struct cti_record *recs, unsigned int n);
/* Like cti_zone_records, with each record's slot in slots[] (NULL: none). */
int cti_zone_records_at(struct cti *c, unsigned int zone, struct cti_record *buf,
			unsigned long long *slots, unsigned int n);
/* What this kernel offers: netfilter BPF programs (6.4+, loadable by us)
 * and the zone-aware conntrack kfunc options (6.11+). */
/* Record the entries of the attached namespace that exist now, from
 * conntrack's table read in BPF (no ctnetlink dump): the hooks record every
 * later one. anchor: any TCP or UDP entry of the namespace (it finds the
 * table). buckets: nf_conntrack_buckets. threads (1-8): parts of the table
 * walked in parallel. -EOPNOTSUPP: opened from the pins (no walk program);
 * -ENOENT: the anchor is gone; -ESTALE: the table was not found where a
 * chain said, or was resized meanwhile. On any error the records already
 * stored stay (duplicates of a later walk are harmless). */
int cti_walk_table(struct cti *c, const struct cti_record *anchor, unsigned int buckets,
		   unsigned int threads, struct cti_walk_result *res);
int cti_probe(int *netfilter_bpf, int *zoned_kfuncs);
int cti_zone_stats(struct cti *c, unsigned int zone, struct cti_zone *out);
int cti_stats(struct cti *c, struct cti_stats *out);
/* Copy up to n records of zone into buf; returns how many. */
int cti_zone_records(struct cti *c, unsigned int zone, struct cti_record *buf,
		     unsigned int n);
/* Capacity of the record map. */
long long cti_max_records(struct cti *c);
/* 1 if the record map holds its memory up front (CTI_OPEN_PREALLOC), 0 if it
 * allocates per record. */
int cti_preallocated(struct cti *c);
const char *cti_last_log(void);
/* 0 if dir is a real directory (no symlink) owned by us with mode 0700;
 * -ENOTDIR / -EPERM otherwise. */
int cti_check_dir(const char *dir);
/* SO_NETNS_COOKIE of a namespace (unique, never reused). */
int cti_netns_cookie(int netns_fd, unsigned long long *cookie);
int cti_meta_get(struct cti *c, struct cti_meta *out);
int cti_meta_set(struct cti *c, const struct cti_meta *in);
/* Remove records (their entries were deleted by other means); returns how
 * many existed. */
long long cti_drop_records(struct cti *c, unsigned int zone, const unsigned long long *slots,
			   unsigned int n);
/* Records the hook pruned in the last CTI_EXPIRED_SECS seconds because their
 * entry had expired while still in the table (waiting for conntrack's gc). */
long long cti_expired_recent(struct cti *c);

/* ---- CFFI-CDEF-END ---- */

#endif /* __CT_INDEX_LOADER_H */
