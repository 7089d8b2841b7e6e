/* SPDX-License-Identifier: Apache-2.0 */
/* The exact filter check run on every entry, whatever the kernel filtered. */
#include "pct.h"

static int prefix_match(const unsigned char *addr, const struct pct_prefix *p)
{
    unsigned int full = p->plen / 8, rest = p->plen % 8, i;

    for (i = 0; i < full; i++)
        if (addr[i] != p->addr[i])
            return 0;
    if (rest) {
        unsigned char mask = (unsigned char)(0xff << (8 - rest));
        if ((addr[full] & mask) != (p->addr[full] & mask))
            return 0;
    }
    return 1;
}

int pct_match(const struct pct_filter *f, const struct pct_entry *e)
{
    unsigned int m = f->fields;

    /* zone Z: the entry's zone id is Z, whatever its direction (as the
     * kernel's own zone filters compare it) */
    if ((m & PCT_F_ZONE) && e->zone != f->zone)
        return 0;
    if ((m & PCT_F_ZONE_DIR) && e->zone_dir != f->zone_dir)
        return 0;
    if ((m & PCT_F_FAMILY) && e->family != f->family)
        return 0;
    /* an address is only comparable within its own family */
    if ((m & (PCT_F_SRC | PCT_F_DST | PCT_F_ADDR | PCT_F_REPLY_SRC | PCT_F_REPLY_DST))
        && e->family != f->family)
        return 0;
    if ((m & PCT_F_PROTO) && e->proto != f->proto)
        return 0;
    if ((m & PCT_F_MARK) && (e->mark & f->mark_mask) != f->mark)
        return 0;
    if ((m & PCT_F_SRC) && !prefix_match(e->orig_src, &f->src))
        return 0;
    if ((m & PCT_F_DST) && !prefix_match(e->orig_dst, &f->dst))
        return 0;
    if ((m & PCT_F_ADDR) && !prefix_match(e->orig_src, &f->addr)
        && !prefix_match(e->orig_dst, &f->addr))
        return 0;
    if ((m & PCT_F_REPLY_SRC) && !prefix_match(e->reply_src, &f->reply_src))
        return 0;
    if ((m & PCT_F_REPLY_DST) && !prefix_match(e->reply_dst, &f->reply_dst))
        return 0;
    if ((m & PCT_F_SPORT) && (!e->has_ports || e->orig_sport < f->sport_lo
                              || e->orig_sport > f->sport_hi))
        return 0;
    if ((m & PCT_F_DPORT) && (!e->has_ports || e->orig_dport < f->dport_lo
                              || e->orig_dport > f->dport_hi))
        return 0;
    return 1;
}
