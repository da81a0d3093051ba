/* early_drop.c - table pressure: IPVS's drop-entry defence, for XDP.
 *
 * Never LRU: a full table turns new connections away (counted as untracked)
 * rather than evict anything. To keep room for legitimate connections during
 * a flood of half-open ones, the daemon runs these programs (one per family,
 * through BPF_PROG_TEST_RUN) while the table is above its high watermark.
 * They walk the expiry index from the sweeper's cursor forward - soonest due
 * first, so within a timeout class the oldest first - without consuming it,
 * and end unassured live entries (reason CT_END_EARLY, "lack of resources":
 * DESTROY and outbox like any other end) until the live entries are down to
 * cfg->early_low. Assured entries and outbox copies are never touched. The
 * position is kept in ct_global.early, so successive runs continue the walk.
 */

static __always_inline int ct_early_record(u32 fam, u32 slot, u32 idx,
					   struct ct_config *cfg, u64 now)
{
	union ct_key k = {};
	if (fam == 4) {
		struct ct_wheel_key wk = { .slot = slot, .chunk = idx / CT_WHEEL4_PER_CHUNK };
		u64 pos = ct_chunk_pos(idx, CT_WHEEL4_PER_CHUNK);
		if (pos >= CT_WHEEL4_PER_CHUNK)
			return 0;
		struct ct_wheel_chunk4 *c = ct_wheel4.lookup(&wk);
		if (!c || !(c->filled & (1ULL << pos)))
			return 0;
		k.k4 = c->keys[pos];
	} else {
		struct ct_wheel_key wk = { .slot = slot, .chunk = idx / CT_WHEEL6_PER_CHUNK };
		u64 pos = ct_chunk_pos(idx, CT_WHEEL6_PER_CHUNK);
		if (pos >= CT_WHEEL6_PER_CHUNK)
			return 0;
		struct ct_wheel_chunk6 *c = ct_wheel6.lookup(&wk);
		if (!c || !(c->filled & (1ULL << pos)))
			return 0;
		k.k6 = c->keys[pos];
	}
	if (ct_key_dying(fam, &k))
		return 0;
	struct ct_entry *e = ct_tbl_lookup(fam, &k);
	if (!e || ct_sched_slot(e) != slot)
		return 0;
	u64 last = e->last_ns;
	if ((last & CT_LAST_DEAD) || (CT_ST_FLAGS(ct_status(e)) & CT_F_ASSURED))
		return 0;
	if (__sync_val_compare_and_swap(&e->last_ns, last, last | CT_LAST_DEAD) != last)
		return 0; /* refreshed meanwhile, perhaps assured now: leave it */
	ct_destroy(fam, &k, e, last, CT_END_EARLY, cfg, now);
	ct_stat_inc(CT_STAT_EARLY_DROPS);
	return 1;
}

static __always_inline int ct_early_family(struct __sk_buff *skb, const u32 fam)
{
	struct ct_sweep_req *rq = ct_sweep_req_of(skb, fam);
	if (!rq)
		return TC_ACT_SHOT;
	u32 budget = rq->budget;
	struct ct_config *cfg = ct_cfg();
	struct ct_global *g = ct_glob();
	if (!cfg || !g)
		return TC_ACT_SHOT;
	u32 cursor = fam == 4 ? g->cursor[0] : g->cursor[1];
	u64 *posp = fam == 4 ? &g->early[0] : &g->early[1];
	u64 now = bpf_ktime_get_ns();
	u32 last_slot = ct_slot(now) + rq->horizon;
	u64 pos = *posp;
	u32 slot = pos >> 32;
	u32 idx = (u32)pos;
	if (slot < cursor || slot > last_slot) {
		slot = cursor;
		idx = 0;
	}
	u32 dropped = 0;
	for (u32 i = 0; i < CT_SWEEP_BATCH; i++) {
		if (i >= budget)
			break;
		if (g->entries - g->dying <= cfg->early_low)
			break;
		if (rq->room == 0) {
			rq->stalled = 1;
			break;
		}
		if (slot > last_slot) {
			slot = cursor; /* one pass done; the next run starts over */
			idx = 0;
			break;
		}
		struct ct_wheel_slot_key sk = { .slot = slot, .family = fam };
		struct ct_wheel_slot *ws = ct_wslots.lookup(&sk);
		if (!ws || idx >= ws->n) {
			slot++;
			idx = 0;
			continue;
		}
		if (idx < ws->done)
			idx = ws->done; /* the sweeper consumed those */
		if (idx >= ws->n)
			continue;
		rq->room--;
		dropped += ct_early_record(fam, slot, idx, cfg, now);
		idx++;
	}
	*posp = ((u64)slot << 32) | idx;
	rq->pending = dropped;
	return TC_ACT_OK;
}

int ct_early4(struct __sk_buff *skb)
{
	return ct_early_family(skb, 4);
}

int ct_early6(struct __sk_buff *skb)
{
	return ct_early_family(skb, 6);
}
