/* ct_parse.h - packet parsing into a connection key.
 *
 * Every read is bounds-checked against data_end; every length field in a
 * header is checked against the frame before it is believed. A frame that
 * fails a check is CT_PARSE_INVALID: the datapath counts it and passes it on,
 * it never tracks it.
 */
#ifndef CT_PARSE_H
#define CT_PARSE_H

#define CT_PARSE_OK       0
#define CT_PARSE_NOT_IP   1 /* ARP, LLDP ...: not our business */
#define CT_PARSE_INVALID  2 /* malformed */
#define CT_PARSE_FRAGMENT 3 /* non-first fragment: no ports to track by */
#define CT_PARSE_OTHER    4 /* IP, but no protocol we track */

#define CT_ETH_P_IP     0x0800
#define CT_ETH_P_IPV6   0x86DD
#define CT_ETH_P_8021Q  0x8100
#define CT_ETH_P_8021AD 0x88A8

#define CT_IPV6_EXT_MAX 6

struct ct_pkt {
	union {
		struct ct_key4 k4;
		struct ct_key6 k6;
	};
	u32 l3_len;     /* IP header and payload, as the IP header states it */
	u8  family;     /* 4 or 6 */
	u8  tcp_flags;
	u8  no_create;  /* may only match an entry: ICMP echo reply */
	u8  _pad0;
};

struct ct_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct ct_ports {
	__be16 source;
	__be16 dest;
};

struct ct_icmp_echo {
	u8 type;
	u8 code;
	__sum16 csum;
	__be16 id;
	__be16 seq;
};

/* L4 at l4 (bounds checked here), protocol proto, l4_len bytes of L4 header
 * and payload according to the IP header; frag: first fragment of several. */
static __always_inline int ct_parse_l4(void *l4, void *data_end, u8 proto, u32 l4_len,
				       int frag, struct ct_pkt *p, __be16 *sport, __be16 *dport)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return CT_PARSE_INVALID;
		u32 doff = th->doff * 4;
		if (doff < sizeof(*th) || (!frag && doff > l4_len))
			return CT_PARSE_INVALID;
		*sport = th->source;
		*dport = th->dest;
		p->tcp_flags = ((u8 *)th)[13];
		return CT_PARSE_OK;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return CT_PARSE_INVALID;
		u32 ulen = bpf_ntohs(uh->len);
		if (!frag && (ulen < sizeof(*uh) || ulen > l4_len))
			return CT_PARSE_INVALID;
		*sport = uh->source;
		*dport = uh->dest;
		return CT_PARSE_OK;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct ct_icmp_echo *ic = l4;
		if ((void *)(ic + 1) > data_end || (!frag && l4_len < sizeof(*ic)))
			return CT_PARSE_INVALID; /* short, or the rest is Ethernet padding */
		u8 req = proto == IPPROTO_ICMP ? 8 : 128;
		u8 rep = proto == IPPROTO_ICMP ? 0 : 129;
		if (ic->type != req && ic->type != rep)
			return CT_PARSE_OTHER;
		p->no_create = ic->type == rep;
		*sport = ic->id;
		*dport = ic->id;
		return CT_PARSE_OK;
	}
	return CT_PARSE_OTHER;
}

static __always_inline int ct_parse_ipv4(void *nh, void *data_end, u32 avail, struct ct_pkt *p)
{
	struct iphdr *iph = nh;
	if ((void *)(iph + 1) > data_end)
		return CT_PARSE_INVALID;
	if (iph->version != 4 || iph->ihl < 5)
		return CT_PARSE_INVALID;
	u32 hlen = iph->ihl * 4;
	u32 tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || tot > avail || nh + hlen > data_end)
		return CT_PARSE_INVALID;
	p->family = 4;
	p->l3_len = tot;
	p->k4.saddr = iph->saddr;
	p->k4.daddr = iph->daddr;
	p->k4.proto = iph->protocol;
	u16 frag = bpf_ntohs(iph->frag_off);
	if (frag & 0x1fff)
		return CT_PARSE_FRAGMENT;
	return ct_parse_l4(nh + hlen, data_end, iph->protocol, tot - hlen, frag & 0x2000,
			   p, &p->k4.sport, &p->k4.dport);
}

static __always_inline int ct_parse_ipv6(void *nh, void *data_end, u32 avail, struct ct_pkt *p)
{
	struct ipv6hdr *ip6 = nh;
	if ((void *)(ip6 + 1) > data_end)
		return CT_PARSE_INVALID;
	if (ip6->version != 6)
		return CT_PARSE_INVALID;
	u32 tot = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (tot > avail)
		return CT_PARSE_INVALID;
	p->family = 6;
	p->l3_len = tot;
	__builtin_memcpy(p->k6.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->k6.daddr, &ip6->daddr, 16);

	u8 nexthdr = ip6->nexthdr;
	void *cur = ip6 + 1;
	int frag = 0;
#pragma unroll
	for (int i = 0; i < CT_IPV6_EXT_MAX; i++) {
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
		    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT &&
		    nexthdr != IPPROTO_AH)
			break;
		u8 *eh = cur;
		if ((void *)(eh + 8) > data_end)
			return CT_PARSE_INVALID;
		u32 elen;
		if (nexthdr == IPPROTO_FRAGMENT) {
			u16 off = bpf_ntohs(*(__be16 *)(eh + 2));
			if (off & 0xfff8)
				return CT_PARSE_FRAGMENT;
			frag = off & 1;
			elen = 8;
		} else if (nexthdr == IPPROTO_AH) {
			elen = ((u32)eh[1] + 2) * 4;
		} else {
			elen = ((u32)eh[1] + 1) * 8;
		}
		nexthdr = eh[0];
		cur += elen;
		if (cur > nh + tot)
			return CT_PARSE_INVALID;
	}
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS ||
	    nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_AH)
		return CT_PARSE_OTHER; /* more extension headers than we walk */
	p->k6.proto = nexthdr;
	return ct_parse_l4(cur, data_end, nexthdr, (u32)(nh + tot - cur), frag,
			   p, &p->k6.sport, &p->k6.dport);
}

/* frame_len: the whole frame's length, which for a non-linear skb on tc is
 * more than data_end - data; header reads are still bounded by data_end. */
static __always_inline int ct_parse(void *data, void *data_end, u32 frame_len, struct ct_pkt *p)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return CT_PARSE_INVALID;
	void *nh = eth + 1;
	u16 proto = bpf_ntohs(eth->h_proto);
	u16 vlan = 0;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != CT_ETH_P_8021Q && proto != CT_ETH_P_8021AD)
			break;
		struct ct_vlan_hdr *vh = nh;
		if ((void *)(vh + 1) > data_end)
			return CT_PARSE_INVALID;
		if (i == 0)
			vlan = bpf_ntohs(vh->tci) & 0x0fff;
		proto = bpf_ntohs(vh->proto);
		nh = vh + 1;
	}
	u32 l2 = nh - data;
	if (l2 > frame_len)
		return CT_PARSE_INVALID;
	u32 avail = frame_len - l2;
	int rc;
	if (proto == CT_ETH_P_IP) {
		rc = ct_parse_ipv4(nh, data_end, avail, p);
		p->k4.vlan = vlan;
	} else if (proto == CT_ETH_P_IPV6) {
		rc = ct_parse_ipv6(nh, data_end, avail, p);
		p->k6.vlan = vlan;
	} else {
		return CT_PARSE_NOT_IP;
	}
	return rc;
}

#endif /* CT_PARSE_H */
