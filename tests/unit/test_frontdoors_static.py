"""Static checks of the front doors (cli/, vagrant/): lint, schema, config validation.

Each tool is the real one from Debian (shellcheck, xmllint + resource-agents'
DTD, vagrant, systemd-analyze); a test whose tool is missing is skipped and
says which package brings it. The keepalived notify script and the stall
report of move-vip.sh touch no network, so they run here with a recording
stand-in for nfsreset.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
AGENT = ROOT / "cli" / "ocf" / "nfsreset"
NOTIFY = ROOT / "cli" / "keepalived" / "nfsreset-notify"
UNIT = ROOT / "cli" / "systemd" / "nfsreset@.service"
EXAMPLE = ROOT / "cli" / "systemd" / "nfsreset.toml.example"
VAGRANT_DIR = ROOT / "vagrant"
MOVE_VIP = VAGRANT_DIR / "move-vip.sh"
# Only the OCF 1.0 DTD ships with resource-agents 4.12 (Debian 12); there is
# no ra-api-1.1.dtd. The agent declares <version>1.1</version> and uses
# nothing beyond 1.0's elements, so it validates against what is there.
OCF_DTD = pathlib.Path("/usr/share/resource-agents/ra-api-1.dtd")
IPADDR2 = pathlib.Path("/usr/lib/ocf/resource.d/heartbeat/IPaddr2")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} not installed (apt-get install {package})")
    return path


def shell_scripts() -> list[pathlib.Path]:
    found = []
    for base in (ROOT / "cli", VAGRANT_DIR):
        for path in sorted(base.rglob("*")):
            if not path.is_file() or ".vagrant" in path.parts:
                continue
            head = path.read_bytes()[:64]
            if head.startswith(b"#!") and (b"sh\n" in head.split(b"\n")[0] + b"\n"):
                found.append(path)
    return found


def test_the_scripts_are_found():
    names = {p.name for p in shell_scripts()}
    assert {"nfsreset", "nfsreset-notify", "move-vip.sh", "head.sh", "client.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    shellcheck = need("shellcheck", "shellcheck")
    res = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def _meta_data() -> str:
    if not IPADDR2.exists():
        pytest.skip("resource-agents not installed (apt-get install resource-agents)")
    env = dict(os.environ, OCF_ROOT="/usr/lib/ocf")
    res = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_meta_data_validates_against_the_ocf_dtd(tmp_path):
    xmllint = need("xmllint", "libxml2-utils")
    if not OCF_DTD.exists():
        pytest.skip(f"{OCF_DTD} missing (apt-get install resource-agents)")
    doc = tmp_path / "meta-data.xml"
    doc.write_text(_meta_data())
    res = subprocess.run([xmllint, "--noout", "--dtdvalid", str(OCF_DTD), str(doc)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "IPaddr2nfs" in doc.read_text() and 'name="nfsreset_port"' in doc.read_text()


def test_meta_data_does_not_fail_without_ipaddr2(tmp_path):
    """OCF: meta-data never fails; without IPaddr2 it still says what is wrong."""
    xmllint = need("xmllint", "libxml2-utils")
    env = dict(os.environ, OCF_ROOT="/usr/lib/ocf", NFSRESET_IPADDR2=str(tmp_path / "missing"))
    if not pathlib.Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists():
        pytest.skip("resource-agents not installed")
    res = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0
    assert "IPaddr2 was not found" in res.stdout
    doc = tmp_path / "md.xml"
    doc.write_text(res.stdout)
    if OCF_DTD.exists():
        check = subprocess.run([xmllint, "--noout", "--dtdvalid", str(OCF_DTD), str(doc)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


def test_systemd_unit_verifies(tmp_path):
    analyze = need("systemd-analyze", "systemd")
    # verify insists that ExecStart exists: point it at the checkout's command
    # (the installed unit uses the package's /usr/bin/nfsreset).
    binary = ROOT / ".venv" / "bin" / "nfsreset"
    if not binary.exists():
        pytest.skip("no .venv/bin/nfsreset: run setup.sh")
    unit = tmp_path / "nfsreset@nfs.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/nfsreset", str(binary)))
    # --man=no: Documentation=man:nfsreset(8) exists once the package is installed
    res = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values; its complaints name the file
    complaints = [line for line in (res.stdout + res.stderr).splitlines() if unit.name in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


def test_systemd_unit_runs_the_contract_command():
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/nfsreset watch --config /etc/nfsreset/%i.toml" in text
    assert "Type=simple" in text and "NoNewPrivileges=yes" in text
    assert "ProtectSystem=strict" in text and "StateDirectory=nfsreset" in text


def test_example_config_parses_and_has_the_contract_keys():
    conf = tomllib.loads(EXAMPLE.read_text())
    assert conf["vips"] and all(isinstance(v, str) for v in conf["vips"])
    assert conf["ports"] == [2049]
    assert conf["state_dir"] == "/var/lib/nfsreset"
    assert conf["strategy"] in ("auto", "destroy", "rst", "nft")


def _vagrant(tmp_path, provider: str, *args: str, path_prefix: str = "") -> subprocess.CompletedProcess:
    vagrant = need("vagrant", "vagrant")
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"),
               VAGRANT_DEFAULT_PROVIDER=provider, VAGRANT_CHECKPOINT_DISABLE="1")
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    # On a copy: validate leaves a .vagrant/ dir behind, which has no place in the checkout.
    work = tmp_path / "checkout" / "vagrant"
    if not work.exists():
        shutil.copytree(VAGRANT_DIR, work, ignore=shutil.ignore_patterns(".vagrant"))
    return subprocess.run([vagrant, "validate", *args], cwd=work, capture_output=True,
                          text=True, env=env, timeout=180)


def test_vagrantfile_validates_ignoring_providers(tmp_path):
    res = _vagrant(tmp_path, "virtualbox", "--ignore-provider")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


def test_vagrantfile_validates_for_virtualbox(tmp_path):
    """VirtualBox itself is not installed here. Vagrant only asks VBoxManage
    for its version before it validates the virtualbox block, so a VBoxManage
    that answers --version (and fails everything else) lets the real
    validation of that block run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "VBoxManage").write_text('#!/bin/sh\n[ "$1" = --version ] && { echo 7.0.6r155176; exit 0; }\nexit 1\n')
    (fake / "VBoxManage").chmod(0o755)
    res = _vagrant(tmp_path, "virtualbox", path_prefix=str(fake))
    assert res.returncode == 0, res.stdout + res.stderr


def test_vagrantfile_validates_for_libvirt(tmp_path):
    vagrant = need("vagrant", "vagrant")
    plugins = subprocess.run([vagrant, "plugin", "list"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, VAGRANT_HOME=str(tmp_path / "vh")))
    if "vagrant-libvirt" not in plugins.stdout:
        pytest.skip("vagrant-libvirt not installed (apt-get install vagrant-libvirt)")
    res = _vagrant(tmp_path, "libvirt")
    assert res.returncode == 0, res.stdout + res.stderr


# -- keepalived notify script, with a recording nfsreset ------------------------

RECORDER = '#!/bin/sh\necho "$*" >> "$CALLS"\necho "summary of $1"\nexit "${RC:-0}"\n'


@pytest.fixture
def recorder(tmp_path):
    path = tmp_path / "nfsreset"
    path.write_text(RECORDER)
    path.chmod(0o755)
    return path


def notify(tmp_path, recorder, *args, rc=0):
    # MASTER lifts the quarantine with nft: a recording nft first on PATH, so
    # the host's ruleset is never touched.
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "nft").write_text('#!/bin/sh\necho "$*" >> "$NFT_CALLS"\n')
    (bindir / "nft").chmod(0o755)
    env = dict(os.environ, CALLS=str(tmp_path / "calls"), RC=str(rc), NFT_CALLS=str(tmp_path / "nft-calls"),
               PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    res = subprocess.run([str(NOTIFY), "--nfsreset", str(recorder), *args],
                         capture_output=True, text=True, env=env, timeout=30)
    calls_file = tmp_path / "calls"
    calls = sorted(calls_file.read_text().splitlines()) if calls_file.exists() else []
    return res, calls


def test_notify_master_tickles_every_vip(tmp_path, recorder):
    res, calls = notify(tmp_path, recorder, "--vip", "198.51.100.10", "--vip", "2001:db8::10",
                        "--port", "2049", "--port", "20048", "INSTANCE", "nfs_a", "MASTER", "100")
    assert res.returncode == 0, res.stderr
    assert calls == [
        "tickle --vip 198.51.100.10 --state-dir /var/lib/nfsreset --strategy auto --port 2049 --port 20048",
        "tickle --vip 2001:db8::10 --state-dir /var/lib/nfsreset --strategy auto --port 2049 --port 20048",
    ]
    assert "summary of tickle" in res.stderr
    assert (tmp_path / "nft-calls").read_text().splitlines() == [
        "delete element inet nfsreset quarantine4 { 198.51.100.10 }",
        "delete element inet nfsreset quarantine6 { 2001:db8::10 }",
    ]


@pytest.mark.parametrize("state", ["BACKUP", "FAULT", "STOP"])
def test_notify_leaving_states_kill(tmp_path, recorder, state):
    res, calls = notify(tmp_path, recorder, "--vip", "198.51.100.10", "--netns", "blue",
                        "--state-dir", "/srv/state", "--strategy", "nft", "GROUP", "g", state)
    assert res.returncode == 0
    assert calls == ["kill --vip 198.51.100.10 --moment post-stop --state-dir /srv/state "
                     "--strategy nft --netns blue"]


def test_notify_survives_a_failing_nfsreset(tmp_path, recorder):
    res, calls = notify(tmp_path, recorder, "--vip", "198.51.100.10", "INSTANCE", "i", "BACKUP",
                        rc=1)
    assert res.returncode == 0 and len(calls) == 1
    assert "rc=1 summary of kill" in res.stderr


def test_notify_rejects_bad_arguments(tmp_path, recorder):
    assert notify(tmp_path, recorder, "INSTANCE", "i", "MASTER")[0].returncode == 2  # no --vip
    assert notify(tmp_path, recorder, "--vip", "198.51.100.10", "MASTER")[0].returncode == 2
    assert notify(tmp_path, recorder, "--bogus", "x", "INSTANCE", "i", "MASTER")[0].returncode == 2
    assert not (tmp_path / "calls").exists()


def test_notify_ignores_unknown_states(tmp_path, recorder):
    res, calls = notify(tmp_path, recorder, "--vip", "198.51.100.10", "INSTANCE", "i", "DELETED")
    assert res.returncode == 0 and calls == []


# -- move-vip.sh's stall report ---------------------------------------------------

def test_move_vip_reports_the_longest_gap_per_move(tmp_path):
    moves = tmp_path / "moves"
    moves.write_text("100.0 head2 round-1\n120.0 head1 round-1\n")
    writes, t = [], 95.0
    while t < 320:
        # a 1.3 s failover stall, then a 180 s failback stall
        if not (100.2 < t < 101.5) and not (120.1 < t < 300.0):
            writes.append(f"{t:.3f} 1")
        t += 0.1
    log = tmp_path / "log"
    log.write_text("\n".join(writes) + "\n")
    res = subprocess.run([str(MOVE_VIP), "--analyze", str(moves), str(log), "20"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "move 1 to head2 (round-1)" in lines[0] and "stall   1.40 s" in lines[0]
    assert "move 2 to head1 (round-1)" in lines[1] and "stall 179.90 s" in lines[1]
    assert "raise SETTLE" in lines[1]


# -- the unit's capabilities are enough for the BPF tracker -------------------------

@pytest.mark.bpf
def test_unit_capabilities_suffice_for_a_bcc_tracepoint():
    """Run a bcc tracepoint program with exactly the unit's bounding set
    (setpriv keeps uid 0 but drops every other capability), and once without
    CAP_PERFMON to show it is needed: CAP_SYS_ADMIN is not, on this kernel."""
    setpriv = need("setpriv", "util-linux")
    caps = next(line.split("=", 1)[1].split() for line in UNIT.read_text().splitlines()
                if line.startswith("CapabilityBoundingSet="))
    assert "CAP_SYS_ADMIN" not in caps
    prog = ("from bcc import BPF\n"
            "BPF(text='TRACEPOINT_PROBE(sock, inet_sock_set_state) { return 0; }')\n"
            "print('attached')\n")

    def run_with(cap_list):
        bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in cap_list)
        return subprocess.run([setpriv, f"--bounding-set={bounding}", "--inh-caps=-all",
                               "/usr/bin/python3", "-c", prog],
                              capture_output=True, text=True, timeout=120)

    ok = run_with(caps)
    if "No module named 'bcc'" in ok.stderr:
        pytest.skip("python3-bpfcc not installed")
    assert ok.returncode == 0 and "attached" in ok.stdout, ok.stderr
    without = run_with([c for c in caps if c != "CAP_PERFMON"])
    assert without.returncode != 0


def test_notify_lifts_the_quarantine_by_the_names_guard_uses():
    # The script deletes nfsreset's quarantine element with nft itself (faster than
    # a Python start-up); if guard.py renamed its table or sets, that would silently
    # become a no-op and the new MASTER's first resets would be dropped again.
    from nfsreset import guard
    text = NOTIFY.read_text()
    assert f"inet {guard.TABLE} " in text
    for name in guard.QUARANTINE_SETS.values():
        assert f"set={name} " in text
