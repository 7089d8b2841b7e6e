/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * ct_index.h - types shared by ct_index.bpf.c (BPF), ct_index_loader.c
 * (userspace C) and the cffi cdef.
 *
 * Everything between the CFFI-CDEF-BEGIN and CFFI-CDEF-END marker lines is
 * directive-free except for plain "#define NAME <integer>" lines, which
 * ffi.cdef() accepts.  Only plain C types are used (no __u32, no bool).
 * Addresses and ports are stored in network byte order, as in the kernel.
 */
#ifndef __CT_INDEX_H
#define __CT_INDEX_H

/* ---- CFFI-CDEF-BEGIN ---- */

/* Zone ids are u16: the zone table is an array indexed by zone id. */
#define CTI_MAX_ZONES 65536
/* Default capacity of the record map (records, all zones). */
#define CTI_DEFAULT_MAX_RECORDS 262144
/* Records live in chunks of CTI_CHUNK_SLOTS consecutive slots of one zone:
 * one hash element (2 KiB with its header) per 70 records, so storing a
 * record is a lookup and a copy, and a hash insert only once per chunk.
 * Chunk key = (zone << CTI_SLOT_BITS) | (slot / CTI_CHUNK_SLOTS). A slot
 * made by the hook holds the entry's address, not its tuple (read from the
 * entry when needed); a walk's record keeps its tuple in cti_tuples, in
 * chunks of CTI_TUPLE_SLOTS keyed the same way (slot / CTI_TUPLE_SLOTS):
 * two of them per chunk of slots, freed with it. */
#define CTI_CHUNK_SLOTS 70
#define CTI_TUPLE_SLOTS 35
#define CTI_SLOT_BITS 48
#define CTI_SLOT_MASK 0xffffffffffff
/* Upper bound of records visited by one BPF_PROG_TEST_RUN of the reaper. */
#define CTI_MAX_BATCH 8192

/* Where the hook is linked (BPF_LINK_CREATE, netfilter): IPv4 and IPv6,
 * PRE_ROUTING and LOCAL_OUT, right after conntrack. uapi values from kernel
 * 6.4+, absent from older headers. */
#define CTI_PROG_TYPE_NETFILTER 32
#define CTI_ATTACH_NETFILTER 45
#define CTI_NFPROTO_IPV4 2
#define CTI_NFPROTO_IPV6 10
#define CTI_NF_INET_PRE_ROUTING 0
#define CTI_NF_INET_LOCAL_OUT 3
#define CTI_PRIORITY -199   /* NF_IP_PRI_CONNTRACK (-200) + 1 */

/* struct cti_reap_args.op */
#define CTI_OP_REAP 1        /* expire matching TCP/UDP entries, prune dead */
#define CTI_OP_PRUNE 2       /* only drop records whose entry is gone */
#define CTI_OP_CLEAR_DIRTY 3 /* reset cti_zone.failed if it still equals .end;
                              old value in .failed */
#define CTI_OP_ADD 4         /* append the .budget records that follow the args
                              in the packet (entries found by a walk) */
#define CTI_OP_DROP 5        /* delete the .budget slots (u64) that follow the
                              args (entries deleted by other means) */
#define CTI_OP_SWEEP 6       /* start the sweeper (CTI_SWEEP_*) unless it runs */
#define CTI_OP_LIST 7        /* list the zone's records from slot .tail up to
                              .end: at most .budget (<= CTI_LIST_MAX) struct
                              cti_listed behind the args; .visited = how
                              many, .tail = the slot to go on from */
/* Records one CTI_OP_ADD run carries after struct cti_reap_args. */
#define CTI_ADD_MAX 64
/* Slots one CTI_OP_DROP run carries after struct cti_reap_args. */
#define CTI_DROP_MAX 64
/* Records one CTI_OP_LIST run returns: a test run's packet is at most a
 * page, less the XDP head and tail room. */
#define CTI_LIST_MAX 48

/* NF_CT_ZONE_DIR_* (ct->zone.dir): a zone applies to the original direction,
 * the reply direction, or both (the default). */
#define CTI_ZONE_DIR_ORIG 1
#define CTI_ZONE_DIR_REPL 2
#define CTI_ZONE_DIR_BOTH 3

/* struct cti_reap_args.flags */
#define CTI_RF_NO_REAP_LOOKUP 1 /* experiment: skip the 2nd lookup that unlinks */

/* struct cti_filter.flags: every set field must match (AND) */
#define CTI_F_FAMILY 1
#define CTI_F_PROTO 2
#define CTI_F_SRC 4   /* (saddr & src_mask) == src */
#define CTI_F_DST 8   /* (daddr & dst_mask) == dst */
#define CTI_F_SPORT 16 /* sport_lo <= sport <= sport_hi */
#define CTI_F_DPORT 32
#define CTI_F_ADDR 64  /* src or dst inside addr/addr_mask */

/* One recorded conntrack entry: its original-direction tuple, as a walk
 * hands it in and a listing (CTI_OP_LIST) hands it out. 56 bytes. */
struct cti_record {
	unsigned int saddr[4];     /* IPv4 uses saddr[0] */
	unsigned int daddr[4];
	unsigned short sport;      /* TCP/UDP/SCTP/DCCP port, ICMP id, GRE key */
	unsigned short dport;      /* port; 0 for ICMP */
	unsigned char family;      /* AF_INET (2) / AF_INET6 (10) */
	unsigned char proto;       /* IPPROTO_* */
	unsigned char icmp_type;
	unsigned char icmp_code;
	unsigned short zone;       /* ct->zone.id */
	unsigned char zone_dir;    /* ct->zone.dir (CTI_ZONE_DIR_*; never 0) */
	unsigned char hook;        /* NF_INET_* hook that saw the entry */
	unsigned int ts_sec;       /* CLOCK_MONOTONIC seconds at record time (now_sec) */
	unsigned long long ct;     /* the nf_conn's address (hook records; 0 from a
	                              walk) */
};

/* One slot of a chunk, 24 bytes: a record, published once seq == its key + 1
 * (zone << CTI_SLOT_BITS | slot, + 1: unique, also if a freed chunk's memory
 * is reused at once, as a preallocated map does); 0 when empty (never
 * written, or its record deleted: slots are never reused). The hook stores
 * the entry's address and a fingerprint of its tuple (the tuple is read
 * from the entry when needed; the fingerprint tells whether the memory now
 * holds another entry): 24 bytes of fresh memory per new connection, not
 * 64. A walk's record has ct 0 and its tuple in cti_tuples. */
struct cti_slot {
	unsigned long long ct;     /* the nf_conn's address, or 0 (a walk's) */
	unsigned long long seq;
	unsigned int ts_sec;       /* made or last moved (CLOCK_MONOTONIC seconds) */
	unsigned int fp;           /* the entry's tuple's fingerprint (tuple_fp) */
};
struct cti_chunk {
	struct cti_slot s[CTI_CHUNK_SLOTS];
};
/* The tuples of a walk's records: slot n's in chunk n / CTI_TUPLE_SLOTS at
 * n % CTI_TUPLE_SLOTS, valid while slot n is published. */
struct cti_tuple_chunk {
	struct cti_record r[CTI_TUPLE_SLOTS];
};
/* One record of a listing (CTI_OP_LIST) and its slot. */
struct cti_listed {
	unsigned long long slot;
	struct cti_record rec;
};

/* Per-zone bookkeeping, BPF array indexed by zone id. 80 bytes. */
struct cti_zone {
	unsigned long long head;   /* next slot to reserve (monotonic) */
	unsigned long long done;   /* finished insert attempts, ok or failed */
	unsigned long long tail;   /* first slot that may hold a record */
	unsigned long long failed; /* records lost (map full): zone is dirty */
	unsigned long long added;  /* records stored since load */
	unsigned long long removed; /* records deleted since load (added -
	                               removed = records that exist) */
	unsigned long long busy;    /* a reaper pass is running: the hook leaves
	                               the zone's records alone */
	unsigned long long moves;   /* records the hook moved to the head */
	unsigned long long pruned;  /* records the hook pruned (entry freed) */
	unsigned long long lasting; /* the pruner found the tail's record alive,
	                               lasting (CTI_LASTING) and young in this
	                               second: (second & 0xffff) << 48 | tail + 1;
	                               the hook does not look again before the
	                               next second or a move of the tail */
};

/* Global counters of the netfilter program (per-CPU array, 1 entry). */
struct cti_stats {
	unsigned long long seen;      /* packets with ctinfo NEW or RELATED (the
	                                 others leave at once, uncounted) */
	unsigned long long no_ct;     /* unused (packets without an entry leave
	                                 on the fast path) */
	unsigned long long confirmed; /* NEW/RELATED but already confirmed */
	unsigned long long recorded;  /* records stored */
	unsigned long long failed;    /* records lost (see cti_zone.failed) */
	unsigned long long read_err;  /* a new entry read as freed (use 0) */
	unsigned long long seeded;    /* records stored by CTI_OP_ADD (walks) */
	unsigned long long removed;   /* records deleted (reaper, prune, drop) */
	unsigned long long tuple_chunks; /* chunks of cti_tuples made less those
	                                    freed (per CPU: only the sum counts) */
};

/* Index-wide facts kept with the maps (array of 1, written by userspace). */
struct cti_meta {
	unsigned long long insert_base; /* netns "insert" statistic at the last
	                                   attach/resync: ctnetlink and BPF inserts
	                                   bypass the hooks and move it */
	unsigned long long netns_cookie; /* SO_NETNS_COOKIE of the hooked netns */
	unsigned long long attached_ns;  /* nsfs inode of that netns */
	unsigned long long version;      /* layout version (CTI_META_VERSION) */
};
#define CTI_META_VERSION 6

struct cti_filter {
	unsigned int flags;        /* CTI_F_* */
	unsigned char family;
	unsigned char proto;
	unsigned short sport_lo;   /* host order, inclusive ranges */
	unsigned short sport_hi;
	unsigned short dport_lo;
	unsigned short dport_hi;
	unsigned short pad;
	unsigned int src[4];       /* network order, pre-masked */
	unsigned int src_mask[4];
	unsigned int dst[4];
	unsigned int dst_mask[4];
	unsigned int addr[4];
	unsigned int addr_mask[4];
};

/*
 * Request and reply of one reaper run. It is the "packet" handed to
 * BPF_PROG_TEST_RUN (data_in) and read back from data_out.
 */
struct cti_reap_args {
	/* in */
	unsigned int op;           /* CTI_OP_* */
	unsigned int zone;
	unsigned int budget;       /* max records to visit, <= CTI_MAX_BATCH */
	unsigned int flags;        /* CTI_RF_* */
	unsigned long long end;    /* pass end slot; 0 = start a pass at head */
	struct cti_filter filter;
	/* out */
	int status;                /* 0, or -errno */
	unsigned int pass_done;    /* 1 once tail >= end */
	unsigned long long visited;
	unsigned long long deleted;     /* expired and reaped by us */
	unsigned long long gone;        /* lookup ENOENT: entry already gone */
	unsigned long long kept;        /* not matching / alive (prune) */
	unsigned long long unsupported; /* not TCP/UDP: kfunc cannot look up */
	unsigned long long still_there; /* 2nd lookup still found the entry */
	unsigned long long errors;      /* other lookup / timeout errors */
	unsigned long long holes;       /* empty slots skipped */
	unsigned long long failed;      /* CLEAR_DIRTY: old value */
	unsigned long long tail;        /* zone tail after this run */
	unsigned long long head;        /* zone head after this run */
	unsigned long long foreign;     /* lookup found another entry (other zone
	                                   or direction, tuple reused): untouched */
	unsigned long long moves_start; /* cti_zone.moves when the pass began */
	unsigned int restart;           /* the hook moved records during the pass:
	                                   run another pass */
	unsigned int pad2;
};
/*
 * The table walk (cti_walk, BPF_PROG_TEST_RUN): records the entries that
 * exist when the hooks are attached by reading conntrack's hash table from
 * BPF, where a ctnetlink dump would format and copy every entry.
 * CTI_WALK_LOCATE finds the table from one entry (the anchor, looked up by
 * its tuple); CTI_WALK_SCAN then walks buckets [bucket, end).
 */
#define CTI_WALK_LOCATE 1
#define CTI_WALK_SCAN 2
/* One scan run stops at the first bucket's end past CTI_WALK_NODES chain
 * nodes or CTI_WALK_PAUSE steps (a step: one node or one bucket, so a
 * sparse table's runs stay short too); CTI_WALK_STEPS bounds a run
 * outright: a chain longer than the steps left (none is) is -E2BIG. */
#define CTI_WALK_NODES 32768
#define CTI_WALK_PAUSE 131072
#define CTI_WALK_STEPS 262144
/* A bucket whose chain ends in another bucket's marker (its last entry was
 * freed and reused meanwhile) is walked again, this many times at most. */
#define CTI_WALK_RETRIES 8

struct cti_walk_args {
	/* in */
	unsigned int op;            /* CTI_WALK_* */
	unsigned int buckets;       /* the table's size (nf_conntrack_buckets) */
	struct cti_record anchor;   /* LOCATE: an entry's tuple, zone and direction */
	unsigned long long table;   /* SCAN: the table's address (from LOCATE) */
	unsigned long long net;     /* SCAN: the namespace's struct net (from LOCATE) */
	unsigned int bucket;        /* SCAN: first bucket; out: the next one */
	unsigned int end;           /* SCAN: one past the last bucket */
	unsigned int max_nodes;     /* SCAN: CTI_WALK_NODES (limits handed in stay
	                               unknown to the verifier: its loop states merge) */
	unsigned int max_retries;   /* SCAN: CTI_WALK_RETRIES */
	unsigned int max_steps;     /* SCAN: CTI_WALK_PAUSE */
	unsigned int pad;
	/* out */
	int status;                 /* 0, or -errno */
	unsigned int anchor_bucket; /* LOCATE: the anchor's bucket */
	unsigned long long nodes;     /* chain nodes visited */
	unsigned long long entries;   /* this namespace's live entries found */
	unsigned long long recorded;  /* of those, records stored */
	unsigned long long lost;      /* of those, records lost (zone dirty) */
	unsigned long long foreign;   /* other namespaces' entries */
	unsigned long long skipped;   /* expired, dying, or freed while read */
	unsigned long long restarts;  /* buckets walked again */
};

/* Records the hook pruned because their entry had expired (its timeout
 * passed) while the entry was still in the table, waiting for conntrack's
 * garbage collector: one counter per second, CTI_EXPIRED_SECS seconds kept
 * (an array map indexed by second % CTI_EXPIRED_SECS). Those entries are
 * still counted by the table (nf_conntrack_count) though no dump shows them
 * and no lookup finds them: the count check allows for them. */
#define CTI_EXPIRED_SECS 64
struct cti_expired_sec {
	unsigned long long sec;   /* bpf_ktime seconds this counter belongs to */
	unsigned long long count; /* expired records pruned in that second */
};

/* The hook prunes a zone's tail only beyond this many slots. */
#define CTI_PRUNE_MIN_WINDOW 64
/* Tail slots the hook examines per record it stores: up to
 * CTI_PRUNE_PER_APPEND * CTI_PRUNE_EVERY with every CTI_PRUNE_EVERY-th record
 * of a zone (a zone whose oldest record is alive is then looked at once per
 * CTI_PRUNE_EVERY new connections, not on each). */
#define CTI_PRUNE_PER_APPEND 2
#define CTI_PRUNE_EVERY 4
/* A live record at the tail is moved to the head only when older than this
 * (seconds since it was made or last moved): younger ones are waited for
 * (they are the oldest of the zone). */
#define CTI_PRUNE_MOVE_AGE 30
/* The sweeper, a BPF timer: every CTI_SWEEP_NS it prunes the tails of the
 * next CTI_SWEEP_ZONES zones (all 65,536 in 0.4 s), CTI_SWEEP_SLOTS tail
 * slots at most. The hook prunes a zone as it records, so a zone without
 * new connections is pruned by the sweeper alone. It moves a live record
 * (to reach dead ones behind it) only CTI_SWEEP_MOVE_AGE seconds after the
 * record was made or last moved: a zone of long-lived connections is not
 * cycled through without end. */
#define CTI_SWEEP_NS 100000000
#define CTI_SWEEP_ZONES 16384
#define CTI_SWEEP_SLOTS 8192
#define CTI_SWEEP_MOVE_AGE 300

/* ---- CFFI-CDEF-END ---- */

#endif /* __CT_INDEX_H */
