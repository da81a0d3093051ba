/* migrate_merge.c - the last step of `ctstream migrate`.
 *
 * While a migration moves the table into the new layout, the old layout's
 * programs are frozen (ct_meta.frozen): they only add each packet to a hold
 * record of its tuple (ct_hold4/6). Once the new layout's programs are
 * attached everywhere and no old one runs, the daemon hands the hold keys to
 * this program (BPF_PROG_TEST_RUN, a struct ct_merge_hdr and up to
 * CT_MERGE_BATCH keys): each flow's two holds (its key's and the reversed
 * key's) are added to the moved entry, counters exactly, and its state is
 * moved on by the flags the holds saw (three alternating passes, SYN only in
 * the first: the order of the held packets is not kept, the state machine is
 * monotone enough for it). A flow that started during the hold gets its
 * entry now, as its first packet would have made it (first_ns from the
 * hold), with its CREATE. Both holds are deleted.
 */

union ct_merge_key {
	struct ct_key4 k4;
	struct ct_key6 k6;
};

static __always_inline struct ct_hold *ct_hold_lookup(u32 fam, void *key)
{
	if (fam == 4)
		return ct_hold4.lookup(key);
	return ct_hold6.lookup(key);
}

static __always_inline void ct_hold_delete(u32 fam, void *key)
{
	if (fam == 4)
		ct_hold4.delete(key);
	else
		ct_hold6.delete(key);
}

/* fo, fr: the flags held per direction. The entry's own flags per
 * direction (those the new programs saw since the swap, and before the
 * freeze) take part too: a packet the new program handled may have waited
 * for one that was held (an ACK for a held SYN/ACK). */
static __always_inline void ct_merge_state(struct ct_entry *e, u8 proto, u8 fo, u8 fr)
{
	u32 st0 = ct_status(e);
	fo |= (st0 >> 16) & 0xff;
	fr |= st0 >> 24;
#pragma unroll
	for (int pass = 0; pass < 3; pass++) {
		u8 mask = pass ? (u8)~CT_TCP_SYN : 0xff;
		u32 st = ct_status(e);
		u32 next = ct_next_status(st, proto, CT_DIR_ORIG, fo & mask);
		next = ct_next_status(next, proto, CT_DIR_REPLY, fr & mask);
		if (next != st)
			ct_swap_half(&e->status_seq, 0, st, next);
	}
	/* A flow the new programs picked up mid-stream (its SYN and SYN/ACK
	 * were held) counts as answered once a held reply is merged, as a
	 * reply in ESTABLISHED would have made it. */
	u32 st = ct_status(e);
	u32 fl = CT_ST_FLAGS(st);
	if (fr && (fl & CT_F_PICKUP) && !(fl & CT_F_ASSURED))
		ct_swap_half(&e->status_seq, 0, st, st | ((u32)(CT_F_ASSURED | CT_F_SEEN_REPLY) << 8));
}

/* 0 merged, 1 created, 2 lost, 3 nothing (merged already as a reverse). */
static __always_inline int ct_merge_one(u32 fam, void *key, struct ct_config *cfg, u64 now)
{
	struct ct_hold *hp = ct_hold_lookup(fam, key);
	if (!hp)
		return 3;
	struct ct_hold ha = *hp, hb = {};
	union ct_key rkey = {};
	ct_key_reverse(fam, &rkey, key);
	struct ct_hold *rp = ct_hold_lookup(fam, &rkey);
	if (rp)
		hb = *rp;
	u8 proto = ct_key_proto(fam, key);
	/* ha belongs to key, hb to rkey; o and r: the original and reply ones. */
	struct ct_hold *o = &ha, *r = &hb;
	void *okey = key;
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	if (!e || (e->last_ns & CT_LAST_DEAD)) {
		e = ct_tbl_lookup(fam, &rkey);
		if (e && (e->last_ns & CT_LAST_DEAD))
			e = 0;
		if (e) {
			o = &hb;
			r = &ha;
			okey = &rkey;
		}
	}
	int rc = 0;
	if (!e) {
		/* Started during the hold: its first packet was the earlier hold's. */
		if (hb.pkts && hb.first_ns < ha.first_ns) {
			o = &hb;
			r = &ha;
			okey = &rkey;
		}
		struct ct_pkt p = {};
		if (fam == 4)
			__builtin_memcpy(&p.k4, okey, sizeof(struct ct_key4));
		else
			__builtin_memcpy(&p.k6, okey, sizeof(struct ct_key6));
		p.family = fam;
		p.l3_len = o->bytes;
		u8 tf = o->tcp_flags;
		p.tcp_flags = (tf & CT_TCP_SYN) ? CT_TCP_SYN : tf;
		if (ct_create(fam, okey, &p, cfg, now, 0, o->first_ns, 0) != CT_CREATE_OK) {
			rc = 2;
			goto out;
		}
		e = ct_tbl_lookup(fam, okey);
		if (!e) {
			rc = 2;
			goto out;
		}
		if (o->pkts > 1)
			__sync_fetch_and_add(&e->pkts[CT_DIR_ORIG], o->pkts - 1);
		rc = 1;
	} else {
		__sync_fetch_and_add(&e->pkts[CT_DIR_ORIG], o->pkts);
		__sync_fetch_and_add(&e->bytes[CT_DIR_ORIG], o->bytes);
	}
	if (r->pkts) {
		__sync_fetch_and_add(&e->pkts[CT_DIR_REPLY], r->pkts);
		__sync_fetch_and_add(&e->bytes[CT_DIR_REPLY], r->bytes);
	}
	ct_merge_state(e, proto, (u8)o->tcp_flags, r->pkts ? (u8)r->tcp_flags | CT_TCP_ACK : 0);
	u64 held_last = o->last_ns > r->last_ns ? o->last_ns : r->last_ns;
	u64 last = e->last_ns;
	if (!(last & CT_LAST_FLAGS) && held_last > last)
		__sync_val_compare_and_swap(&e->last_ns, last, held_last);
out:
	ct_hold_delete(fam, key);
	if (rp)
		ct_hold_delete(fam, &rkey);
	return rc;
}

/* fam is a constant at each call (see ct_sweep_family). */
static __always_inline int ct_merge_family(struct __sk_buff *skb, const u32 fam)
{
	struct ct_merge_hdr hdr;
	if (bpf_skb_load_bytes(skb, 0, &hdr, sizeof(hdr)))
		return TC_ACT_SHOT;
	struct ct_config *cfg = ct_cfg();
	if (!cfg)
		return TC_ACT_SHOT;
	const u32 rec = fam == 4 ? sizeof(struct ct_key4) : sizeof(struct ct_key6);
	u64 now = bpf_ktime_get_ns();
	hdr.merged = hdr.created = hdr.lost = 0;
	for (u32 i = 0; i < CT_MERGE_BATCH; i++) {
		if (i >= hdr.count)
			break;
		union ct_merge_key k;
		if (bpf_skb_load_bytes(skb, sizeof(hdr) + i * rec, &k, rec))
			break;
		int rc = ct_merge_one(fam, &k, cfg, now);
		if (rc == 0)
			hdr.merged++;
		else if (rc == 1)
			hdr.created++;
		else if (rc == 2)
			hdr.lost++;
	}
	bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0);
	return TC_ACT_OK;
}

int ct_merge4(struct __sk_buff *skb)
{
	return ct_merge_family(skb, 4);
}

int ct_merge6(struct __sk_buff *skb)
{
	return ct_merge_family(skb, 6);
}
