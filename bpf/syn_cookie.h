/* syn_cookie.h - SYN cookies in front of the table (XDP only).
 *
 * With cookies on, a SYN of no entry to a local listener gets no entry: XDP
 * answers it with a SYN-ACK whose sequence number is a cookie the kernel's
 * own TCP would have chosen (bpf_tcp_raw_gen_syncookie_*, the kernel's
 * secret and encoding), and sends it back out (XDP_TX). The client's ACK
 * then meets no entry either: XDP checks its cookie (bpf_tcp_raw_check_*);
 * a valid one creates the entry, as if the table had seen the whole
 * handshake, and goes on to the kernel, which opens the connection through
 * its syncookie path; a bad one is dropped.
 *
 * The kernel takes a cookie ACK only for a listener that sent cookies itself
 * in the last two minutes (net.ipv4.tcp_syncookies=2 makes it cookie every
 * SYN it sees). So the first SYN to each listener, and one every
 * CT_SC_REFRESH_NS after, is passed to the kernel untracked: its answer is
 * a cookie of the same kind, and keeps that listener's window open.
 *
 * Options travel the kernel's way: MSS in the cookie; with timestamps, the
 * client's window scale, SACK-permitted and ECN in the low 6 bits of our
 * TSval, which the client echoes. Without timestamps only the MSS survives.
 * Our TSval is in the kernel's clock (ms of CLOCK_MONOTONIC) and the kernel
 * must not add its per-connection offset: net.ipv4.tcp_timestamps=2. The
 * daemon sets both sysctls while cookies are on (streamer/datapath/syncookies.py).
 */
#ifndef CT_SYN_COOKIE_H
#define CT_SYN_COOKIE_H

#define CT_SC_REFRESH_NS (30ULL * 1000000000ULL)
#define CT_SC_TTL        64
#define CT_TCPOPT_NOP    1
#define CT_TCPOPT_MSS    2
#define CT_TCPOPT_WS     3
#define CT_TCPOPT_SACKOK 4
#define CT_TCPOPT_TS     8
#define CT_TS_WS_NONE    0xf
#define CT_TS_SACK       0x10
#define CT_TS_ECN        0x20
#define CT_TS_BITS       0x3f
#define CT_TCP_ECE       0x40
#define CT_TCP_CWR       0x80

/* A listener, as the socket lookup names it: its bound address and port. */
struct ct_sc_listener {
	u32 addr[4];
	u16 port;
	u16 family;
};

/* auto mode: SYNs of no entry per destination port, in ~1.07 s windows. */
struct ct_sc_rate {
	u32 window;
	u32 cur;
	u32 prev;
	u32 _pad;
};

BPF_HASH(ct_sc_listeners, struct ct_sc_listener, u64, 1024);
BPF_ARRAY(ct_sc_rate, struct ct_sc_rate, 65536);

/* The handshake map: what the cookie cannot carry about a SYN answered from
 * XDP (its time, its length, retransmissions), keyed by the connection's
 * key and read back by the valid ACK, which deletes it. LRU, and apart from
 * the table: a flood churns it (at 130k SYNs/s a record lives about 0.5 s),
 * a real handshake completes long before that; for the few that do not, the
 * ACK falls back to what the cookie tells (CT_SYN_HS_ESTIMATED). A record is
 * the same handshake only for the same client ISN: a SYN with another one
 * starts a new record, an ACK with another one finds none. */
struct ct_sc_hs {
	u64 first_ns;
	u64 last_ns;
	u32 syn_bytes;
	u32 synack_bytes;
	u32 isn;           /* the client's SYN sequence number */
	u16 syns;
	u16 synacks;
};

#define CT_SC_HS_MAX     65536
#define CT_SC_HS_KEEP_NS (130ULL * 1000000000ULL)   /* a client's SYN retries, 6 by default: 127 s */

BPF_TABLE("lru_hash", struct ct_key4, struct ct_sc_hs, ct_sc_hs4, CT_SC_HS_MAX);
BPF_TABLE("lru_hash", struct ct_key6, struct ct_sc_hs, ct_sc_hs6, CT_SC_HS_MAX);

static __always_inline struct ct_sc_hs *ct_sc_hs_lookup(u32 fam, struct ct_pkt *p)
{
	return fam == 4 ? ct_sc_hs4.lookup(&p->k4) : ct_sc_hs6.lookup(&p->k6);
}

/* A SYN answered from XDP (synack_bytes, the SYN-ACK's length) or passed
 * for the kernel to answer (0: its SYN-ACK is not seen here): a new record,
 * or one more SYN of a handshake whose SYN was retransmitted. */
static __always_inline void ct_sc_hs_note(u32 fam, struct ct_pkt *p, u64 now, u32 isn,
					  u32 synack_bytes)
{
	u16 sa = synack_bytes ? 1 : 0;
	struct ct_sc_hs *h = ct_sc_hs_lookup(fam, p);
	if (h && h->isn == isn && now - h->last_ns < CT_SC_HS_KEEP_NS) {
		h->last_ns = now;
		h->syns += 1;
		h->synacks += sa;
		h->syn_bytes += p->l3_len;
		h->synack_bytes += synack_bytes;
		return;
	}
	struct ct_sc_hs n = {.first_ns = now, .last_ns = now, .syn_bytes = p->l3_len,
			     .synack_bytes = synack_bytes, .isn = isn, .syns = 1, .synacks = sa};
	if (fam == 4)
		ct_sc_hs4.update(&p->k4, &n);
	else
		ct_sc_hs6.update(&p->k6, &n);
}

/* The valid ACK: its handshake, exactly, if the record is still there. */
static __always_inline int ct_sc_hs_take(u32 fam, struct ct_pkt *p, u32 ack_isn, u64 now,
					 struct ct_handshake *hs)
{
	struct ct_sc_hs *h = ct_sc_hs_lookup(fam, p);
	if (!h || h->isn != ack_isn || now - h->last_ns >= CT_SC_HS_KEEP_NS)
		return 0;
	hs->first_ns = h->first_ns;
	hs->syn_bytes = h->syn_bytes;
	hs->synack_bytes = h->synack_bytes;
	hs->syns = h->syns;
	hs->synacks = h->synacks;
	if (fam == 4)
		ct_sc_hs4.delete(&p->k4);
	else
		ct_sc_hs6.delete(&p->k6);
	return 1;
}

/* What the client's SYN offered, from its options. */
struct ct_sc_opts {
	u32 tsval;      /* network order */
	u32 tsecr;      /* network order */
	u8  ts;
	u8  sack;
	u8  wscale;     /* CT_TS_WS_NONE: not offered */
	u8  mss_seen;
};

/* The options of the TCP header at offset tcp_off of the frame. They are
 * copied to the stack first and scanned at constant positions: a walk by a
 * variable offset into the packet gives the verifier a state per offset
 * and path, more than it will check (and BCC has no bpf_loop callbacks). */
#define CT_SC_OPT_MAX 40
static __always_inline void ct_sc_parse_opts(struct xdp_md *ctx, u32 tcp_off, u32 doff,
					     struct ct_sc_opts *o)
{
	u8 buf[CT_SC_OPT_MAX] = {};
	o->wscale = CT_TS_WS_NONE;
	if (doff <= 5)
		return;
	u64 optlen = ((u64)doff * 4 - sizeof(struct tcphdr)) & 0x3f;
	if (optlen == 0 || optlen > CT_SC_OPT_MAX)
		return;
	if (bpf_xdp_load_bytes(ctx, tcp_off + sizeof(struct tcphdr), buf, optlen))
		return;
	u32 skip = 0;
#pragma unroll
	for (int i = 0; i < CT_SC_OPT_MAX - 1; i++) {
		if (i >= optlen)
			break;
		if (skip) {
			skip--;
			continue;
		}
		u8 kind = buf[i];
		if (kind == 0)
			break;
		if (kind == CT_TCPOPT_NOP)
			continue;
		u8 len = buf[i + 1];
		if (len < 2)
			break;
		if (kind == CT_TCPOPT_WS && len == 3 && i + 3 <= CT_SC_OPT_MAX) {
			u8 ws = buf[(i + 2) % CT_SC_OPT_MAX];
			o->wscale = ws < 14 ? ws : 14;
		} else if (kind == CT_TCPOPT_SACKOK && len == 2) {
			o->sack = 1;
		} else if (kind == CT_TCPOPT_TS && len == 10 && i + 10 <= CT_SC_OPT_MAX) {
			o->ts = 1;
			__builtin_memcpy(&o->tsval, &buf[(i + 2) % CT_SC_OPT_MAX], 4);
			__builtin_memcpy(&o->tsecr, &buf[(i + 6) % CT_SC_OPT_MAX], 4);
		} else if (kind == CT_TCPOPT_MSS) {
			o->mss_seen = 1;
		}
		skip = len - 1;
	}
}

/* The cookie of a SYN (the helpers want the TCP header's length as a
 * constant the verifier can check against the frame). */
#define CT_SC_GEN_CASE(n)                                                          \
	case n:                                                                    \
		if ((void *)th + n * 4 > data_end)                                 \
			return -1;                                                 \
		return fam == 4 ? bpf_tcp_raw_gen_syncookie_ipv4(ip, th, n * 4)    \
				: bpf_tcp_raw_gen_syncookie_ipv6(ip, th, n * 4);

static __always_inline s64 ct_sc_gen(u32 fam, void *ip, struct tcphdr *th, void *data_end)
{
	switch (th->doff) {
	CT_SC_GEN_CASE(5)
	CT_SC_GEN_CASE(6)
	CT_SC_GEN_CASE(7)
	CT_SC_GEN_CASE(8)
	CT_SC_GEN_CASE(9)
	CT_SC_GEN_CASE(10)
	CT_SC_GEN_CASE(11)
	CT_SC_GEN_CASE(12)
	CT_SC_GEN_CASE(13)
	CT_SC_GEN_CASE(14)
	CT_SC_GEN_CASE(15)
	}
	return -1;
}

static __always_inline u16 ct_csum_fold(u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* Our SYN-ACK's TCP options: MSS; with timestamps, SACK-permitted (or two
 * NOPs), the timestamp, and window scale (NOP + 3 bytes) if offered. */
static __always_inline u32 ct_sc_optlen(struct ct_sc_opts *o)
{
	if (!o->ts)
		return 4;
	return o->wscale == CT_TS_WS_NONE ? 16 : 20;
}

/* The client's SYN, as long as its IP header and a Linux client's options
 * for what the cookie tells (the SYN itself is gone: documented estimate). */
static __always_inline u32 ct_sc_syn_len(u32 iplen, int ts, int sack, int ws)
{
	u32 opts = 4;                          /* MSS */
	if (ts)
		opts += 12;                    /* SACK-permitted or 2 NOPs, timestamp */
	else
		opts += (sack ? 4 : 0);        /* NOP NOP SACK-permitted */
	if (ws)
		opts += 4;                     /* NOP, window scale */
	return iplen + sizeof(struct tcphdr) + opts;
}

/* Where the IP header starts (after up to two VLAN tags), if the TCP
 * header follows it directly: IPv4 without options, IPv6 without extension
 * headers (the rest takes the usual path). Parsed again here, on the cold
 * path, so that ct_parse keeps nothing more for the hot one. */
static __always_inline int ct_sc_l3(struct xdp_md *ctx, u32 fam, u32 *l3)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	u16 proto = bpf_ntohs(eth->h_proto);
	u32 off = sizeof(*eth);
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != CT_ETH_P_8021Q && proto != CT_ETH_P_8021AD)
			break;
		struct ct_vlan_hdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return -1;
		proto = bpf_ntohs(vh->proto);
		off += sizeof(*vh);
	}
	if (fam == 4) {
		struct iphdr *iph = data + off;
		if ((void *)(iph + 1) > data_end || iph->ihl != 5)
			return -1;
	} else {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return -1;
	}
	*l3 = off;
	return 0;
}

/* Rewrite the SYN at data into our SYN-ACK and size the frame to it.
 * Returns CT_VERDICT_TX, or CT_SC_GO_ON if the frame could not be made. */
static __always_inline int ct_sc_synack(struct xdp_md *ctx, u32 fam, struct ct_pkt *p,
					struct ct_config *cfg, u64 now, u32 l3)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (l3 > 22)
		return CT_SC_GO_ON;
	u32 iplen = fam == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	void *ip = data + l3;
	struct tcphdr *th = ip + iplen;
	if ((void *)(th + 1) > data_end)
		return CT_SC_GO_ON;
	u8 tf = ((u8 *)th)[13];
	struct ct_sc_opts o = {};
	ct_sc_parse_opts(ctx, l3 + iplen, th->doff, &o);
	s64 ck = ct_sc_gen(fam, ip, th, data_end);
	if (ck < 0) {
		ct_syn_stat_inc(CT_SYN_ERRORS);
		return CT_SC_GO_ON;
	}
	u32 cookie = (u32)ck;
	u32 seq = bpf_ntohl(th->seq);
	u32 mtu = 0;
	if (bpf_check_mtu(ctx, 0, &mtu, 0, 0) < 0 || mtu < 576)
		mtu = 1500;
	u16 mss = mtu - iplen - sizeof(struct tcphdr);
	int ecn = o.ts && (tf & (CT_TCP_ECE | CT_TCP_CWR)) == (CT_TCP_ECE | CT_TCP_CWR);
	u32 tsv = 0;
	if (o.ts) {
		u32 ms = (u32)(now / 1000000);
		u32 bits = (o.wscale & 0xf) | (o.sack ? CT_TS_SACK : 0) | (ecn ? CT_TS_ECN : 0);
		tsv = (ms & ~(u32)CT_TS_BITS) | bits;
		if ((s32)(tsv - ms) > 0)
			tsv -= CT_TS_BITS + 1;   /* never ahead of the kernel's clock */
	}
	u32 optlen = ct_sc_optlen(&o);
	u32 tcplen = sizeof(struct tcphdr) + optlen;
	int delta = (int)(l3 + iplen + tcplen) - (int)(data_end - data);
	if (delta && bpf_xdp_adjust_tail(ctx, delta)) {
		ct_syn_stat_inc(CT_SYN_ERRORS);
		return CT_SC_GO_ON;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return CT_VERDICT_DROP;   /* the SYN is gone already: nothing to pass */
	u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	ip = data + (l3 & 31);
	u64 sum = 0;
	if (fam == 4) {
		struct iphdr *iph = ip;
		if ((void *)(iph + 1) > data_end)
			return CT_VERDICT_DROP;
		iph->version = 4;
		iph->ihl = 5;
		iph->tos = 0;
		iph->tot_len = bpf_htons(sizeof(*iph) + tcplen);
		iph->id = 0;
		iph->frag_off = bpf_htons(0x4000);
		iph->ttl = CT_SC_TTL;
		iph->protocol = IPPROTO_TCP;
		iph->saddr = p->k4.daddr;
		iph->daddr = p->k4.saddr;
		iph->check = 0;
		s64 c = bpf_csum_diff(0, 0, (void *)iph, sizeof(*iph), 0);
		iph->check = c < 0 ? 0 : ct_csum_fold((u64)c);
		sum = (u64)p->k4.saddr + p->k4.daddr;
		th = (void *)(iph + 1);
	} else {
		struct ipv6hdr *ip6 = ip;
		if ((void *)(ip6 + 1) > data_end)
			return CT_VERDICT_DROP;
		*(__be32 *)ip6 = bpf_htonl(0x60000000);
		ip6->payload_len = bpf_htons(tcplen);
		ip6->nexthdr = IPPROTO_TCP;
		ip6->hop_limit = CT_SC_TTL;
		__builtin_memcpy(&ip6->saddr, p->k6.daddr, 16);
		__builtin_memcpy(&ip6->daddr, p->k6.saddr, 16);
		u32 *a = (u32 *)p->k6.saddr, *b = (u32 *)p->k6.daddr;
#pragma unroll
		for (int i = 0; i < 4; i++)
			sum += (u64)a[i] + b[i];
		th = (void *)(ip6 + 1);
	}
	if ((void *)th + sizeof(*th) + 4 > data_end)
		return CT_VERDICT_DROP;
	__be16 sport = fam == 4 ? p->k4.sport : p->k6.sport;
	__be16 dport = fam == 4 ? p->k4.dport : p->k6.dport;
	th->source = dport;
	th->dest = sport;
	th->seq = bpf_htonl(cookie);
	th->ack_seq = bpf_htonl(seq + 1);
	((u8 *)th)[12] = (u8)((tcplen / 4) << 4);
	((u8 *)th)[13] = CT_TCP_SYN | CT_TCP_ACK | (ecn ? CT_TCP_ECE : 0);
	th->window = bpf_htons((65535 / mss) * mss);
	th->check = 0;
	th->urg_ptr = 0;
	u8 *op = (u8 *)(th + 1);
	op[0] = CT_TCPOPT_MSS;
	op[1] = 4;
	op[2] = mss >> 8;
	op[3] = mss & 0xff;
	s64 c;
	if (optlen == 4) {
		c = bpf_csum_diff(0, 0, (void *)th, 24, 0);
	} else {
		if ((void *)th + 36 > data_end)
			return CT_VERDICT_DROP;
		op[4] = o.sack ? CT_TCPOPT_SACKOK : CT_TCPOPT_NOP;
		op[5] = o.sack ? 2 : CT_TCPOPT_NOP;
		op[6] = CT_TCPOPT_TS;
		op[7] = 10;
		u32 tsv_n = bpf_htonl(tsv);
		__builtin_memcpy(op + 8, &tsv_n, 4);
		__builtin_memcpy(op + 12, &o.tsval, 4);
		if (optlen == 20) {
			if ((void *)th + 40 > data_end)
				return CT_VERDICT_DROP;
			op[16] = CT_TCPOPT_NOP;
			op[17] = CT_TCPOPT_WS;
			op[18] = 3;
			op[19] = cfg->syn_wscale;
			c = bpf_csum_diff(0, 0, (void *)th, 40, 0);
		} else {
			c = bpf_csum_diff(0, 0, (void *)th, 36, 0);
		}
	}
	if (c < 0)
		return CT_VERDICT_DROP;
	sum += (u64)(u32)c + bpf_htons(IPPROTO_TCP) + bpf_htons((u16)tcplen);
	th->check = ct_csum_fold(sum);
	ct_sc_hs_note(fam, p, now, seq, iplen + tcplen);
	ct_syn_stat_inc(CT_SYN_SENT);
	return CT_VERDICT_TX;
}

/* auto mode: whether SYNs to this port come faster than syn_rate per
 * second (this window or the last), or the table is above syn_high_pct. */
static __always_inline int ct_sc_hot(struct ct_config *cfg, __be16 dport, u64 now)
{
	if (cfg->syn_high_pct) {
		struct ct_global *g = ct_glob();
		if (g && g->entries * 100 >= (u64)cfg->table_limit * cfg->syn_high_pct)
			return 1;
	}
	if (!cfg->syn_rate)
		return 0;
	u32 idx = bpf_ntohs(dport);
	struct ct_sc_rate *r = ct_sc_rate.lookup(&idx);
	if (!r)
		return 0;
	u32 w = (u32)(now >> 30);
	u32 seen = r->window;
	if (seen != w) {
		/* racy on purpose: a count a little off only moves the switch */
		r->prev = seen + 1 == w ? r->cur : 0;
		r->cur = 0;
		r->window = w;
	}
	__sync_fetch_and_add(&r->cur, 1);
	return r->cur > cfg->syn_rate || r->prev > cfg->syn_rate;
}

static __always_inline int ct_syncookie(struct xdp_md *ctx, u32 fam, struct ct_pkt *p,
					struct ct_config *cfg, u64 now, struct ct_entry *ended)
{
	u8 tf = p->tcp_flags & (CT_TCP_SYN | CT_TCP_ACK | CT_TCP_RST | CT_TCP_FIN);
	int syn = tf == CT_TCP_SYN;
	if (!syn && tf != CT_TCP_ACK)
		return CT_SC_GO_ON;
	u32 l3;
	if (ct_sc_l3(ctx, fam, &l3))
		return CT_SC_GO_ON;
	__be16 dport = fam == 4 ? p->k4.dport : p->k6.dport;
	int hot = 1;
	if (syn && !(cfg->flags & CT_CFG_SYNCOOKIE)) {
		hot = ct_sc_hot(cfg, dport, now);
		if (!hot)
			return CT_SC_GO_ON;
	}

	/* Is it for a local listener? */
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	if (fam == 4) {
		t.ipv4.saddr = p->k4.saddr;
		t.ipv4.daddr = p->k4.daddr;
		t.ipv4.sport = p->k4.sport;
		t.ipv4.dport = p->k4.dport;
		sk = bpf_skc_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->k6.saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->k6.daddr, 16);
		t.ipv6.sport = p->k6.sport;
		t.ipv6.dport = p->k6.dport;
		sk = bpf_skc_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk) {
		if (!syn)
			return CT_SC_GO_ON;
		ct_syn_stat_inc(CT_SYN_NO_LISTENER);
		return ct_untracked(p, cfg, 0);
	}
	struct ct_sc_listener lk = {.family = fam};
	int listen = sk->state == BPF_TCP_LISTEN;
	if (listen) {
		lk.port = (u16)sk->src_port;
		if (fam == 4) {
			lk.addr[0] = sk->src_ip4;
		} else {
			lk.addr[0] = sk->src_ip6[0];
			lk.addr[1] = sk->src_ip6[1];
			lk.addr[2] = sk->src_ip6[2];
			lk.addr[3] = sk->src_ip6[3];
		}
	}
	bpf_sk_release(sk);
	if (!listen)
		return CT_SC_GO_ON;   /* a connection the kernel knows (TIME_WAIT, SYN_RECV ...) */

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	u32 iplen = fam == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	if (syn) {
		u64 *last = ct_sc_listeners.lookup(&lk);
		if (!last || now - *last > CT_SC_REFRESH_NS) {
			ct_sc_listeners.update(&lk, &now);
			ct_syn_stat_inc(CT_SYN_TO_KERNEL);
			struct tcphdr *sth = data + (l3 & 0x3f) + iplen;
			if ((void *)(sth + 1) <= data_end)
				ct_sc_hs_note(fam, p, now, bpf_ntohl(sth->seq), 0);
			return ct_untracked(p, cfg, 0);
		}
		int v = ct_sc_synack(ctx, fam, p, cfg, now, l3);
		if (v == CT_VERDICT_TX && !(cfg->flags & CT_CFG_SYNCOOKIE))
			ct_syn_stat_inc(CT_SYN_AUTO);
		return v;
	}

	/* A bare ACK of no entry to a listener: the third packet of a cookie
	 * handshake, or nothing the kernel would take. */
	if (l3 > 22)
		return CT_SC_GO_ON;
	void *ip = data + l3;
	struct tcphdr *th = ip + iplen;
	if ((void *)(th + 1) > data_end)
		return CT_SC_GO_ON;
	long bad;
	if (fam == 4) {
		if (ip + sizeof(struct iphdr) > data_end)
			return CT_SC_GO_ON;
		bad = bpf_tcp_raw_check_syncookie_ipv4(ip, th);
	} else {
		if (ip + sizeof(struct ipv6hdr) > data_end)
			return CT_SC_GO_ON;
		bad = bpf_tcp_raw_check_syncookie_ipv6(ip, th);
	}
	if (bad) {
		ct_syn_stat_inc(CT_SYN_ACK_INVALID);
		ct_stat_inc(CT_STAT_UNTRACKED_PKTS);
		ct_stat_add(CT_STAT_UNTRACKED_BYTES, p->l3_len);
		return CT_VERDICT_DROP;
	}
	ct_syn_stat_inc(CT_SYN_ACK_VALID);
	/* The handshake the table did not see: from the handshake map, or
	 * else what the cookie tells. The client's TSecr echoes our TSval
	 * (the SYN's ms, low 6 bits the options); without timestamps the
	 * SYN's time is unknown and the ACK's stands for it. */
	struct ct_handshake hs = {.first_ns = now, .syns = 1, .synacks = 1};
	int have = ct_sc_hs_take(fam, p, bpf_ntohl(th->seq) - 1, now, &hs);
	if (!have)
		ct_syn_stat_inc(CT_SYN_HS_ESTIMATED);
	if (!have || !hs.synacks) {
		/* The kernel's SYN-ACK (or ours, unrecorded) has the options
		 * the cookie's timestamp bits tell, laid out as ours. */
		struct ct_sc_opts o = {};
		ct_sc_parse_opts(ctx, l3 + iplen, th->doff, &o);
		int ws = 0, sack = 0;
		if (o.ts) {
			u32 tsecr = bpf_ntohl(o.tsecr);
			u32 bits = tsecr & CT_TS_BITS;
			ws = (bits & 0xf) != CT_TS_WS_NONE;
			sack = !!(bits & CT_TS_SACK);
			u32 ms = (u32)(now / 1000000);
			u32 ago = ms - tsecr;   /* our TSval: the SYN's ms less at most 63 */
			if (!have && tsecr && ago < 120000)
				hs.first_ns = now - (u64)ago * 1000000;
		}
		struct ct_sc_opts back = {.ts = o.ts, .sack = sack,
					  .wscale = ws ? 0 : CT_TS_WS_NONE};
		if (!have)
			hs.syn_bytes = ct_sc_syn_len(iplen, o.ts, o.ts ? sack : 1, o.ts ? ws : 1);
		hs.synack_bytes = iplen + sizeof(struct tcphdr) + ct_sc_optlen(&back);
		hs.synacks = 1;
	}
	int c = ct_create(fam, (union ct_key *)p, p, cfg, now, ended, 0, &hs);
	if (c == CT_CREATE_OK)
		return CT_VERDICT_PASS;
	if (c == CT_CREATE_FULL)
		ct_stat_inc(CT_STAT_TABLE_FULL);
	return ct_untracked(p, cfg, c == CT_CREATE_FULL);
}

#endif /* CT_SYN_COOKIE_H */
