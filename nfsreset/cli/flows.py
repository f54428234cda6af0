"""`nfsreset flows`: the sessions on the watched ports, and which are stale.

The body reads the kernel (a sock_diag dump, the address table and FIB) and,
when `watch` runs here, its live table; the table's layout is plain data
(flows_table) so its 80-column rule is tested without root.
"""
from __future__ import annotations

import json

from nfsreset.cli.common import JSON, NETNS, PORT, VIP, Opt, in_netns, parse_ports, parse_vip

OPTIONS = (
    VIP.but(default=(), multiple=True,
            help="Only sessions on this VIP (repeatable). Default: every local address."),
    PORT,
    NETNS,
    Opt(("-w", "--wide"), "wide", bool, False,
        help="Add the columns RECVQ, SENDQ and, while `watch` runs with BPF here, SND_NXT and RCV_NXT."),
    JSON.but(help="One JSON object: sessions and a summary per VIP (every column, whether or not --wide)."),
)


def flows(*, vip: list[str], port: list[int], netns_name: str | None, wide: bool, json_out: bool) -> int:
    """Show the sessions on the watched ports, and which are stale.

    A session is stale when its local address is not configured here (the VIP
    moved away and the socket stayed). Exit code 1 when any is stale, so a
    monitor can call it during and after a move. The table fits 80 columns
    unless addresses are long; AGE is known only while `watch` runs here.
    """
    import time
    from nfsreset.kernel import addrs, netns, sockdiag
    from nfsreset.core.plan import is_stale
    from nfsreset.daemon.livetable import read_live_table
    vips = [parse_vip(v) for v in vip]
    ports = parse_ports(port)
    with in_netns(netns_name):
        pairs = sockdiag.dump(local_ips=vips or None, local_ports=sorted(ports))
        # after the dump, and with a FIB lookup per address seen (`local` route ranges)
        local = addrs.local_ips(vips=set(vips) | {f.key.vip for f, _ in pairs})
        live = read_live_table(netns.current_inode())
    # A running `watch` for this namespace knows what a dump cannot: how old each
    # session is and its sequence numbers (from BPF). Queues come from the dump.
    tracked = {}
    if live is not None:
        for r in live.get("flows", []):
            tracked[(r["vip"], r["vport"], r["client"], r["cport"])] = r
    now = time.monotonic()
    rows = []
    for f, _ in sorted(pairs, key=lambda p: p[0].key):
        t = tracked.get((f.key.vip, f.key.vport, f.key.client, f.key.cport), {})
        first = t.get("first_seen")
        rows.append({"vip": f.key.vip, "vport": f.key.vport, "client": f.key.client, "cport": f.key.cport,
                     "state": f.state, "age_s": round(now - first, 1) if first else None,
                     "recvq": f.recvq, "sendq": f.sendq,
                     "snd_nxt": t.get("snd_nxt"), "rcv_nxt": t.get("rcv_nxt"),
                     "stale": is_stale(f, local)})
    summary: dict[str, dict] = {}
    for r in rows:
        s = summary.setdefault(r["vip"], {"sessions": 0, "stale": 0, "configured": r["vip"] in local})
        s["sessions"] += 1
        s["stale"] += r["stale"]
    for v in vips:
        summary.setdefault(v, {"sessions": 0, "stale": 0, "configured": v in local})
    source = f"watch pid {live['pid']}" if live else "sock_diag dump"
    if json_out:
        # The last move report per VIP (`watch` only: a dump cannot know it).
        moves = {v: m for v, m in (live or {}).get("moves", {}).items() if not vips or v in vips}
        print(json.dumps({"source": source, "sessions": rows, "vips": summary, "moves": moves}))
    else:
        for line in flows_table(rows, wide, seqs=bool(live is not None and live.get("bpf"))):
            print(line)
        print(f"# source: {source}")
        for v, s in sorted(summary.items()):
            where = "configured here" if s["configured"] else "NOT configured here"
            print(f"# {v}: {s['sessions']} session(s), {s['stale']} stale; {where}")
    return 1 if any(r["stale"] for r in rows) else 0


def flows_table(rows: list[dict], wide: bool, seqs: bool) -> list[str]:
    """The `flows` table, each column as wide as its widest cell. By default five
    columns: within 80 while VIP:PORT and CLIENT:PORT take at most 26 characters
    each (`[2001:db8::100]:65535` takes 21) and AGE at most 8. --wide adds the
    queues (and sequence numbers when the BPF tracker knows them): bcc's tools too
    keep extended columns behind a flag."""
    from nfsreset.core.model import format_endpoint
    cols = ["VIP", "CLIENT", "STATE", "AGE", "STALE"] + (["RECVQ", "SENDQ"] if wide else [])
    if wide and seqs:
        cols += ["SND_NXT", "RCV_NXT"]
    right = {"AGE", "RECVQ", "SENDQ", "SND_NXT", "RCV_NXT"}
    cells = []
    for r in rows:
        row = {"VIP": format_endpoint(r["vip"], r["vport"]), "CLIENT": format_endpoint(r["client"], r["cport"]),
               "STATE": r["state"], "AGE": f"{r['age_s']:.0f}s" if r["age_s"] is not None else "-",
               "STALE": "STALE" if r["stale"] else "-", "RECVQ": str(r["recvq"]), "SENDQ": str(r["sendq"]),
               "SND_NXT": "-" if r["snd_nxt"] is None else str(r["snd_nxt"]),
               "RCV_NXT": "-" if r["rcv_nxt"] is None else str(r["rcv_nxt"])}
        cells.append([row[c] for c in cols])
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return " ".join(v.rjust(w) if c in right else v.ljust(w)
                        for c, v, w in zip(cols, values, width)).rstrip()
    return [line(cols)] + [line(row) for row in cells]
