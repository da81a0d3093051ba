/* outbox_ack.c - the daemon's acknowledgement of DESTROYs.
 *
 * Run by the daemon through BPF_PROG_TEST_RUN with a struct ct_ack_hdr and up
 * to CT_ACK_BATCH records of one family as the "packet", once the sink has
 * durably written those DESTROYs. An outbox entry is removed only if it
 * carries the acked ct_id, so a late or repeated ack can never remove a
 * different flow. A DESTROY names the key its entry had when it was emitted:
 * the connection's own tuple (dying byte 0), or a generation key. An entry
 * that a new connection moved off its tuple since is looked for under the
 * generation keys. Removing it frees its place under the table limit.
 */

union ct_ack {
	struct ct_ack4 a4;
	struct ct_ack6 a6;
};

/* Remove the outbox entry of (key, ct_id); 1 if it was there. */
static __always_inline int ct_ack_one(u32 fam, void *key, u64 ct_id)
{
	u8 *dying = fam == 4 ? &((struct ct_key4 *)key)->dying : &((struct ct_key6 *)key)->dying;
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	if (*dying) {
		/* A generation key: only sweeps and acks, one at a time, touch it. */
		return e && e->ct_id == ct_id && !ct_tbl_delete(fam, key);
	}
	u64 v;
	if (e && e->ct_id == ct_id && ct_outbox_take(e, &v))
		return !ct_tbl_delete(fam, key);
	/* Not under its tuple (any more): moved for a new connection. */
#pragma unroll
	for (int i = 0; i < CT_OUTBOX_TRIES; i++) {
		*dying = CT_KEY_DYING | ((ct_id + i) & 0x7f);
		e = ct_tbl_lookup(fam, key);
		if (e && e->ct_id == ct_id)
			return !ct_tbl_delete(fam, key);
	}
	return 0;
}

/* fam is a constant at each call (see ct_sweep_family). */
static __always_inline int ct_ack_family(struct __sk_buff *skb, const u32 fam)
{
	struct ct_ack_hdr hdr;
	if (bpf_skb_load_bytes(skb, 0, &hdr, sizeof(hdr)))
		return TC_ACT_SHOT;
	const u32 rec = fam == 4 ? sizeof(struct ct_ack4) : sizeof(struct ct_ack6);
	u32 acked = 0, stale = 0;
	for (u32 i = 0; i < CT_ACK_BATCH; i++) {
		if (i >= hdr.count)
			break;
		union ct_ack a;
		if (bpf_skb_load_bytes(skb, sizeof(hdr) + i * rec, &a, rec))
			break;
		void *key = fam == 4 ? (void *)&a.a4.key : (void *)&a.a6.key;
		u64 ct_id = fam == 4 ? a.a4.ct_id : a.a6.ct_id;
		if (!ct_ack_one(fam, key, ct_id)) {
			stale++;
			continue;
		}
		struct ct_global *g = ct_glob();
		if (g) {
			__sync_fetch_and_add(&g->entries, -1);
			__sync_fetch_and_add(&g->dying, -1);
			if (fam == 6)
				__sync_fetch_and_add(&g->entries6, -1);
		}
		acked++;
	}
	ct_stat_add(CT_STAT_ACKED, acked);
	ct_stat_add(CT_STAT_ACK_STALE, stale);
	hdr.acked = acked;
	bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0);
	return TC_ACT_OK;
}

int ct_ack4(struct __sk_buff *skb)
{
	return ct_ack_family(skb, 4);
}

int ct_ack6(struct __sk_buff *skb)
{
	return ct_ack_family(skb, 6);
}
