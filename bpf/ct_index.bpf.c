// SPDX-License-Identifier: GPL-2.0
/*
 * ct_index.bpf.c - per-zone index of conntrack entries and in-kernel reaper.
 *
 * cti_record: BPF_PROG_TYPE_NETFILTER program, attached (by the loader, with
 *   BPF_LINK_CREATE) at PRE_ROUTING and LOCAL_OUT for IPv4 and IPv6 with
 *   priority NF_IP_PRI_CONNTRACK + 1.  For every packet whose conntrack entry
 *   is not yet confirmed (i.e. the entry is being created by this packet) it
 *   appends the original tuple to the zone's records.
 *
 * cti_reap: XDP program, only run through BPF_PROG_TEST_RUN from inside the
 *   network namespace.  The request (struct cti_reap_args) is the packet; the
 *   reply is written back into it.  It walks one zone's slots [tail, end),
 *   expires matching entries with bpf_ct_change_timeout(ct, 0) and reaps them
 *   at once with a second lookup, and drops records of entries that are gone.
 *   Its CTI_OP_SWEEP starts the sweeper: a BPF timer that prunes the tails of
 *   every zone in turn (the hook prunes only the zones it records into).
 *
 * Layout: each zone has a slot window [tail, head) in cti_zones[zone];
 * appends reserve a slot with an atomic add on head.  Slots live in chunks
 * of 31, one hash element each keyed by (zone << 48 | slot / 31): storing a
 * record is a chunk lookup and a copy (a hash insert once per chunk), and a
 * chunk is freed when the zone's tail passes it.  A reaper pass moves
 * surviving records to fresh slots at the head, so after a complete pass
 * [tail, head) holds only records that survived plus newer ones: walking a
 * zone costs O(records of that zone), independent of the conntrack table
 * size.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "ct_index.h"

char LICENSE[] SEC("license") = "GPL";

#define NF_ACCEPT 1
#define AF_INET 2
#define AF_INET6 10
#define IPS_CONFIRMED (1UL << 3)
#define IPS_DYING (1UL << 9)
#define ENOENT 2
#define EFAULT 14
#define EINVAL 22
#define E2BIG 7
#define ESTALE 116
#define ETIME 62
#define EPROTO 71
#define BPF_F_CURRENT_NETNS (-1)
#define IPPROTO_ICMPV6 58

#ifndef BPF_NOEXIST
#define BPF_NOEXIST 1
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	/* chunks; the loader sizes it for its max_records, and may
	 * preallocate it (CTI_OPEN_PREALLOC) */
	__uint(max_entries, CTI_DEFAULT_MAX_RECORDS / CTI_CHUNK_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct cti_chunk);
} cti_records SEC(".maps");

/* the tuples of records a walk added (the hook's hold the entry's address) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	/* the loader sizes it for its max_records; never preallocated (walks
	 * are not on the packet path) */
	__uint(max_entries, CTI_DEFAULT_MAX_RECORDS / CTI_TUPLE_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct cti_tuple_chunk);
} cti_tuples SEC(".maps");

/* the value a new chunk (of either map) is made from: zeros, as big as the
 * bigger of the two */
union cti_empty {
	struct cti_chunk slots;
	struct cti_tuple_chunk tuples;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, union cti_empty);
} cti_empty_chunk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTI_MAX_ZONES);
	__type(key, __u32);
	__type(value, struct cti_zone);
} cti_zones SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cti_stats);
} cti_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cti_meta);
} cti_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CTI_EXPIRED_SECS);
	__type(key, __u32);
	__type(value, struct cti_expired_sec);
} cti_expired SEC(".maps");

/* the sweeper's timer, the next zone it visits and its runs so far; and
 * the clock it keeps for the hook (now_sec) */
struct cti_sweeper {
	struct bpf_timer timer;
	__u32 cursor;
	__u64 runs;
	__u64 clock_jiffies;   /* jiffies when it last set clock_sec */
	__u32 clock_sec;       /* CLOCK_MONOTONIC, whole seconds */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cti_sweeper);
} cti_sweeper SEC(".maps");

/* The index's clock, in whole seconds of CLOCK_MONOTONIC. The sweeper
 * writes it on every run (each CTI_SWEEP_NS); reading it back is a load,
 * where the clock itself is a read of the TSC and a division: ~200 of the
 * ~930 samples the hook's code and helpers took over 1.2M new flows
 * (perf record -a; the coarse clock is not offered to netfilter programs).
 * jiffies tell whether the sweeper's value is fresh: at most
 * CTI_CLOCK_FRESH jiffies old (0.25 s at HZ=1000, 2.5 s at HZ=100);
 * otherwise (the sweeper is stopped, or late) the clock is read. */
#define CTI_CLOCK_FRESH 250

static __always_inline __u32 clock_sec(void)
{
	return bpf_ktime_get_ns() / 1000000000ULL;
}

static __always_inline __u32 now_sec(void)
{
	__u32 zero = 0;
	struct cti_sweeper *sw = bpf_map_lookup_elem(&cti_sweeper, &zero);

	if (sw && bpf_jiffies64() - sw->clock_jiffies <= CTI_CLOCK_FRESH)
		return sw->clock_sec;
	return clock_sec();
}

/* count one record pruned while its expired entry waits for conntrack's gc */
static __always_inline void count_expired(__u32 now)
{
	__u32 idx = now % CTI_EXPIRED_SECS;
	struct cti_expired_sec *e = bpf_map_lookup_elem(&cti_expired, &idx);

	if (!e)
		return;
	if (e->sec != now) {
		/* a new second: a racing CPU may lose a count here, which only
		 * makes the count check stricter (a fallback, never a miss) */
		e->sec = now;
		e->count = 0;
	}
	__sync_fetch_and_add(&e->count, 1);
}

static __always_inline void count_removed(__u64 n)
{
	__u32 zero = 0;
	struct cti_stats *st = bpf_map_lookup_elem(&cti_stats, &zero);

	if (st)
		st->removed += n;
}

_Static_assert(CTI_CHUNK_SLOTS == 2 * CTI_TUPLE_SLOTS,
	       "a chunk of slots holds the slots of two tuple chunks (free_chunk)");

static __always_inline __u64 cti_key(__u32 zone, __u64 slot)
{
	return ((__u64)zone << CTI_SLOT_BITS) | (slot & CTI_SLOT_MASK);
}

/* ---- the record store: slots of a zone, in chunks ---- */

/* The element of map (cti_records or cti_tuples) under key; with create, it
 * is made from the empty template if missing (a racing CPU may make it
 * first: *made is 1 only for the CPU that did). NULL: no such element, or
 * the map is full. */
static __always_inline void *chunk_at(void *map, __u64 key, int create, int *made)
{
	void *c = bpf_map_lookup_elem(map, &key);
	__u32 zero = 0;

	if (!c && create) {
		union cti_empty *empty = bpf_map_lookup_elem(&cti_empty_chunk, &zero);

		if (!empty)
			return NULL;
		*made = !bpf_map_update_elem(map, &key, empty, BPF_NOEXIST);
		c = bpf_map_lookup_elem(map, &key);
	}
	return c;
}

/* A slot's place in its chunk; with create, the chunk is made if missing.
 * NULL: no such chunk, or the map is full. */
static __always_inline struct cti_slot *slot_at(__u32 zone, __u64 slot, int create)
{
	__u32 i = slot % CTI_CHUNK_SLOTS;
	int made = 0;
	struct cti_chunk *c = chunk_at(&cti_records, cti_key(zone, slot / CTI_CHUNK_SLOTS),
				       create, &made);

	/* the compiler knows i < CTI_CHUNK_SLOTS, the verifier must be told */
	asm volatile("" : "+r"(i));
	if (!c || i >= CTI_CHUNK_SLOTS)
		return NULL;
	return &c->s[i];
}

static __always_inline void count_tuple_chunks(long n)
{
	__u32 zero = 0;
	struct cti_stats *st = bpf_map_lookup_elem(&cti_stats, &zero);

	if (st)
		st->tuple_chunks += n;
}

/* Where a walk's record keeps its tuple; with create, its chunk is made if
 * missing (and counted). NULL: no such chunk, or the map is full. */
static __always_inline struct cti_record *tuple_at(__u32 zone, __u64 slot, int create)
{
	__u32 i = slot % CTI_TUPLE_SLOTS;
	int made = 0;
	struct cti_tuple_chunk *c = chunk_at(&cti_tuples, cti_key(zone, slot / CTI_TUPLE_SLOTS),
					     create, &made);

	if (made)
		count_tuple_chunks(1);
	asm volatile("" : "+r"(i));
	if (!c || i >= CTI_TUPLE_SLOTS)
		return NULL;
	return &c->r[i];
}

/* Store a record in a slot no one has used: the hook's (rec->ct set) is its
 * entry's address, age and tuple fingerprint fp; a walk's keeps its tuple in
 * cti_tuples, written before the slot is published. 0, or -1 (map full). */
static __always_inline int rec_insert(__u32 zone, __u64 slot, const struct cti_record *rec,
				      __u32 fp)
{
	struct cti_slot *s;

	if (!rec->ct) {
		struct cti_record *t = tuple_at(zone, slot, 1);

		if (!t)
			return -1;
		*t = *rec;
	}
	s = slot_at(zone, slot, 1);
	if (!s || s->seq)
		return -1;
	s->ct = rec->ct;
	s->ts_sec = rec->ts_sec;
	s->fp = fp;
	__sync_lock_test_and_set(&s->seq, cti_key(zone, slot) + 1);   /* publish: a full barrier */
	return 0;
}

/* The slot's record. 0, or -1: an empty slot (a hole). A hook record comes
 * out as its entry's address and age, its fingerprint in *fp
 * (resolve_record reads the rest from the entry); a walk's with its tuple. A record is never
 * rewritten in place; a walk's tuple chunk is freed only after its slots
 * were emptied, so a tuple copied while the slot was still published after
 * the copy is the record's. */
static __always_inline int rec_lookup(__u32 zone, __u64 slot, struct cti_record *out,
				      __u32 *fp)
{
	struct cti_slot *s = slot_at(zone, slot, 0);
	__u64 want = cti_key(zone, slot) + 1;
	struct cti_record *t;

	if (!s || __sync_fetch_and_add(&s->seq, 0) != want)
		return -1;
	out->ct = s->ct;
	out->ts_sec = s->ts_sec;
	out->hook = 0;
	out->zone = zone;
	*fp = s->fp;
	if (out->ct)
		return 0;
	t = tuple_at(zone, slot, 0);
	if (!t)
		return -1;
	__builtin_memcpy(out, t, __builtin_offsetof(struct cti_record, hook));
	if (__sync_fetch_and_add(&s->seq, 0) != want)
		return -1;
	return 0;
}

/* Empty the slot. 0, or -1 if it held nothing (or another CPU emptied it). */
static __always_inline int rec_delete(__u32 zone, __u64 slot)
{
	struct cti_slot *s = slot_at(zone, slot, 0);

	if (!s || __sync_val_compare_and_swap(&s->seq, cti_key(zone, slot) + 1, 0) !=
		  cti_key(zone, slot) + 1)
		return -1;
	return 0;
}

/* Freeing chunks. No slot below a zone's tail is ever written again, so a
 * chunk wholly below it is freed; a record still in it (a pruner on another
 * CPU between moving the tail and deleting) is emptied and counted here:
 * whoever empties a slot counts it, once. */
struct empty_ctx {
	struct cti_chunk *c;
	struct cti_zone *zm;
	struct cti_stats *st;   /* NULL: the caller counts from zm->removed */
};

static long empty_slot(__u64 i, void *data)
{
	struct empty_ctx *e = data;
	struct cti_slot *s;
	__u64 seq;

	if (i >= CTI_CHUNK_SLOTS)
		return 1;
	s = &e->c->s[i];
	seq = s->seq;
	if (seq && __sync_val_compare_and_swap(&s->seq, seq, 0) == seq) {
		__sync_fetch_and_add(&e->zm->removed, 1);
		if (e->st)
			e->st->removed++;
	}
	return 0;
}

/* a chunk of slots and the tuple chunks of its slots go together: the
 * slots are emptied first, so no reader takes a freed tuple for a record */
static __always_inline void free_chunk(__u32 zone, __u64 chunk, struct cti_zone *zm,
				       struct cti_stats *st)
{
	__u64 key = cti_key(zone, chunk);
	struct empty_ctx e = { .zm = zm, .st = st };
	__u64 tkey = cti_key(zone, chunk * (CTI_CHUNK_SLOTS / CTI_TUPLE_SLOTS));
	long freed = 0;

	e.c = bpf_map_lookup_elem(&cti_records, &key);
	if (e.c) {
		bpf_loop(CTI_CHUNK_SLOTS, empty_slot, &e, 0);
		bpf_map_delete_elem(&cti_records, &key);
	}
	freed += !bpf_map_delete_elem(&cti_tuples, &tkey);
	tkey++;
	freed += !bpf_map_delete_elem(&cti_tuples, &tkey);
	if (freed)
		count_tuple_chunks(-freed);
}

/* a reaper run moved the tail from..to: free the chunks now below it */
struct free_ctx {
	struct cti_zone *zm;
	__u64 chunk, end;
	__u32 zone;
};

static long free_next_chunk(__u64 i, void *data)
{
	struct free_ctx *f = data;

	if (f->chunk >= f->end)
		return 1;
	free_chunk(f->zone, f->chunk, f->zm, NULL);
	f->chunk++;
	return 0;
}

static __noinline void free_chunks_below(__u32 zone, struct cti_zone *zm, __u64 from,
					      __u64 to)
{
	struct free_ctx f = { .zm = zm, .chunk = from / CTI_CHUNK_SLOTS,
			      .end = to / CTI_CHUNK_SLOTS, .zone = zone };

	if (f.end > f.chunk)
		bpf_loop(CTI_MAX_BATCH / CTI_CHUNK_SLOTS + 2, free_next_chunk, &f, 0);
}

/* Reserve a slot, publish the record, then count the attempt done.
 * Returns the slot, or -1 when the record could not be stored: the zone is
 * then marked dirty, so the index is never silently incomplete. */
static __always_inline long long cti_append(struct cti_zone *zm, __u32 zone,
					    const struct cti_record *rec, __u32 fp)
{
	long long slot;

	slot = __sync_fetch_and_add(&zm->head, 1);
	if (rec_insert(zone, slot, rec, fp)) {
		__sync_fetch_and_add(&zm->failed, 1);
		slot = -1;
	} else {
		__sync_fetch_and_add(&zm->added, 1);
	}
	__sync_fetch_and_add(&zm->done, 1);
	return slot;
}

/* ------------------------------------------------------------------ */
/* Netfilter program: record new entries                               */
/* ------------------------------------------------------------------ */

/* The kernel's BTF id of struct nf_conn, set by the loader before load; 0
 * when the kernel's own BTF has none (conntrack in a module whose BTF alone
 * has it). With it, nf_conn is read with plain loads: CO-RE relocated, a
 * fault reads as zeros (the JIT's exception table), and no probe-read helper
 * call (~40 ns each) per read; the hook reads a new entry's fields this way
 * at about half the cost. Without it, with CO-RE probe reads, which zero
 * what they cannot read. Neither the hook's entry (from skb->_nfct) nor a
 * record's (its ct field) is a trusted pointer. */
const volatile __u32 nf_conn_btf_id = 0;

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* ct->zone.dir as a record keeps it: the direction bits, 0 (unset) meaning both */
static __always_inline __u8 zone_dir_of(__u8 dir)
{
	dir &= CTI_ZONE_DIR_BOTH;
	return dir | (!dir) * CTI_ZONE_DIR_BOTH;
}

/* Non-zero unless the entry (its zone id and direction, its original tuple)
 * is the one the record was made for. Branch-free: the verifier walks it for
 * every slot of a reaper batch. IPv4: the rest of both addresses is zero. */
static __always_inline __u32 record_differs(const struct cti_record *r, __u16 zone, __u8 dir,
					    const struct nf_conntrack_tuple *t)
{
	const __u32 *sa = (const __u32 *)&t->src.u3, *da = (const __u32 *)&t->dst.u3;
	/* ICMP: the tuple's dst.u holds type and code, the record has dport 0 */
	int icmp = (r->proto == IPPROTO_ICMP) | (r->proto == IPPROTO_ICMPV6);
	__u16 want_dp = icmp ? (__u16)(r->icmp_type | (r->icmp_code << 8)) : r->dport;

	return (zone ^ r->zone) | (dir ^ r->zone_dir) | (t->src.u.all ^ r->sport) |
	       (t->dst.u.all ^ want_dp) |
	       (sa[0] ^ r->saddr[0]) | (sa[1] ^ r->saddr[1]) | (sa[2] ^ r->saddr[2]) |
	       (sa[3] ^ r->saddr[3]) |
	       (da[0] ^ r->daddr[0]) | (da[1] ^ r->daddr[1]) | (da[2] ^ r->daddr[2]) |
	       (da[3] ^ r->daddr[3]);
}

/* The nf_conn at addr as a pointer plain loads may read (nf_conn_btf_id set) */
static __always_inline const struct nf_conn *ct_plain(unsigned long addr)
{
	return bpf_rdonly_cast((const void *)addr, nf_conn_btf_id);
}

/* The entry's status alone: a repeat packet of a connection without a
 * reply yet needs nothing else. */
static __always_inline unsigned long read_ct_status(unsigned long addr)
{
	unsigned long status = 0;

	if (nf_conn_btf_id)
		return ct_plain(addr)->status;
	bpf_core_read(&status, sizeof(status), &((struct nf_conn *)addr)->status);
	return status;
}

#define CTI_GONE 0
#define CTI_ALIVE 1
#define CTI_EXPIRED 2	/* still in the table, but timed out: no lookup finds it */
#define CTI_LASTING 3	/* alive, and no timeout within CTI_LASTING_JIFFIES (1 s
			   or more at any HZ up to 1000); or a walk's record,
			   whose entry is not read */
#define CTI_LASTING_JIFFIES 1000

/* What the index needs of an entry besides its tuple */
struct ct_state {
	unsigned long status;
	__u32 timeout;   /* jiffies, 32 bits */
	int use;         /* ct_general.use: 0 once the entry is freed */
	__u32 fp;        /* tuple_fp() of its original tuple */
	__u16 zone;
	__u8 dir;        /* ct->zone.dir as it is (0: both) */
};

#define FP_MIX(h, w) (((h) ^ (__u32)(w)) * 0x9e3779b1u)

/* A fingerprint of a tuple as read_entry reads it (dport: the raw dst.u):
 * the hook stores it with the entry's address; when the address holds
 * another connection's entry later (freed and reused), the fingerprints
 * differ (but for 1 in 2^32, which leaves a duplicate record of the zone's
 * own entry). */
static __always_inline __u32 tuple_fp(const struct cti_record *r)
{
	__u32 h = FP_MIX(0x7f4a7c15u, r->family | r->proto << 8);

	h = FP_MIX(h, r->sport | (__u32)r->dport << 16);
	h = FP_MIX(h, r->saddr[0]);
	h = FP_MIX(h, r->saddr[1]);
	h = FP_MIX(h, r->saddr[2]);
	h = FP_MIX(h, r->saddr[3]);
	h = FP_MIX(h, r->daddr[0]);
	h = FP_MIX(h, r->daddr[1]);
	h = FP_MIX(h, r->daddr[2]);
	h = FP_MIX(h, r->daddr[3]);
	return h ^ (h >> 15);
}

/* Read the nf_conn at addr: its original tuple into r (dport: the raw
 * dst.u, for ICMP its type and code), the rest into e. Conntrack entries
 * come from a SLAB_TYPESAFE_BY_RCU cache: the memory stays an nf_conn (or
 * becomes unreadable, which reads as zeros), so reading it is safe. Read
 * straight into the record (the reaper's stack has no room for a copy). */
static __always_inline void read_entry(unsigned long addr, struct cti_record *r,
				       struct ct_state *e)
{
	if (nf_conn_btf_id) {
		const struct nf_conn *ct = ct_plain(addr);
		const struct nf_conntrack_tuple *t = &ct->tuplehash[0].tuple;

		e->status = ct->status;
		e->use = ct->ct_general.use.refs.counter;
		e->timeout = ct->timeout;
		if (bpf_core_field_exists(ct->zone)) {
			e->zone = ct->zone.id;
			e->dir = ct->zone.dir;
		}
		__builtin_memcpy(r->saddr, &t->src.u3, sizeof(r->saddr));
		__builtin_memcpy(r->daddr, &t->dst.u3, sizeof(r->daddr));
		r->sport = t->src.u.all;
		r->dport = t->dst.u.all;
		r->family = t->src.l3num;
		r->proto = t->dst.protonum;
	} else {
		/* CO-RE probe reads (~40 ns each); what cannot be read is zeroed */
		struct nf_conn *ct = (struct nf_conn *)addr;
		struct nf_conntrack_tuple *t = &ct->tuplehash[0].tuple;

		bpf_core_read(&e->status, sizeof(e->status), &ct->status);
		bpf_core_read(&e->use, sizeof(e->use), &ct->ct_general.use.refs.counter);
		bpf_core_read(&e->timeout, sizeof(e->timeout), &ct->timeout);
		if (bpf_core_field_exists(ct->zone)) {
			bpf_core_read(&e->zone, sizeof(e->zone), &ct->zone.id);
			bpf_core_read(&e->dir, sizeof(e->dir), &ct->zone.dir);
		}
		bpf_core_read(r->saddr, sizeof(r->saddr), &t->src.u3);
		bpf_core_read(r->daddr, sizeof(r->daddr), &t->dst.u3);
		bpf_core_read(&r->sport, sizeof(r->sport), &t->src.u.all);
		bpf_core_read(&r->dport, sizeof(r->dport), &t->dst.u.all);
		bpf_core_read(&r->family, sizeof(r->family), &t->src.l3num);
		bpf_core_read(&r->proto, sizeof(r->proto), &t->dst.protonum);
	}
	e->fp = tuple_fp(r);
}

/* A hook record of zone's, with its fingerprint fp: read its entry, and
 * complete the record from it (its original tuple, zone and direction;
 * ICMP: type and code, no dport). A freed entry has use 0: CTI_GONE, as is
 * one not (yet) confirmed, or another connection's (the memory was reused:
 * another fingerprint, or another zone). An entry whose timeout has passed
 * is CTI_EXPIRED: conntrack's gc frees it when it comes by (seconds later
 * under churn), every lookup and dump already treats it as gone. So is a
 * dying one (deleted, out of the table, but still referenced, e.g. by a
 * packet still queued somewhere): freed when the last reference goes,
 * counted by the table until then. Records from walks (ct 0) are kept, as
 * they are. */
static __always_inline int resolve_record(struct cti_record *r, __u32 zone, __u32 fp)
{
	struct ct_state e = {};
	__s32 left;

	if (!r->ct)
		return CTI_LASTING;
	read_entry(r->ct, r, &e);
	if (!(e.use > 0 && (e.status & IPS_CONFIRMED) && e.zone == zone && e.fp == fp))
		return CTI_GONE;
	r->zone = e.zone;
	r->zone_dir = zone_dir_of(e.dir);
	/* ICMP: dst.u is { u8 type, code } */
	if (r->proto == IPPROTO_ICMP || r->proto == IPPROTO_ICMPV6) {
		r->icmp_type = ((__u8 *)&r->dport)[0];
		r->icmp_code = ((__u8 *)&r->dport)[1];
		r->dport = 0;
	} else {
		r->icmp_type = 0;
		r->icmp_code = 0;
	}
	if (e.status & IPS_DYING)
		return CTI_EXPIRED;
	/* nf_ct_is_expired() */
	left = e.timeout - (__u32)bpf_jiffies64();
	if (left <= 0)
		return CTI_EXPIRED;
	return left > CTI_LASTING_JIFFIES ? CTI_LASTING : CTI_ALIVE;
}

/* cti_zone.lasting for tail slot t in second now */
static __always_inline __u64 lasting_mark(__u32 now, __u64 t)
{
	return (__u64)(now & 0xffff) << CTI_SLOT_BITS | ((t + 1) & CTI_SLOT_MASK);
}

struct prune_ctx {
	struct cti_zone *zm;
	struct cti_stats *st;
	__u32 zone;
	__u32 now;
	__u32 move_age;   /* CTI_PRUNE_MOVE_AGE, or the sweeper's */
};

/* The pruner moved the zone's tail past slot t: free t's chunk if t was
 * its last slot (the reaper frees what its passes move past in
 * free_chunks_below). */
static __always_inline void tail_passed(struct prune_ctx *p, __u64 t)
{
	if ((t + 1) % CTI_CHUNK_SLOTS == 0)
		free_chunk(p->zone, t / CTI_CHUNK_SLOTS, p->zm, p->st);
}

/* Amortised pruning: with every CTI_PRUNE_EVERY-th record of a zone, look at its oldest
 * slots; drop records of freed entries, move live ones to the head. Keeps a
 * churning zone's window (and the map) at its live entries without cleanups.
 * Skipped while a reaper pass runs on the zone (it moves the tail itself); a
 * move racing with a pass's start is caught by cti_zone.moves (the pass is
 * run again). One slot per step of a bpf_loop: its own stack frame, and the
 * verifier checks a step once. */
static long prune_step(__u64 i, void *data)
{
	struct prune_ctx *p = data;
	struct cti_zone *zm = p->zm;
	struct cti_record r;
	__u64 t, nslot;
	__u32 fp = 0;
	__s32 age;
	int alive;

	t = zm->tail;
	if (zm->busy || zm->head - t <= CTI_PRUNE_MIN_WINDOW)
		return 1;
	if (rec_lookup(p->zone, t, &r, &fp))
		return 1;   /* a hole or an insert in flight: leave it to a pass */
	alive = resolve_record(&r, p->zone, fp);
	if (alive != CTI_ALIVE && alive != CTI_LASTING) {
		if (__sync_val_compare_and_swap(&zm->tail, t, t + 1) != t)
			return 1;
		if (!rec_delete(p->zone, t)) {
			__sync_fetch_and_add(&zm->removed, 1);
			__sync_fetch_and_add(&zm->pruned, 1);
			p->st->removed++;
			if (alive == CTI_EXPIRED)
				count_expired(p->now);
		}
		tail_passed(p, t);
		return 0;
	}
	/* alive and young: it is the zone's oldest record, so it will most
	 * likely go first; wait for it (keeps the window in creation order) */
	age = p->now - r.ts_sec;
	if (age < (__s32)p->move_age) {
		/* the hook's look would wait too (the sweeper's waits longer) */
		if (alive == CTI_LASTING && age < CTI_PRUNE_MOVE_AGE)
			zm->lasting = lasting_mark(p->now, t);
		return 1;
	}
	/* alive for long: copy it to the head first, so it is never out of
	 * sight, then release its slot; its age counts from the move (a zone
	 * of long-lived connections is not cycled through on every look) */
	r.ts_sec = p->now;
	nslot = __sync_fetch_and_add(&zm->head, 1);
	if (rec_insert(p->zone, nslot, &r, fp)) {
		__sync_fetch_and_add(&zm->done, 1);   /* a hole at nslot */
		return 1;
	}
	__sync_fetch_and_add(&zm->moves, 1);
	__sync_fetch_and_add(&zm->done, 1);
	if (__sync_val_compare_and_swap(&zm->tail, t, t + 1) != t) {
		/* another CPU took slot t: drop our copy again */
		rec_delete(p->zone, nslot);
		return 1;
	}
	rec_delete(p->zone, t);
	tail_passed(p, t);
	return 0;
}

static __always_inline void cti_prune_tail(struct cti_zone *zm, __u32 zone,
					   struct cti_stats *st, __u32 now)
{
	struct prune_ctx p = { .zm = zm, .st = st, .zone = zone, .now = now,
			       .move_age = CTI_PRUNE_MOVE_AGE };

	bpf_loop(CTI_PRUNE_PER_APPEND * CTI_PRUNE_EVERY, prune_step, &p, 0);
}

/* The sweeper: the hook prunes a zone's tail as it records into the zone,
 * so records of ended connections in a zone without new ones would hold
 * the map's room until the zone is cleaned. A BPF timer visits every zone
 * in turn and prunes its tail the same way (prune_step). */
struct sweep_ctx {
	struct prune_ctx p;   /* the zone being pruned; here, not in
	                         sweep_zone's frame: the stack limit */
	__u32 next;           /* the next zone to visit */
	__u32 budget;         /* tail slots left to look at in this run */
};

static long sweep_zone(__u64 i, void *data)
{
	struct sweep_ctx *s = data;
	__u32 zone = s->next, n;
	struct cti_zone *zm;

	if (!s->budget)
		return 1;
	s->next = (zone + 1) % CTI_MAX_ZONES;
	zm = bpf_map_lookup_elem(&cti_zones, &zone);
	if (!zm || zm->head - zm->tail <= CTI_PRUNE_MIN_WINDOW)
		return 0;
	s->p.zm = zm;
	s->p.zone = zone;
	n = bpf_loop(s->budget, prune_step, &s->p, 0);
	s->budget -= n < s->budget ? n : s->budget;
	return 0;
}

static int sweep(void *map, __u32 *key, struct cti_sweeper *sw)
{
	__u32 zero = 0;
	struct sweep_ctx s = { .next = sw->cursor % CTI_MAX_ZONES, .budget = CTI_SWEEP_SLOTS,
			       .p = { .now = clock_sec(),
				      .move_age = CTI_SWEEP_MOVE_AGE } };

	sw->clock_sec = s.p.now;
	sw->clock_jiffies = bpf_jiffies64();
	s.p.st = bpf_map_lookup_elem(&cti_stats, &zero);
	if (s.p.st)
		bpf_loop(CTI_SWEEP_ZONES, sweep_zone, &s, 0);
	sw->cursor = s.next;
	sw->runs++;
	bpf_timer_start(&sw->timer, CTI_SWEEP_NS, 0);
	return 0;
}

/* Read a new entry and store its record; its zone and clock for the
 * pruning. Its own stack frame (not inlined): the hook's frame, the pruning
 * step's and read_ct's together fit the 512 bytes of stack. 0: stored, and
 * it is the zone's turn to prune; 1: stored; -1: not stored. */
static __noinline int record_new(unsigned long ct, __u32 hook, struct cti_stats *st,
				 __u32 *zone_out, __u32 *now_out)
{
	struct cti_record rec = {};
	struct ct_state e = {};
	struct cti_zone *zm;
	long long slot;
	__u32 zone;

	if (!st)
		return -1;
	/* the record is the entry's address and its tuple's fingerprint */
	read_entry(ct, &rec, &e);
	if (e.use <= 0) {
		st->read_err++;   /* read as freed: not an entry being made */
		return -1;
	}
	zone = e.zone;
	rec.hook = hook;
	rec.ts_sec = now_sec();
	rec.ct = ct;

	zm = bpf_map_lookup_elem(&cti_zones, &zone);
	if (!zm)
		return -1;
	slot = cti_append(zm, zone, &rec, e.fp);
	if (slot < 0) {
		st->failed++;
		return -1;
	}
	st->recorded++;
	*zone_out = zone;
	*now_out = rec.ts_sec;
	return slot % CTI_PRUNE_EVERY ? 1 : 0;
}

SEC("netfilter")
int cti_record(struct bpf_nf_ctx *ctx)
{
	struct cti_stats *st;
	struct cti_zone *zm;
	unsigned long nfct, ct;
	__u32 zero = 0, zone = 0, now = 0;

	/* skb is a trusted BTF pointer: a plain (CO-RE relocated) load */
	nfct = ctx->skb->_nfct;
	/* The fast path, for most packets: no entry, or a packet of a connection
	 * that has seen a reply (ctinfo ESTABLISHED, ESTABLISHED_REPLY,
	 * RELATED_REPLY): its entry is confirmed, nothing to read or count. Only
	 * IP_CT_NEW and IP_CT_RELATED can belong to an entry being created. */
	ct = nfct & ~7UL;
	if (!ct || ((nfct & 7) != IP_CT_NEW && (nfct & 7) != IP_CT_RELATED))
		return NF_ACCEPT;

	st = bpf_map_lookup_elem(&cti_stats, &zero);
	if (!st)
		return NF_ACCEPT;
	st->seen++;

	/* Repeats of a connection without a reply yet (ctinfo stays NEW) need
	 * only its status. */
	if (read_ct_status(ct) & IPS_CONFIRMED) {
		st->confirmed++;   /* a repeat of a connection without reply yet */
		return NF_ACCEPT;
	}

	/* a new entry */
	if (record_new(ct, ctx->state->hook /* trusted: a plain load */, st, &zone, &now))
		return NF_ACCEPT;
	zm = bpf_map_lookup_elem(&cti_zones, &zone);
	/* The zone's oldest record was found alive, young and lasting in
	 * this second: it stays so for the rest of it (but for a delete of its
	 * entry, seen a second later), and it holds the tail. Looking again is
	 * a chunk lookup and a read of the entry per look; most zones, most of
	 * the time (their oldest connection lives on), need none. */
	if (zm && zm->lasting != lasting_mark(now, zm->tail))
		cti_prune_tail(zm, zone, st, now);
	return NF_ACCEPT;
}

/* ------------------------------------------------------------------ */
/* XDP reaper, run with BPF_PROG_TEST_RUN                              */
/* ------------------------------------------------------------------ */

extern struct nf_conn *bpf_xdp_ct_lookup(struct xdp_md *xdp_ctx,
					 struct bpf_sock_tuple *bpf_tuple,
					 __u32 tuple__sz, struct bpf_ct_opts *opts,
					 __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;
extern int bpf_ct_change_timeout(struct nf_conn *ct, __u32 timeout) __ksym;

struct reap_ctx {
	struct xdp_md *xdp;
	struct cti_zone *zm;
	struct cti_filter f;
	__u64 pos;
	__u64 end;
	__u64 new_tail;
	__u64 visited, deleted, gone, kept, unsupported, still_there, errors,
	      holes, foreign;
	__u32 zone;
	__u32 op;
	__u32 flags;
	__u32 resolved; /* every slot < end is written or known failed */
	__u32 stuck;    /* a slot could not be resolved: tail stops there */
};

static __always_inline int addr_match(const unsigned int *a,
				      const unsigned int *want,
				      const unsigned int *mask)
{
	return (a[0] & mask[0]) == want[0] && (a[1] & mask[1]) == want[1] &&
	       (a[2] & mask[2]) == want[2] && (a[3] & mask[3]) == want[3];
}

static __always_inline int filter_match(const struct cti_record *r,
					const struct cti_filter *f)
{
	if ((f->flags & CTI_F_FAMILY) && r->family != f->family)
		return 0;
	if ((f->flags & CTI_F_PROTO) && r->proto != f->proto)
		return 0;
	if (f->flags & CTI_F_SPORT) {
		__u16 p = bpf_ntohs(r->sport);
		if (p < f->sport_lo || p > f->sport_hi)
			return 0;
	}
	if (f->flags & CTI_F_DPORT) {
		__u16 p = bpf_ntohs(r->dport);
		if (p < f->dport_lo || p > f->dport_hi)
			return 0;
	}
	if ((f->flags & CTI_F_SRC) && !addr_match(r->saddr, f->src, f->src_mask))
		return 0;
	if ((f->flags & CTI_F_DST) && !addr_match(r->daddr, f->dst, f->dst_mask))
		return 0;
	if ((f->flags & CTI_F_ADDR) && !addr_match(r->saddr, f->addr, f->addr_mask)
	    && !addr_match(r->daddr, f->addr, f->addr_mask))
		return 0;
	return 1;
}

/* lookup of the record's tuple in its zone; opts->error set on NULL */
static __always_inline struct nf_conn *ct_lookup(struct xdp_md *xdp,
						 const struct cti_record *r,
						 struct bpf_ct_opts *opts)
{
	struct bpf_sock_tuple tup = {};
	__u32 tsz;

	__builtin_memset(opts, 0, sizeof(*opts));
	opts->netns_id = BPF_F_CURRENT_NETNS;
	opts->l4proto = r->proto;
	opts->ct_zone_id = r->zone;
	opts->ct_zone_dir = r->zone_dir; /* never 0: the hook and CTI_OP_ADD make it 1..3 */
	if (r->family == AF_INET) {
		tup.ipv4.saddr = r->saddr[0];
		tup.ipv4.daddr = r->daddr[0];
		tup.ipv4.sport = r->sport;
		tup.ipv4.dport = r->dport;
		tsz = sizeof(tup.ipv4);
	} else {
		__builtin_memcpy(tup.ipv6.saddr, r->saddr, 16);
		__builtin_memcpy(tup.ipv6.daddr, r->daddr, 16);
		tup.ipv6.sport = r->sport;
		tup.ipv6.dport = r->dport;
		tsz = sizeof(tup.ipv6);
	}
	return bpf_xdp_ct_lookup(xdp, &tup, tsz, opts, sizeof(*opts));
}

enum { ACT_KEEP, ACT_REMOVE };

/* Is ct the entry this record was made for? The lookup compares the zone id
 * of the direction it matched in only, so with a directional zone (or a
 * tuple another connection now uses in its reply direction) it may return
 * an entry of another zone: never touch that one. */
static __always_inline int ct_is_record(struct nf_conn *ct, const struct cti_record *r)
{
	/* ct is the lookup's trusted reference: plain (CO-RE relocated) loads */
	__u16 zid = 0;
	__u8 dir = 0;

	if (bpf_core_field_exists(ct->zone)) {
		zid = ct->zone.id;
		dir = ct->zone.dir;
	}
	return !record_differs(r, zid, zone_dir_of(dir), &ct->tuplehash[0].tuple);
}

static long reap_one(__u64 idx, void *data)
{
	struct reap_ctx *c = data;
	struct bpf_ct_opts opts;
	struct cti_record r;
	struct nf_conn *ct;
	__u64 nslot;
	int act = ACT_KEEP, err;
	__u32 fp = 0;

	if (c->pos >= c->end)
		return 1;
	c->visited++;
	if (rec_lookup(c->zone, c->pos, &r, &fp)) {
		/* a hole: pruned record or failed insert, or an insert in flight */
		c->holes++;
		if (!c->resolved)
			c->stuck = 1;
		goto next;
	}

	if (resolve_record(&r, c->zone, fp) == CTI_GONE) {
		c->gone++;
		act = ACT_REMOVE;
		goto keep;
	}
	if (c->op == CTI_OP_REAP && !filter_match(&r, &c->f)) {
		c->kept++;
		goto keep;
	}
	if (r.proto != IPPROTO_TCP && r.proto != IPPROTO_UDP) {
		/* the conntrack kfuncs only look up TCP and UDP */
		c->unsupported++;
		goto keep;
	}

	ct = ct_lookup(c->xdp, &r, &opts);
	if (!ct) {
		if (opts.error == -ENOENT) {
			c->gone++;
			act = ACT_REMOVE;
		} else {
			c->errors++;
		}
		goto keep;
	}
	if (!ct_is_record(ct, &r)) {
		/* the record's own entry is gone (it would clash with this one) */
		bpf_ct_release(ct);
		c->foreign++;
		act = ACT_REMOVE;
		goto keep;
	}
	if (c->op == CTI_OP_PRUNE) {
		bpf_ct_release(ct);
		c->kept++;
		goto keep;
	}
	err = bpf_ct_change_timeout(ct, 0);
	bpf_ct_release(ct);
	if (err && err != -ETIME) {
		/* -EPERM: IPS_FIXED_TIMEOUT */
		c->errors++;
		goto keep;
	}
	if (c->flags & CTI_RF_NO_REAP_LOOKUP) {
		c->still_there++;
		act = ACT_REMOVE;
		goto keep;
	}
	/* the entry is expired now; a lookup of its tuple reaps it at once */
	ct = ct_lookup(c->xdp, &r, &opts);
	if (ct) {
		bpf_ct_release(ct);
		c->still_there++;
	} else {
		c->deleted++;
	}
	act = ACT_REMOVE;

keep:
	if (act == ACT_REMOVE) {
		if (!rec_delete(c->zone, c->pos))
			__sync_fetch_and_add(&c->zm->removed, 1);
		goto next;
	}
	/* survivor: move it to a fresh slot at the head to keep the zone compact */
	nslot = __sync_fetch_and_add(&c->zm->head, 1);
	if (rec_insert(c->zone, nslot, &r, fp) == 0)
		rec_delete(c->zone, c->pos);
	else
		c->stuck = 1; /* map full: leave it in place */
	__sync_fetch_and_add(&c->zm->done, 1);
next:
	c->pos++;
	if (!c->stuck)
		c->new_tail = c->pos;
	return 0;
}

/* CTI_OP_ADD: append the n records behind the request, each aged from now
 * (the pruner and the sweeper move a live record only once it is old: a
 * walk's records would otherwise all be moved at first sight). Its own
 * stack frame (the reaper's and reap_one's fill the rest). Returns the
 * records read << 32 | those lost. */
static __noinline __u64 add_records(struct xdp_md *ctx, struct cti_zone *zm, __u32 zone,
				    __u32 n)
{
	__u32 i, lost = 0, added = 0, zero = 0, now = now_sec();
	struct cti_stats *st;

	if (!zm)
		return 0;
	for (i = 0; i < CTI_ADD_MAX && i < n; i++) {
		struct cti_record rec;

		if (bpf_xdp_load_bytes(ctx, sizeof(struct cti_reap_args) + i * sizeof(rec), &rec,
				       sizeof(rec)))
			break;
		if (rec.zone != zone)
			continue;
		rec.ct = 0;   /* a walk's record: its tuple is kept */
		if (!(rec.zone_dir & CTI_ZONE_DIR_BOTH))
			rec.zone_dir = CTI_ZONE_DIR_BOTH;
		rec.ts_sec = now;
		if (cti_append(zm, zone, &rec, 0) < 0)
			lost++;
		else
			added++;
	}
	st = bpf_map_lookup_elem(&cti_stats, &zero);
	if (st)
		st->seeded += added;
	return (__u64)i << 32 | lost;
}

/* CTI_OP_LIST: the zone's records from slot pos up to end, each with its
 * slot, written behind the request. A hook record is completed from its
 * entry; one whose entry is gone (CTI_GONE) is not listed: a prune drops it. */
struct list_ctx {
	struct xdp_md *xdp;
	__u64 pos, end;
	__u32 zone, out, max;
};

static long list_one(__u64 i, void *data)
{
	struct list_ctx *l = data;
	struct cti_listed item = {};
	__u32 fp = 0;

	if (l->pos >= l->end || l->out >= l->max || l->out >= CTI_LIST_MAX)
		return 1;
	if (!rec_lookup(l->zone, l->pos, &item.rec, &fp) &&
	    resolve_record(&item.rec, l->zone, fp) != CTI_GONE) {
		item.slot = l->pos;
		if (bpf_xdp_store_bytes(l->xdp, sizeof(struct cti_reap_args) +
					l->out * sizeof(item), &item, sizeof(item)))
			return 1;
		l->out++;
	}
	l->pos++;
	return 0;
}

static __always_inline int list_records(struct xdp_md *ctx, struct cti_zone *zm, __u32 zone,
				   __u64 from, __u64 end, __u32 max)
{
	struct list_ctx l = { .xdp = ctx, .zone = zone, .end = end, .max = max };
	struct cti_reap_args *a;
	__u64 tail;

	if (!zm)
		return XDP_ABORTED;
	tail = zm->tail;
	l.pos = from > tail ? from : tail;
	bpf_loop(CTI_MAX_BATCH, list_one, &l, 0);
	a = (void *)(long)ctx->data;
	if ((void *)(a + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	a->visited = l.out;
	a->tail = l.pos;
	a->head = zm->head;
	a->status = 0;
	return XDP_PASS;
}

/* The reply of a request that read its payload with bpf_xdp_load_bytes:
 * ctx data may have moved, so it is checked again before writing. */
static __always_inline int reply_done(struct xdp_md *ctx, __u64 visited, __u64 failed)
{
	struct cti_reap_args *a = (void *)(long)ctx->data;

	if ((void *)(a + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	a->visited = visited;
	a->failed = failed;
	a->status = 0;
	return XDP_PASS;
}

SEC("xdp")
int cti_reap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct cti_reap_args *a = data;
	struct reap_ctx c = {};
	__u64 done, head, removed_before;
	__u32 budget;

	if ((void *)(a + 1) > data_end)
		return XDP_ABORTED;

	c.zone = a->zone;
	c.op = a->op;
	c.flags = a->flags;
	if (c.zone >= CTI_MAX_ZONES) {
		a->status = -22;
		return XDP_PASS;
	}
	c.zm = bpf_map_lookup_elem(&cti_zones, &c.zone);
	if (!c.zm) {
		a->status = -2;
		return XDP_PASS;
	}
	if (c.op == CTI_OP_CLEAR_DIRTY) {
		/* only if no record was lost since the caller's resync began */
		a->failed = __sync_val_compare_and_swap(&c.zm->failed, a->end, 0);
		a->status = 0;
		return XDP_PASS;
	}
	if (c.op == CTI_OP_ADD) {
		__u32 n = a->budget;
		__u64 res = add_records(ctx, c.zm, c.zone, n);

		return reply_done(ctx, res >> 32, (__u32)res);
	}
	if (c.op == CTI_OP_LIST)
		return list_records(ctx, c.zm, c.zone, a->tail, a->end, a->budget);
	if (c.op == CTI_OP_DROP) {
		struct cti_stats *st;
		__u32 i, n = a->budget, zero = 0;

		st = bpf_map_lookup_elem(&cti_stats, &zero);
		for (i = 0; i < CTI_DROP_MAX && i < n; i++) {
			__u64 slot;

			if (bpf_xdp_load_bytes(ctx, sizeof(*a) + i * sizeof(slot), &slot,
					       sizeof(slot)))
				break;
			if (rec_delete(c.zone, slot))
				continue;
			/* counted in maps, not in a register: keeps the loop's states few */
			__sync_fetch_and_add(&c.zm->removed, 1);
			if (st)
				__sync_fetch_and_add(&st->removed, 1);
		}
		return reply_done(ctx, i, 0);
	}
	if (c.op == CTI_OP_SWEEP) {
		struct cti_sweeper *sw;
		__u32 zero = 0;
		long err;

		sw = bpf_map_lookup_elem(&cti_sweeper, &zero);
		if (!sw) {
			a->status = -2;
			return XDP_PASS;
		}
		err = bpf_timer_init(&sw->timer, &cti_sweeper, 1 /* CLOCK_MONOTONIC */);
		if (!err) {
			err = bpf_timer_set_callback(&sw->timer, sweep);
			if (!err)
				err = bpf_timer_start(&sw->timer, CTI_SWEEP_NS, 0);
		} else if (err == -16 /* EBUSY: initialised, it runs */) {
			err = 0;
		}
		a->status = err;
		return XDP_PASS;
	}
	if (c.op != CTI_OP_REAP && c.op != CTI_OP_PRUNE) {
		a->status = -22;
		return XDP_PASS;
	}

	/* read done before head: done == head means no insert is in flight */
	done = __sync_fetch_and_add(&c.zm->done, 0);
	head = __sync_fetch_and_add(&c.zm->head, 0);
	c.end = a->end ? a->end : head;
	if (c.end > head)
		c.end = head;
	c.resolved = done == head;
	c.pos = c.zm->tail;
	c.new_tail = c.pos;
	c.xdp = ctx;
	__builtin_memcpy(&c.f, &a->filter, sizeof(c.f));
	removed_before = __sync_fetch_and_add(&c.zm->removed, 0);
	if (!a->end) {   /* a pass begins: keep the hook off the zone's tail */
		__sync_lock_test_and_set(&c.zm->busy, 1);
		a->moves_start = __sync_fetch_and_add(&c.zm->moves, 0);
		a->restart = 0;
	}

	budget = a->budget;
	if (budget == 0 || budget > CTI_MAX_BATCH)
		budget = CTI_MAX_BATCH;
	bpf_loop(budget, reap_one, &c, 0);

	/* only the reaper moves tail; one reaper per zone at a time */
	if (c.new_tail > c.zm->tail) {
		__u64 old_tail = c.zm->tail;

		c.zm->tail = c.new_tail;
		free_chunks_below(c.zone, c.zm, old_tail, c.new_tail);
	}

	a->status = 0;
	a->end = c.end;
	a->pass_done = c.zm->tail >= c.end;
	if (a->pass_done) {
		__sync_lock_test_and_set(&c.zm->busy, 0);
		/* a move that raced with the pass's start may sit beyond its end */
		a->restart = __sync_fetch_and_add(&c.zm->moves, 0) != a->moves_start;
	}
	a->visited += c.visited;
	a->deleted += c.deleted;
	a->gone += c.gone;
	a->kept += c.kept;
	a->unsupported += c.unsupported;
	a->still_there += c.still_there;
	a->errors += c.errors;
	a->holes += c.holes;
	a->foreign += c.foreign;
	/* only this zone's reaper or drops change its removed count meanwhile */
	count_removed(__sync_fetch_and_add(&c.zm->removed, 0) - removed_before);
	a->tail = c.zm->tail;
	a->head = c.zm->head;
	return XDP_PASS;
}

/* ------------------------------------------------------------------ */
/* Table walk (attach), run with BPF_PROG_TEST_RUN                     */
/* ------------------------------------------------------------------ */

/* conntrack's table is an array of hlist_nulls heads; the chain of bucket
 * b ends in the marker b << 1 | 1, and every entry sits on two chains (its
 * original and its reply tuple). Its address is no symbol a program can
 * name (kallsyms lists data only with KALLSYMS_ALL), so CTI_WALK_LOCATE
 * finds it from one entry: forward along the entry's chain to the marker
 * (its bucket), back along pprev to the bucket's head. The scan checks
 * every chain's marker, so a wrong address or a resized table ends in an
 * error, never in a silent partial walk. All under the test run's RCU read
 * lock, as the kernel's own lookups walk these chains. */

/* The pointer at addr; 0 if it cannot be read (no node or marker is 0) */
static __always_inline unsigned long read_ptr(unsigned long addr)
{
	unsigned long v;

	if (bpf_probe_read_kernel(&v, sizeof(v), (const void *)addr))
		return 0;
	return v;
}

struct locate_ctx {
	unsigned long p;
	__u64 bucket;
	int found;
};

/* p: a node; stop at its chain's marker */
static long to_marker(__u64 i, void *data)
{
	struct locate_ctx *l = data;
	unsigned long next = read_ptr(l->p);

	if (!next)
		return 1;
	if (next & 1) {
		l->bucket = next >> 1;
		l->found = 1;
		return 1;
	}
	l->p = next;
	return 0;
}

/* p: the address of the pointer to a node (its pprev), which is either the
 * previous node (its next field comes first) or the bucket's head. A node
 * at p has a pprev pointing back at p; the head's neighbour in the array
 * (the next bucket's head) holds a marker or a node whose next is not p. */
static long to_head(__u64 i, void *data)
{
	struct locate_ctx *l = data;
	unsigned long q = read_ptr(l->p + sizeof(void *));

	if (!q || (q & 1) || read_ptr(q) != l->p) {
		l->found = 2;
		return 1;
	}
	l->p = q;
	return 0;
}

static __always_inline int walk_locate(struct xdp_md *ctx, struct cti_walk_args *a)
{
	struct locate_ctx l = {};
	struct bpf_ct_opts opts;
	struct cti_record r;
	struct nf_conn *ct;
	unsigned long node, net;

	__builtin_memcpy(&r, &a->anchor, sizeof(r));
	ct = ct_lookup(ctx, &r, &opts);
	if (!ct)
		return opts.error ? opts.error : -ENOENT;
	node = (unsigned long)&ct->tuplehash[0].hnnode;
	net = (unsigned long)ct->ct_net.net;
	bpf_ct_release(ct);

	l.p = node;
	bpf_loop(CTI_WALK_STEPS, to_marker, &l, 0);
	if (l.found != 1 || l.bucket >= a->buckets)
		return -ESTALE;
	a->anchor_bucket = l.bucket;
	l.found = 0;
	l.p = read_ptr(node + sizeof(void *));   /* its pprev */
	if (!l.p || (l.p & 1))
		return -ESTALE;   /* unhashed meanwhile */
	bpf_loop(CTI_WALK_STEPS, to_head, &l, 0);
	if (l.found != 2)
		return -ESTALE;
	a->table = l.p - l.bucket * sizeof(void *);
	a->net = net;
	return 0;
}

struct walk_ctx {
	unsigned long table, net, p;
	__u32 bucket, end, retries, now, max_nodes, max_retries, max_steps;
	__u32 paused;   /* stopped at a bucket's end with buckets left */
	__u64 nodes, entries, recorded, lost, foreign, skipped, restarts;
	int err;
};

enum { WALK_RECORDED, WALK_LOST, WALK_FOREIGN, WALK_SKIPPED };

/* One entry on the table: record it if it is this namespace's and alive
 * (what a ctnetlink dump would list). A record like the hook's: the
 * entry's address and its tuple's fingerprint. A global function: verified
 * once on its own, not on every path of the walk's loop. */
__noinline int walk_entry(unsigned long ct, unsigned long net, __u32 now)
{
	struct cti_record rec = {};
	struct ct_state e = {};
	struct cti_zone *zm;
	unsigned long ct_net = 0;
	__u32 zone;
	__s32 left;

	if (nf_conn_btf_id)
		ct_net = (unsigned long)ct_plain(ct)->ct_net.net;
	else
		bpf_core_read(&ct_net, sizeof(ct_net), &((struct nf_conn *)ct)->ct_net.net);
	if (ct_net != net)
		return WALK_FOREIGN;
	read_entry(ct, &rec, &e);
	left = e.timeout - (__u32)bpf_jiffies64();
	if (e.use <= 0 || !(e.status & IPS_CONFIRMED) || (e.status & IPS_DYING) || left <= 0)
		return WALK_SKIPPED;
	zone = e.zone;
	rec.ts_sec = now;
	rec.ct = ct;
	zm = bpf_map_lookup_elem(&cti_zones, &zone);
	if (!zm || cti_append(zm, zone, &rec, e.fp) < 0)
		return WALK_LOST;
	return WALK_RECORDED;
}

static long walk_step(__u64 i, void *data)
{
	struct walk_ctx *w = data;
	struct nf_conntrack_tuple_hash *h;
	unsigned long next;
	__u8 dir = 1;

	if (w->p & 1) {   /* a chain's end */
		if ((w->p >> 1) == w->bucket) {
			w->retries = 0;
			w->bucket++;
			if (w->bucket >= w->end)
				return 1;
			if (w->nodes >= w->max_nodes || i >= w->max_steps) {
				w->paused = 1;   /* the next run goes on from here */
				return 1;
			}
		} else if (++w->retries > w->max_retries) {
			w->err = -ESTALE;   /* not this bucket's chain: a wrong table */
			return 1;
		} else {
			w->restarts++;   /* its last entry was freed and reused: again */
		}
		w->p = read_ptr(w->table + (__u64)w->bucket * sizeof(void *));
		if (!w->p) {
			w->err = -EFAULT;
			return 1;
		}
		return 0;
	}
	h = (struct nf_conntrack_tuple_hash *)w->p;
	next = read_ptr(w->p);   /* hnnode.next comes first */
	if (!next) {
		w->err = -EFAULT;
		return 1;
	}
	bpf_core_read(&dir, sizeof(dir), &h->tuple.dst.dir);
	w->nodes++;
	if (dir == IP_CT_DIR_ORIGINAL) {
		switch (walk_entry(w->p - bpf_core_field_offset(struct nf_conn, tuplehash),
				   w->net, w->now)) {
		case WALK_RECORDED:
			w->entries++;
			w->recorded++;
			break;
		case WALK_LOST:
			w->entries++;
			w->lost++;
			break;
		case WALK_FOREIGN:
			w->foreign++;
			break;
		default:
			w->skipped++;
		}
	}
	w->p = next;
	return 0;
}

static __always_inline int walk_scan(struct cti_walk_args *a)
{
	struct walk_ctx w = {};
	struct cti_stats *st;
	__u32 zero = 0;

	if (a->bucket >= a->end || a->end > a->buckets || !a->table || !a->net)
		return -EINVAL;
	w.table = a->table;
	w.net = a->net;
	w.bucket = a->bucket;
	w.end = a->end;
	w.max_nodes = a->max_nodes;
	w.max_retries = a->max_retries;
	w.max_steps = a->max_steps;
	w.now = now_sec();
	w.p = read_ptr(w.table + (__u64)w.bucket * sizeof(void *));
	if (!w.p)
		return -EFAULT;
	bpf_loop(CTI_WALK_STEPS, walk_step, &w, 0);
	if (!w.err && w.bucket < w.end && !w.paused)
		w.err = -E2BIG;   /* the steps ran out inside a chain */
	a->bucket = w.bucket;
	a->nodes = w.nodes;
	a->entries = w.entries;
	a->recorded = w.recorded;
	a->lost = w.lost;
	a->foreign = w.foreign;
	a->skipped = w.skipped;
	a->restarts = w.restarts;
	st = bpf_map_lookup_elem(&cti_stats, &zero);
	if (st)
		st->seeded += w.recorded;
	return w.err;
}

SEC("xdp")
int cti_walk(struct xdp_md *ctx)
{
	struct cti_walk_args *a = (void *)(long)ctx->data;

	if ((void *)(a + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	if (a->op == CTI_WALK_LOCATE)
		a->status = walk_locate(ctx, a);
	else if (a->op == CTI_WALK_SCAN)
		a->status = walk_scan(a);
	else
		a->status = -EINVAL;
	return XDP_PASS;
}
