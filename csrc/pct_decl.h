/* SPDX-License-Identifier: Apache-2.0 */
/* Declarations shared by the C shim and the cffi cdef: no preprocessor
 * conditionals here (cffi rejects them), only plain C types.
 * Every function returns 0, a count, or -errno. Nothing prints. */

#define PCT_ABI_VERSION 2

/* Filter fields (struct pct_filter.fields). */
#define PCT_F_ZONE       0x0001
#define PCT_F_FAMILY     0x0002
#define PCT_F_PROTO      0x0004
#define PCT_F_SRC        0x0008
#define PCT_F_DST        0x0010
#define PCT_F_ADDR       0x0020
#define PCT_F_REPLY_SRC  0x0040
#define PCT_F_REPLY_DST  0x0080
#define PCT_F_SPORT      0x0100
#define PCT_F_DPORT      0x0200
#define PCT_F_MARK       0x0400
#define PCT_F_ZONE_DIR   0x0800   /* the zone's direction too (needs PCT_F_ZONE) */

/* Which directions an entry's zone applies to (struct pct_entry.zone_dir).
 * 0 is both: what the kernel means by a plain zone, and what a zeroed entry
 * (e.g. rebuilt from an index record) says. */
#define PCT_ZONE_BOTH    0
#define PCT_ZONE_ORIG    1
#define PCT_ZONE_REPLY   2

/* Which kernel-side filters a dump may use (the probe decides). */
#define PCT_K_FAMILY     0x01
#define PCT_K_MARK       0x02
#define PCT_K_ZONE       0x04
#define PCT_K_TUPLE_V4   0x08
#define PCT_K_TUPLE_V6   0x10
#define PCT_K_ZONE_ATTR  0x20   /* CTA_ZONE accepted at all (CONFIG_NF_CONNTRACK_ZONES) */

struct pct_prefix {
    unsigned char addr[16];   /* network order; IPv4 uses the first 4 bytes */
    unsigned char plen;       /* prefix length in bits */
};

struct pct_filter {
    unsigned int fields;
    unsigned short zone;
    unsigned char family;     /* AF_INET (2) or AF_INET6 (10) */
    unsigned char proto;
    unsigned char zone_dir;   /* PCT_ZONE_*, with PCT_F_ZONE_DIR */
    struct pct_prefix src, dst, addr, reply_src, reply_dst;
    unsigned short sport_lo, sport_hi, dport_lo, dport_hi;
    unsigned int mark, mark_mask;
};

/* One conntrack entry as it crosses to Python (host byte order for numbers). */
struct pct_entry {
    unsigned int id;
    unsigned int mark;
    unsigned int status;
    unsigned int timeout;
    unsigned short zone;      /* the zone id, whatever its direction */
    unsigned char zone_dir;   /* PCT_ZONE_BOTH, _ORIG or _REPLY */
    unsigned char family;
    unsigned char proto;
    unsigned char orig_src[16], orig_dst[16], reply_src[16], reply_dst[16];
    unsigned short orig_sport, orig_dport, reply_sport, reply_dport;
    unsigned short icmp_id;
    unsigned char icmp_type, icmp_code;
    unsigned char tcp_state;
    unsigned char has_ports;
};

struct pct_caps {
    int probed;               /* 1 when the probe ran to the end */
    int probe_errno;          /* first unexpected errno of the probe, 0 if none */
    int zones;                /* CTA_ZONE accepted (CONFIG_NF_CONNTRACK_ZONES) */
    int dump_zone;            /* dump honours CTA_ZONE, zone 0 included */
    int flush_zone;           /* flush honours CTA_ZONE, zone 0 included */
    int flush_family;         /* flush honours the family (nfgenmsg version 1) */
    int flush_mark;           /* flush honours CTA_MARK/CTA_MARK_MASK */
    int dump_mark;            /* dump honours CTA_MARK/CTA_MARK_MASK */
    int dump_filter_v4;       /* dump honours CTA_FILTER for IPv4 tuples */
    int dump_filter_v6;       /* ...and for IPv6 tuples (not inverted) */
    int dump_filter_v6_inverted; /* the known kernel bug was seen */
    int flush_filter;         /* flush accepts and honours CTA_FILTER (IPv4) */
};

struct pct_delete_result {
    unsigned long long matched;
    unsigned long long deleted;
    unsigned long long already_gone;
    unsigned long long failed;
    int first_errno;          /* positive errno of the first failed delete */
    int walks;                /* table dumps performed */
    unsigned long long dumped; /* entries the kernel sent us */
};

/* Specification for bulk creation: count entries, varying the source port
 * (sport_base .. 65535) first, then the source address. */
struct pct_create_spec {
    unsigned char family;
    unsigned char proto;
    unsigned short zone;
    unsigned char src[16], dst[16];
    unsigned char reply_src[16], reply_dst[16]; /* all-zero: mirror of orig */
    unsigned short sport_base, dport;
    unsigned int mark;
    unsigned int timeout;
    unsigned int first;      /* index of the first entry (to split work) */
    unsigned int count;
    int use_zone;            /* 0: send no CTA_ZONE (kernel without zones) */
    unsigned char zone_dir;  /* PCT_ZONE_BOTH, _ORIG or _REPLY */
};

struct pct_handle;

/* Open ctnetlink sockets; netns_path NULL means the caller's namespace. */
int pct_open(const char *netns_path, struct pct_handle **out);
void pct_close(struct pct_handle *h);

/* Probe kernel behaviour in a throwaway network namespace. */
int pct_probe(struct pct_caps *caps);

/* Streamed dump: start, then call next until it returns 0. */
int pct_dump_start(struct pct_handle *h, const struct pct_filter *f, unsigned int kflags);
int pct_dump_next(struct pct_handle *h, struct pct_entry *out, int max);
void pct_dump_abort(struct pct_handle *h);

/* Count matching entries (one walk, no Python objects). */
long long pct_count(struct pct_handle *h, const struct pct_filter *f, unsigned int kflags);

/* One walk matching any of n filters, deleting matches in batches.
 * kflags describes which kernel-side filters are safe. dry_run: count
 * matches, delete nothing. per_filter (n results, or NULL) gets each
 * filter's share: an entry counts for the first filter it matches. */
int pct_delete_walk(struct pct_handle *h, const struct pct_filter *filters, int n,
                    unsigned int kflags, int dry_run, int use_zone_attr,
                    struct pct_delete_result *res, struct pct_delete_result *per_filter);

/* Delete exactly these entries (by original tuple, zone and id). */
int pct_delete_entries(struct pct_handle *h, const struct pct_entry *entries, int n,
                       int use_zone_attr, struct pct_delete_result *res);

/* One flush message: only zone (+ family with version 1, + mark). */
int pct_flush(struct pct_handle *h, const struct pct_filter *f);

/* Number of entries in the namespace (CT_GET_STATS). */
long long pct_table_count(struct pct_handle *h);

/* Create entries in batches; returns how many were created or -errno. */
long long pct_create(struct pct_handle *h, const struct pct_create_spec *spec,
                     unsigned long long *failed, int *first_errno);

/* The eBPF zone index (bpf/ct_index.h and ct_index_loader.h). */
struct cti;
struct cti_walk_result;
long long pct_index_seed(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                         unsigned int kflags, long long *lost);
/* Record the namespace's existing entries by reading conntrack's table
 * from BPF (cti_walk_table), the table found from one entry a dump's first
 * batch shows; 0 with res zero: the namespace has no entries. */
int pct_index_walk(struct pct_handle *h, struct cti *c, const char *netns_path,
                   unsigned int threads, struct cti_walk_result *res);
/* *unsure: matched records the index could not delete safely (a reply-only
 * zone without kfuncs, or a tuple that now names another entry): walk. */
int pct_index_delete(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                     const struct cti_filter *bf, int use_kfuncs, int use_zone_attr,
                     struct pct_delete_result *res, unsigned long long *unsure);
/* Many zoned filters through the index, no walk: each zone's records are read
 * once, matched against that zone's filters (first match wins, as in a walk)
 * and deleted with batched netlink deletes; per_filter gets each share. */
int pct_index_delete_each(struct pct_handle *h, struct cti *c, const struct pct_filter *fs,
                          int n, int use_kfuncs, int use_zone_attr,
                          struct pct_delete_result *res, struct pct_delete_result *per_filter,
                          unsigned long long *unsure);
/* One walk: live entries without a record (up to max copied to missing);
 * with add, they are recorded (lost: records the map could not take). */
long long pct_index_audit(struct pct_handle *h, struct cti *c, struct pct_entry *missing,
                          int max, unsigned long long *checked, int add, long long *lost);
/* Creators the netfilter hooks do not see, measured without a walk:
 * the namespace's "insert" statistic (ctnetlink and BPF inserts), summed over
 * CPUs; Open vSwitch datapaths in the namespace (-1: unknown); nftables
 * bridge-family tables (bridge conntrack). netns_path NULL: the caller's. */
int pct_index_blind_spots(struct pct_handle *h, const char *netns_path,
                          unsigned long long *insert, int *ovs_datapaths, int *bridge_tables);

/* Match one entry against a filter (exposed for unit tests). */
int pct_match(const struct pct_filter *f, const struct pct_entry *e);
