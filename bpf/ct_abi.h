/* ct_abi.h - the ABI shared by the BPF programs and the Python daemon.
 *
 * This header is the single source of truth for every struct and constant
 * that crosses the kernel/user boundary. streamer/datapath/abi.py mirrors it, and
 * tests/bpf/test_abi.py compiles static assertions generated from the Python
 * side against this file, so a change here that Python does not follow fails
 * the tests. Rules: fields are never reordered, padding is explicit, and a
 * change of layout bumps CT_ABI_VERSION.
 */
#ifndef CT_ABI_H
#define CT_ABI_H

#define CT_ABI_VERSION 2

/* Event types (struct ct_event.type). */
#define CT_EV_CREATE  1
#define CT_EV_UPDATE  2
#define CT_EV_DESTROY 3

/* Direction of a packet relative to the connection's first packet. */
#define CT_DIR_ORIG  0
#define CT_DIR_REPLY 1

/* TCP states of the relaxed state machine; non-TCP entries stay CT_S_NONE. */
#define CT_S_NONE        0
#define CT_S_SYN_SENT    1
#define CT_S_SYN_RECV    2
#define CT_S_ESTABLISHED 3
#define CT_S_FIN_WAIT    4
#define CT_S_CLOSE_WAIT  5
#define CT_S_LAST_ACK    6
#define CT_S_TIME_WAIT   7
#define CT_S_CLOSE       8

/* Entry flags (byte 1 of ct_entry.status, struct ct_event.flags). */
#define CT_F_ASSURED    0x01 /* traffic seen both ways (TCP: handshake done) */
#define CT_F_SEEN_REPLY 0x02
#define CT_F_FIN_REPLY  0x04 /* the first FIN came from the reply side */
#define CT_F_PICKUP     0x08 /* picked up mid-stream, no SYN seen */

/* Why a connection ended (struct ct_event.end_reason). */
#define CT_END_NONE   0
#define CT_END_IDLE   1 /* idle timeout */
#define CT_END_FIN    2 /* closed by FIN */
#define CT_END_RST    3 /* reset */
#define CT_END_REUSE  4 /* tuple reused by a new SYN after close */
#define CT_END_EARLY  5 /* dropped early under table pressure ("lack of resources") */
#define CT_END_IGNORED 6 /* the configuration now ignores the flow (a live apply) */

/* Bits of struct ct_event.missed and of the entry's missed mask: event types
 * that could not be written to the ring (1 << (type - 1)). */
#define CT_MISSED_CREATE  0x01
#define CT_MISSED_UPDATE  0x02
#define CT_MISSED_DESTROY 0x04

/* key.dying: 0 for a live connection, and for an ended one that waits in the
 * dying outbox under its own tuple (CT_LAST_OUTBOX). When a new connection
 * needs that tuple, the waiting entry moves to the key with dying =
 * CT_KEY_DYING | generation; the generation lets a tuple that is reused
 * quickly have several ended connections waiting. */
#define CT_KEY_DYING      0x80
#define CT_OUTBOX_TRIES   4    /* generations tried when moving */

/* TCP flag bits as they stand in the TCP header's flags byte. */
#define CT_TCP_FIN 0x01
#define CT_TCP_SYN 0x02
#define CT_TCP_RST 0x04
#define CT_TCP_PSH 0x08
#define CT_TCP_ACK 0x10

/* Timeout classes, indices into ct_config.timeout_ns. */
#define CT_TO_SYN   0
#define CT_TO_EST   1
#define CT_TO_FIN   2
#define CT_TO_UDP   3
#define CT_TO_ICMP  4
#define CT_TO_OTHER 5
#define CT_TO__MAX  8

/* Per-CPU counters, indices into the ct_stats map. */
#define CT_STAT_PACKETS         0  /* frames seen by the datapath */
#define CT_STAT_INVALID         1  /* malformed, or a packet of no connection (RST, SYN/ACK, echo reply) */
#define CT_STAT_RING_FULL       2  /* an event could not be reserved */
#define CT_STAT_TABLE_FULL      3  /* a new connection found the table full */
#define CT_STAT_CREATED         4
#define CT_STAT_DESTROYED       5
#define CT_STAT_FRAGMENTS       6  /* non-first fragments (counted, not tracked) */
#define CT_STAT_UNTRACKED_PKTS  7  /* IP packets not attributed to an entry */
#define CT_STAT_UNTRACKED_BYTES 8
#define CT_STAT_NOT_IP          9
#define CT_STAT_EVENTS          10 /* events written to the ring */
#define CT_STAT_WHEEL_FULL      11 /* an expiry could not be indexed */
#define CT_STAT_RESCHEDULED     12 /* sweeper: entry refreshed, moved on */
#define CT_STAT_SWEPT           13 /* sweeper: index records examined */
#define CT_STAT_OTHER_L4        14 /* IP but not TCP/UDP/ICMP echo */
#define CT_STAT_MISSED_SENT     15 /* events that carried missed bits (re-delivery) */
#define CT_STAT_RETRIES         16 /* DESTROYs emitted again from the outbox */
#define CT_STAT_EARLY_DROPS     17 /* unassured entries dropped under pressure */
#define CT_STAT_ACKED           18 /* outbox entries removed by the daemon's ack */
#define CT_STAT_ACK_STALE       19 /* acks that matched nothing (late or duplicate) */
#define CT_STAT_OUTBOX_FULL     20 /* tuple reused, no generation free: a DESTROY left unguarded */
#define CT_STAT_IGNORED_PACKETS 21 /* packets of flows the selection ignores (passed untouched) */
#define CT_STAT_IGNORED_BYTES   22
#define CT_STAT_HELD            23 /* packets held while a migration froze this layout */
#define CT_STAT__MAX            24

/* SYN-cookie counters: a map of their own (ct_syn_stats), so that ct_stats,
 * pinned with CT_STAT__MAX places, keeps its size and its layout. */
#define CT_SYN_SENT        0 /* SYN-ACKs with a cookie sent from XDP */
#define CT_SYN_TO_KERNEL   1 /* SYNs passed so the kernel cookies one itself
				(it keeps the listener's syncookie window open) */
#define CT_SYN_ACK_VALID   2 /* ACKs with a valid cookie: entry created */
#define CT_SYN_ACK_INVALID 3 /* bare ACKs to a listener, no entry, bad cookie: dropped */
#define CT_SYN_NO_LISTENER 4 /* SYNs to no listener while cookies were on: passed, untracked */
#define CT_SYN_AUTO        5 /* SYNs that auto mode answered with a cookie */
#define CT_SYN_ERRORS      6 /* a SYN-ACK could not be built (frame too short ...) */
#define CT_SYN_HS_ESTIMATED 7 /* valid ACKs whose SYN had left the handshake map:
                              * start time and SYN counters estimated */
#define CT_SYN__MAX        8

/* Flags in the top bits of ct_entry.last_ns (CLOCK_MONOTONIC nanoseconds
 * never reach bit 61). An entry's end is claimed by the compare-and-swap of
 * the live last_ns it examined to last_ns | CT_LAST_DEAD, so a packet that
 * refreshed it in between makes the claim fail; a dead value never turns
 * live again, so no claim can succeed twice (no ABA).
 *   CT_LAST_DEAD    the connection has ended; packets no longer count to it.
 *   CT_LAST_OUTBOX  its DESTROY is made: the entry is in the dying outbox.
 *   CT_LAST_BUSY    one CPU owns the outbox entry for a moment (an ack
 *                   deleting it, a retry re-emitting it, a new connection
 *                   moving it out of its tuple's way); the others keep off.
 * The low bits keep the time of the last packet, the DESTROY's flowEnd. */
#define CT_LAST_DEAD   (1ULL << 63)
#define CT_LAST_OUTBOX (1ULL << 62)
#define CT_LAST_BUSY   (1ULL << 61)
#define CT_LAST_FLAGS  (CT_LAST_DEAD | CT_LAST_OUTBOX | CT_LAST_BUSY)

/* Expiry index granularity: one slot is 2^30 ns (about 1.07 s). */
#define CT_SLOT_SHIFT 30

/* ct_entry.sched, high half. Bits 56-63: the missed mask (CT_MISSED_*).
 * Live entry: bits 32-55 the slot of the last periodic UPDATE (24 bits,
 * compared modulo 2^24). In the outbox: bits 48-55 the end reason, bits 32-47
 * the retries so far. */
#define CT_SCHED_MISSED_SHIFT 56
#define CT_SCHED_MISSED_MASK  (0xffULL << CT_SCHED_MISSED_SHIFT)
#define CT_SCHED_REPORT_MASK  0xffffffU  /* of the high half */
#define CT_SCHED_REASON_SHIFT 48
#define CT_SCHED_RETRY_MASK   0xffffULL  /* of the high half */

/* IPv4 connection key, original direction. 16 bytes. */
struct ct_key4 {
	__u32 saddr;  /* network byte order */
	__u32 daddr;
	__u16 sport;  /* network byte order; ICMP: echo id */
	__u16 dport;
	__u8  proto;
	__u8  dying;  /* 0, or CT_KEY_DYING | generation: the outbox copy */
	__u16 vlan;   /* 802.1Q VLAN id of the outer tag, 0 if untagged */
};

/* IPv6 connection key, original direction. 40 bytes. */
struct ct_key6 {
	__u8  saddr[16];
	__u8  daddr[16];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  dying;
	__u16 vlan;
};

/* A table entry. 72 bytes; the same for both families.
 *
 * Words that more than one CPU may change at once are 64 bits wide and only
 * changed with atomic instructions (BCC's LLVM has no 32-bit atomics), so
 * small fields share a word: status with seq, the index slot with the report
 * slot. last_ns doubles as the entry's life (CT_LAST_* above).
 */
struct ct_entry {
	__u64 ct_id;
	__u64 first_ns;    /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 last_ns;
	__u64 pkts[2];     /* [CT_DIR_ORIG], [CT_DIR_REPLY]; L3 packets */
	__u64 bytes[2];    /* L3 bytes: IP header and payload */
	__u64 status_seq;  /* low 32: state | flags << 8 | tcpfl_orig << 16 | tcpfl_reply << 24;
			    * high 32: next event sequence number (in the outbox:
			    * its DESTROY's seq + 1) */
	__u64 sched;       /* low 32: index slot that holds the entry;
			    * high 32: see CT_SCHED_* above */
#if CT_LAYOUT >= 3
	__u64 moved_ns;    /* layout 3: when `ctstream migrate` moved it here, 0 if made here */
#endif
};

/* The event written to the ring. 120 bytes. */
struct ct_event {
	__u8  type;        /* CT_EV_* */
	__u8  version;     /* CT_ABI_VERSION */
	__u16 len;         /* sizeof(struct ct_event) */
	__u8  family;      /* 4 or 6 */
	__u8  proto;       /* IPPROTO_* */
	__u8  state;       /* CT_S_* */
	__u8  flags;       /* CT_F_* */
	__u64 ct_id;
	__u32 seq;
	__u8  end_reason;  /* CT_END_*, DESTROY only */
	__u8  missed;      /* bit mask of event types that were missed before */
	__u8  tcp_flags_orig;
	__u8  tcp_flags_reply;
	__u64 ts_ns;       /* when the event was made, CLOCK_MONOTONIC */
	__u64 first_ns;
	__u64 last_ns;
	__u64 pkts_orig;
	__u64 pkts_reply;
	__u64 bytes_orig;
	__u64 bytes_reply;
	__u8  saddr[16];   /* IPv4: first 4 bytes, rest zero */
	__u8  daddr[16];
	__u16 sport;       /* network byte order */
	__u16 dport;
	__u16 vlan;
	__u8  dying;       /* the outbox key's dying byte: ack with it and ct_id */
	__u8  retries;     /* DESTROY: times it was emitted before (saturates) */
};

/* Run-time configuration, one element in the ct_config array map. The daemon
 * writes it; the datapath reads it on every packet. 104 bytes. */
struct ct_config {
	__u64 timeout_ns[CT_TO__MAX];
	__u64 report_interval_ns;  /* periodic UPDATE of long flows; 0 = off */
	__u32 table_limit;         /* live + outbox entries of both families together */
	__u32 flags;               /* CT_CFG_* */
	__u64 grace_ns;            /* outbox: re-emit an unacked DESTROY after
				    * uniform [grace/2, grace] */
	__u32 early_low;           /* early drop stops at this many live entries */
	__u32 ipv6_limit;          /* IPv6 live + outbox entries at most (the map's
				    * slack above it is kept for outbox copies) */
	__u32 syn_rate;            /* SYN cookies, auto: SYNs per second to one port
				    * that turn cookies on for it (0: rate never does) */
	__u8  syn_high_pct;        /* ... or table fill, percent (0: fill never does) */
	__u8  syn_wscale;          /* window scale our SYN-ACK offers (the kernel's) */
	__u16 _pad_cfg;
};

#define CT_CFG_DROP_UNTRACKED 0x1  /* drop, rather than pass, when the table is full */
/* The event mask, as flags that leave events out (0, an older daemon's
 * config, emits every event). DESTROY cannot be left out: it is what the
 * outbox guarantees. An event left out takes no seq, so none is missing. */
#define CT_CFG_QUIET_CREATE   0x2  /* no CREATE */
#define CT_CFG_QUIET_ASSURED  0x4  /* no UPDATE when a flow becomes ASSURED */
#define CT_CFG_QUIET_STATE    0x8  /* no UPDATE on a TCP state change */
/* Traffic selection (streamer/datapath/selection.py): look the flow's
 * addresses up in the slot's ct_sel4/ct_sel6 sets; without it every flow is
 * tracked and nothing is looked up. _IFACE: some interface has a set of its
 * own, so look under the packet's ifindex first. */
#define CT_CFG_SELECT         0x10
#define CT_CFG_SELECT_IFACE   0x20
/* SYN cookies (bpf/syn_cookie.h; XDP only). _ON: every SYN to a local
 * listener is answered from XDP; _AUTO: only while the SYNs to its port
 * exceed syn_rate per second or the table is above syn_high_pct. With
 * either, a bare ACK of no entry to a listener is checked as a cookie. */
#define CT_CFG_SYNCOOKIE      0x40
#define CT_CFG_SYNCOOKIE_AUTO 0x80

/* Configuration generations. ct_config holds two slots and ct_sel4/6 two
 * sets (the slot is part of their key); ct_meta.generation says which is in
 * force: slot = generation & 1. The daemon builds the next generation in
 * the other slot and switches to it with one write of ct_meta, so a packet,
 * which reads ct_meta once, sees the whole old or the whole new
 * configuration (streamer/datapath/generation.py). */
#define CT_CONFIG_SLOTS 2

/* The layout of the pinned maps: bumped when a pinned map's key, value or
 * size rule changes, so that a daemon refuses a table it would misread.
 * Layout 1 had no ct_meta (and one ct_config slot). CT_LAYOUT is the layout
 * a build makes: this source's by default; -DCT_LAYOUT=3 builds the next
 * one, which so far differs only in struct ct_entry (one more field) and in
 * its tables' pin names. It exists to exercise `ctstream migrate`, which
 * moves a live table from one layout to the other
 * (streamer/datapath/migrate.py). */
#define CT_LAYOUT_VERSION 2
#define CT_LAYOUT_NEXT    3
#ifndef CT_LAYOUT
#define CT_LAYOUT CT_LAYOUT_VERSION
#endif
#if CT_LAYOUT != CT_LAYOUT_VERSION && CT_LAYOUT != CT_LAYOUT_NEXT
#error "CT_LAYOUT must be CT_LAYOUT_VERSION or CT_LAYOUT_NEXT"
#endif

/* Verdicts of the selection sets (struct ct_sel.verdict). */
#define CT_SEL_TRACK  1
#define CT_SEL_IGNORE 2

/* The generation in force and the pinned maps' layout, one element in the
 * ct_meta array map. 16 bytes. */
struct ct_meta {
	__u64 generation;          /* its low bit is the ct_config/ct_sel slot in force */
	__u32 layout;              /* the CT_LAYOUT of the programs the maps belong to */
	__u32 frozen;              /* a layout: its programs only hold packets (migrate) */
};

/* What the programs of a frozen layout keep of a packet, per tuple as the
 * packet carries it, while `ctstream migrate` moves their table: the new
 * layout's ct_merge4/6 adds it to the moved entries. 40 bytes. */
struct ct_hold {
	__u64 pkts;
	__u64 bytes;
	__u64 first_ns;
	__u64 last_ns;
	__u64 tcp_flags;           /* the flags bytes seen, ORed */
};

/* Merge input: a header and up to CT_MERGE_BATCH keys (ct_key4 or ct_key6)
 * of ct_hold4/6; the program takes each key's hold and its reverse's. */
#define CT_MERGE_BATCH 4

struct ct_merge_hdr {
	__u32 count;    /* in: keys that follow */
	__u32 merged;   /* out: flows whose holds were added to their entry */
	__u32 created;  /* out: flows that started during the hold: entries made */
	__u32 lost;     /* out: holds that found no entry and could start none */
};

/* Selection set keys (LPM tries). prefixlen counts the bits after it: slot
 * and ifindex always in full (64), then the prefix's own. 16 and 28 bytes. */
struct ct_sel_key4 {
	__u32 prefixlen;
	__u32 slot;
	__u32 ifindex;             /* 0: the top level's set */
	__u8  addr[4];
};

struct ct_sel_key6 {
	__u32 prefixlen;
	__u32 slot;
	__u32 ifindex;
	__u8  addr[16];
};

struct ct_sel {
	__u8  verdict;             /* CT_SEL_* */
	__u8  plen;                /* the prefix's own length, to compare two matches */
	__u16 _pad;
};

/* Global state, one element in the ct_global array map. 56 bytes. */
struct ct_global {
	__u64 next_ct_id;          /* seeded by the daemon with wall-clock ns */
	__u64 entries;             /* live + outbox entries of both families */
	__u32 cursor[2];           /* sweeper: next slot to process, [0]=v4 [1]=v6 */
	__u64 dying;               /* outbox entries (part of entries) */
	__u64 early[2];            /* early drop position: slot << 32 | record */
	__u64 entries6;            /* IPv6 live + outbox entries (part of entries) */
};

/* Expiry index ("timing wheel"). Entries are filed under the slot in which
 * they are due to expire, in chunks of keys; a slot's record counts how many
 * positions were handed out and how many the sweeper has consumed. */
/* Keys per chunk: as many as keep a chunk's hash element (48-byte header,
 * 8-byte key, value, 8-byte allocator link) within a 1 KiB allocator block. */
#define CT_WHEEL4_PER_CHUNK 59
#define CT_WHEEL6_PER_CHUNK 23

struct ct_wheel_slot_key {
	__u32 slot;
	__u32 family;
};

struct ct_wheel_slot {
	__u64 n;     /* positions handed out (atomic) */
	__u64 done;  /* positions consumed by the sweeper */
};

struct ct_wheel_key {  /* one chunk map per family, so no family here */
	__u32 slot;
	__u32 chunk;
};

struct ct_wheel_chunk4 {
	__u64 filled;  /* bit i: keys[i] is written (atomic OR) */
	struct ct_key4 keys[CT_WHEEL4_PER_CHUNK];
};

struct ct_wheel_chunk6 {
	__u64 filled;
	struct ct_key6 keys[CT_WHEEL6_PER_CHUNK];
};

/* Sweeper and early-drop input: the packet handed to BPF_PROG_TEST_RUN. */
struct ct_sweep_req {
	__u8  family;   /* in: 4 or 6 */
	__u8  stalled;  /* out: stopped because room ran out */
	__u8  _pad0[2];
	__u32 budget;   /* in: index records to examine per run, at most CT_SWEEP_BATCH */
	__u32 pending;  /* out: sweeper: slots due but not yet done after this run;
			 * early drop: entries dropped by this run */
	__u32 horizon;  /* in, early drop: slots ahead of now to look at */
	__u32 room;     /* in/out: events this call may still write to the ring; each
			 * record examined may write one, and at 0 the run stops
			 * (stalled) rather than turn expiries into missed events */
	__u32 _pad1;
};

/* Ack input: a header and up to CT_ACK_BATCH records of one family. */
#define CT_ACK_BATCH 64

struct ct_ack_hdr {
	__u32 count;    /* in: records that follow */
	__u32 acked;    /* out: outbox entries removed */
};

struct ct_ack4 {
	struct ct_key4 key;  /* the DESTROY's key (dying byte from the event) */
	__u64 ct_id;         /* must match, or nothing is removed */
};

struct ct_ack6 {
	struct ct_key6 key;
	__u64 ct_id;
};

_Static_assert(sizeof(struct ct_key4) == 16, "ct_key4 size");
_Static_assert(sizeof(struct ct_key6) == 40, "ct_key6 size");
#if CT_LAYOUT == CT_LAYOUT_VERSION
_Static_assert(sizeof(struct ct_entry) == 72, "ct_entry size");
#endif
_Static_assert(sizeof(struct ct_event) == 120, "ct_event size");
_Static_assert(sizeof(struct ct_config) == 104, "ct_config size");
_Static_assert(sizeof(struct ct_global) == 56, "ct_global size");
_Static_assert(sizeof(struct ct_meta) == 16, "ct_meta size");
_Static_assert(sizeof(struct ct_sel_key4) == 16, "ct_sel_key4 size");
_Static_assert(sizeof(struct ct_sel_key6) == 28, "ct_sel_key6 size");
_Static_assert(sizeof(struct ct_sel) == 4, "ct_sel size");
_Static_assert(sizeof(struct ct_hold) == 40, "ct_hold size");
_Static_assert(sizeof(struct ct_merge_hdr) == 16, "ct_merge_hdr size");

_Static_assert(sizeof(struct ct_wheel_chunk4) == 952, "ct_wheel_chunk4 size");
_Static_assert(sizeof(struct ct_wheel_chunk6) == 928, "ct_wheel_chunk6 size");
_Static_assert(48 + 8 + sizeof(struct ct_wheel_chunk4) + 8 <= 1024, "a chunk4 element fits 1 KiB");
_Static_assert(48 + 8 + sizeof(struct ct_wheel_chunk6) + 8 <= 1024, "a chunk6 element fits 1 KiB");
_Static_assert(sizeof(struct ct_sweep_req) == 24, "ct_sweep_req size");
_Static_assert(sizeof(struct ct_ack_hdr) == 8, "ct_ack_hdr size");
_Static_assert(sizeof(struct ct_ack4) == 24, "ct_ack4 size");
_Static_assert(sizeof(struct ct_ack6) == 48, "ct_ack6 size");

#endif /* CT_ABI_H */
