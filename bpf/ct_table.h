/* ct_table.h - family dispatch for the connection tables, the expiry index
 * and event emission.
 *
 * Keys are passed as void * with their family: IPv4 and IPv6 live in separate
 * maps so that an IPv4 entry pays for a 16-byte key, not a 40-byte one.
 */
#ifndef CT_TABLE_H
#define CT_TABLE_H

union ct_key {
	struct ct_key4 k4;
	struct ct_key6 k6;
};

static __always_inline u32 ct_slot(u64 ns)
{
	return ns >> CT_SLOT_SHIFT;
}

static __always_inline u32 ct_status(struct ct_entry *e)
{
	return (u32)e->status_seq;
}

static __always_inline u32 ct_sched_slot(struct ct_entry *e)
{
	return (u32)e->sched;
}

/* Change one 32-bit half of a shared 64-bit word from old to new, while the
 * other half may be changing under us. 1 if our change landed, 0 if the half
 * no longer held old (another CPU changed it first). */
static __always_inline int ct_swap_half(u64 *w, int hi, u32 old, u32 new)
{
	u32 shift = hi ? 32 : 0;
	u64 mask = 0xffffffffULL << shift;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		u64 cur = *(volatile u64 *)w;
		if ((u32)(cur >> shift) != old)
			return 0;
		u64 next = (cur & ~mask) | ((u64)new << shift);
		if (__sync_val_compare_and_swap(w, cur, next) == cur)
			return 1;
	}
	return 0;
}

static __always_inline struct ct_entry *ct_tbl_lookup(u32 fam, void *key)
{
	if (fam == 4)
		return ct4.lookup(key);
	return ct6.lookup(key);
}

/* 0 on success; fails if the key exists (another CPU won the race) or the
 * map is out of memory. */
static __always_inline int ct_tbl_insert(u32 fam, void *key, struct ct_entry *e)
{
	if (fam == 4)
		return ct4.insert(key, e);
	return ct6.insert(key, e);
}

/* 0 if the key was there and is gone now. */
static __always_inline int ct_tbl_delete(u32 fam, void *key)
{
	if (fam == 4)
		return ct4.delete(key);
	return ct6.delete(key);
}

static __always_inline u8 ct_key_proto(u32 fam, void *key)
{
	if (fam == 4)
		return ((struct ct_key4 *)key)->proto;
	return ((struct ct_key6 *)key)->proto;
}

static __always_inline void ct_key_reverse(u32 fam, union ct_key *dst, union ct_key *src)
{
	if (fam == 4) {
		dst->k4.saddr = src->k4.daddr;
		dst->k4.daddr = src->k4.saddr;
		dst->k4.sport = src->k4.dport;
		dst->k4.dport = src->k4.sport;
		dst->k4.proto = src->k4.proto;
		dst->k4.dying = 0;
		dst->k4.vlan = src->k4.vlan;
	} else {
		__builtin_memcpy(dst->k6.saddr, src->k6.daddr, 16);
		__builtin_memcpy(dst->k6.daddr, src->k6.saddr, 16);
		dst->k6.sport = src->k6.dport;
		dst->k6.dport = src->k6.sport;
		dst->k6.proto = src->k6.proto;
		dst->k6.dying = 0;
		dst->k6.vlan = src->k6.vlan;
	}
}

/* ---- expiry index ------------------------------------------------------
 *
 * An entry is filed under the slot in which it is due. The packet path files
 * a new entry once, and files it again only when a state change brings its
 * expiry forward; a refresh that pushes expiry back costs nothing here: the
 * sweeper finds the entry not yet due and files it under its new slot (lazy
 * re-scheduling). the low half of ct_entry.sched names the one record that counts; any
 * other record of the entry is stale and skipped.
 *
 * Writers only file under slots after the current one, and the sweeper only
 * consumes a slot once two slots have passed since it began, so a slot is
 * never written and consumed at the same time.
 */
static __always_inline int ct_wheel_push(u32 fam, void *key, u32 slot)
{
	struct ct_wheel_slot_key sk = { .slot = slot, .family = fam };
	struct ct_wheel_slot *ws = ct_wslots.lookup(&sk);
	if (!ws) {
		struct ct_wheel_slot fresh = {};
		ct_wslots.insert(&sk, &fresh);
		ws = ct_wslots.lookup(&sk);
		if (!ws)
			goto full;
	}
	u32 n = __sync_fetch_and_add(&ws->n, 1);
	u32 zero = 0;
	void *zchunk = ct_zero.lookup(&zero);
	if (!zchunk)
		goto full;
	if (fam == 4) {
		struct ct_wheel_key wk = { .slot = slot, .chunk = n / CT_WHEEL4_PER_CHUNK };
		u64 pos = ct_chunk_pos(n, CT_WHEEL4_PER_CHUNK);
		if (pos >= CT_WHEEL4_PER_CHUNK)
			goto full;
		struct ct_wheel_chunk4 *c = ct_wheel4.lookup(&wk);
		if (!c) {
			ct_wheel4.insert(&wk, zchunk);
			c = ct_wheel4.lookup(&wk);
			if (!c)
				goto full;
		}
		__builtin_memcpy(&c->keys[pos], key, sizeof(struct ct_key4));
		__sync_fetch_and_or(&c->filled, 1ULL << pos);
	} else {
		struct ct_wheel_key wk = { .slot = slot, .chunk = n / CT_WHEEL6_PER_CHUNK };
		u64 pos = ct_chunk_pos(n, CT_WHEEL6_PER_CHUNK);
		if (pos >= CT_WHEEL6_PER_CHUNK)
			goto full;
		struct ct_wheel_chunk6 *c = ct_wheel6.lookup(&wk);
		if (!c) {
			ct_wheel6.insert(&wk, zchunk);
			c = ct_wheel6.lookup(&wk);
			if (!c)
				goto full;
		}
		__builtin_memcpy(&c->keys[pos], key, sizeof(struct ct_key6));
		__sync_fetch_and_or(&c->filled, 1ULL << pos);
	}
	return 0;
full:
	ct_stat_inc(CT_STAT_WHEEL_FULL);
	return -1;
}

/* File the entry under new_slot if its record is still the one under
 * old_slot; whoever wins the swap files it. */
static __always_inline void ct_reschedule(u32 fam, void *key, struct ct_entry *e,
					  u32 old_slot, u32 new_slot)
{
	if (ct_swap_half(&e->sched, 0, old_slot, new_slot))
		ct_wheel_push(fam, key, new_slot);
}

/* ---- timeouts ----------------------------------------------------------- */

static __always_inline u32 ct_timeout_class(u8 proto, u8 state)
{
	if (proto == IPPROTO_TCP) {
		if (state == CT_S_SYN_SENT || state == CT_S_SYN_RECV)
			return CT_TO_SYN;
		if (state == CT_S_ESTABLISHED)
			return CT_TO_EST;
		return CT_TO_FIN;
	}
	if (proto == IPPROTO_UDP)
		return CT_TO_UDP;
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
		return CT_TO_ICMP;
	return CT_TO_OTHER;
}

static __always_inline u64 ct_timeout(struct ct_config *cfg, u8 proto, u8 state)
{
	u32 cls = ct_timeout_class(proto, state);
	if (cls >= CT_TO__MAX)
		return 0;
	return cfg->timeout_ns[cls];
}

/* The slot an entry last seen at `last` is due in, never earlier than the
 * slot after now (see the index comment above). */
static __always_inline u32 ct_due_slot(u64 last, u64 timeout, u64 now)
{
	u32 due = ct_slot(last + timeout);
	u32 min = ct_slot(now) + 1;
	return due > min ? due : min;
}

static __always_inline u8 ct_end_reason(u8 proto, u8 state)
{
	if (proto != IPPROTO_TCP)
		return CT_END_IDLE;
	if (state == CT_S_CLOSE)
		return CT_END_RST;
	if (state >= CT_S_FIN_WAIT)
		return CT_END_FIN;
	return CT_END_IDLE;
}

/* ---- events ------------------------------------------------------------- */

static __always_inline u8 ct_key_dying(u32 fam, void *key)
{
	if (fam == 4)
		return ((struct ct_key4 *)key)->dying;
	return ((struct ct_key6 *)key)->dying;
}

/* Every event takes the entry's next seq, delivered or not, so a consumer
 * can see from the gaps how many events of a flow it missed. */
static __always_inline u32 ct_next_seq(struct ct_entry *e)
{
	return __sync_fetch_and_add(&e->status_seq, 1ULL << 32) >> 32;
}

/* Write one event. 0 if it reached the ring. If the ring is full, the event
 * type's bit goes into the entry's missed mask instead, and the next event
 * that does reach the ring carries (and clears) the mask. */
static __always_inline int ct_emit(u8 type, u32 fam, void *key, struct ct_entry *e,
				   u32 status, u32 seq, u8 reason, u8 retries, u64 last, u64 now)
{
	struct ct_event *ev = ct_events.ringbuf_reserve(sizeof(struct ct_event));
	if (!ev) {
		__sync_fetch_and_or(&e->sched, (u64)(1U << ((type - 1) & 7)) << CT_SCHED_MISSED_SHIFT);
		ct_stat_inc(CT_STAT_RING_FULL);
		return -1;
	}
	u8 missed = 0;
	if (e->sched & CT_SCHED_MISSED_MASK) {
		missed = __sync_fetch_and_and(&e->sched, ~CT_SCHED_MISSED_MASK) >> CT_SCHED_MISSED_SHIFT;
		if (missed)
			ct_stat_inc(CT_STAT_MISSED_SENT);
	}
	ev->type = type;
	ev->version = CT_ABI_VERSION;
	ev->len = sizeof(struct ct_event);
	ev->family = fam;
	ev->state = status & 0xff;
	ev->flags = (status >> 8) & 0xff;
	ev->tcp_flags_orig = (status >> 16) & 0xff;
	ev->tcp_flags_reply = status >> 24;
	ev->ct_id = e->ct_id;
	ev->seq = seq;
	ev->end_reason = reason;
	ev->missed = missed;
	ev->ts_ns = now;
	ev->first_ns = e->first_ns;
	ev->last_ns = last;
	ev->pkts_orig = e->pkts[CT_DIR_ORIG];
	ev->pkts_reply = e->pkts[CT_DIR_REPLY];
	ev->bytes_orig = e->bytes[CT_DIR_ORIG];
	ev->bytes_reply = e->bytes[CT_DIR_REPLY];
	ev->retries = retries;
	if (fam == 4) {
		struct ct_key4 *k = key;
		__builtin_memset(ev->saddr, 0, 16);
		__builtin_memset(ev->daddr, 0, 16);
		__builtin_memcpy(ev->saddr, &k->saddr, 4);
		__builtin_memcpy(ev->daddr, &k->daddr, 4);
		ev->sport = k->sport;
		ev->dport = k->dport;
		ev->proto = k->proto;
		ev->vlan = k->vlan;
		ev->dying = k->dying;
	} else {
		struct ct_key6 *k = key;
		__builtin_memcpy(ev->saddr, k->saddr, 16);
		__builtin_memcpy(ev->daddr, k->daddr, 16);
		ev->sport = k->sport;
		ev->dport = k->dport;
		ev->proto = k->proto;
		ev->vlan = k->vlan;
		ev->dying = k->dying;
	}
	ct_events.ringbuf_submit(ev, 0);
	ct_stat_inc(CT_STAT_EVENTS);
	return 0;
}

/* ---- the dying outbox ---------------------------------------------------
 *
 * A connection that ends is not forgotten when its DESTROY is emitted: its
 * entry stays where it is, marked CT_LAST_OUTBOX, until the daemon acks that
 * DESTROY (naming the ct_id, so a late ack never removes another flow). It
 * keeps its place under the table limit: ct_global.entries counts it, and
 * ct_global.dying counts the outbox. It is filed in the expiry index under a
 * retry slot; if no ack came by then, the sweeper emits the DESTROY again
 * (same seq, retries + 1).
 *
 * Packets pass over an ended entry as if it were not there. A new connection
 * that needs its tuple first moves it to a generation key (key.dying =
 * CT_KEY_DYING | generation), which no packet builds. Ending in place costs
 * no insert and no delete, which are most of an expiry's cost in a large
 * table (their hash buckets are cold); the move is paid only by a tuple
 * reused within the ack delay.
 */

/* Uniform in [grace/2, grace] from now, and never before the next slot. */
static __always_inline u32 ct_retry_slot(struct ct_config *cfg, u64 now)
{
	u64 half = cfg->grace_ns >> 1;
	u64 jitter = half ? (u64)bpf_get_prandom_u32() % (half + 1) : 0;
	return ct_due_slot(now, half + jitter, now);
}

/* Own an outbox entry for a moment (CT_LAST_BUSY). 1 if this CPU does: then
 * no ack, retry or move can touch the entry (or free its element) until the
 * owner clears the bit or deletes the entry. */
static __always_inline int ct_outbox_take(struct ct_entry *e, u64 *was)
{
	u64 v = e->last_ns;
	*was = v;
	if ((v & (CT_LAST_OUTBOX | CT_LAST_BUSY)) != CT_LAST_OUTBOX)
		return 0;
	return __sync_val_compare_and_swap(&e->last_ns, v, v | CT_LAST_BUSY) == v;
}

/* The end of an entry whose last_ns this CPU claimed (CT_LAST_DEAD set on
 * `last`): the entry is this CPU's alone until it sets CT_LAST_OUTBOX, the
 * last thing it does. */
static __always_inline void ct_destroy(u32 fam, void *key, struct ct_entry *e, u64 last,
				       u8 reason, struct ct_config *cfg, u64 now)
{
	u32 seq = ct_next_seq(e);
	u32 status = ct_status(e);
	u32 slot = ct_retry_slot(cfg, now);
	e->sched = slot | (e->sched & CT_SCHED_MISSED_MASK) | ((u64)reason << CT_SCHED_REASON_SHIFT);
	ct_stat_inc(CT_STAT_DESTROYED);
	struct ct_global *g = ct_glob();
	if (g)
		__sync_fetch_and_add(&g->dying, 1);
	if (ct_emit(CT_EV_DESTROY, fam, key, e, status, seq, reason, 0, last, now)) {
		slot = ct_slot(now) + 1; /* never delivered: retry as soon as possible */
		e->sched = (e->sched & ~0xffffffffULL) | slot;
	}
	ct_wheel_push(fam, key, slot);
	__sync_fetch_and_or(&e->last_ns, CT_LAST_OUTBOX);
}

/* Free a tuple for a new connection: move the ended connection that waits
 * under it (e) to a generation key. 0 if the tuple is free now; -1 if
 * another CPU owns the entry at the moment (the packet goes untracked).
 * If every generation of the tuple is taken, the waiting DESTROY is given up
 * (it was emitted at least once; counted in outbox_full). */
static __always_inline int ct_outbox_move(u32 fam, void *key, struct ct_entry *e, u64 now)
{
	u64 v;
	if (!ct_outbox_take(e, &v))
		return -1;
	struct ct_entry d = *e;
	d.last_ns = v;
	u32 slot = ct_sched_slot(e);
	u32 min = ct_slot(now) + 1;
	if (slot < min)
		slot = min;
	d.sched = (d.sched & ~0xffffffffULL) | slot;

	union ct_key dk = {};
	u8 *dying;
	if (fam == 4) {
		__builtin_memcpy(&dk.k4, key, sizeof(struct ct_key4));
		dying = &dk.k4.dying;
	} else {
		__builtin_memcpy(&dk.k6, key, sizeof(struct ct_key6));
		dying = &dk.k6.dying;
	}
	int rc = -1;
#pragma unroll
	for (int i = 0; i < CT_OUTBOX_TRIES; i++) {
		*dying = CT_KEY_DYING | ((d.ct_id + i) & 0x7f);
		rc = ct_tbl_insert(fam, &dk, &d);
		if (rc == 0)
			break;
	}
	if (rc == 0) {
		ct_wheel_push(fam, &dk, slot);
	} else {
		ct_stat_inc(CT_STAT_OUTBOX_FULL);
		struct ct_global *g = ct_glob();
		if (g) {
			__sync_fetch_and_add(&g->entries, -1);
			__sync_fetch_and_add(&g->dying, -1);
			if (fam == 6)
				__sync_fetch_and_add(&g->entries6, -1);
		}
	}
	/* Only the owner of CT_LAST_BUSY deletes, and no connection can be
	 * created under the key while the entry holds it: this removes e. */
	ct_tbl_delete(fam, key);
	return 0;
}

#endif /* CT_TABLE_H */
