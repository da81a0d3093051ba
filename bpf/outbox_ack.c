/* outbox_ack.c - the daemon's acknowledgement of DESTROYs.
 *
 * Run by the daemon through BPF_PROG_TEST_RUN with a struct ct_ack_hdr and up
 * to CT_ACK_BATCH records of one family as the "packet", once the sink has
 * durably written those DESTROYs. An outbox copy is removed only if it is
 * still there under the acked key and carries the acked ct_id, so a late or
 * repeated ack can never remove a different flow. Removing it frees its place
 * under the table limit.
 */

static __always_inline void ct_acked_one(u32 fam)
{
	struct ct_global *g = ct_glob();
	if (g) {
		__sync_fetch_and_add(&g->entries, -1);
		__sync_fetch_and_add(&g->dying, -1);
		if (fam == 6)
			__sync_fetch_and_add(&g->entries6, -1);
	}
	ct_stat_inc(CT_STAT_ACKED);
}

int ct_ack4(struct __sk_buff *skb)
{
	struct ct_ack_hdr hdr;
	if (bpf_skb_load_bytes(skb, 0, &hdr, sizeof(hdr)))
		return TC_ACT_SHOT;
	u32 acked = 0, stale = 0;
	for (u32 i = 0; i < CT_ACK_BATCH; i++) {
		if (i >= hdr.count)
			break;
		struct ct_ack4 a;
		if (bpf_skb_load_bytes(skb, sizeof(hdr) + i * sizeof(a), &a, sizeof(a)))
			break;
		struct ct_entry *e = (a.key.dying & CT_KEY_DYING) ? ct4.lookup(&a.key) : 0;
		if (!e || e->ct_id != a.ct_id || ct4.delete(&a.key)) {
			stale++;
			continue;
		}
		ct_acked_one(4);
		acked++;
	}
	ct_stat_add(CT_STAT_ACK_STALE, stale);
	hdr.acked = acked;
	bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0);
	return TC_ACT_OK;
}

int ct_ack6(struct __sk_buff *skb)
{
	struct ct_ack_hdr hdr;
	if (bpf_skb_load_bytes(skb, 0, &hdr, sizeof(hdr)))
		return TC_ACT_SHOT;
	u32 acked = 0, stale = 0;
	for (u32 i = 0; i < CT_ACK_BATCH; i++) {
		if (i >= hdr.count)
			break;
		struct ct_ack6 a;
		if (bpf_skb_load_bytes(skb, sizeof(hdr) + i * sizeof(a), &a, sizeof(a)))
			break;
		struct ct_entry *e = (a.key.dying & CT_KEY_DYING) ? ct6.lookup(&a.key) : 0;
		if (!e || e->ct_id != a.ct_id || ct6.delete(&a.key)) {
			stale++;
			continue;
		}
		ct_acked_one(6);
		acked++;
	}
	ct_stat_add(CT_STAT_ACK_STALE, stale);
	hdr.acked = acked;
	bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0);
	return TC_ACT_OK;
}
