/* table_fill.c - bench/table_scale.py's traffic generator inside the kernel.
 *
 * Filling a table of 10 million entries one test-run syscall per packet would
 * take minutes of Python. This tc program is run with BPF_PROG_TEST_RUN and a
 * large `repeat` instead: each run rewrites the source address and port of
 * the frame it was given (one scapy-built template) to those of flow number
 * `idx`, then hands the frame to ct_handle(), the very function that
 * ct_xdp_ingress and ct_tc_egress run. Parse, lookups, create (entries
 * counter, insert, expiry index push, CREATE event) are the datapath's own.
 *
 * table_scale.py compiles this file like the loader compiles the datapath:
 * our quoted includes expanded into one text, with the datapath's -D flags,
 * so BPF_TABLE_PINNED opens the SAME pinned maps as the loaded datapath.
 * Only fill_ctl (and the never-written ct_zero) belong to this object.
 *
 * Flow number idx: source 198.18.0.0/15 host part idx & 0x1ffff, source
 * port 1024 + (idx >> 17). Destination, ports and protocol come from the
 * template, so different templates give disjoint sets of flows.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#include "ct_abi.h"
#include "ct_maps.h"
#include "ct_parse.h"
#include "ct_table.h"
#include "ct_logic.h"

#define FILL_MODE_NEXT   0 /* idx = base + next++: a flow never used before */
#define FILL_MODE_RANDOM 1 /* idx = base + random % range: an existing flow */

#define FILL_OFF_SADDR (14 + 12) /* IPv4 source address, untagged frame */
#define FILL_OFF_SPORT (14 + 20) /* L4 source port, IPv4 header without options */

struct fill_ctl {
	__u64 next;
	__u32 mode;
	__u32 base;
	__u32 range;
	__u32 _pad;
};

BPF_ARRAY(fill_ctl, struct fill_ctl, 1);

int ct_bench_fill(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct fill_ctl *c = fill_ctl.lookup(&zero);
	if (!c)
		return TC_ACT_SHOT;
	u32 idx;
	if (c->mode == FILL_MODE_RANDOM)
		idx = c->base + bpf_get_prandom_u32() % (c->range ? c->range : 1);
	else
		idx = c->base + (u32)__sync_fetch_and_add(&c->next, 1);
	__be32 saddr = bpf_htonl(0xC6120000U | (idx & 0x1ffff));
	__be16 sport = bpf_htons(1024 + (idx >> 17));
	if (bpf_skb_store_bytes(skb, FILL_OFF_SADDR, &saddr, sizeof(saddr), 0) ||
	    bpf_skb_store_bytes(skb, FILL_OFF_SPORT, &sport, sizeof(sport), 0))
		return TC_ACT_SHOT;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int v = ct_handle(data, data_end, skb->len);
	return v == CT_VERDICT_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
