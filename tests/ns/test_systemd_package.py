"""The Debian package under real systemd: a container with systemd as PID 1.

A systemd-nspawn container boots this host's own Debian 12 root (bind-mounted
read-only; --volatile=overlay keeps every write in a tmpfs that goes with the
container) inside node1 of the test topology (its network namespace; never the
host's network). The built package is installed in it with apt, and the
packaged unit, agent and command are checked for real:

- `systemctl enable --now nfsreset@nfs` reaches `ready` in the journal, under
  the unit's full sandbox and with BPF (the tracker loads);
- the VIP removed inside the container: the watcher ends the session on it
  (the server socket is gone from sock_diag) and quarantines the VIP; the VIP
  back: the quarantine is lifted and the client (a real socket in the client
  namespace, over the topology's veths) is tickled until its stale
  connection is reset;
- `systemctl stop` leaves no nft table, no BPF program of the watcher and no
  file outside the state dir;
- the packaged OCF agent passes ocf-tester; `nfsreset doctor` reports every
  rung (and, with the kernel headers away, which package to install); a
  reinstall (the upgrade path) restarts a running watcher; `apt-get remove`
  stops it and removes the nft table, purge removes the state dir.

What it took to run systemd here (PID 1 of the host is not systemd, cgroup v1
hybrid): see docs/internals.md, "Testing under real systemd".

Run: .venv/bin/pytest -q -s tests/ns/test_systemd_package.py   (~1 min, root)
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from nfsreset.kernel import netns, sockdiag
from tests import debpkg
from nfsreset.lab.topology import HOST_ADDRS, VIP4

pytestmark = [pytest.mark.netns, pytest.mark.bpf, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]
PORT = 2049
VIP6_AWAY = "2001:db8::10"        # listed in the config, never configured: the "away" path
OCF_VIP = "198.51.100.20"
UNIT = "nfsreset@nfs.service"
CG_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
BOOT_S = 60.0
STEP_S = 30.0
# Dependencies of the package that the host may lack (it has the rest: setup.sh
# installs python3-bpfcc, python3-nftables, nftables, iproute2; build-deb.sh
# python3-typer). apt in the container has no network: they come from the
# host's apt cache, fetched there once.
CACHED_DEPS = ("python3-pyroute2", "python3-psutil", "python3-typer", "python3-click")


def sh(*argv: str, timeout: float = STEP_S, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} missing: apt-get install {package} (setup.sh installs it)")
    return path


@pytest.fixture(scope="session")
def deb() -> pathlib.Path:
    """dist/nfsreset_<version>_all.deb, built once per session unless dist/ has
    one newer than every source file (tests/debpkg.py)."""
    return debpkg.built_deb()


@pytest.fixture(scope="session")
def apt_cache_deps() -> None:
    missing = [p for p in CACHED_DEPS
               if sh("dpkg-query", "-W", "-f=${Status}", p, check=False).stdout != "install ok installed"]
    if missing:
        res = sh("apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends", *missing,
                 check=False, timeout=300, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert res.returncode == 0, f"could not fetch {missing} into the apt cache: {res.stderr}"


class Container:
    """systemd as PID 1 of a container on this host's root, in network namespace `ns`."""

    # Where the package's directory is seen inside: the host's /tmp is not (nspawn
    # gives the container a /tmp of its own), and a CI clone may live there.
    DIST_INSIDE = "/mnt/nfsreset-dist"

    def __init__(self, name: str, ns: str, logdir: pathlib.Path, tracefs: bool = True,
                 dist: pathlib.Path | None = None):
        self.name, self.ns, self.tracefs, self.dist = name, ns, tracefs, dist
        self.root = tempfile.mkdtemp(prefix=f"{name}-root-")
        self.cgroups = [os.path.join(r, name) for r in CG_ROOTS]
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.log = open(logdir / "console.log", "w+")

    def start(self) -> float:
        for cg in self.cgroups:
            os.mkdir(cg)
        nspawn = [
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
            f"--directory={self.root}", "--volatile=overlay", f"--machine={self.name}",
            f"--network-namespace-path=/run/netns/{self.ns}",
            # CAP_NET_ADMIN: nspawn grants it only with a private network of its
            # own. CAP_BPF/CAP_PERFMON and the two system calls: the BPF tracker.
            "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
            "--system-call-filter=bpf perf_event_open",
            # the tracefs a head has (nspawn mounts /sys without it)
            *(["--bind-ro=/sys/kernel/tracing"] if self.tracefs else []),
            *([f"--bind-ro={self.dist}:{self.DIST_INSIDE}"] if self.dist else []),
            "--", "systemd.unit=basic.target", "systemd.show_status=no",
            "systemd.mask=apt-daily.timer", "systemd.mask=apt-daily-upgrade.timer",
            "systemd.mask=man-db.timer", "systemd.mask=e2scrub_all.timer",
        ]
        # nspawn refuses "/" itself: a read-only bind of it, in a mount
        # namespace of the launcher's own (nothing to unmount on the host).
        # The launcher joins its own cgroups first: --keep-unit puts the
        # container in <current cgroup>/payload.
        script = ('for cg in "$@"; do echo $$ > "$cg/cgroup.procs"; done; '
                  f'exec unshare --mount --propagation private sh -c \'mount --bind / {self.root} && '
                  f'mount -o remount,bind,ro {self.root} && exec "$0" "$@"\' '
                  + " ".join(f"'{a}'" for a in nspawn))
        t0 = time.monotonic()
        self.proc = subprocess.Popen(["sh", "-c", script, "launcher", *self.cgroups], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"})
        deadline = t0 + BOOT_S
        while self._find_leader() is None:
            assert time.monotonic() < deadline, f"no container init after {BOOT_S} s: {self.console()}"
            assert self.proc.poll() is None, f"systemd-nspawn exited {self.proc.returncode}: {self.console()}"
            time.sleep(0.05)
        while True:
            res = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_S)
            if res.stdout.strip() in ("running", "degraded"):
                break
            assert time.monotonic() < deadline, f"boot did not finish: {res.stdout} {self.console()}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def _find_leader(self) -> int | None:
        """The container's PID 1, as a host pid (the file exists, empty, before it)."""
        procs = os.path.join(self.cgroups[1], "payload", "init.scope", "cgroup.procs")
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.leader = int(open(procs).read().split()[0])
        return self.leader

    def console(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = STEP_S, **kw) -> subprocess.CompletedProcess:
        return sh(*self.argv(*argv), check=check, timeout=timeout, **kw)

    def host_pids(self, unit: str) -> list[int]:
        """Host pids of a unit's processes (its cgroup in the container's tree)."""
        slice_ = "system-nfsreset.slice" if unit.startswith("nfsreset@") else ""
        path = os.path.join(self.cgroups[1], "payload", "system.slice", slice_, unit, "cgroup.procs")
        try:
            return [int(p) for p in open(path).read().split()]
        except OSError:
            return []

    def close(self) -> list[str]:
        """Power off (kill if it will not), remove the cgroups. Returns what was left."""
        left = []
        if self.proc is not None:
            if self.proc.poll() is None and self._find_leader() is not None:
                self.run("systemctl", "poweroff", check=False, timeout=10)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                left.append("container did not power off in 20 s: killed")
                with contextlib.suppress(OSError):
                    open(os.path.join(self.cgroups[1], "cgroup.kill"), "w").write("1")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for cg in self.cgroups:
            for _ in range(50):
                if not os.path.isdir(cg):
                    break
                for d, _subdirs, _files in sorted(os.walk(cg), key=lambda w: -len(w[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
                time.sleep(0.1)
            if os.path.isdir(cg):
                left.append(f"cgroup {cg}")
        if any(self.root in line for line in open("/proc/self/mountinfo")):
            left.append(f"mount on {self.root}")
        else:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)
        self.log.close()
        return left


@pytest.fixture
def container(topo, tmp_path, deb):
    need("systemd-nspawn", "systemd-container")
    c = Container(f"nfsr-{os.getpid()}-sd", topo.ns("node1"), tmp_path, dist=deb.parent)
    try:
        yield c
    finally:
        left = c.close()
        assert not left, left


def journal(c: Container, unit: str = UNIT) -> str:
    return c.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout


def wait_for(what: str, cond, timeout: float = STEP_S, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def nft_tables(c: Container) -> str:
    return c.run("nft", "list", "tables").stdout


def quarantined(c: Container, vip: str) -> bool:
    res = c.run("nft", "-j", "list", "set", "inet", "nfsreset", "quarantine4", check=False)
    if res.returncode != 0:
        return False
    for item in json.loads(res.stdout)["nftables"]:
        if "set" in item and vip in json.dumps(item["set"].get("elem", [])):
            return True
    return False


def bpf_prog_ids(pids: list[int]) -> set[int]:
    """Ids of the BPF programs these host pids hold a descriptor of (fdinfo)."""
    ids = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with contextlib.suppress(OSError):
                    for line in open(f"/proc/{pid}/fdinfo/{fd}"):
                        if line.startswith("prog_id:"):
                            ids.add(int(line.split()[1]))
    return ids


def loaded(prog_ids: set[int]) -> set[int]:
    """Which of these programs the kernel still has."""
    progs = json.loads(sh("bpftool", "-j", "prog", "show").stdout)
    return prog_ids & {p["id"] for p in progs}


def files_outside_state(c: Container) -> set[str]:
    """Files under /etc /run /var /tmp, minus the state dir and what systemd and
    journald write themselves."""
    out = c.run("find", "/etc", "/run", "/var", "/tmp", "-xdev", "-type", "f", check=False).stdout.split()
    skip = ("/var/lib/nfsreset/", "/var/log/journal/", "/run/log/", "/run/systemd/", "/var/lib/systemd/",
            "/run/user/", "/var/cache/man/", "/run/udev/")
    return {f for f in out if not f.startswith(skip)}


def test_package_under_systemd(topo, container, deb, apt_cache_deps):
    t = {}
    need("ocf-tester", "resource-agents")
    need("bpftool", "bpftool")
    t["boot"] = container.start()
    c = container

    # This image was built by Docker, whose /usr/sbin/policy-rc.d (exit 101)
    # forbids maintainer scripts to start or stop services; a cluster head has
    # none. Removed in the container's overlay only.
    c.run("rm", "-f", "/usr/sbin/policy-rc.d")

    # -- install (apt resolves the Depends from Debian 12 packages) ---------------------
    inside = f"{Container.DIST_INSIDE}/{deb.name}"
    t0 = time.monotonic()
    c.run("apt-get", "install", "-y", "-q", "--no-install-recommends", inside, timeout=180,
          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    t["install"] = time.monotonic() - t0
    assert c.run("dpkg-query", "-W", "-f=${Status}", "nfsreset").stdout == "install ok installed"
    assert "/usr/bin/nfsreset" in c.run("dpkg", "-L", "nfsreset").stdout
    c.run("man", "-w", "nfsreset")

    # -- doctor: every rung, as root in the container ------------------------------------
    doc = json.loads(c.run("nfsreset", "doctor", "--json").stdout)
    for part in ("checks", "strategies"):
        for name, r in doc[part].items():
            print(f"\n[doctor] {'ok ' if r['ok'] else 'NO '} {name:<13} {r['why']}", end="")
    print()
    assert {"destroy", "rst", "nft", "tickle", "watch-bpf"} <= set(doc["strategies"])
    assert all(r["ok"] for part in ("checks", "strategies") for r in doc[part].values()), doc
    # linux-headers is only a Recommends: without headers doctor says what to install
    build = f"/lib/modules/{os.uname().release}/build"
    c.run("mv", build, build + ".away")
    try:
        res = c.run("nfsreset", "doctor", "--json", check=False)
        assert res.stdout.startswith("{"), f"doctor without headers: {res.returncode} {res.stderr[-2000:]}"
        doc = json.loads(res.stdout)
    finally:
        c.run("mv", build + ".away", build)
    assert not doc["checks"]["headers"]["ok"]
    assert f"apt install linux-headers-{os.uname().release}" in doc["checks"]["headers"]["why"], doc["checks"]

    # -- the watcher: enable --now, ready -------------------------------------------------
    c.run("sh", "-c", f"printf 'vips = [\"{VIP4}\", \"{VIP6_AWAY}\"]\\nports = [{PORT}]\\n' > /etc/nfsreset/nfs.toml")
    before = files_outside_state(c)
    c.run("ip", "addr", "add", f"{VIP4}/24", "dev", "eth0")
    fam = socket.AF_INET
    with netns.entered(topo.ns("node1")):
        listener = socket.socket(fam, socket.SOCK_STREAM)
    client = server = None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", PORT))
        listener.listen(8)
        t0 = time.monotonic()
        c.run("systemctl", "enable", "--now", UNIT)
        t["enable"] = time.monotonic() - t0
        wait_for("ready in the journal", lambda: "ready: watching" in journal(c))
        t["ready"] = time.monotonic() - t0
        print(f"[journal] {journal(c).strip()}")
        assert "with BPF" in journal(c), journal(c)
        pids = c.host_pids(UNIT)
        assert pids, "no process in the unit's cgroup"
        progs = bpf_prog_ids(pids)
        assert progs, "the watcher holds no BPF program"
        # The sandbox as it applies: exactly the unit's four capabilities, no
        # new privileges, a mount namespace of its own (ProtectSystem=strict).
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pids[0]}/status").read().splitlines()
                      if ":\t" in line)
        caps = {12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW", 38: "CAP_PERFMON", 39: "CAP_BPF"}
        assert int(status["CapEff"], 16) == sum(1 << b for b in caps), status["CapEff"]
        assert int(status["CapBnd"], 16) == sum(1 << b for b in caps), status["CapBnd"]
        assert status["NoNewPrivs"].strip() == "1"
        assert os.readlink(f"/proc/{pids[0]}/ns/mnt") != os.readlink(f"/proc/{c.leader}/ns/mnt")
        assert os.stat(f"/proc/{pids[0]}/ns/net").st_ino == os.stat(f"/run/netns/{topo.ns('node1')}").st_ino
        assert "table inet nfsreset" in nft_tables(c)
        show = c.run("systemctl", "show", UNIT, "-p", "ActiveState,NRestarts,ExecMainPID").stdout
        assert "ActiveState=active" in show and "NRestarts=0" in show, show

        # -- a session on the VIP; the VIP leaves ----------------------------------------
        with netns.entered(topo.ns("client")):
            client = socket.socket(fam, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect((VIP4, PORT))
        server, peer = listener.accept()
        assert peer[0] == HOST_ADDRS["client"][0]
        client.sendall(b"hello")
        assert server.recv(5) == b"hello"

        def sessions() -> int:
            with netns.entered(topo.ns("node1")):
                return len(sockdiag.dump([VIP4], [PORT]))

        assert sessions() == 1

        # `nfsreset flows` (outside the sandbox) reads the watcher's live table
        # from /run/nfsreset, which the unit must let it write.
        def flows_from_watcher() -> dict | None:
            doc = json.loads(c.run("nfsreset", "flows", "--vip", VIP4, "--json").stdout)
            return doc if doc["source"].startswith("watch pid") and doc["sessions"] else None
        wait_for("`nfsreset flows` served by the watcher", flows_from_watcher, timeout=5, every=0.2)
        t0 = time.monotonic()
        c.run("ip", "addr", "del", f"{VIP4}/24", "dev", "eth0")
        wait_for("the session on the VIP ended", lambda: sessions() == 0)
        t["away: session ended"] = time.monotonic() - t0
        wait_for("VIP quarantined", lambda: quarantined(c, VIP4))
        t["away: quarantined"] = time.monotonic() - t0
        with pytest.raises(OSError) as gone:
            server.recv(1)
        assert gone.value.errno in (errno.ECONNABORTED, errno.ECONNRESET), gone.value

        # -- the VIP comes back: quarantine lifted, the client's stale connection reset --
        client.settimeout(0.1)
        t0 = time.monotonic()
        c.run("ip", "addr", "add", f"{VIP4}/24", "dev", "eth0")
        wait_for("quarantine lifted", lambda: not quarantined(c, VIP4))
        t["back: quarantine lifted"] = time.monotonic() - t0

        def client_reset() -> bool:
            try:
                client.recv(1)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            return True   # EOF is an end too
        wait_for("the client's connection reset (tickle)", client_reset, timeout=5)
        t["back: client reset"] = time.monotonic() - t0
        assert c.run("systemctl", "is-active", UNIT).stdout.strip() == "active"

        # -- stop: no table, no program, no file but the state dir ------------------------
        t0 = time.monotonic()
        c.run("systemctl", "stop", UNIT)
        t["stop"] = time.monotonic() - t0
        # a watch releases only its own VIPs' elements; the emptied table goes too (checked below)
        assert "stopped; BPF detached; released" in journal(c), journal(c)
        assert "nfsreset" not in nft_tables(c)
        assert not loaded(progs), f"BPF programs left: {loaded(progs)}"
        assert not c.host_pids(UNIT)
        new = files_outside_state(c) - before
        assert not new, f"left outside the state dir: {sorted(new)}"
        assert c.run("ls", "-A", "/var/lib/nfsreset").stdout.strip(), "the state dir recorded nothing"
    finally:
        for s in (client, server, listener):
            if s is not None:
                s.close()

    # -- the packaged OCF agent --------------------------------------------------------------
    t0 = time.monotonic()
    res = c.run("ocf-tester", "-n", "vip", "-o", f"ip={OCF_VIP}", "-o", "cidr_netmask=24",
                "/usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs", check=False, timeout=180)
    t["ocf-tester"] = time.monotonic() - t0
    assert res.returncode == 0 and "passed all tests" in res.stdout, res.stdout + res.stderr
    md = c.run("/usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs", "meta-data",
               env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"}).stdout
    assert 'name="nfsreset_bin"' in md and 'default="/usr/bin/nfsreset"' in md

    # -- an upgrade (here: reinstall) restarts a running watcher (postinst try-restart) -------
    c.run("systemctl", "start", UNIT)
    wait_for("ready again", lambda: journal(c).count("ready: watching") >= 2)
    first = c.host_pids(UNIT)
    t0 = time.monotonic()
    c.run("apt-get", "install", "-y", "-q", "--reinstall", inside, timeout=180,
          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    t["reinstall"] = time.monotonic() - t0
    wait_for("ready after the upgrade", lambda: journal(c).count("ready: watching") >= 3)
    assert c.host_pids(UNIT) and not set(first) & set(c.host_pids(UNIT)), "the watcher was not restarted"
    assert "/etc/nfsreset/nfs.toml.example" in c.run("dpkg-query", "-W", "-f=${Conffiles}", "nfsreset").stdout

    # -- remove with the watcher running: stopped, table gone; purge: state dir gone --------
    progs = bpf_prog_ids(c.host_pids(UNIT))
    assert progs
    t0 = time.monotonic()
    c.run("apt-get", "remove", "-y", "-q", "nfsreset", timeout=120,
          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    t["remove"] = time.monotonic() - t0
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() in ("inactive", "failed", "unknown")
    assert not c.host_pids(UNIT) and not loaded(progs)
    assert "nfsreset" not in nft_tables(c)
    assert c.run("test", "-d", "/var/lib/nfsreset", check=False).returncode == 0, "remove took the state dir"
    assert c.run("test", "-e", "/usr/bin/nfsreset", check=False).returncode != 0
    t0 = time.monotonic()
    c.run("apt-get", "purge", "-y", "-q", "nfsreset", timeout=120,
          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    t["purge"] = time.monotonic() - t0
    for gone_path in ("/var/lib/nfsreset", "/run/nfsreset", "/etc/nfsreset/nfs.toml.example",
                      "/etc/systemd/system/multi-user.target.wants/" + UNIT, "/lib/systemd/system/nfsreset@.service"):
        assert c.run("test", "-e", gone_path, check=False).returncode != 0, f"{gone_path} left after purge"
    print("[times] " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
