"""Static checks of the front doors (cli/, vagrant/): lint, schema, config validation.

Each tool is the real one from Debian (shellcheck, xmllint + resource-agents'
DTD, vagrant, systemd-analyze); a test whose tool is missing is skipped and
says which package brings it. The keepalived notify script and the stall
report of move-vip.sh touch no network, so they run here with a recording
stand-in for nfsreset.

The Vagrant lab's VMs cannot boot here (no nested virtualisation, no
network): what it installs is checked against the built package instead
(tests/debpkg.py builds it when dist/ has none up to date), through the
configuration Vagrant itself reads from the Vagrantfile.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import pytest

from tests import debpkg

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


def _vagrant_env(tmp_path, provider: str, path_prefix: str = "") -> dict:
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"),
               VAGRANT_DEFAULT_PROVIDER=provider, VAGRANT_CHECKPOINT_DISABLE="1",
               # no box is ever looked up or downloaded, whatever a test runs
               VAGRANT_SERVER_URL="http://127.0.0.1:9", VAGRANT_BOX_UPDATE_CHECK_DISABLE="1")
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return env


def _lab_copy(tmp_path, deb: pathlib.Path | None = None) -> pathlib.Path:
    """vagrant/ and pyproject.toml (the package's version) in a copy of the
    checkout, with dist/ holding `deb` if given: Vagrant leaves a .vagrant/
    dir behind, which has no place in the checkout."""
    work = tmp_path / "checkout" / "vagrant"
    if not work.exists():
        shutil.copytree(VAGRANT_DIR, work, ignore=shutil.ignore_patterns(".vagrant"))
        shutil.copy(ROOT / "pyproject.toml", work.parent)
        if deb is not None:
            (work.parent / "dist").mkdir()
            shutil.copy(deb, work.parent / "dist")
    return work


def _vagrant(tmp_path, provider: str, *args: str, path_prefix: str = "",
             deb: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    vagrant = need("vagrant", "vagrant")
    return subprocess.run([vagrant, "validate", *args], cwd=_lab_copy(tmp_path, deb), capture_output=True,
                          text=True, env=_vagrant_env(tmp_path, provider, path_prefix), timeout=180)


def _fake_vboxmanage(tmp_path) -> pathlib.Path:
    """VirtualBox itself is not installed here. Vagrant only asks VBoxManage
    for its version before it validates the virtualbox block, so a VBoxManage
    that answers --version (and fails everything else, noting the call) lets
    the real validation of that block run."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "VBoxManage").write_text('#!/bin/sh\n[ "$1" = --version ] && { echo 7.0.6r155176; exit 0; }\n'
                                     f'echo "$*" >> {tmp_path}/vboxmanage.calls\nexit 1\n')
    (fake / "VBoxManage").chmod(0o755)
    return fake


def test_vagrantfile_validates_ignoring_providers(tmp_path):
    res = _vagrant(tmp_path, "virtualbox", "--ignore-provider")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


def test_vagrantfile_validates_for_virtualbox(tmp_path):
    res = _vagrant(tmp_path, "virtualbox", path_prefix=str(_fake_vboxmanage(tmp_path)))
    assert res.returncode == 0, res.stdout + res.stderr


def test_vagrantfile_validates_for_libvirt(tmp_path):
    vagrant = need("vagrant", "vagrant")
    plugins = subprocess.run([vagrant, "plugin", "list"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, VAGRANT_HOME=str(tmp_path / "vh")))
    if "vagrant-libvirt" not in plugins.stdout:
        pytest.skip("vagrant-libvirt not installed (apt-get install vagrant-libvirt)")
    res = _vagrant(tmp_path, "libvirt")
    assert res.returncode == 0, res.stdout + res.stderr


# -- the Vagrant lab installs the package, not the checkout --------------------------

# Vagrant's own reading of the Vagrantfile (its library, as `vagrant` loads
# it), per machine: provisioners, before-triggers, synced folders.
VAGRANT_DUMP = r"""
require "json"
require "vagrant"
Vagrant.plugin("2").manager
env = Vagrant::Environment.new(cwd: Dir.pwd)
set = ->(v) { v.is_a?(Vagrant::Config::V2::DummyConfig) || v == Vagrant::Plugin::V2::Config::UNSET_VALUE ? nil : v }
out = {}
env.machine_names.each do |n|
  m = env.machine(n, :virtualbox)
  out[n] = {
    "provisioners" => m.config.vm.provisioners.map { |p|
      c = p.config
      {"name" => p.name.to_s, "type" => p.type.to_s,
       "source" => set.(c.instance_variable_get(:@source)), "destination" => set.(c.instance_variable_get(:@destination)),
       "path" => set.(c.instance_variable_get(:@path)), "args" => set.(c.instance_variable_get(:@args))} },
    "triggers" => m.config.trigger.before_triggers.map { |t|
      {"command" => t.command.to_s, "warn" => set.(t.warn), "abort" => set.(t.abort)} },
    "synced_folders" => m.config.vm.synced_folders.map { |_, o|
      {"guest" => o[:guestpath], "host" => o[:hostpath], "disabled" => !!o[:disabled]} },
  }
end
puts JSON.generate(out)
"""
# Runtime paths of nfsreset that no package ships (made when it runs).
RUNTIME_PATHS = {"/var/lib/nfsreset", "/run/nfsreset"}
LAB_SCRIPTS = [VAGRANT_DIR / "Vagrantfile", MOVE_VIP, *sorted((VAGRANT_DIR / "provision").glob("*.sh"))]


@pytest.fixture(scope="module")
def deb() -> pathlib.Path:
    return debpkg.built_deb()


def _lab_config(tmp_path, deb: pathlib.Path | None) -> dict:
    ruby = need("ruby", "ruby")
    need("vagrant", "vagrant")
    work = _lab_copy(tmp_path, deb)
    script = tmp_path / "dump.rb"
    script.write_text(VAGRANT_DUMP)
    res = subprocess.run([ruby, str(script)], cwd=work, capture_output=True, text=True, timeout=180,
                         env=_vagrant_env(tmp_path, "virtualbox", str(_fake_vboxmanage(tmp_path))))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def _code(path: pathlib.Path) -> str:
    """The file without its comments (shell and Ruby: # to the end of the line)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines()
                     if not line.startswith("#!"))


def test_the_heads_install_the_built_package(tmp_path, deb):
    """The Vagrantfile, as Vagrant reads it: each head uploads dist/'s package
    of this version and common.sh installs that file; no VM gets the checkout."""
    lab = _lab_config(tmp_path, deb)
    assert set(lab) == {"head1", "head2", "client"}
    dist_deb = str(tmp_path / "checkout" / "dist" / deb.name)
    for head in ("head1", "head2"):
        provs = lab[head]["provisioners"]
        assert [p["name"] for p in provs] == ["nfsreset-deb", "nfsreset", "head"], provs
        upload, install = provs[0], provs[1]
        assert upload["type"] == "file" and upload["source"] == dist_deb, upload
        assert upload["destination"] == f"/tmp/{deb.name}"
        assert install["type"] == "shell" and install["path"] == "provision/common.sh"
        assert install["args"] == [upload["destination"]], install
        assert lab[head]["triggers"] == []
    assert [p["name"] for p in lab["client"]["provisioners"]] == ["client"]
    for machine in lab.values():
        assert all(f["disabled"] for f in machine["synced_folders"]), machine["synced_folders"]
    # and Vagrant's validation of that (the file provisioner's source must exist)
    res = _vagrant(tmp_path, "virtualbox", path_prefix=str(_fake_vboxmanage(tmp_path)), deb=deb)
    assert res.returncode == 0, res.stdout + res.stderr


def test_without_the_package_up_stops_before_any_vm(tmp_path):
    """No dist/*.deb: `vagrant up` aborts with what to do, before the provider
    is asked for anything (the fake VBoxManage notes every call but --version)."""
    vagrant = need("vagrant", "vagrant")
    lab = _lab_config(tmp_path, None)
    for head in ("head1", "head2"):
        assert {t["command"] for t in lab[head]["triggers"]} == {"up", "provision", "reload"}
        assert all(t["abort"] for t in lab[head]["triggers"])
    res = subprocess.run([vagrant, "up", "head1"], cwd=_lab_copy(tmp_path), capture_output=True, text=True,
                         timeout=120, env=_vagrant_env(tmp_path, "virtualbox", str(_fake_vboxmanage(tmp_path))))
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "bash packaging/build-deb.sh" in out and "nfsreset_" in out, out
    assert not (tmp_path / "vboxmanage.calls").exists(), (tmp_path / "vboxmanage.calls").read_text()


def test_lab_scripts_use_only_what_the_package_ships(deb):
    """Every nfsreset path the provisioners and move-vip.sh use on a VM is a
    file of the built package (dpkg-deb -c), the agent's OCF name included."""
    shipped = debpkg.contents(deb)
    used: dict[str, set[str]] = {}
    for script in LAB_SCRIPTS:
        code = _code(script)
        for path in re.findall(r"/(?:usr|lib|etc|var|run|opt|srv|sbin|bin)/[\w.@/-]*", code):
            if "nfsreset" in path.lower() or "ipaddr2nfs" in path.lower():
                used.setdefault(path.rstrip("/."), set()).add(script.name)
        for provider, agent in re.findall(r"ocf:(nfsreset):(\w+)", code):
            used.setdefault(f"/usr/lib/ocf/resource.d/{provider}/{agent}", set()).add(script.name)
        for unit in re.findall(r"\bnfsreset@[\w.-]*\.service", code):
            used.setdefault(f"/lib/systemd/system/{unit}", set()).add(script.name)
    # What the lab needs at least: the command, the agent and the unit.
    assert {"/usr/bin/nfsreset", "/usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs",
            "/lib/systemd/system/nfsreset@.service"} <= set(used), used
    missing = {p: sorted(by) for p, by in used.items() if p not in shipped and p not in RUNTIME_PATHS}
    assert not missing, f"used on the VMs but not in {deb.name}: {missing}"
    for path in ("/usr/bin/nfsreset", "/usr/lib/ocf/resource.d/nfsreset/IPaddr2nfs", "/usr/sbin/nfsreset-notify"):
        assert shipped[path].startswith("-rwxr-xr-x"), (path, shipped[path])


@pytest.mark.parametrize("script", LAB_SCRIPTS, ids=lambda p: p.name)
def test_lab_scripts_need_no_checkout(script):
    """No clone, venv, setup.sh or pip on the VMs, and nothing where the
    checkout's nfsreset used to be linked."""
    code = _code(script)
    for word in ("setup.sh", ".venv", "git clone", "pip ", "/usr/local/bin/nfsreset",
                 "/usr/local/sbin/nfsreset", "rsync", '"/nfsreset"'):
        assert word not in code, f"{script.name}: {word}"


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
    from nfsreset.kernel import guard
    text = NOTIFY.read_text()
    assert f"inet {guard.TABLE} " in text
    for name in guard.QUARANTINE_SETS.values():
        assert f"set={name} " in text
