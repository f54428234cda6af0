// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * flowtrack: the TCP sockets of watched VIPs and ports, as the kernel changes them.
 *
 * Loaded by nfsreset/tracker.py through bcc. Only raw tracepoints are used:
 * this kernel has no kprobes and refuses fentry, and a raw tracepoint skips
 * building the event record that a classic tracepoint fills for every socket
 * of the host (measured: the classic sock:inet_sock_set_state alone cost ~6%
 * of a connect/close loop; see bench/bench_tracker.py). It also needs no
 * tracefs. The headers bcc compiles against may belong to another kernel, so
 * no kernel struct is dereferenced here by field name: every read goes
 * through bpf_probe_read_kernel() at an offset that Python resolved from
 * /sys/kernel/btf/vmlinux and passed as -DOFF_*.
 *
 * Filter order, cheapest first and before any per-flow map is touched:
 * protocol TCP, local port in `ports`, local address in `vips`, then (only
 * when Python switched it on) the socket's netns inode in `netns_ok`.
 */
#include <uapi/linux/ptrace.h>
#include <linux/types.h>

#if !defined(OFF_TCP_RCV_NXT) || !defined(OFF_TCP_SND_NXT) || !defined(OFF_SK_NET) || \
    !defined(OFF_NET_INUM) || !defined(OFF_SK_COOKIE) || !defined(OFF_SKB_CB) || \
    !defined(OFF_TCB_SEQ) || !defined(OFF_TCB_END_SEQ) || !defined(OFF_SK_PROTOCOL) || \
    !defined(OFF_SK_FAMILY) || !defined(OFF_INET_SPORT) || !defined(OFF_SK_DPORT) || \
    !defined(OFF_SK_RCV_SADDR) || !defined(OFF_SK_DADDR) || !defined(OFF_SK_V6_RCV_SADDR) || \
    !defined(OFF_SK_V6_DADDR)
#error "struct offsets must come from BTF: see nfsreset.tracker.bpf_offsets()"
#endif
#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef RING_PAGES
#define RING_PAGES 64
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
    u64 first_seen;     // bpf_ktime_get_ns(): CLOCK_MONOTONIC; 0 = not seen opening
    u64 last_change;
    u64 cookie;         // 0 until someone asked the kernel for it
    u64 sk;
};

struct event {
    u32 kind;
    u32 old_state;
    struct flow flow;
};

BPF_HASH(ports, u16, u8, 1024);
BPF_HASH(vips, struct addr16, u8, 1024);
BPF_HASH(netns_ok, u32, u8, 1024);
// [0]: 1 when netns_ok filters (an empty netns set means every namespace).
BPF_ARRAY(config, u32, 1);
BPF_ARRAY(lost, u64, 1);
/*
 * Keyed by the socket pointer, not by 4-tuple+netns: the pointer is what both
 * tracepoints hand us (tcp_probe has no cheap 4-tuple in raw form), a u64 key
 * hashes faster than a 40-byte one, and two sockets can never share it while
 * both live. The same 4-tuple can come back (NFS reconnects from the same
 * port), but never while the old socket exists in the same netns. Pointer
 * reuse is harmless because the entry goes on TCP_CLOSE, which every full TCP
 * socket passes before it is freed, and a socket born again (CLOSE -> x)
 * overwrites whatever was there.
 */
BPF_HASH(flows, u64, struct flow, MAX_FLOWS);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);

static __always_inline u32 sk_netns(const void *sk)
{
    const void *net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_INUM);
    return inum;
}

static __always_inline void read_seqs(const void *sk, struct flow *f)
{
    bpf_probe_read_kernel(&f->snd_nxt, sizeof(f->snd_nxt), (const char *)sk + OFF_TCP_SND_NXT);
    bpf_probe_read_kernel(&f->rcv_nxt, sizeof(f->rcv_nxt), (const char *)sk + OFF_TCP_RCV_NXT);
    if (!f->cookie)
        bpf_probe_read_kernel(&f->cookie, sizeof(f->cookie), (const char *)sk + OFF_SK_COOKIE);
}

static __always_inline void emit(u32 kind, u32 old_state, const struct flow *f)
{
    struct event *ev = events.ringbuf_reserve(sizeof(struct event));
    if (!ev) {
        // Ring full: Python reads this count and reconciles with a socket dump.
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
        return;
    }
    ev->kind = kind;
    ev->old_state = old_state;
    ev->flow = *f;
    // Default wakeup: the kernel only wakes the reader when it had caught up,
    // so a burst costs one wakeup, not one per event.
    events.ringbuf_submit(ev, 0);
}

#define READ(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

// trace_inet_sock_set_state(sk, oldstate, newstate): fires for every inet
// socket of every namespace, v4 and v6, on each state change.
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1], newstate = (int)ctx->args[2];
    u16 protocol = 0, lport = 0, rport = 0, family = 0;
    READ(protocol, sk, OFF_SK_PROTOCOL);
    if (protocol != FT_IPPROTO_TCP)
        return 0;
    // Listeners are not flows; SYN_RECV children are not worth a map entry
    // until the handshake completes (a SYN flood must not fill `flows`).
    if (newstate == FT_TCP_LISTEN || oldstate == FT_TCP_LISTEN ||
        newstate == FT_TCP_SYN_RECV || newstate == FT_TCP_NEW_SYN_RECV)
        return 0;
    // inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) releases the port
    // (inet_put_port zeroes skc_num) before the tracepoint fires.
    READ(lport, sk, OFF_INET_SPORT);
    lport = __builtin_bswap16(lport);           // network order
    if (!ports.lookup(&lport))
        return 0;

    struct addr16 laddr = {}, raddr = {};
    READ(family, sk, OFF_SK_FAMILY);
    if (family == FT_AF_INET) {
        laddr.a[10] = 0xff; laddr.a[11] = 0xff;
        raddr.a[10] = 0xff; raddr.a[11] = 0xff;
        bpf_probe_read_kernel(&laddr.a[12], 4, (const char *)sk + OFF_SK_RCV_SADDR);
        bpf_probe_read_kernel(&raddr.a[12], 4, (const char *)sk + OFF_SK_DADDR);
    } else if (family == FT_AF_INET6) {
        READ(laddr, sk, OFF_SK_V6_RCV_SADDR);   // dual-stack v4: already v4-mapped
        READ(raddr, sk, OFF_SK_V6_DADDR);
    } else {
        return 0;
    }
    if (!vips.lookup(&laddr))
        return 0;
    READ(rport, sk, OFF_SK_DPORT);
    rport = __builtin_bswap16(rport);           // skc_dport: network order

    u32 netns = sk_netns(sk);
    u32 zero = 0;
    u32 *filter_netns = config.lookup(&zero);
    if (filter_netns && *filter_netns && !netns_ok.lookup(&netns))
        return 0;

    u64 key = (u64)sk;
    u64 now = bpf_ktime_get_ns();
    struct flow *known = flows.lookup(&key);

    if (newstate == FT_TCP_CLOSE) {
        struct flow f = {};
        if (known) {
            f = *known;
        } else {
            // Never seen opening (the tracker started later): still worth a
            // close event. A child that died in SYN_RECV is not.
            if (oldstate == FT_TCP_SYN_RECV)
                return 0;
            f.laddr = laddr; f.raddr = raddr; f.lport = lport; f.rport = rport;
            f.netns = netns; f.family = family; f.sk = key;
        }
        f.state = newstate;
        f.last_change = now;
        read_seqs(sk, &f);
        emit(EV_CLOSE, oldstate, &f);
        if (known)
            flows.delete(&key);
        return 0;
    }

    if (known && oldstate != FT_TCP_CLOSE) {
        known->state = newstate;
        known->last_change = now;
        read_seqs(sk, known);
        emit(EV_STATE, oldstate, known);
        return 0;
    }

    // First sight: a new connection (SYN_RECV -> ESTABLISHED, CLOSE -> SYN_SENT)
    // or one that existed before the tracker and changes state now.
    struct flow f = {};
    f.laddr = laddr; f.raddr = raddr; f.lport = lport; f.rport = rport;
    f.netns = netns; f.state = newstate; f.family = family; f.sk = key;
    f.first_seen = now;
    f.last_change = now;
    read_seqs(sk, &f);
    if (flows.update(&key, &f) != 0) {
        // Table full: the flow is reported but not kept; count it with the
        // lost events, since the remedy (reconcile with a dump) is the same.
        u64 *n = lost.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    emit(EV_OPEN, oldstate, &f);
    return 0;
}

/*
 * tcp_probe fires at the top of tcp_rcv_established(), for every segment an
 * ESTABLISHED socket receives, before the segment is processed. A raw
 * tracepoint skips building the event record (which would also generate a
 * socket cookie per segment); unwatched sockets cost one hash lookup.
 * rcv_nxt read here does not yet include this segment; an in-order segment
 * will move it to the segment's end_seq (data + FIN), so that is stored: a
 * segment the stack then drops (zero window, memory pressure) leaves rcv_nxt
 * a few bytes ahead until the next segment or state change corrects it.
 */
RAW_TRACEPOINT_PROBE(tcp_probe)
{
    u64 key = ctx->args[0];
    struct flow *f = flows.lookup(&key);
    if (!f)
        return 0;
    const void *sk = (const void *)ctx->args[0];
    const char *skb = (const char *)ctx->args[1];
    u32 seq = 0, end_seq = 0;
    read_seqs(sk, f);
    bpf_probe_read_kernel(&seq, sizeof(seq), skb + OFF_SKB_CB + OFF_TCB_SEQ);
    bpf_probe_read_kernel(&end_seq, sizeof(end_seq), skb + OFF_SKB_CB + OFF_TCB_END_SEQ);
    if (seq == f->rcv_nxt)
        f->rcv_nxt = end_seq;
    return 0;
}
