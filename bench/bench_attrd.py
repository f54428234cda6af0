#!/usr/bin/env python3
"""Benchmark: a VIP's client list through Pacemaker's attribute daemon (nfsreset.state.store).

Run as root from the checkout:
    .venv/bin/python bench/bench_attrd.py [--sizes 10 1000 10000] [--repeat 5] [--family 4|6] [--json]

Part 1, in-process (no root): for N client tuples (documentation addresses,
about 20 sessions per client address, NFS-like ports), the size of the
encodings and the time to encode + decode (decode includes every record's
validation, as `tickle` does it):
    json   the state file's JSON (statedir.write_clients's document): the baseline
    text   sorted "vport client cport" lines, uncompressed, base64
    g1     nfsreset.state.store.encode: the same lines, gzip -9, base64 (the chosen one)

Part 2, with --lab (root, corosync + pacemaker installed): a real two-node
cluster (nfsreset.lab.cluster, one node per head namespace, ~8 s cold start).
Per N, median of --repeat:
    publish   `attrd_updater -p -n nfsreset-clients-VIP -U VALUE` on node1 (exec to exit)
    visible   from before that publish to node2's `attrd_updater -Q -N node1` returning
              the new value (polled back to back): publish-to-visible-on-peer
    read      `attrd_updater -Q -A -n ...` on node2 plus decode (what post-start does)
    baseline  the same publish with a 3-byte value, same run
and the ratios against the baseline. Finally node1 is killed (SIGKILL to its
PID 1, as `nfsreset lab --crash`) and node2 is asked for node1's value: does a
crashed node's list survive on its peer?

Everything the cluster creates dies with its namespaces; the lab's cleanup runs
on any exit.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfsreset.core.model import FlowKey  # noqa: E402
from nfsreset.state.store import attr_name, decode, encode  # noqa: E402


def clients(n: int, family: int) -> list[FlowKey]:
    vip = "198.51.100.10" if family == 4 else "2001:db8::10"
    out = []
    hosts = max(1, min(454, n // 20))      # ~20 sessions per client address, 454 v4 addresses at most
    for i in range(n):
        host = i % hosts
        if family == 4:
            client = f"203.0.113.{1 + host}" if host < 254 else f"198.51.100.{20 + host - 254}"
        else:
            client = f"2001:db8:1::{host + 1:x}"
        out.append(FlowKey(vip, 2049, client, 1024 + (i // hosts) * 7))
    return out


def median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def encodings(sizes, family, repeat) -> list[dict]:
    rows = []
    for n in sizes:
        keys = clients(n, family)
        vip = keys[0].vip
        js = json.dumps({"format": 1, "vip": vip, "written": 0, "node": "node1",
                         "clients": [[k.vport, k.client, k.cport] for k in sorted(keys)]},
                        separators=(",", ":"))
        text = base64.b64encode("".join(f"{k.vport} {k.client} {k.cport}\n" for k in sorted(keys)).encode())
        value, kept = encode(keys)
        t_enc = median_time(lambda: encode(keys), repeat)
        t_dec = median_time(lambda: decode(value, vip, "bench", print), repeat)
        assert len(set(decode(value, vip, "bench", print))) == kept
        rows.append({"n": n, "kept": kept, "json_bytes": len(js), "text_b64_bytes": len(text), "g1_bytes": len(value),
                     "g1_over_json": round(len(value) / len(js), 3), "encode_ms": round(t_enc * 1e3, 2),
                     "decode_ms": round(t_dec * 1e3, 2)})
    return rows


def lab(sizes, family, repeat) -> dict:
    from nfsreset.lab.cluster import Cluster, primitive_xml
    from nfsreset.lab.topology import Topology
    out: dict = {"rows": []}
    vip = "198.51.100.10" if family == 4 else "2001:db8::10"
    name = attr_name(vip)
    with Topology.create("attrdb") as topo:
        wd = tempfile.mkdtemp(prefix="nfsr-bench-attrd-")
        c = Cluster(topo, wd, primitive_xml(vip, "ipaddr2", {}))
        try:
            c.start()
            c.wait_online("node1", {"node1", "node2"}, 45)
            c.wait_online("node2", {"node1", "node2"}, 45)

            def timed(node, *argv):
                t0 = time.perf_counter()
                res = c.tool(node, *argv)
                return time.perf_counter() - t0, res.stdout

            base = statistics.median(timed("node1", "attrd_updater", "-p", "-n", "nfsreset-bench", "-U", f"b{i}")[0]
                                     for i in range(repeat))
            out["baseline_publish_ms"] = round(base * 1e3, 1)
            for n in sizes:
                pub, vis, rd = [], [], []
                for r in range(repeat):
                    keys = clients(n, family)
                    keys[-1] = FlowKey(vip, 2049, keys[-1].client, 40700 + r)   # a new value every round
                    value, _ = encode(keys)
                    t0 = time.perf_counter()
                    pub.append(timed("node1", "attrd_updater", "-p", "-n", name, "-U", value)[0])
                    deadline = time.perf_counter() + 5
                    while time.perf_counter() < deadline:
                        got = c.tool("node2", "attrd_updater", "-Q", "-N", "node1", "-n", name, check=False)
                        if f'value="{value}"' in got.stdout:
                            vis.append(time.perf_counter() - t0)
                            break
                    t1 = time.perf_counter()
                    _, text = timed("node2", "attrd_updater", "-Q", "-A", "-n", name)
                    from nfsreset.state.store import parse_query
                    got_keys = decode(parse_query(text, name)["node1"], vip, "bench", print)
                    rd.append(time.perf_counter() - t1)
                    assert len(got_keys) == n
                med = {k: statistics.median(v) for k, v in (("publish", pub), ("visible", vis), ("read", rd))}
                out["rows"].append({"n": n, "value_chars": len(value),
                                    **{f"{k}_ms": round(v * 1e3, 1) for k, v in med.items()},
                                    "publish_over_baseline": round(med["publish"] / base, 2),
                                    "visible_seen": f"{len(vis)}/{repeat}"})
            c.kill_node("node1")
            time.sleep(3)
            got = c.tool("node2", "attrd_updater", "-Q", "-N", "node1", "-n", name, check=False)
            out["after_crash_node2_sees_node1"] = 'value="g1:' in got.stdout
            out["after_crash_query"] = " ".join((got.stdout + got.stderr).split())[:120]
        finally:
            c.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--lab", action="store_true", help="also measure attrd in a real two-node cluster (root)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    doc = {"family": a.family, "encodings": encodings(a.sizes, a.family, a.repeat)}
    if a.lab:
        doc["attrd"] = lab(a.sizes, a.family, a.repeat)
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"IPv{a.family}  encodings (bytes; g1 = gzip+base64, the chosen one; ms = median of {a.repeat})")
    print(f"{'N':>7} {'json':>9} {'text+b64':>9} {'g1':>8} {'g1/json':>8} {'enc ms':>7} {'dec ms':>7} {'kept':>7}")
    for r in doc["encodings"]:
        print(f"{r['n']:>7} {r['json_bytes']:>9} {r['text_b64_bytes']:>9} {r['g1_bytes']:>8} "
              f"{r['g1_over_json']:>8} {r['encode_ms']:>7} {r['decode_ms']:>7} {r['kept']:>7}")
    if a.lab:
        at = doc["attrd"]
        print(f"\nattrd in a two-node cluster (ms, median of {a.repeat}); baseline = publish of a 3-byte value: "
              f"{at['baseline_publish_ms']} ms")
        print(f"{'N':>7} {'value':>8} {'publish':>8} {'x base':>7} {'visible@peer':>13} {'read+decode':>12}")
        for r in at["rows"]:
            print(f"{r['n']:>7} {r['value_chars']:>8} {r['publish_ms']:>8} {r['publish_over_baseline']:>7} "
                  f"{r['visible_ms']:>13} {r['read_ms']:>12}  ({r['visible_seen']} seen)")
        print(f"\nafter node1 was killed, node2 still has node1's value: {at['after_crash_node2_sees_node1']} "
              f"({at['after_crash_query']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
