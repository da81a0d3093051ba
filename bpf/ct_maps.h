/* ct_maps.h - every map of the datapath, pinned in bpffs.
 *
 * Sizes arrive as -D flags that streamer/datapath/loader.py builds from validated
 * integers; nothing else of the configuration becomes C text. Because every
 * map is pinned, a program loaded again (a restarted daemon, `ctstream list`)
 * opens the maps already there instead of making new ones.
 */
#ifndef CT_MAPS_H
#define CT_MAPS_H

#ifndef CT_PIN_DIR
#error "CT_PIN_DIR must be defined (bpffs directory for the pinned maps)"
#endif
/* Map capacities: the table limit (IPv4) or the IPv6 cap, plus room for
 * the moment in which an ending entry and its outbox copy both exist. */
#ifndef CT_MAX4
#define CT_MAX4 65536
#endif
#ifndef CT_MAX6
#define CT_MAX6 65536
#endif
#define CT_MAP_SLACK 256
#ifndef CT_RING_BYTES
#define CT_RING_BYTES (1 << 20)
#endif
/* Index records one sweeper run examines. The loop body is branchy (index
 * push, event, atomics with retry); on 6.18 the verifier accepts 2 and gives
 * up at 4. The daemon multiplies it with BPF_PROG_TEST_RUN's repeat, which
 * costs tens of nanoseconds per run. */
#ifndef CT_SWEEP_BATCH
#define CT_SWEEP_BATCH 2
#endif

#define CT_PIN(name) CT_PIN_DIR "/" name

/* Index capacity: at most two live records per entry (its due slot and one
 * left behind when a timeout was shortened), in chunks, plus one partly
 * filled chunk per slot in use. */
#define CT_WHEEL4_MAX (CT_MAX4 / (CT_WHEEL4_PER_CHUNK / 2) + 16384)
#define CT_WHEEL6_MAX (CT_MAX6 / (CT_WHEEL6_PER_CHUNK / 2) + 16384)
#define CT_WHEEL_SLOTS_MAX 65536

/* The connection tables (live entries and the dying outbox): plain hash
 * maps, never LRU, so that fresh connections cannot evict established ones.
 * IPv4 is preallocated: its memory is committed at load (136 bytes per entry
 * of the limit, plus 16 per hash bucket), and creating or ending an entry
 * allocates nothing. IPv6 entries are allocated as they come, up to their
 * own cap, so an IPv4 network pays for the IPv6 map's buckets only. */
#if CT_LAYOUT >= 3
#define CT_TABLE4_PIN "ct4_l3"  /* beside layout 2's while migrate moves them */
#define CT_TABLE6_PIN "ct6_l3"
#else
#define CT_TABLE4_PIN "ct4"
#define CT_TABLE6_PIN "ct6"
#endif
BPF_TABLE_PINNED("hash", struct ct_key4, struct ct_entry, ct4, CT_MAX4 + CT_MAP_SLACK, CT_PIN(CT_TABLE4_PIN));
BPF_TABLE_PINNED("hash", struct ct_key6, struct ct_entry, ct6, CT_MAX6 + CT_MAP_SLACK, CT_PIN(CT_TABLE6_PIN), BPF_F_NO_PREALLOC);

/* A migration's hold (struct ct_hold): shared by every layout. */
#define CT_HOLD_MAX 65536
BPF_TABLE_PINNED("hash", struct ct_key4, struct ct_hold, ct_hold4, CT_HOLD_MAX, CT_PIN("ct_hold4"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ct_key6, struct ct_hold, ct_hold6, CT_HOLD_MAX, CT_PIN("ct_hold6"), BPF_F_NO_PREALLOC);

/* The expiry index. */
BPF_TABLE_PINNED("hash", struct ct_wheel_slot_key, struct ct_wheel_slot, ct_wslots, CT_WHEEL_SLOTS_MAX, CT_PIN("ct_wslots"));
BPF_TABLE_PINNED("hash", struct ct_wheel_key, struct ct_wheel_chunk4, ct_wheel4, CT_WHEEL4_MAX, CT_PIN("ct_wheel4"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ct_wheel_key, struct ct_wheel_chunk6, ct_wheel6, CT_WHEEL6_MAX, CT_PIN("ct_wheel6"), BPF_F_NO_PREALLOC);

/* Configuration: two slots, the generation in force in ct_meta, and the
 * selection sets of both slots (CT_CONFIG_SLOTS in ct_abi.h). LPM tries
 * must be made without preallocation. */
#ifndef CT_SEL_MAX
#define CT_SEL_MAX 65536
#endif
BPF_TABLE_PINNED("array", u32, struct ct_config, ct_config, CT_CONFIG_SLOTS, CT_PIN("ct_config"));
BPF_TABLE_PINNED("array", u32, struct ct_meta, ct_meta, 1, CT_PIN("ct_meta"));
BPF_TABLE_PINNED("lpm_trie", struct ct_sel_key4, struct ct_sel, ct_sel4, CT_SEL_MAX, CT_PIN("ct_sel4"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ct_sel_key6, struct ct_sel, ct_sel6, CT_SEL_MAX, CT_PIN("ct_sel6"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct ct_global, ct_global, 1, CT_PIN("ct_global"));
BPF_TABLE_PINNED("percpu_array", u32, u64, ct_stats, CT_STAT__MAX, CT_PIN("ct_stats"));
BPF_TABLE_PINNED("percpu_array", u32, u64, ct_syn_stats, CT_SYN__MAX, CT_PIN("ct_syn_stats"));

/* Never written: the zeroed value a new index chunk starts from (too large
 * for the BPF stack next to everything else). */
BPF_ARRAY(ct_zero, struct ct_wheel_chunk4, 1);
_Static_assert(sizeof(struct ct_wheel_chunk4) >= sizeof(struct ct_wheel_chunk6),
	       "ct_zero must be as large as the largest chunk");

/* The event ring. BCC's BPF_RINGBUF_OUTPUT cannot be pinned, so this spells
 * out the same table type with a pinned section. */
struct ct_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u64 (*ringbuf_query)(u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" CT_PIN("ct_events"))))
struct ct_events_table_t ct_events = { .max_entries = CT_RING_BYTES };

/* Position n % per within a chunk, as a 64-bit value with a bound the
 * verifier sees: per is not a power of two, and the compiler drops a plain
 * check it can prove, so the barrier hides the value from it first.
 * Returns per (out of range) only if something is badly wrong. */
static __always_inline u64 ct_chunk_pos(u64 n, u64 per)
{
	u64 pos = n % per;
	asm volatile("" : "+r"(pos));
	return pos < per ? pos : per;
}

static __always_inline void ct_stat_add(u32 idx, u64 n)
{
	u64 *v = ct_stats.lookup(&idx);
	if (v)
		*v += n;
}

static __always_inline void ct_stat_inc(u32 idx)
{
	ct_stat_add(idx, 1);
}

static __always_inline void ct_syn_stat_inc(u32 idx)
{
	u64 *v = ct_syn_stats.lookup(&idx);
	if (v)
		*v += 1;
}

/* The configuration in force, and its slot. Called once per program run:
 * everything the run decides comes from the one generation it read. A
 * single byte holds the slot bit, so even a torn read of the generation
 * gives the old or the new slot. */
static __always_inline struct ct_config *ct_cfg_slot(u32 *slot, int *frozen)
{
	u32 zero = 0;
	struct ct_meta *m = ct_meta.lookup(&zero);
	u32 s = m ? (u32)(*(volatile u8 *)&m->generation & 1) : 0;
	*slot = s;
	*frozen = m && *(volatile u32 *)&m->frozen == CT_LAYOUT;
	return ct_config.lookup(&s);
}

static __always_inline struct ct_config *ct_cfg(void)
{
	u32 slot;
	int frozen;
	return ct_cfg_slot(&slot, &frozen);
}

static __always_inline struct ct_global *ct_glob(void)
{
	u32 zero = 0;
	return ct_global.lookup(&zero);
}

#endif /* CT_MAPS_H */
