/* sweeper.c - expiry. BCC cannot load BPF timers' callbacks, so the daemon
 * runs these programs (one per family) every tick through BPF_PROG_TEST_RUN
 * (with `repeat`), handing each a struct ct_sweep_req as the "packet".
 *
 * They are tc (SCHED_CLS) programs although they never see traffic: a test
 * run of an XDP program with repeat > 1 installs it in the XDP dispatcher and
 * removes it again, waiting for RCU each time (16-32 ms per call here); a tc
 * test run has no such cost.
 *
 * Each run consumes at most `budget` index records of slots that are due, so
 * the work per tick is bounded whatever the table size. A record whose entry
 * was refreshed is filed again under its new due slot; an entry that is due
 * is claimed by setting CT_LAST_DEAD on the last_ns we examined, which fails
 * if a packet refreshed it after we looked, and only the claimer ends it (it
 * stays in place, in the outbox). Outbox entries are filed in the same index
 * under their retry slot.
 */

/* An outbox entry whose retry slot came: no ack arrived, emit its DESTROY
 * again (same seq) and file it under the next retry slot. The daemon runs
 * sweeps and acks one at a time; an entry under its live tuple must also be
 * owned against a packet that moves it (ct_outbox_move) meanwhile. A moved
 * one (generation key) is touched by sweeps and acks only. */
static __always_inline void ct_sweep_dying(u32 fam, void *key, struct ct_entry *e,
					   struct ct_config *cfg, u64 now)
{
	int in_place = !ct_key_dying(fam, key);
	u64 v = e->last_ns;
	if (in_place && !ct_outbox_take(e, &v))
		return; /* being moved: the mover files it under its new key */
	u32 hi = e->sched >> 32;
	u32 retries = hi & CT_SCHED_RETRY_MASK;
	u8 reason = (hi >> (CT_SCHED_REASON_SHIFT - 32)) & 0xff;
	u32 seq = (u32)(e->status_seq >> 32) - 1;
	if (retries < CT_SCHED_RETRY_MASK)
		retries++;
	int rc = ct_emit(CT_EV_DESTROY, fam, key, e, ct_status(e), seq, reason,
			 retries > 255 ? 255 : retries, v & ~CT_LAST_FLAGS, now);
	ct_stat_inc(CT_STAT_RETRIES);
	u32 due = rc ? ct_slot(now) + 1 : ct_retry_slot(cfg, now);
	e->sched = (e->sched & CT_SCHED_MISSED_MASK) | ((u64)reason << CT_SCHED_REASON_SHIFT) |
		   ((u64)retries << 32) | due;
	ct_wheel_push(fam, key, due);
	if (in_place)
		__sync_fetch_and_and(&e->last_ns, ~CT_LAST_BUSY);
}

static __always_inline void ct_sweep_entry(u32 fam, void *key, u32 slot,
					   struct ct_config *cfg, u64 now)
{
	struct ct_entry *e = ct_tbl_lookup(fam, key);
	if (!e || ct_sched_slot(e) != slot)
		return; /* gone, or filed elsewhere since: a stale record */
	u64 last = e->last_ns;
	if (ct_key_dying(fam, key) || (last & CT_LAST_OUTBOX)) {
		ct_sweep_dying(fam, key, e, cfg, now);
		return;
	}
	if (last & CT_LAST_DEAD)
		return; /* another CPU is ending it */
	u8 proto = ct_key_proto(fam, key);
	u32 status = ct_status(e);
	u8 state = CT_ST_STATE(status);
	u64 timeout = ct_timeout(cfg, proto, state);
	if (last + timeout > now) {
		/* Not due. Events a full ring swallowed go out now. */
		if (e->sched & CT_SCHED_MISSED_MASK)
			ct_emit(CT_EV_UPDATE, fam, key, e, status, ct_next_seq(e), CT_END_NONE, 0,
				last, now);
		ct_reschedule(fam, key, e, slot, ct_due_slot(last, timeout, now));
		ct_stat_inc(CT_STAT_RESCHEDULED);
		return;
	}
	if (__sync_val_compare_and_swap(&e->last_ns, last, last | CT_LAST_DEAD) != last) {
		ct_reschedule(fam, key, e, slot, ct_slot(now) + 1);
		ct_stat_inc(CT_STAT_RESCHEDULED);
		return;
	}
	ct_destroy(fam, key, e, last, ct_end_reason(proto, state), cfg, now);
}

/* Consume index record idx of slot; drop the chunk once its last record is
 * consumed. */
static __always_inline void ct_sweep_record(u32 fam, u32 slot, u32 idx,
					    struct ct_config *cfg, u64 now)
{
	if (fam == 4) {
		struct ct_wheel_key wk = { .slot = slot, .chunk = idx / CT_WHEEL4_PER_CHUNK };
		u64 pos = ct_chunk_pos(idx, CT_WHEEL4_PER_CHUNK);
		if (pos >= CT_WHEEL4_PER_CHUNK)
			return;
		struct ct_wheel_chunk4 *c = ct_wheel4.lookup(&wk);
		if (!c)
			return;
		if (c->filled & (1ULL << pos)) {
			struct ct_key4 k = c->keys[pos];
			ct_sweep_entry(4, &k, slot, cfg, now);
		}
		if (pos == CT_WHEEL4_PER_CHUNK - 1)
			ct_wheel4.delete(&wk);
	} else {
		struct ct_wheel_key wk = { .slot = slot, .chunk = idx / CT_WHEEL6_PER_CHUNK };
		u64 pos = ct_chunk_pos(idx, CT_WHEEL6_PER_CHUNK);
		if (pos >= CT_WHEEL6_PER_CHUNK)
			return;
		struct ct_wheel_chunk6 *c = ct_wheel6.lookup(&wk);
		if (!c)
			return;
		if (c->filled & (1ULL << pos)) {
			struct ct_key6 k = c->keys[pos];
			ct_sweep_entry(6, &k, slot, cfg, now);
		}
		if (pos == CT_WHEEL6_PER_CHUNK - 1)
			ct_wheel6.delete(&wk);
	}
}

/* A slot is done: drop its last, partly filled chunk and its record. */
static __always_inline void ct_sweep_slot_done(u32 fam, struct ct_wheel_slot_key *sk, u32 n)
{
	if (fam == 4) {
		struct ct_wheel_key wk = { .slot = sk->slot, .chunk = n / CT_WHEEL4_PER_CHUNK };
		if (n % CT_WHEEL4_PER_CHUNK)
			ct_wheel4.delete(&wk);
	} else {
		struct ct_wheel_key wk = { .slot = sk->slot, .chunk = n / CT_WHEEL6_PER_CHUNK };
		if (n % CT_WHEEL6_PER_CHUNK)
			ct_wheel6.delete(&wk);
	}
	ct_wslots.delete(sk);
}

/* The request of a sweeper or early-drop run, in the test packet; NULL if it
 * is short or names the other family. */
static __always_inline struct ct_sweep_req *ct_sweep_req_of(struct __sk_buff *skb, u32 fam)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ct_sweep_req *rq = data;
	if ((void *)(rq + 1) > data_end || rq->family != fam)
		return 0;
	rq->stalled = 0;
	return rq;
}

/* fam is a constant at each call, so the compiler drops the other family's
 * branches: the verifier could not explore both within its limits. */
static __always_inline int ct_sweep_family(struct __sk_buff *skb, const u32 fam)
{
	struct ct_sweep_req *rq = ct_sweep_req_of(skb, fam);
	if (!rq)
		return TC_ACT_SHOT;
	u32 budget = rq->budget;
	struct ct_config *cfg = ct_cfg();
	struct ct_global *g = ct_glob();
	if (!cfg || !g)
		return TC_ACT_SHOT;
	u32 *cursor = fam == 4 ? &g->cursor[0] : &g->cursor[1];
	u64 now = bpf_ktime_get_ns();
	u32 now_slot = ct_slot(now);
	/* The loader seeds the cursor before anything is attached, so no entry
	 * is filed under a slot behind it. This is only a guard against a map
	 * that was never seeded (a full walk from slot 0 would take ages). */
	if (*cursor == 0 || *cursor > now_slot)
		*cursor = now_slot - 2;
	/* Writers file under now_slot + 1 or later; consume a slot only once
	 * two slots have begun since it did. */

	u32 swept = 0;
	for (u32 i = 0; i < CT_SWEEP_BATCH; i++) {
		if (i >= budget)
			break;
		u32 cur = *cursor;
		if (cur + 2 > now_slot)
			break;
		if (rq->room == 0) {
			rq->stalled = 1;
			break;
		}
		struct ct_wheel_slot_key sk = { .slot = cur, .family = fam };
		struct ct_wheel_slot *ws = ct_wslots.lookup(&sk);
		if (!ws) {
			*cursor = cur + 1;
			continue;
		}
		u32 done = ws->done;
		u32 n = ws->n;
		if (done >= n) {
			ct_sweep_slot_done(fam, &sk, n);
			*cursor = cur + 1;
			continue;
		}
		ws->done = done + 1;
		rq->room--;
		ct_sweep_record(fam, cur, done, cfg, now);
		swept++;
	}
	ct_stat_add(CT_STAT_SWEPT, swept);
	u32 cur = *cursor;
	rq->pending = cur + 2 <= now_slot ? now_slot - cur - 1 : 0;
	return TC_ACT_OK;
}

int ct_sweep4(struct __sk_buff *skb)
{
	return ct_sweep_family(skb, 4);
}

int ct_sweep6(struct __sk_buff *skb)
{
	return ct_sweep_family(skb, 6);
}
