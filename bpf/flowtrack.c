// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * flowtrack: the TCP sockets of watched VIPs and ports, as the kernel changes them.
 *
 * Loaded by nfsreset/flows/tracker.py through bcc. Only raw tracepoints are used:
 * this kernel has no kprobes and refuses fentry, and a raw tracepoint skips
 * building the event record that a classic tracepoint fills for every socket
 * of the host (measured: the classic sock:inet_sock_set_state alone cost ~6%
 * of a connect/close loop; see bench/bench_tracker.py). It also needs no
 * tracefs. The headers bcc compiles against may belong to another kernel, so
 * no kernel struct is dereferenced here by field name: every read goes
 * through bpf_probe_read_kernel() at an offset that Python resolved from
 * /sys/kernel/btf/vmlinux and passed as -DOFF_*. Members that lie close
 * together are read as one window (-D*_LO, *_LEN): each probe read costs
 * ~15 ns whatever its size, and this runs for every TCP state change.
 *
 * Filter order, cheapest first: new state (from the arguments), local port
 * in `ports` (an array indexed by port: no hashing), then a flow already
 * followed is updated at once; only a socket seen for the first time is
 * checked against protocol, `vips` and (when Python switched it on) its
 * netns inode in `netns_ok`.
 *
 * What reaches the ring (see tracker.py for the reader): open and close of
 * every flow, and a flow's state changes once it is CFG_STATE_AGE old. A
 * connection that opens and closes within microseconds costs two records.
 */
#include <uapi/linux/ptrace.h>
#include <linux/types.h>

#if !defined(OFF_TCP_RCV_NXT) || !defined(OFF_TCP_SND_NXT) || !defined(OFF_SK_NET) || \
    !defined(OFF_NET_INUM) || !defined(OFF_SK_COOKIE) || !defined(OFF_SKB_CB) || \
    !defined(OFF_TCB_SEQ) || !defined(OFF_TCB_END_SEQ) || !defined(OFF_SK_PROTOCOL) || \
    !defined(OFF_SK_FAMILY) || !defined(OFF_INET_SPORT) || !defined(OFF_SK_DPORT) || \
    !defined(OFF_SK_RCV_SADDR) || !defined(OFF_SK_DADDR) || !defined(OFF_SK_V6_RCV_SADDR) || \
    !defined(OFF_SK_V6_DADDR) || !defined(COMMON_LO) || !defined(COMMON_LEN) || \
    !defined(SEQS_LO) || !defined(SEQS_LEN) || !defined(TCB_LO) || !defined(TCB_LEN)
#error "struct offsets must come from BTF: see nfsreset.flows.program.bpf_offsets()"
#endif
#ifndef SLOT_BITS
#define SLOT_BITS 16
#endif
#define NSLOTS (1 << SLOT_BITS)
#ifndef SPILL_FLOWS
#define SPILL_FLOWS (NSLOTS / 2)
#endif
#ifndef RING_PAGES
#define RING_PAGES 256
#endif
#ifndef WAKE_GAP_NS
#define WAKE_GAP_NS 10000000ULL
#endif
#ifndef WAKE_BYTES
#define WAKE_BYTES (RING_PAGES * 4096 / 4)
#endif

#define FT_AF_INET 2
#define FT_AF_INET6 10
#define FT_IPPROTO_TCP 6
#define FT_TCP_ESTABLISHED 1
#define FT_TCP_SYN_RECV 3
#define FT_TCP_CLOSE 7
#define FT_TCP_LISTEN 10
#define FT_TCP_NEW_SYN_RECV 12

#define EV_OPEN 1
#define EV_STATE 2
#define EV_CLOSE 3

// Every address is kept as 16 bytes; IPv4 as v4-mapped (::ffff:a.b.c.d), which
// is also what a dual-stack socket reports, so one v4 VIP key matches both.
struct addr16 {
    u8 a[16];
};

struct flow {
    struct addr16 laddr;
    struct addr16 raddr;
    u16 lport;          // host order
    u16 rport;
    u32 netns;          // net->ns.inum
    u32 state;
    u32 snd_nxt;
    u32 rcv_nxt;
    u32 family;         // AF_INET / AF_INET6 as the socket has it
    u64 first_seen;     // bpf_ktime_get_ns(): CLOCK_MONOTONIC; 0 = a close is all we saw
    u64 last_change;
    u64 cookie;         // as at first sight: 0 until someone asked the kernel for it
    u64 sk;
};

struct event {
    u32 kind;
    u32 old_state;
    struct flow flow;
};

struct wake {
    u64 last_ns;        // when the reader was last woken
    u64 bytes;          // submitted since then
};

// Indexed by port: an array lookup is inlined by the verifier, a hash lookup
// hashes; this test runs for every TCP state change of the host.
// 1: watched; 2: no longer watched, but flows followed are followed to their close.
BPF_ARRAY(ports, u8, 65536);
BPF_HASH(vips, struct addr16, u8, 1024);
BPF_HASH(netns_ok, u32, u8, 1024);
// [CFG_NETNS]: 1 when netns_ok filters (an empty netns set means every namespace).
// [CFG_SPILLED]: entries in `flows` (kept by the program): while it is 0, a
// socket not in its slot is not looked up there. tcp_probe looks up every
// segment an ESTABLISHED socket of the host receives.
#define CFG_NETNS 0
#define CFG_SPILLED 1
BPF_ARRAY(config, u64, 2);
/*
 * State changes of a flow younger than age_j jiffies are kept in the table
 * only, not sent (see the tracepoint below). Young or not is decided in
 * jiffies because bpf_ktime_get_ns() costs ~37 ns here (two of them were
 * ~75 ns of a churned connection's ~0.5 us) and reading jiffies ~2 ns, while
 * bpf_ktime_get_coarse_ns() is refused to tracing programs. A flow's birth
 * (first_seen, ns) is put on the jiffies scale with a pair of readings of
 * both clocks that Python takes through clock_pair() below: t0 (ns) was j0
 * (jiffies), one tick is tick_ns. Python also sets age_j so that the real
 * age at the switch stays under FlowTracker.STATE_AGE_S despite the tick
 * granularity. age_j = 0 (not calibrated): every change is sent.
 */
struct clock {
    u64 age_j;
    u64 t0;
    u64 j0;
    u64 tick_ns;
};
BPF_ARRAY(clock, struct clock, 1);
/* One reading of jiffies, between two of the monotonic clock (clock_pair). */
struct clock_sample {
    u64 before;
    u64 jiffies;
    u64 after;
};
BPF_ARRAY(clock_sample, struct clock_sample, 1);
BPF_ARRAY(lost, u64, 1);
BPF_ARRAY(wake, struct wake, 1);
/*
 * The flow table, keyed by the socket pointer, not by 4-tuple+netns: the
 * pointer is what both tracepoints hand us (tcp_probe has no cheap 4-tuple in
 * raw form), and two sockets can never share it while both live. The same
 * 4-tuple can come back (NFS reconnects from the same port), but never while
 * the old socket exists in the same netns. Pointer reuse is harmless because
 * the entry goes on TCP_CLOSE, which every full TCP socket passes before it
 * is freed, and a socket born again overwrites whatever was there.
 *
 * Two parts. `slots` is an array indexed by a hash of the pointer: a socket
 * claims its slot with one compare-and-swap of `sk` and frees it by storing
 * 0, so the insert, look-ups and delete of a connection cost a few loads and
 * stores. A BPF hash map did the same with bucket locks and a per-CPU free
 * list: ~100 ns per insert+delete and ~15 ns per look-up, measured, ~0.11 us
 * of the ~0.5 us a watched connection cost under churn. A socket whose slot
 * is held by another one goes to `flows`, that hash map, kept for collisions
 * (rare while the table is sparse). `slots` is mmapable: Python reads it in
 * place (tracker.py). A slot is only ever written by the program run that
 * holds the socket's lock (state changes and tcp_probe of one socket are
 * serialised by it), so the only race is the claim, which the CAS settles.
 */
BPF_F_TABLE("array", u32, struct flow, slots, NSLOTS, BPF_F_MMAPABLE);
BPF_HASH(flows, u64, struct flow, SPILL_FLOWS);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);

// Fibonacci hashing of the pointer (sockets are cache-line aligned: the low
// bits say nothing). tracker.py computes the same index.
static __always_inline u32 slot_index(u64 sk)
{
    return (u32)(((sk >> 6) * 0x9E3779B97F4A7C15ULL) >> (64 - SLOT_BITS));
}

static __always_inline struct flow *find(u64 sk)
{
    u32 i = slot_index(sk);
    struct flow *f = slots.lookup(&i);
    if (f && f->sk == sk)
        return f;
    i = CFG_SPILLED;
    u64 *spilled = config.lookup(&i);
    if (spilled && !*spilled)
        return 0;
    return flows.lookup(&sk);
}

static __always_inline void count_spilled(s64 n)
{
    u32 i = CFG_SPILLED;
    u64 *spilled = config.lookup(&i);
    if (spilled)
        __sync_fetch_and_add(spilled, n);
}

static __always_inline void forget(u64 sk, struct flow *f)
{
    if (f->sk == sk) {
        u32 i = slot_index(sk);
        if (slots.lookup(&i) == f) {
            f->sk = 0;      // frees the slot: the entry's last store
            return;
        }
    }
    if (flows.delete(&sk) == 0)
        count_spilled(-1);
}

// 0 when kept; a socket born again at its old address (a close we missed)
// takes its own slot back.
#define SLOT_BUSY 1ULL    // no socket lives at address 1
static __always_inline int keep(u64 sk, const struct flow *f)
{
    u32 i = slot_index(sk);
    struct flow *slot = slots.lookup(&i);
    if (slot && (slot->sk == sk || __sync_val_compare_and_swap(&slot->sk, 0, SLOT_BUSY) == 0)) {
        // Claimed as busy, filled, then named: a reader that sees the
        // pointer sees the rest (x86 keeps stores in order). A stale entry
        // of this very socket in `flows` (a close we missed) stays shadowed.
        __builtin_memcpy(slot, f, sizeof(*f) - sizeof(f->sk));
        slot->sk = sk;
        return 0;
    }
    if (flows.insert(&sk, f) == 0) {
        count_spilled(1);
        return 0;
    }
    return flows.update(&sk, f);    // this very socket, still there from before
}

struct common_window { u8 b[COMMON_LEN]; };     // of struct sock, from COMMON_LO
#define COMMON(dst, w, off) __builtin_memcpy(&(dst), &(w).b[(off) - COMMON_LO], sizeof(dst))

// snd_nxt and rcv_nxt (adjacent in tcp_sock on 6.18), in one read.
static __always_inline void read_seqs(const void *sk, struct flow *f)
{
    struct { u8 b[SEQS_LEN]; } w;
    bpf_probe_read_kernel(&w, sizeof(w), (const char *)sk + SEQS_LO);
    __builtin_memcpy(&f->snd_nxt, &w.b[OFF_TCP_SND_NXT - SEQS_LO], sizeof(f->snd_nxt));
    __builtin_memcpy(&f->rcv_nxt, &w.b[OFF_TCP_RCV_NXT - SEQS_LO], sizeof(f->rcv_nxt));
}

static __always_inline void count_lost(void)
{
    u32 zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/*
 * When to wake the reader. The kernel's default wakes it for every record
 * submitted while it had caught up, and a reader that keeps up under churn is
 * always caught up: a wakeup (an IPI and a context switch, dearer still in a
 * VM) per event. Here the reader is woken by the first record after
 * WAKE_GAP_NS without a wakeup (a lone event is delivered at once) and
 * whenever WAKE_BYTES were submitted since the last one (the ring never
 * fills for want of a wakeup); every other record waits for the reader's
 * next look, which it takes within WAKE_GAP_NS of any wakeup (tracker.py).
 * The two counters are racy across CPUs on purpose: a lost update costs at
 * most one wakeup too many or too few, never a record.
 */
static __always_inline u64 wake_flags(u64 now)
{
#if WAKE_BYTES == 0
    return 0;           // kernel default (for comparison in benchmarks)
#else
    u32 zero = 0;
    struct wake *w = wake.lookup(&zero);
    if (!w)
        return 0;
    w->bytes += sizeof(struct event) + 8;
    if (now - w->last_ns >= WAKE_GAP_NS || w->bytes >= WAKE_BYTES) {
        w->last_ns = now;
        w->bytes = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
#endif
}

static __always_inline struct event *reserve(void)
{
    struct event *ev = events.ringbuf_reserve(sizeof(struct event));
    if (!ev) {
        // Seen on 6.18 a few times per 10^5 records, with the ring empty,
        // when two CPUs submit at once; a second try often succeeds.
        ev = events.ringbuf_reserve(sizeof(struct event));
    }
    if (!ev) {
        // Ring full: Python reads this count and reconciles with a socket dump.
        count_lost();
    }
    return ev;
}

static __always_inline void emit(u32 kind, u32 old_state, const struct flow *f, u64 now)
{
    struct event *ev = reserve();
    if (!ev)
        return;
    ev->kind = kind;
    ev->old_state = old_state;
    ev->flow = *f;
    events.ringbuf_submit(ev, wake_flags(now));
}

/*
 * Not attached: tracker.py runs it with BPF_PROG_TEST_RUN to read the
 * kernel's jiffies and monotonic clock together (user space sees no jiffies).
 * The clock is read on both sides: a test run can be preempted or interrupted
 * between two helper calls, and a reading that took long dates nothing.
 */
int clock_pair(void *ctx)
{
    u32 i = 0;
    struct clock_sample *s = clock_sample.lookup(&i);
    if (s) {
        s->before = bpf_ktime_get_ns();
        s->jiffies = bpf_jiffies64();
        s->after = bpf_ktime_get_ns();
    }
    return 0;
}

// Is `f` younger than age_j? Sets *now to the jiffies time in ns (for
// last_change of a change that is not sent: to the tick, never before birth).
static __always_inline int young(const struct flow *f, u64 *now)
{
    u32 zero = 0;
    struct clock *c = clock.lookup(&zero);
    if (!c || !c->age_j || !c->tick_ns)
        return 0;
    u64 now_j = bpf_jiffies64();
    u64 born_j = c->j0 + (f->first_seen - c->t0) / c->tick_ns;
    if (now_j - born_j >= c->age_j)     // also a flow born before t0: wraps to huge
        return 0;
    u64 t = c->t0 + (now_j - c->j0) * c->tick_ns;
    *now = t > f->first_seen ? t : f->first_seen;
    return 1;
}

#define READ(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

// trace_inet_sock_set_state(sk, oldstate, newstate): fires for every inet
// socket of every namespace, v4 and v6, on each state change.
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1], newstate = (int)ctx->args[2];
    // Listeners are not flows; SYN_RECV children are not worth a map entry
    // until the handshake completes (a SYN flood must not fill `flows`).
    if (newstate == FT_TCP_LISTEN || oldstate == FT_TCP_LISTEN ||
        newstate == FT_TCP_SYN_RECV || newstate == FT_TCP_NEW_SYN_RECV)
        return 0;
    // inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) releases the port
    // (inet_put_port zeroes skc_num) before the tracepoint fires.
    u16 lport = 0;
    READ(lport, sk, OFF_INET_SPORT);
    u32 port = __builtin_bswap16(lport);        // network order
    u8 *watched = ports.lookup(&port);
    if (!watched || !*watched)
        return 0;

    u64 key = (u64)sk;
    u64 now;
    struct flow *known = find(key);
    // CLOSE -> x and SYN_RECV -> x are births: an entry found then belongs to
    // a socket that lived at this address before (a close we missed).
    if (known && (oldstate == FT_TCP_CLOSE || oldstate == FT_TCP_SYN_RECV)) {
        forget(key, known);
        known = 0;
    }
    // A flow we follow was checked against every filter when it was first
    // seen: its addresses are not read again.
    if (known) {
        known->state = newstate;
        if (newstate == FT_TCP_CLOSE) {
            // The close of a young flow (churn) is stamped to the tick.
            if (!young(known, &now))
                now = bpf_ktime_get_ns();
            known->last_change = now;
            // No sequence numbers: a closed flow's are of no use to anyone.
            struct event *ev = reserve();
            if (ev) {
                ev->kind = EV_CLOSE;
                ev->old_state = oldstate;
                ev->flow = *known;
                events.ringbuf_submit(ev, wake_flags(now));
            }
            forget(key, known);
            return 0;
        }
        /*
         * Under churn a connection walks ESTABLISHED -> CLOSE_WAIT -> LAST_ACK
         * within microseconds: two records per connection that the reader
         * would decode only to drop them. A young flow's change stays in the
         * table; the reader looks each flow it reported open up once it is
         * STATE_AGE_S old (tracker.py), so the change still reaches it.
         * Sequence numbers only for a change that is sent: a young flow's are
         * read again when it receives (tcp_probe) or changes later.
         */
        if (young(known, &now)) {
            known->last_change = now;
            return 0;
        }
        now = bpf_ktime_get_ns();
        known->last_change = now;
        read_seqs(sk, known);
        emit(EV_STATE, oldstate, known, now);
        return 0;
    }

    if (*watched != 1)  // a port no longer watched: its flows only, no new ones
        return 0;
    now = bpf_ktime_get_ns();
    u16 protocol = 0;
    READ(protocol, sk, OFF_SK_PROTOCOL);
    if (protocol != FT_IPPROTO_TCP)
        return 0;
    struct common_window w;
    bpf_probe_read_kernel(&w, sizeof(w), (const char *)sk + COMMON_LO);
    u16 family = 0, rport = 0;
    COMMON(family, w, OFF_SK_FAMILY);
    struct addr16 laddr = {}, raddr = {};
    if (family == FT_AF_INET) {
        laddr.a[10] = 0xff; laddr.a[11] = 0xff;
        raddr.a[10] = 0xff; raddr.a[11] = 0xff;
        __builtin_memcpy(&laddr.a[12], &w.b[OFF_SK_RCV_SADDR - COMMON_LO], 4);
        __builtin_memcpy(&raddr.a[12], &w.b[OFF_SK_DADDR - COMMON_LO], 4);
    } else if (family == FT_AF_INET6) {
        COMMON(laddr, w, OFF_SK_V6_RCV_SADDR);  // dual-stack v4: already v4-mapped
        COMMON(raddr, w, OFF_SK_V6_DADDR);
    } else {
        return 0;
    }
    if (!vips.lookup(&laddr))
        return 0;
    COMMON(rport, w, OFF_SK_DPORT);
    rport = __builtin_bswap16(rport);           // skc_dport: network order

    const void *net = 0;
    u32 netns = 0;
    COMMON(net, w, OFF_SK_NET);
    if (net)
        READ(netns, net, OFF_NET_INUM);
    u32 idx = CFG_NETNS;
    u64 *filter_netns = config.lookup(&idx);
    if (filter_netns && *filter_netns && !netns_ok.lookup(&netns))
        return 0;

    struct flow f = {};
    f.laddr = laddr; f.raddr = raddr; f.lport = port; f.rport = rport;
    f.netns = netns; f.state = newstate; f.family = family; f.sk = key;
    f.last_change = now;
    COMMON(f.cookie, w, OFF_SK_COOKIE);
    read_seqs(sk, &f);
    if (newstate == FT_TCP_CLOSE) {
        // Never seen opening (the tracker started later): still worth a
        // close event. A child that died in SYN_RECV is not.
        if (oldstate == FT_TCP_SYN_RECV)
            return 0;
        emit(EV_CLOSE, oldstate, &f, now);
        return 0;
    }

    // First sight: a new connection (SYN_RECV -> ESTABLISHED, CLOSE -> SYN_SENT)
    // or one that existed before the tracker and changes state now.
    f.first_seen = now;
    if (keep(key, &f) != 0) {
        // Table full: the flow is reported but not kept; count it with the
        // lost events, since the remedy (reconcile with a dump) is the same.
        count_lost();
    }
    emit(EV_OPEN, oldstate, &f, now);
    return 0;
}

/*
 * tcp_probe fires at the top of tcp_rcv_established(), for every segment an
 * ESTABLISHED socket receives, before the segment is processed. A raw
 * tracepoint skips building the event record (which would also generate a
 * socket cookie per segment). An unwatched socket costs find(): its slot and
 * the spill count, two array look-ups; the `flows` hash only while it holds any.
 * rcv_nxt read here does not yet include this segment; an in-order segment
 * will move it to the segment's end_seq (data + FIN), so that is stored: a
 * segment the stack then drops (zero window, memory pressure) leaves rcv_nxt
 * a few bytes ahead until the next segment or state change corrects it.
 */
RAW_TRACEPOINT_PROBE(tcp_probe)
{
    u64 key = ctx->args[0];
    struct flow *f = find(key);
    if (!f)
        return 0;
    const void *sk = (const void *)ctx->args[0];
    const char *skb = (const char *)ctx->args[1];
    struct { u8 b[TCB_LEN]; } w;                // seq and end_seq of tcp_skb_cb
    u32 seq = 0, end_seq = 0;
    read_seqs(sk, f);
    bpf_probe_read_kernel(&w, sizeof(w), skb + OFF_SKB_CB + TCB_LO);
    __builtin_memcpy(&seq, &w.b[OFF_TCB_SEQ - TCB_LO], sizeof(seq));
    __builtin_memcpy(&end_seq, &w.b[OFF_TCB_END_SEQ - TCB_LO], sizeof(end_seq));
    if (seq == f->rcv_nxt)
        f->rcv_nxt = end_seq;
    return 0;
}
