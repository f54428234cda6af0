#!/usr/bin/env python3
"""Benchmark: from exec of `nfsreset kill` / `nfsreset tickle` to its first action.

Run as root from the checkout:
    .venv/bin/python bench/bench_hook_latency.py [--runs 10] [--family 4|6] [--conns 4] [--json]
        [--nfsreset PATH ...]

The hooks are exec'd by IPaddr2/Pacemaker at the worst moment of a failover;
the goal is their first destroy or first packet within 0.1 s of exec. This
measures it from outside, in a lab of its own (nfsreset.lab.topology:
node1 = the head the hook runs on, client; namespaces `nfsr-<pid>-...`):

- t0 = CLOCK_MONOTONIC right before Popen of the hook, launched two ways:
  `ip netns exec NODE1 .venv/bin/nfsreset ...` and
  `.venv/bin/nfsreset ... --netns NODE1` (no `ip netns exec` of its own).
- kill (--moment post-stop, a fresh VIP per run because `kill` leaves the
  VIP quarantined): `--conns` stale server sockets whose VIP was just
  deleted; this process polls a sock_diag dump inside node1 about every
  millisecond; the first action is the first of them disappearing.
  (Polling, not capture: the quarantine drops the RST an IPv6 destroy would
  send, and an IPv4 socket cannot send at all once its address is gone.)
- tickle (--rounds 1, VIP configured on node1, one --client tuple): an
  AF_PACKET socket on the client's eth0 stamps each frame with
  CLOCK_MONOTONIC when recv() returns (namespaces share the clock); the first
  action is the tickle ACK (VIP:2049 -> client tuple, ACK only). The
  VIP's announcement (gratuitous ARP / unsolicited NA), sent just before,
  is reported too.
- The floor, same run: exec-to-exit of `.venv/bin/python -c pass` (and of
  `ip netns exec NODE1 .venv/bin/python -c pass`).
- `--nfsreset PATH` (repeatable): another nfsreset command timed the same way,
  its runs interleaved with the venv's (e.g. the Debian package's
  /usr/bin/nfsreset, on Debian's python3 without a venv); rows named
  `HOW PATH`. Its floor is exec-to-exit of its interpreter (`#!` line) `-c pass`.

Reported: median (and min/max) of --runs runs, ratio to the floor. Also
`python -X importtime -c 'import nfsreset.cli.main'` (top 5 by cumulative time),
and the same for one real `nfsreset kill` run (PYTHONPROFILEIMPORTTIME),
which includes the adapters `kill` imports lazily.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from nfsreset.kernel import netns, sockdiag  # noqa: E402
from nfsreset.lab.topology import HOST_ADDRS, IFACE, Topology  # noqa: E402

VENV = os.path.join(os.path.abspath(ROOT), ".venv", "bin")
PYTHON = os.path.join(VENV, "python")
NFSRESET = os.path.join(VENV, "nfsreset")
PORT = 2049
SERVER, CLIENT = "node1", "client"
TICKLE_VIP = {4: "198.51.100.10", 6: "2001:db8::10"}
GOAL_S = 0.1
POLL_S = 0.001
ACTION_TIMEOUT_S = 5.0
PROC_TIMEOUT_S = 30.0
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
PACKET_OUTGOING = 4


def kill_vip(family: int, i: int) -> str:
    # past the client's own address (.100 / ::100), not on it
    j = 20 + i + (20 + i >= 100) if family == 4 else 0x20 + i + (0x20 + i >= 0x100)
    return f"198.51.100.{j}" if family == 4 else f"2001:db8::{j:x}"


def launch_argv(topo: Topology, how: str, *args: str, binary: str = NFSRESET) -> list[str]:
    if how == "ip-netns-exec":
        return topo.exec_argv(SERVER, binary, *args)
    return [binary, *args, "--netns", topo.ns(SERVER)]


def interpreter(binary: str) -> str:
    """The python of a console script: its #! line."""
    with open(binary, "rb") as f:
        first = f.readline(200)
    if not first.startswith(b"#!"):
        raise ValueError(f"{binary}: no #! line")
    return first[2:].split()[0].decode()


# -- floors -------------------------------------------------------------------------------
def exec_to_exit(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, timeout=PROC_TIMEOUT_S)
    return time.monotonic() - t0


# -- kill ---------------------------------------------------------------------------------
def stale_sockets(topo: Topology, vip: str, conns: int, listener: socket.socket) -> list[socket.socket]:
    """`conns` connections client -> vip:2049, then vip deleted on node1: stale server sockets."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    topo.add_addr(SERVER, vip, nodad=True)
    held: list[socket.socket] = []
    try:
        with netns.entered(topo.ns(CLIENT)):
            for _ in range(conns):
                c = socket.socket(fam, socket.SOCK_STREAM)
                held.append(c)
                c.settimeout(5)
                c.connect((vip, PORT))
        listener.settimeout(5)
        for _ in range(conns):
            held.append(listener.accept()[0])
        topo.del_addr(SERVER, vip)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def run_hook(argv: list[str], observe) -> dict:
    """Exec a hook, let observe(proc, t0) time its first action (a dict of times),
    then reap it and add its exit, wall time and the engine's own elapsed_s."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = observe(proc, t0)
        out, err = proc.communicate(timeout=PROC_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exited = time.monotonic() - t0
    engine = None
    try:
        engine = json.loads(out).get("elapsed_s")
    except (json.JSONDecodeError, AttributeError):
        pass
    return {**seen, "exit_s": exited, "exit": proc.returncode, "engine_s": engine,
            "stderr": err.decode(errors="replace").strip().splitlines()[-3:]}


def count_on(topo: Topology, vip: str) -> int:
    with netns.entered(topo.ns(SERVER)):
        return len(sockdiag.dump([vip], [PORT]))


def one_kill(topo: Topology, how: str, vip: str, conns: int, listener: socket.socket, state_dir: str,
             binary: str = NFSRESET) -> dict:
    held = stale_sockets(topo, vip, conns, listener)
    try:
        if count_on(topo, vip) != conns:
            raise RuntimeError(f"expected {conns} stale sockets on {vip}")
        argv = launch_argv(topo, how, "kill", "--vip", vip, "--state-dir", state_dir,
                           "--moment", "post-stop", "--json", binary=binary)

        def observe(proc: subprocess.Popen, t0: float) -> dict:
            first = gone = None
            with netns.entered(topo.ns(SERVER)):
                deadline = t0 + ACTION_TIMEOUT_S
                while time.monotonic() < deadline:
                    n = len(sockdiag.dump([vip], [PORT]))
                    now = time.monotonic()
                    if n < conns and first is None:
                        first = now - t0
                    if n == 0:
                        gone = now - t0
                        break
                    if proc.poll() is not None and n == conns:
                        break           # it exited and nothing went: report, don't spin
                    time.sleep(POLL_S)
            return {"first_s": first, "all_gone_s": gone}

        return run_hook(argv, observe)
    finally:
        for s in held:
            s.close()


# -- tickle -------------------------------------------------------------------------------
def capture_socket(topo: Topology) -> socket.socket:
    with netns.entered(topo.ns(CLIENT)):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((IFACE, ETH_P_ALL))
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> None:
    for _ in range(10_000):
        try:
            s.recv(65535)
        except BlockingIOError:
            return


def classify(frame: bytes, vip: str, cport: int) -> str | None:
    """'tickle' for an ACK-only TCP segment VIP:2049 -> client:cport, 'announce' for
    ARP or ICMPv6 neighbour advertisement about the VIP, else None."""
    if len(frame) < 14:
        return None
    (etype,) = struct.unpack_from("!H", frame, 12)
    if etype == ETH_P_ARP and len(frame) >= 42:
        sender = socket.inet_ntop(socket.AF_INET, frame[28:32])
        return "announce" if sender == vip else None
    if etype == ETH_P_IP and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != socket.IPPROTO_TCP or socket.inet_ntop(socket.AF_INET, frame[26:30]) != vip:
            return None
        tcp = 14 + ihl
    elif etype == ETH_P_IPV6 and len(frame) >= 54:
        src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
        nxt = frame[20]
        if nxt == 58 and len(frame) >= 55 and frame[54] == 136:       # ICMPv6 NA
            target = socket.inet_ntop(socket.AF_INET6, frame[62:78]) if len(frame) >= 78 else ""
            return "announce" if vip in (src, target) else None
        if nxt != socket.IPPROTO_TCP or src != vip:
            return None
        tcp = 54
    else:
        return None
    if len(frame) < tcp + 14:
        return None
    sport, dport = struct.unpack_from("!HH", frame, tcp)
    flags = frame[tcp + 13]
    return "tickle" if (sport, dport, flags & 0x17) == (PORT, cport, 0x10) else None


def one_tickle(topo: Topology, how: str, vip: str, client_ip: str, cport: int, cap: socket.socket,
               binary: str = NFSRESET) -> dict:
    drain(cap)
    endpoint = f"[{client_ip}]:{cport}" if ":" in client_ip else f"{client_ip}:{cport}"
    argv = launch_argv(topo, how, "tickle", "--vip", vip, "--client", endpoint, "--rounds", "1", "--json",
                       binary=binary)

    def observe(proc: subprocess.Popen, t0: float) -> dict:
        first = {"announce": None, "tickle": None}
        deadline = t0 + ACTION_TIMEOUT_S
        while first["tickle"] is None and time.monotonic() < deadline:
            r, _, _ = select.select([cap], [], [], 0.05)
            if not r:
                if proc.poll() is not None:
                    break
                continue
            while True:
                try:
                    frame, addr = cap.recvfrom(65535)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if addr[2] == PACKET_OUTGOING:
                    continue
                kind = classify(frame, vip, cport)
                if kind and first[kind] is None:
                    first[kind] = now - t0
        return {"first_s": first["tickle"], "announce_s": first["announce"]}

    return run_hook(argv, observe)


# -- imports ------------------------------------------------------------------------------
def parse_importtime(text: str, top: int = 5) -> list[tuple[str, int, int]]:
    """(module, self us, cumulative us) of the `top` largest cumulative entries."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        rows.append((parts[2].rstrip(), int(parts[0]), int(parts[1])))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def import_profile() -> list[tuple[str, int, int]]:
    res = subprocess.run([PYTHON, "-X", "importtime", "-c", "import nfsreset.cli.main"], capture_output=True,
                         text=True, timeout=PROC_TIMEOUT_S, cwd=ROOT)
    return parse_importtime(res.stderr)


def kill_import_profile(topo: Topology, listener: socket.socket, family: int, i: int, state_dir: str
                        ) -> list[tuple[str, int, int]]:
    """Import times of one real `nfsreset kill` run, lazily imported adapters included."""
    vip = kill_vip(family, i)
    held = stale_sockets(topo, vip, 1, listener)
    try:
        res = subprocess.run(launch_argv(topo, "--netns", "kill", "--vip", vip, "--state-dir", state_dir,
                                         "--moment", "post-stop"),
                             capture_output=True, text=True, timeout=PROC_TIMEOUT_S,
                             env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    finally:
        for s in held:
            s.close()
    return parse_importtime(res.stderr)


# -- report -------------------------------------------------------------------------------
def summary(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"median": None, "min": None, "max": None, "missing": len(values)}
    return {"median": statistics.median(got), "min": min(got), "max": max(got),
            "missing": len(values) - len(got)}


def ms(v: float | None) -> str:
    return "   -  " if v is None else f"{v * 1000:6.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per measurement (median reported), 1-40")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--conns", type=int, default=4, help="stale sockets per kill run, 1-100")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--nfsreset", action="append", default=[], metavar="PATH",
                    help="also time this nfsreset command (repeatable), interleaved with the venv's")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.runs <= 40 or not 1 <= args.conns <= 100:
        print("--runs 1-40, --conns 1-100", file=sys.stderr)
        return 2
    if not os.access(NFSRESET, os.X_OK):
        print(f"{NFSRESET} not found: run setup.sh", file=sys.stderr)
        return 2
    others = {}
    for path in args.nfsreset:
        try:
            others[os.path.abspath(path)] = interpreter(path)
        except (OSError, ValueError) as e:
            print(f"--nfsreset: {path}: {e}", file=sys.stderr)
            return 2
        if not os.access(path, os.X_OK):
            print(f"--nfsreset: {path} is not executable", file=sys.stderr)
            return 2
    if (2 + 2 * len(others)) * args.runs >= 230:    # one fresh kill VIP per run: 198.51.100.20-251
        print("--runs times launches (2 per command) must stay within 230", file=sys.stderr)
        return 2

    import tempfile
    state_dir = tempfile.mkdtemp(prefix="nfsr-bench-state-")
    fam = socket.AF_INET if args.family == 4 else socket.AF_INET6
    hows = ("ip-netns-exec", "--netns")
    # (row name, launch, binary): the venv's rows keep their plain names
    rows = [(how, how, NFSRESET) for how in hows] + \
        [(f"{how} {path}", how, path) for path in others for how in hows]
    report: dict = {"kernel": os.uname().release, "cpus": os.cpu_count(), "family": args.family,
                    "runs": args.runs, "conns": args.conns, "goal_s": GOAL_S}
    topo = Topology.create(tag="bhook")
    listener = cap = None
    try:
        with netns.entered(topo.ns(SERVER)):
            listener = socket.socket(fam, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", PORT))
        listener.listen(128)
        cap = capture_socket(topo)

        floor = [exec_to_exit([PYTHON, "-c", "pass"]) for _ in range(args.runs)]
        floor_ns = [exec_to_exit(topo.exec_argv(SERVER, PYTHON, "-c", "pass")) for _ in range(args.runs)]
        report["floor_python_pass"] = summary(floor)
        report["floor_ip_netns_exec_python_pass"] = summary(floor_ns)
        for path, py in others.items():
            report[f"floor {py} -c pass"] = summary([exec_to_exit([py, "-c", "pass"]) for _ in range(args.runs)])

        n = len(rows)
        kills: dict[str, list[dict]] = {r[0]: [] for r in rows}
        for i in range(args.runs):
            for j, (name, how, binary) in enumerate(rows):     # interleave the launches
                kills[name].append(one_kill(topo, how, kill_vip(args.family, n * i + j), args.conns,
                                            listener, state_dir, binary))
        vip = TICKLE_VIP[args.family]
        topo.add_addr(SERVER, vip, nodad=True)
        client_ip = HOST_ADDRS[CLIENT][0 if args.family == 4 else 1]
        tickles: dict[str, list[dict]] = {r[0]: [] for r in rows}
        for i in range(args.runs):
            for j, (name, how, binary) in enumerate(rows):
                tickles[name].append(one_tickle(topo, how, vip, client_ip, 40000 + n * i + j, cap, binary))
        report["kill"] = {h: {"first_action": summary([r["first_s"] for r in rs]),
                              "all_gone": summary([r["all_gone_s"] for r in rs]),
                              "exit": summary([r["exit_s"] for r in rs]),
                              "engine": summary([r["engine_s"] for r in rs]),
                              "exit_codes": sorted({r["exit"] for r in rs}), "runs": rs}
                          for h, rs in kills.items()}
        report["tickle"] = {h: {"first_action": summary([r["first_s"] for r in rs]),
                                "announce": summary([r["announce_s"] for r in rs]),
                                "exit": summary([r["exit_s"] for r in rs]),
                                "engine": summary([r["engine_s"] for r in rs]),
                                "exit_codes": sorted({r["exit"] for r in rs}), "runs": rs}
                            for h, rs in tickles.items()}
        report["imports_cli"] = import_profile()
        report["imports_kill_run"] = kill_import_profile(topo, listener, args.family, n * args.runs, state_dir)
    finally:
        for s in (listener, cap):
            if s is not None:
                s.close()
        topo.destroy()
        import shutil
        shutil.rmtree(state_dir, ignore_errors=True)

    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    ok = all(r["first_action"]["missing"] == 0 for part in ("kill", "tickle") for r in report[part].values())
    return 0 if ok else 1


def print_table(rep: dict) -> None:
    fl = rep["floor_python_pass"]["median"]
    print(f"kernel {rep['kernel']}, {rep['cpus']} cpus, IPv{rep['family']}, {rep['runs']} runs each, "
          f"kill with {rep['conns']} stale sockets; times in ms from just before Popen (exec)")
    print(f"floor: `python -c pass` exec-to-exit {ms(fl)} (min {ms(rep['floor_python_pass']['min'])}); "
          f"`ip netns exec NS python -c pass` {ms(rep['floor_ip_netns_exec_python_pass']['median'])}")
    for key, f in rep.items():
        if key.startswith("floor /"):
            print(f"floor: `{key[len('floor '):]}` exec-to-exit {ms(f['median'])} (min {ms(f['min'])})")
    w = max(14, *(len(h) for h in rep["kill"]))
    print(f"{'hook':<7} {'launched by':<{w}} {'first action':>12} {'min':>6} {'max':>6} {'/floor':>6} "
          f"{'announce':>8} {'all gone':>8} {'exit':>6} {'engine':>6}  goal {GOAL_S * 1000:.0f} ms")
    for part in ("kill", "tickle"):
        for how, r in rep[part].items():
            fa = r["first_action"]
            ratio = f"{fa['median'] / fl:6.2f}" if fa["median"] is not None else "   -  "
            extra = r.get("announce", r.get("all_gone"))
            print(f"{part:<7} {how:<{w}} {ms(fa['median']):>12} {ms(fa['min'])} {ms(fa['max'])} {ratio} "
                  f"{ms(extra['median']) if part == 'tickle' else '     -  ':>8} "
                  f"{ms(r['all_gone']['median']) if part == 'kill' else '   -  ':>8} "
                  f"{ms(r['exit']['median'])} {ms(r['engine']['median'])}"
                  f"{'  MISSING ' + str(fa['missing']) if fa['missing'] else ''}"
                  f"{'  exit codes ' + str(r['exit_codes']) if r['exit_codes'] != [0] else ''}")
    for title, rows in (("python -X importtime -c 'import nfsreset.cli.main'", rep["imports_cli"]),
                        ("one real `nfsreset kill` run (PYTHONPROFILEIMPORTTIME)", rep["imports_kill_run"])):
        print(f"top 5 cumulative imports, {title}:")
        for name, self_us, cum_us in rows:
            print(f"  {cum_us / 1000:7.1f} ms cumulative {self_us / 1000:6.1f} ms self  {name.strip()}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt    # run the finally blocks: namespaces, children, temp dirs


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main())
