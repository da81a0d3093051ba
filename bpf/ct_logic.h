/* ct_logic.h - connection tracking for one packet.
 *
 * A packet either refreshes the entry of its connection (found under its own
 * tuple: original direction, or under the reversed tuple: reply direction)
 * or creates one. A packet is never held back: the verdict is PASS unless
 * the configuration asks to drop what cannot be tracked.
 */
#ifndef CT_LOGIC_H
#define CT_LOGIC_H

#define CT_VERDICT_PASS 0
#define CT_VERDICT_DROP 1
#define CT_VERDICT_TX   2 /* XDP only: the frame was rewritten into our answer */

#define CT_ST_STATE(s) ((s) & 0xff)
#define CT_ST_FLAGS(s) (((s) >> 8) & 0xff)
#define CT_ST_MAKE(state, flags, tfo, tfr) \
	((u32)(state) | ((u32)(flags) << 8) | ((u32)(tfo) << 16) | ((u32)(tfr) << 24))

/* The relaxed TCP state machine, in the spirit of nf_conntrack's: it follows
 * the flags, not the sequence numbers. Pure function of the status word, so
 * the caller can apply it with one compare-and-swap. */
static __always_inline u32 ct_tcp_next(u32 status, int dir, u8 tf)
{
	u8 state = CT_ST_STATE(status);
	u8 flags = CT_ST_FLAGS(status);
	u8 tfo = (status >> 16) & 0xff;
	u8 tfr = status >> 24;
	int fin_dir = (flags & CT_F_FIN_REPLY) ? CT_DIR_REPLY : CT_DIR_ORIG;

	if (dir == CT_DIR_ORIG)
		tfo |= tf;
	else
		tfr |= tf;

	if (tf & CT_TCP_RST) {
		state = CT_S_CLOSE;
		goto out;
	}
	switch (state) {
	case CT_S_SYN_SENT:
		if (dir == CT_DIR_REPLY && (tf & CT_TCP_SYN))
			state = CT_S_SYN_RECV; /* SYN/ACK, or simultaneous open */
		break;
	case CT_S_SYN_RECV:
		if (dir == CT_DIR_ORIG && (tf & CT_TCP_ACK) && !(tf & CT_TCP_SYN)) {
			state = CT_S_ESTABLISHED;
			flags |= CT_F_ASSURED;
			if (tf & CT_TCP_FIN) {
				state = CT_S_FIN_WAIT;
				flags &= ~CT_F_FIN_REPLY;
			}
		}
		break;
	case CT_S_ESTABLISHED:
		if (dir == CT_DIR_REPLY && (flags & CT_F_PICKUP))
			flags |= CT_F_ASSURED; /* a picked-up flow answered */
		if (tf & CT_TCP_FIN) {
			state = CT_S_FIN_WAIT;
			if (dir == CT_DIR_REPLY)
				flags |= CT_F_FIN_REPLY;
			else
				flags &= ~CT_F_FIN_REPLY;
		}
		break;
	case CT_S_FIN_WAIT:
		if (dir != fin_dir) {
			if (tf & CT_TCP_FIN)
				state = CT_S_LAST_ACK;
			else if (tf & CT_TCP_ACK)
				state = CT_S_CLOSE_WAIT;
		}
		break;
	case CT_S_CLOSE_WAIT:
		if (dir != fin_dir && (tf & CT_TCP_FIN))
			state = CT_S_LAST_ACK;
		break;
	case CT_S_LAST_ACK:
		if (dir == fin_dir && (tf & CT_TCP_ACK))
			state = CT_S_TIME_WAIT;
		break;
	default:
		break;
	}
out:
	if (dir == CT_DIR_REPLY)
		flags |= CT_F_SEEN_REPLY;
	return CT_ST_MAKE(state, flags, tfo, tfr);
}

static __always_inline u32 ct_next_status(u32 status, u8 proto, int dir, u8 tf)
{
	if (proto == IPPROTO_TCP)
		return ct_tcp_next(status, dir, tf);
	if (dir == CT_DIR_REPLY)
		status |= (u32)(CT_F_SEEN_REPLY | CT_F_ASSURED) << 8;
	return status;
}

#define CT_REFRESH_DONE      0
#define CT_REFRESH_UNTRACKED 1 /* entry claimed by the sweeper meanwhile */
#define CT_REFRESH_RESTART   2 /* old connection ended; track the packet anew */

/* Account a packet to its entry, move the state machine, and emit UPDATE on
 * a state change or when a long flow's report interval has passed. */
static __always_inline int ct_refresh(u32 fam, void *key, struct ct_entry *e, struct ct_pkt *p,
				      int dir, struct ct_config *cfg, u64 now)
{
	u64 last = e->last_ns;
	if (last & CT_LAST_DEAD)
		return CT_REFRESH_UNTRACKED;
	u8 proto = ct_key_proto(fam, key);
	u32 status = ct_status(e);
	u8 state = CT_ST_STATE(status);

	/* A new SYN on the tuple of a closed connection starts a new one, as
	 * nf_conntrack does: end the old entry first. */
	if (proto == IPPROTO_TCP && dir == CT_DIR_ORIG &&
	    (state == CT_S_TIME_WAIT || state == CT_S_CLOSE) &&
	    (p->tcp_flags & (CT_TCP_SYN | CT_TCP_ACK | CT_TCP_RST)) == CT_TCP_SYN) {
		if (__sync_val_compare_and_swap(&e->last_ns, last, last | CT_LAST_DEAD) != last)
			return CT_REFRESH_UNTRACKED;
		ct_destroy(fam, key, e, last, ct_end_reason(proto, state), cfg, now);
		return CT_REFRESH_RESTART;
	}

	if (now > last && (__sync_val_compare_and_swap(&e->last_ns, last, now) & CT_LAST_DEAD))
		return CT_REFRESH_UNTRACKED;
	__sync_fetch_and_add(&e->pkts[dir & 1], 1);
	__sync_fetch_and_add(&e->bytes[dir & 1], p->l3_len);

	u32 next = ct_next_status(status, proto, dir, p->tcp_flags);
	if (next != status && !ct_swap_half(&e->status_seq, 0, status, next))
		next = status; /* another CPU moved it first; its change stands */

	int assured = (CT_ST_FLAGS(next) ^ CT_ST_FLAGS(status)) & CT_F_ASSURED;
	if (CT_ST_STATE(next) != state || assured) {
		/* A state with a shorter timeout brings expiry forward: file the
		 * entry under the earlier slot (later ones are found lazily). */
		u32 due = ct_due_slot(now, ct_timeout(cfg, proto, CT_ST_STATE(next)), now);
		u32 sched = ct_sched_slot(e);
		if (due < sched)
			ct_reschedule(fam, key, e, sched, due);
		/* The event mask: a change that becomes ASSURED is an "assured"
		 * UPDATE, any other a "state" one. Left out, the packet goes on
		 * to the re-delivery and report checks below. */
		if (!(cfg->flags & (assured ? CT_CFG_QUIET_ASSURED : CT_CFG_QUIET_STATE))) {
			ct_emit(CT_EV_UPDATE, fam, key, e, next, ct_next_seq(e), CT_END_NONE, 0,
				now, now);
			return CT_REFRESH_DONE;
		}
	}

	/* Events were lost to a full ring: the next packet re-delivers them. */
	if (e->sched & CT_SCHED_MISSED_MASK) {
		ct_emit(CT_EV_UPDATE, fam, key, e, next, ct_next_seq(e), CT_END_NONE, 0, now, now);
		return CT_REFRESH_DONE;
	}

	u64 ivl_ns = cfg->report_interval_ns;
	if (ivl_ns) {
		u32 ivl = ivl_ns >> CT_SLOT_SHIFT;
		if (!ivl)
			ivl = 1;
		u32 hi = e->sched >> 32;
		u32 reported = hi & CT_SCHED_REPORT_MASK;
		u32 cur = ct_slot(now) & CT_SCHED_REPORT_MASK;
		if (((cur - reported) & CT_SCHED_REPORT_MASK) >= ivl &&
		    ct_swap_half(&e->sched, 1, hi, (hi & ~CT_SCHED_REPORT_MASK) | cur))
			ct_emit(CT_EV_UPDATE, fam, key, e, next, ct_next_seq(e), CT_END_NONE, 0, now, now);
	}
	return CT_REFRESH_DONE;
}

/* Whether, and in which state, a packet with no entry starts one. */
static __always_inline int ct_new_state(u8 proto, struct ct_pkt *p, u8 *state, u8 *flags)
{
	*flags = 0;
	if (proto == IPPROTO_TCP) {
		u8 tf = p->tcp_flags;
		if (tf & CT_TCP_RST)
			return 0;
		if (tf & CT_TCP_SYN) {
			if (tf & CT_TCP_ACK)
				return 0; /* SYN/ACK of nothing we saw */
			*state = CT_S_SYN_SENT;
			return 1;
		}
		if (!(tf & CT_TCP_ACK))
			return 0;
		/* Mid-stream pickup, like nf_conntrack_tcp_loose. */
		*flags = CT_F_PICKUP;
		*state = (tf & CT_TCP_FIN) ? CT_S_FIN_WAIT : CT_S_ESTABLISHED;
		return 1;
	}
	*state = CT_S_NONE;
	return !p->no_create;
}

#define CT_CREATE_OK     0
#define CT_CREATE_NO     1 /* this packet does not start a connection */
#define CT_CREATE_FULL   2
#define CT_CREATE_RACE   3 /* another CPU created the entry first */

/* Give back a place ct_create took under the limits. */
static __always_inline void ct_unreserve(struct ct_global *g, u32 fam)
{
	__sync_fetch_and_add(&g->entries, -1);
	if (fam == 6)
		__sync_fetch_and_add(&g->entries6, -1);
}

/* ended: the ended connection that waits under key for its ack, if any.
 * first: when the connection began, if before now (a migration's merge;
 * the packet path passes 0). */
/* What a SYN-cookie handshake adds to the entry its valid ACK creates: the
 * SYN and our SYN-ACK, which no entry saw (bpf/syn_cookie.h). */
struct ct_handshake {
	u64 first_ns;      /* the first SYN's time */
	u32 syn_bytes;     /* the SYN(s) and the SYN-ACK(s) answered from XDP */
	u32 synack_bytes;
	u16 syns;
	u16 synacks;
};

static __always_inline int ct_create(u32 fam, void *key, struct ct_pkt *p,
				     struct ct_config *cfg, u64 now, struct ct_entry *ended,
				     u64 first, const struct ct_handshake *hs)
{
	u8 proto = ct_key_proto(fam, key);
	u8 state, flags;
	if (hs) {
		state = CT_S_ESTABLISHED;
		flags = CT_F_ASSURED | CT_F_SEEN_REPLY;
	} else if (!ct_new_state(proto, p, &state, &flags)) {
		return CT_CREATE_NO;
	}
	struct ct_global *g = ct_glob();
	if (!g)
		return CT_CREATE_FULL;
	u64 n = __sync_fetch_and_add(&g->entries, 1);
	if (n >= cfg->table_limit) {
		__sync_fetch_and_add(&g->entries, -1);
		return CT_CREATE_FULL;
	}
	if (fam == 6 && __sync_fetch_and_add(&g->entries6, 1) >= cfg->ipv6_limit) {
		ct_unreserve(g, fam);
		return CT_CREATE_FULL;
	}
	/* Only a connection that will be tracked moves the ended one away. */
	if (ended && ct_outbox_move(fam, key, ended, now)) {
		ct_unreserve(g, fam);
		return CT_CREATE_RACE;
	}
	struct ct_entry ne = {};
	ne.ct_id = __sync_fetch_and_add(&g->next_ct_id, 1);
	ne.first_ns = first ? first : now;
	ne.last_ns = now;
	ne.pkts[CT_DIR_ORIG] = 1;
	ne.bytes[CT_DIR_ORIG] = p->l3_len;
	u32 status = CT_ST_MAKE(state, flags, p->tcp_flags, 0);
	if (hs) {
		ne.first_ns = hs->first_ns;
		ne.pkts[CT_DIR_ORIG] += hs->syns;
		ne.bytes[CT_DIR_ORIG] += hs->syn_bytes;
		ne.pkts[CT_DIR_REPLY] = hs->synacks;
		ne.bytes[CT_DIR_REPLY] = hs->synack_bytes;
		status = CT_ST_MAKE(state, flags, p->tcp_flags | CT_TCP_SYN, CT_TCP_SYN | CT_TCP_ACK);
	}
	u32 due = ct_due_slot(now, ct_timeout(cfg, proto, state), now);
	ne.status_seq = status;
	ne.sched = due | ((u64)(ct_slot(now) & CT_SCHED_REPORT_MASK) << 32);
	if (ct_tbl_insert(fam, key, &ne)) {
		ct_unreserve(g, fam);
		return ct_tbl_lookup(fam, key) ? CT_CREATE_RACE : CT_CREATE_FULL;
	}
	ct_stat_inc(CT_STAT_CREATED);
	ct_wheel_push(fam, key, due);
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	if (e && !(cfg->flags & CT_CFG_QUIET_CREATE))
		ct_emit(CT_EV_CREATE, fam, key, e, status, ct_next_seq(e), CT_END_NONE, 0, now, now);
	return CT_CREATE_OK;
}

/* Count a packet no entry accounts for. Only a connection that the full
 * table turned away may be dropped (CT_CFG_DROP_UNTRACKED); fragments,
 * ICMP errors, neighbour discovery and the like always pass. */
static __always_inline int ct_untracked(struct ct_pkt *p, struct ct_config *cfg, int table_full)
{
	ct_stat_inc(CT_STAT_UNTRACKED_PKTS);
	ct_stat_add(CT_STAT_UNTRACKED_BYTES, p->l3_len);
	if (table_full && (cfg->flags & CT_CFG_DROP_UNTRACKED))
		return CT_VERDICT_DROP;
	return CT_VERDICT_PASS;
}

#define CT_SC_GO_ON (-1)
/* bpf/syn_cookie.h: a TCP packet of no entry, seen by XDP with SYN cookies
 * on: a verdict, or CT_SC_GO_ON for the usual path. */
static __always_inline int ct_syncookie(struct xdp_md *xdp, u32 fam, struct ct_pkt *p,
					struct ct_config *cfg, u64 now, struct ct_entry *ended);

/* xdp: the XDP context (SYN cookies can answer from there), 0 on tc. */
static __always_inline int ct_track(u32 fam, struct ct_pkt *p, struct ct_config *cfg, u64 now,
				    struct xdp_md *xdp)
{
	union ct_key *key = (union ct_key *)p;
	union ct_key rkey = {};
	int dir = CT_DIR_ORIG;
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	struct ct_entry *ended = 0; /* an ended connection waiting under key */
	void *ekey = key;
	if (e && (e->last_ns & CT_LAST_DEAD)) {
		ended = e;
		e = 0;
	}
	if (!e) {
		ct_key_reverse(fam, &rkey, key);
		e = ct_tbl_lookup(fam, &rkey);
		dir = CT_DIR_REPLY;
		ekey = &rkey;
		if (e && (e->last_ns & CT_LAST_DEAD))
			e = 0;
	}
	if (e) {
		int r = ct_refresh(fam, ekey, e, p, dir, cfg, now);
		if (r == CT_REFRESH_DONE)
			return CT_VERDICT_PASS;
		if (r == CT_REFRESH_UNTRACKED)
			return ct_untracked(p, cfg, 0);
		/* CT_REFRESH_RESTART: only ever in the original direction, and
		 * the old connection now waits under key. */
		ended = e;
	} else if (xdp && (cfg->flags & (CT_CFG_SYNCOOKIE | CT_CFG_SYNCOOKIE_AUTO)) &&
		   ct_key_proto(fam, key) == IPPROTO_TCP) {
		int v = ct_syncookie(xdp, fam, p, cfg, now, ended);
		if (v != CT_SC_GO_ON)
			return v;
	}
	int c = ct_create(fam, key, p, cfg, now, ended, 0, 0);
	if (c == CT_CREATE_OK)
		return CT_VERDICT_PASS;
	if (c == CT_CREATE_RACE) {
		e = ct_tbl_lookup(fam, key);
		if (e && ct_refresh(fam, key, e, p, CT_DIR_ORIG, cfg, now) == CT_REFRESH_DONE)
			return CT_VERDICT_PASS;
		return ct_untracked(p, cfg, 0);
	}
	if (c == CT_CREATE_FULL) {
		ct_stat_inc(CT_STAT_TABLE_FULL);
		return ct_untracked(p, cfg, 1);
	}
	ct_stat_inc(CT_STAT_INVALID); /* e.g. RST or SYN/ACK of nothing */
	return ct_untracked(p, cfg, 0);
}

/* The best match of one address in the slot's selection: plen << 8 |
 * verdict, 0 if the set has no entry for it. */
static __always_inline u32 ct_sel_match(u32 fam, void *addr, u32 slot, u32 ifindex)
{
	struct ct_sel *v = 0;
	if (fam == 4) {
		struct ct_sel_key4 k = {.prefixlen = 64 + 32, .slot = slot, .ifindex = ifindex};
		__builtin_memcpy(k.addr, addr, 4);
		v = ct_sel4.lookup(&k);
		if (!v && ifindex) {
			k.ifindex = 0;
			v = ct_sel4.lookup(&k);
		}
	} else {
		struct ct_sel_key6 k = {.prefixlen = 64 + 128, .slot = slot, .ifindex = ifindex};
		__builtin_memcpy(k.addr, addr, 16);
		v = ct_sel6.lookup(&k);
		if (!v && ifindex) {
			k.ifindex = 0;
			v = ct_sel6.lookup(&k);
		}
	}
	return v ? ((u32)v->plen << 8) | v->verdict : 0;
}

/* Whether the selection ignores the packet's flow: the longer match of its
 * two addresses decides; on a tie, ignore wins. A set always holds a /0
 * entry with its default, so a miss only means maps being rebuilt under a
 * generation not in force: then the flow is tracked. */
static __always_inline int ct_is_ignored(u32 fam, struct ct_pkt *p, u32 slot, u32 ifindex)
{
	void *sa, *da;
	if (fam == 4) {
		sa = &p->k4.saddr;
		da = &p->k4.daddr;
	} else {
		sa = p->k6.saddr;
		da = p->k6.daddr;
	}
	u32 a = ct_sel_match(fam, sa, slot, ifindex);
	u32 b = ct_sel_match(fam, da, slot, ifindex);
	if (!a || !b)
		return 0;
	if ((a >> 8) != (b >> 8))
		return (((a >> 8) > (b >> 8) ? a : b) & 0xff) == CT_SEL_IGNORE;
	return (a & 0xff) == CT_SEL_IGNORE || (b & 0xff) == CT_SEL_IGNORE;
}

/* A packet of a flow the selection ignores: passed untouched and counted.
 * A connection tracked before an apply made it ignored ends here, with its
 * DESTROY (end reason "ignored"; this packet is not counted to it). */
static __always_inline int ct_ignore(u32 fam, struct ct_pkt *p, struct ct_config *cfg, u64 now)
{
	union ct_key *key = (union ct_key *)p;
	union ct_key rkey = {};
	void *ekey = key;
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	if (!e || (e->last_ns & CT_LAST_DEAD)) {
		ct_key_reverse(fam, &rkey, key);
		ekey = &rkey;
		e = ct_tbl_lookup(fam, &rkey);
	}
	if (e) {
		u64 last = e->last_ns;
		if (!(last & CT_LAST_DEAD) &&
		    __sync_val_compare_and_swap(&e->last_ns, last, last | CT_LAST_DEAD) == last)
			ct_destroy(fam, ekey, e, last, CT_END_IGNORED, cfg, now);
	}
	ct_stat_inc(CT_STAT_IGNORED_PACKETS);
	ct_stat_add(CT_STAT_IGNORED_BYTES, p->l3_len);
	return CT_VERDICT_PASS;
}

/* A migration froze this layout's table: keep what the packet adds for the
 * new layout's merge (ct_merge4/6), touch nothing else. A hold that cannot
 * be made (map full) leaves the packet untracked, counted. */
static __always_inline int ct_hold_packet(u32 fam, struct ct_pkt *p, struct ct_config *cfg, u64 now)
{
	struct ct_hold *h = fam == 4 ? ct_hold4.lookup(&p->k4) : ct_hold6.lookup(&p->k6);
	if (!h) {
		struct ct_hold z = {.first_ns = now, .last_ns = now};
		if (fam == 4) {
			ct_hold4.insert(&p->k4, &z);   /* another CPU's stays */
			h = ct_hold4.lookup(&p->k4);
		} else {
			ct_hold6.insert(&p->k6, &z);
			h = ct_hold6.lookup(&p->k6);
		}
		if (!h)
			return ct_untracked(p, cfg, 0);
	}
	__sync_fetch_and_add(&h->pkts, 1);
	__sync_fetch_and_add(&h->bytes, p->l3_len);
	if (p->tcp_flags)
		__sync_fetch_and_or(&h->tcp_flags, (u64)p->tcp_flags);
	if (now > h->last_ns)
		h->last_ns = now;
	ct_stat_inc(CT_STAT_HELD);
	return CT_VERDICT_PASS;
}

/* The datapath entry shared by XDP and tc; ifindex is the interface the
 * packet is seen on (for per-interface selection sets). */
static __always_inline int ct_handle(void *data, void *data_end, u32 frame_len, u32 ifindex,
				     struct xdp_md *xdp)
{
	struct ct_pkt p = {};
	ct_stat_inc(CT_STAT_PACKETS);
	int rc = ct_parse(data, data_end, frame_len, &p);
	if (rc == CT_PARSE_NOT_IP) {
		ct_stat_inc(CT_STAT_NOT_IP);
		return CT_VERDICT_PASS;
	}
	if (rc == CT_PARSE_INVALID) {
		ct_stat_inc(CT_STAT_INVALID);
		return CT_VERDICT_PASS;
	}
	u32 slot;
	int frozen;
	struct ct_config *cfg = ct_cfg_slot(&slot, &frozen);
	if (!cfg)
		return CT_VERDICT_PASS;
	if (rc == CT_PARSE_FRAGMENT) {
		ct_stat_inc(CT_STAT_FRAGMENTS);
		return ct_untracked(&p, cfg, 0);
	}
	if (rc == CT_PARSE_OTHER) {
		ct_stat_inc(CT_STAT_OTHER_L4);
		return ct_untracked(&p, cfg, 0);
	}
	u64 now = bpf_ktime_get_ns();
	if (frozen)
		return ct_hold_packet(p.family == 4 ? 4 : 6, &p, cfg, now);
	u32 sel = cfg->flags & (CT_CFG_SELECT | CT_CFG_SELECT_IFACE);
	if (p.family == 4) {
		if (sel && ct_is_ignored(4, &p, slot, (sel & CT_CFG_SELECT_IFACE) ? ifindex : 0))
			return ct_ignore(4, &p, cfg, now);
		return ct_track(4, &p, cfg, now, xdp);
	}
	if (sel && ct_is_ignored(6, &p, slot, (sel & CT_CFG_SELECT_IFACE) ? ifindex : 0))
		return ct_ignore(6, &p, cfg, now);
	return ct_track(6, &p, cfg, now, xdp);
}

/* The tc entries' part (ingress and egress). A packet built by this host,
 * or one GRO has merged, can keep headers outside the linear area: make the
 * headers (not the payload) readable first. */
#define CT_TC_HDR_PULL 128

static __always_inline int ct_handle_skb(struct __sk_buff *skb)
{
	u32 linear = skb->data_end - skb->data;
	if (linear < CT_TC_HDR_PULL && skb->len > linear)
		bpf_skb_pull_data(skb, skb->len < CT_TC_HDR_PULL ? skb->len : CT_TC_HDR_PULL);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int v = ct_handle(data, data_end, skb->len, skb->ifindex, 0);
	return v == CT_VERDICT_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif /* CT_LOGIC_H */
