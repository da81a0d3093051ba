/* test_abi_roundtrip.c - test only (tests/bpf/test_abi.py), never loaded by
 * the daemon.
 *
 * Writes one struct ct_event in which every field holds a distinct value, so
 * that a field the Python decoder reads at a wrong offset, with a wrong width
 * or in the wrong byte order shows up as a wrong value. The first byte of the
 * test packet chooses the family (4 or 6). Its own ring, not pinned: it shares
 * nothing with the datapath.
 */
#include <uapi/linux/bpf.h>

#include "ct_abi.h"

BPF_RINGBUF_OUTPUT(rt_events, 1);

int rt_fill_event(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *family = data;
	if ((void *)(family + 1) > data_end)
		return XDP_ABORTED;
	if (*family != 4 && *family != 6)
		return XDP_ABORTED;

	struct ct_event *ev = rt_events.ringbuf_reserve(sizeof(struct ct_event));
	if (!ev)
		return XDP_ABORTED;
	ev->type = CT_EV_DESTROY;
	ev->version = CT_ABI_VERSION;
	ev->len = sizeof(struct ct_event);
	ev->family = *family;
	ev->proto = 0x84;
	ev->state = CT_S_LAST_ACK;
	ev->flags = CT_F_ASSURED | CT_F_SEEN_REPLY | CT_F_PICKUP;
	ev->ct_id = 0x0102030405060708ULL;
	ev->seq = 0x11121314;
	ev->end_reason = CT_END_REUSE;
	ev->missed = 0x25;
	ev->tcp_flags_orig = 0x1b;
	ev->tcp_flags_reply = 0x2d;
	ev->ts_ns = 0x2122232425262728ULL;
	ev->first_ns = 0x3132333435363738ULL;
	ev->last_ns = 0x4142434445464748ULL;
	ev->pkts_orig = 0x5152535455565758ULL;
	ev->pkts_reply = 0x6162636465666768ULL;
	ev->bytes_orig = 0x7172737475767778ULL;
	ev->bytes_reply = 0x8182838485868788ULL;
#pragma unroll
	for (int i = 0; i < 16; i++) {
		ev->saddr[i] = 0xa0 + i;
		ev->daddr[i] = 0xb0 + i;
	}
	ev->sport = bpf_htons(0xc1c2);
	ev->dport = bpf_htons(0xd1d2);
	ev->vlan = 0x0e0f;
	ev->dying = 0x83;
	ev->retries = 0x97;
	rt_events.ringbuf_submit(ev, 0);
	return XDP_PASS;
}
