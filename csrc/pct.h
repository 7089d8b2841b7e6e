/* SPDX-License-Identifier: Apache-2.0 */
/* Internal header of the pyconntrack shim. */
#ifndef PCT_H
#define PCT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <linux/netlink.h>
#include <libmnl/libmnl.h>

#include "ct_index.h"
#include "pct_decl.h"

#define PCT_RBUF_SIZE   (256 * 1024)  /* > the kernel's largest dump skb */
#define PCT_SBUF_SIZE   (64 * 1024)   /* one sendmsg of batched requests */
#define PCT_BATCH_MAX   256           /* requests per sendmsg */

struct pct_handle {
    struct mnl_socket *dump_nl;   /* dumps */
    struct mnl_socket *cmd_nl;    /* deletes, creates, flushes, stats */
    unsigned int dump_portid, cmd_portid;
    unsigned int seq;

    /* streamed dump state */
    char *rbuf;
    const struct nlmsghdr *rcur;
    int rleft;
    int dumping;
    unsigned int dump_seq;
    struct pct_filter dump_filter;

    /* batched requests on cmd_nl */
    char *sbuf;
    size_t slen;
    unsigned int batch_first_seq;
    int batch_count;
    int batch_acked;   /* requests in the batch that asked for an ack */
    /* per-filter accounting of a multi-filter walk (NULL otherwise): each
     * queued request remembers the filter it was made for */
    struct pct_delete_result *owners;
    int owner;
    int batch_owner[PCT_BATCH_MAX];
    char *abuf;
};

/* pct_msg.c: building and parsing ctnetlink messages */
struct nlmsghdr *pct_put_request(char *buf, unsigned int type, unsigned int flags,
                                 unsigned char family, unsigned char version,
                                 unsigned int seq);
/* One request, every message of its answer to cb; 0 at the dump's end or the
 * ACK (NLM_F_ACK) of a request that is no dump, -errno on an error. */
int pct_nl_exchange(int fd, char *buf, size_t cap, struct nlmsghdr *req, unsigned int seq,
                    void (*cb)(const struct nlmsghdr *m, void *arg), void *arg);
int pct_parse_entry(const struct nlmsghdr *nlh, struct pct_entry *e,
                    const struct nlattr **orig_tuple);
void pct_put_kernel_filter(struct nlmsghdr *nlh, const struct pct_filter *f,
                           unsigned int kflags);
int pct_addr_len(unsigned char family);
void pct_put_tuple(struct nlmsghdr *nlh, unsigned int type, const struct pct_entry *e);
void pct_put_reply_tuple(struct nlmsghdr *nlh, const struct pct_entry *e);

/* pct_dump.c */
int pct_next_msg(struct pct_handle *h, const struct nlmsghdr **out);

/* pct_delete.c: batched requests with one ACK each */
struct pct_ack_counts {
    unsigned long long ok, enoent, failed;
    int first_errno;
};
char *pct_batch_slot(struct pct_handle *h, size_t need,
                     struct pct_ack_counts *acks, int *err);
void pct_batch_commit(struct pct_handle *h, const struct nlmsghdr *nlh);
int pct_batch_flush(struct pct_handle *h, struct pct_ack_counts *acks);
int pct_request(struct pct_handle *h, struct nlmsghdr *nlh);
/* queue one DELETE (orig: the dumped tuple attribute, or NULL to rebuild it) */
int pct_queue_delete(struct pct_handle *h, const struct pct_entry *e,
                     const struct nlattr *orig, int use_zone_attr,
                     struct pct_ack_counts *acks);
void pct_fill_result(struct pct_delete_result *res, const struct pct_ack_counts *acks);
int pct_batch_finish(struct pct_handle *h, struct pct_ack_counts *acks, int err,
                     struct pct_delete_result *res);

/* pct_netns.c */
int pct_enter_netns(const char *path, int *saved);
int pct_leave_netns(int saved);
int pct_socket_in_netns(const char *netns_path, int protocol);

#endif
