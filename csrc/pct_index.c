/* SPDX-License-Identifier: Apache-2.0 */
/* The eBPF zone index seen from the shim: seeding it from a walk, deleting a
 * zone's matches through it (BPF reaper for TCP/UDP, batched netlink deletes
 * for the rest or where the kernel lacks zoned kfuncs), and auditing it. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "pct.h"
#include "ct_index_loader.h"

#define SEED_BATCH 1024

static int has_ports(unsigned char proto)
{
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
        || proto == IPPROTO_UDPLITE || proto == 47 /* GRE keys */;
}

static int is_icmp(unsigned char proto)
{
    return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* The record the netfilter program would have made for this entry. */
static void entry_to_record(const struct pct_entry *e, struct cti_record *r)
{
    memset(r, 0, sizeof(*r));
    memcpy(r->saddr, e->orig_src, 16);
    memcpy(r->daddr, e->orig_dst, 16);
    r->family = e->family;
    r->proto = e->proto;
    r->zone = e->zone;
    r->hook = 255;   /* found by a walk, not by a hook */
    if (is_icmp(e->proto)) {
        r->sport = htons(e->icmp_id);
        r->icmp_type = e->icmp_type;
        r->icmp_code = e->icmp_code;
    } else if (e->has_ports) {
        r->sport = htons(e->orig_sport);
        r->dport = htons(e->orig_dport);
    }
}

static void record_to_entry(const struct cti_record *r, struct pct_entry *e)
{
    memset(e, 0, sizeof(*e));
    memcpy(e->orig_src, r->saddr, 16);
    memcpy(e->orig_dst, r->daddr, 16);
    e->family = r->family;
    e->proto = r->proto;
    e->zone = r->zone;
    if (is_icmp(r->proto)) {
        e->icmp_id = ntohs(r->sport);
        e->icmp_type = r->icmp_type;
        e->icmp_code = r->icmp_code;
    } else if (has_ports(r->proto) || r->sport || r->dport) {
        e->has_ports = 1;
        e->orig_sport = ntohs(r->sport);
        e->orig_dport = ntohs(r->dport);
    }
}

static int by_zone(const void *a, const void *b)
{
    const struct cti_record *x = a, *y = b;
    return (int)x->zone - (int)y->zone;
}

static int add_sorted(struct cti *c, struct cti_record *recs, int n, long long *lost)
{
    int i = 0;

    qsort(recs, n, sizeof(*recs), by_zone);
    while (i < n) {
        int j = i;
        long long rc;

        while (j < n && recs[j].zone == recs[i].zone)
            j++;
        rc = cti_add_records(c, recs[i].zone, recs + i, j - i);
        if (rc < 0)
            return (int)rc;
        *lost += rc;
        i = j;
    }
    return 0;
}

long long pct_index_seed(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                         unsigned int kflags, long long *lost)
{
    struct pct_entry *entries;
    struct cti_record *recs;
    long long seen = 0;
    int rc, n, i;

    *lost = 0;
    entries = malloc(SEED_BATCH * sizeof(*entries));
    recs = malloc(SEED_BATCH * sizeof(*recs));
    if (!entries || !recs) {
        free(entries);
        free(recs);
        return -ENOMEM;
    }
    rc = pct_dump_start(h, f, kflags);
    while (rc == 0 && (n = pct_dump_next(h, entries, SEED_BATCH)) > 0) {
        for (i = 0; i < n; i++)
            entry_to_record(&entries[i], &recs[i]);
        rc = add_sorted(c, recs, n, lost);
        seen += n;
    }
    if (rc == 0 && n < 0)
        rc = n;
    if (rc < 0)
        pct_dump_abort(h);
    free(entries);
    free(recs);
    return rc < 0 ? rc : seen;
}

/* Every record of a zone with its slot; *out is malloc'd. */
static int zone_records(struct cti *c, unsigned int zone, struct cti_record **out,
                        unsigned long long **slots)
{
    struct cti_zone z;
    unsigned long long window;
    int rc;

    *out = NULL;
    *slots = NULL;
    rc = cti_zone_stats(c, zone, &z);
    if (rc < 0)
        return rc;
    window = z.head - z.tail;
    if (window > (1u << 24))
        return -E2BIG;
    *out = malloc((window + 1) * sizeof(**out));
    *slots = malloc((window + 1) * sizeof(**slots));
    if (!*out || !*slots) {
        free(*out);
        free(*slots);
        return -ENOMEM;
    }
    return cti_zone_records_at(c, zone, *out, *slots, (unsigned int)window);
}

int pct_index_delete(struct pct_handle *h, struct cti *c, const struct pct_filter *f,
                     const struct cti_filter *bf, int use_kfuncs, int use_zone_attr,
                     struct pct_delete_result *res)
{
    struct cti_record *recs = NULL;
    unsigned long long *slots = NULL;
    struct pct_entry *todo = NULL;
    unsigned long long *todo_slots = NULL;
    struct pct_delete_result dr;
    int n, i, k = 0, rc = 0;

    memset(res, 0, sizeof(*res));
    if (!(f->fields & PCT_F_ZONE))
        return -EINVAL;
    if (use_kfuncs) {
        struct cti_reap_result rr;

        rc = cti_reap_zone(c, f->zone, bf, 0, &rr);
        if (rc < 0)
            return rc;
        /* still_there: expired, not yet unlinked; the table no longer
         * shows it and the next lookup or dump reaps it */
        res->deleted += rr.deleted + rr.still_there;
        res->already_gone += rr.gone;
        res->failed += rr.errors;
        if (rr.errors)
            res->first_errno = EIO;
        /* the reaper counts every record its filter matched that the kfuncs
         * cannot look up (a superset of the exact matches): none, nothing left
         * to do, and no second pass over the zone */
        if (!rr.unsupported) {
            res->matched = res->deleted + res->already_gone + res->failed;
            return 0;
        }
    }
    /* the rest: protocols the kfuncs cannot look up (or every protocol on
     * kernels without zoned kfuncs) go through batched netlink deletes */
    n = zone_records(c, f->zone, &recs, &slots);
    if (n < 0)
        return n;
    todo = malloc((n + 1) * sizeof(*todo));
    todo_slots = malloc((n + 1) * sizeof(*todo_slots));
    if (!todo || !todo_slots) {
        rc = -ENOMEM;
        goto out;
    }
    for (i = 0; i < n; i++) {
        if (use_kfuncs && (recs[i].proto == IPPROTO_TCP || recs[i].proto == IPPROTO_UDP))
            continue;
        record_to_entry(&recs[i], &todo[k]);
        if (!pct_match(f, &todo[k]))
            continue;
        todo_slots[k++] = slots[i];
    }
    if (k) {
        rc = pct_delete_entries(h, todo, k, use_zone_attr, &dr);
        if (rc < 0)
            goto out;
        res->deleted += dr.deleted;
        res->already_gone += dr.already_gone;
        res->failed += dr.failed;
        if (!res->first_errno)
            res->first_errno = dr.first_errno;
        /* records of entries now gone; on failures keep them all for a retry */
        if (!dr.failed) {
            for (i = 0; i < k; i++)
                cti_drop_record(c, f->zone, todo_slots[i]);
            if (use_kfuncs) {   /* compact the zone: move its tail past the holes */
                struct cti_reap_result pr;
                cti_prune_zone(c, f->zone, 0, &pr);
            }
        }
    }
    res->matched = res->deleted + res->already_gone + res->failed;
out:
    free(recs);
    free(slots);
    free(todo);
    free(todo_slots);
    return rc;
}

struct dropped {
    unsigned int zone;
    unsigned long long slot;
};

int pct_index_delete_each(struct pct_handle *h, struct cti *c, const struct pct_filter *fs,
                          int n, int use_kfuncs, int use_zone_attr,
                          struct pct_delete_result *res, struct pct_delete_result *per_filter)
{
    struct pct_ack_counts acks = {0};
    struct dropped *drops = NULL;
    size_t n_drops = 0, cap_drops = 0;
    int *idx, i, j, err = 0;

    memset(res, 0, sizeof(*res));
    memset(per_filter, 0, sizeof(*per_filter) * n);
    for (i = 0; i < n; i++)
        if (!(fs[i].fields & PCT_F_ZONE))
            return -EINVAL;
    idx = malloc(n * sizeof(*idx));
    if (!idx)
        return -ENOMEM;
    h->owners = per_filter;
    for (i = 0; i < n && !err; i++) {
        struct cti_record *recs;
        unsigned long long *slots;
        int k = 0, nrec, r;

        for (j = 0; j < i && fs[j].zone != fs[i].zone; j++)
            ;
        if (j < i)
            continue;   /* zone already done */
        for (j = i; j < n; j++)
            if (fs[j].zone == fs[i].zone)
                idx[k++] = j;
        nrec = zone_records(c, fs[i].zone, &recs, &slots);
        if (nrec < 0) {
            err = nrec;
            break;
        }
        for (r = 0; r < nrec && !err; r++) {
            struct pct_entry e;
            int m, which = -1;

            record_to_entry(&recs[r], &e);
            for (m = 0; m < k; m++)
                if (pct_match(&fs[idx[m]], &e)) {
                    which = idx[m];
                    break;
                }
            if (which < 0)
                continue;
            res->matched++;
            per_filter[which].matched++;
            h->owner = which;
            err = pct_queue_delete(h, &e, NULL, use_zone_attr, &acks);
            if (err)
                break;
            if (n_drops == cap_drops) {
                struct dropped *more;
                cap_drops = cap_drops ? 2 * cap_drops : 256;
                more = realloc(drops, cap_drops * sizeof(*drops));
                if (!more) {
                    err = -ENOMEM;
                    break;
                }
                drops = more;
            }
            drops[n_drops].zone = fs[i].zone;
            drops[n_drops++].slot = slots[r];
        }
        free(recs);
        free(slots);
    }
    err = pct_batch_finish(h, &acks, err, res);
    /* records of entries now gone; on failures keep them all for a retry */
    if (!err && !res->failed) {
        size_t d;
        for (d = 0; d < n_drops; d++)
            cti_drop_record(c, drops[d].zone, drops[d].slot);
        if (use_kfuncs)   /* compact the touched zones */
            for (i = 0; i < n; i++) {
                struct cti_reap_result pr;
                for (j = 0; j < i && fs[j].zone != fs[i].zone; j++)
                    ;
                if (j == i)
                    cti_prune_zone(c, fs[i].zone, 0, &pr);
            }
    }
    free(drops);
    free(idx);
    return err;
}

/* ---- audit: live entries the index does not hold -------------------------- */

struct rec_set {
    struct cti_record *slots;
    unsigned char *used;
    size_t cap, count;
};

static unsigned long long rec_hash(const struct cti_record *r)
{
    const unsigned char *p = (const unsigned char *)r;
    unsigned long long h = 1469598103934665603ULL;
    size_t i;

    /* addresses, ports, family, proto, icmp type/code, zone: the first 42 bytes */
    for (i = 0; i < offsetof(struct cti_record, zone_dir); i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static int rec_eq(const struct cti_record *a, const struct cti_record *b)
{
    return !memcmp(a, b, offsetof(struct cti_record, zone_dir));
}

static int set_add(struct rec_set *s, const struct cti_record *r)
{
    size_t i = rec_hash(r) & (s->cap - 1);

    if (2 * (s->count + 1) > s->cap)
        return -1;   /* grew since it was sized: stay at most half full */
    while (s->used[i]) {
        if (rec_eq(&s->slots[i], r))
            return 0;
        i = (i + 1) & (s->cap - 1);
    }
    s->used[i] = 1;
    s->slots[i] = *r;
    s->count++;
    return 1;
}

static int set_has(const struct rec_set *s, const struct cti_record *r)
{
    size_t i = rec_hash(r) & (s->cap - 1);

    while (s->used[i]) {
        if (rec_eq(&s->slots[i], r))
            return 1;
        i = (i + 1) & (s->cap - 1);
    }
    return 0;
}

/* Walks the table once; copies up to max missing entries into missing[]
 * and returns how many live entries have no record (or -errno). */
long long pct_index_audit(struct pct_handle *h, struct cti *c, struct pct_entry *missing,
                          int max, unsigned long long *checked)
{
    struct rec_set set = {0};
    struct pct_entry *batch = NULL;
    unsigned long long total = 0;
    long long n_missing = 0;
    unsigned int zone;
    struct pct_filter all;
    int rc = 0, n, i;

    *checked = 0;
    for (zone = 0; zone < CTI_MAX_ZONES; zone++) {
        struct cti_zone z;
        if (cti_zone_stats(c, zone, &z) == 0)
            total += z.head - z.tail;
    }
    for (set.cap = 1024; set.cap < 2 * total + 1; set.cap <<= 1)
        ;
    set.slots = malloc(set.cap * sizeof(*set.slots));
    set.used = calloc(set.cap, 1);
    batch = malloc(SEED_BATCH * sizeof(*batch));
    if (!set.slots || !set.used || !batch) {
        rc = -ENOMEM;
        goto out;
    }
    for (zone = 0; zone < CTI_MAX_ZONES; zone++) {
        struct cti_record *recs;
        unsigned long long *slots;
        struct cti_zone z;

        if (cti_zone_stats(c, zone, &z) < 0 || z.head == z.tail)
            continue;
        n = zone_records(c, zone, &recs, &slots);
        if (n < 0) {
            rc = n;
            goto out;
        }
        for (i = 0; i < n; i++) {
            recs[i].zone_dir = 0;
            set_add(&set, &recs[i]);
        }
        free(recs);
        free(slots);
    }
    memset(&all, 0, sizeof(all));
    rc = pct_dump_start(h, &all, 0);
    while (rc == 0 && (n = pct_dump_next(h, batch, SEED_BATCH)) > 0) {
        for (i = 0; i < n; i++) {
            struct cti_record r;

            entry_to_record(&batch[i], &r);
            (*checked)++;
            if (set_has(&set, &r))
                continue;
            if (n_missing < max)
                missing[n_missing] = batch[i];
            n_missing++;
        }
    }
    if (rc == 0 && n < 0)
        rc = n;
out:
    free(set.slots);
    free(set.used);
    free(batch);
    return rc < 0 ? rc : n_missing;
}
