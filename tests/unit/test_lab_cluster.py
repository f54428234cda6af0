"""The lab cluster's pure parts: the seeded CIB and the parser of pacemaker-execd's lines."""
from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from nfsreset.lab.cluster import RESOURCE, cib_xml, parse_finished, primitive_xml

# Lines as Pacemaker 2.1.5's pacemaker-execd wrote them in a lab run, with neighbours.
LOG = """\
Dec 03 13:48:25.027 node1 pacemaker-execd     [41] (log_finished) \tinfo: VIP start (call 6, PID 97) exited with status 0 (execution time 100ms)
Dec 03 13:48:25.100 node1 pacemaker-controld  [46] (process_lrm_event) \tnotice: Result of start operation for VIP on node1: ok | rc=0 call=6
Dec 03 13:48:25.231 node1 pacemaker-execd     [41] (log_finished) \tinfo: VIP stop (call 9, PID 207) exited with status 0 (execution time 74ms after being queued 8ms)
Dec 03 13:48:26.231 node1 pacemaker-execd     [41] (log_finished) \tinfo: VIP start (call 12, PID 300) exited with status 1 (execution time 3.120s)
Dec 03 13:48:27.231 node1 pacemaker-execd     [41] (log_finished) \tinfo: OTHERVIP stop (call 13, PID 301) exited with status 0 (execution time 5ms)
"""


def test_parse_finished_reads_action_call_status_and_time():
    ops = parse_finished(LOG)
    assert [(o.action, o.call, o.rc) for o in ops] == [("start", 6, 0), ("stop", 9, 0), ("start", 12, 1)]
    assert [o.seconds for o in ops] == pytest.approx([0.100, 0.074, 3.120])


def test_seeded_cib_is_wellformed_and_has_what_a_short_start_needs():
    cib = ET.fromstring(cib_xml(primitive_xml("198.51.100.10", "ipaddr2", {})))
    # a crm_feature_set above the daemons' own makes the CIB reject every update
    assert "crm_feature_set" not in cib.attrib
    opts = {nv.get("name"): nv.get("value") for nv in cib.iter("nvpair")}
    assert opts["stonith-enabled"] == "false" and opts["dc-deadtime"] == "5s"
    (prim,) = cib.iter("primitive")
    assert (prim.get("id"), prim.get("provider"), prim.get("type")) == (RESOURCE, "heartbeat", "IPaddr2")
    assert [n.get("uname") for n in cib.iter("node")] == ["node1", "node2"]


def test_agent_parameters_are_quoted():
    xml = cib_xml(primitive_xml("2001:db8::10", "ocf", {"nfsreset_bin": '/a "b"/<nfsreset>&'}))
    prim = next(ET.fromstring(xml).iter("primitive"))
    assert (prim.get("provider"), prim.get("type")) == ("nfsreset", "IPaddr2nfs")
    params = {nv.get("name"): nv.get("value") for nv in prim.iter("nvpair")}
    assert params["nfsreset_bin"] == '/a "b"/<nfsreset>&'
    assert params["cidr_netmask"] == "64" and params["ip"] == "2001:db8::10"


@pytest.mark.skipif(shutil.which("crm_verify") is None, reason="needs pacemaker-cli-utils (crm_verify)")
def test_seeded_cib_passes_crm_verify(tmp_path):
    path = tmp_path / "cib.xml"
    path.write_text(cib_xml(primitive_xml("198.51.100.10", "ocf", {"nfsreset_port": "2049"})))
    res = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr + res.stdout


def test_per_head_parameters_are_node_rule_sets():
    """`nfsreset lab --state per-head`: each head's state dir in its own set, chosen by #uname."""
    prim = next(ET.fromstring(cib_xml(primitive_xml(
        "198.51.100.10", "ocf", {"nfsreset_port": "2049"},
        {"node1": {"nfsreset_state_dir": "/s/node1"}, "node2": {"nfsreset_state_dir": "/s/node2"}}))).iter("primitive"))
    sets = {}
    for ia in prim.findall("instance_attributes"):
        expr = ia.find("rule/expression")
        node = None if expr is None else (expr.get("attribute"), expr.get("operation"), expr.get("value"))
        sets[node] = {nv.get("name"): nv.get("value") for nv in ia.findall("nvpair")}
    assert sets[("#uname", "eq", "node1")] == {"nfsreset_state_dir": "/s/node1"}
    assert sets[("#uname", "eq", "node2")] == {"nfsreset_state_dir": "/s/node2"}
    assert "nfsreset_state_dir" not in sets[None] and sets[None]["nfsreset_port"] == "2049"


@pytest.mark.skipif(shutil.which("crm_verify") is None, reason="needs pacemaker-cli-utils (crm_verify)")
def test_per_head_cib_passes_crm_verify(tmp_path):
    path = tmp_path / "cib.xml"
    path.write_text(cib_xml(primitive_xml("2001:db8::10", "ocf", {"nfsreset_port": "2049"},
                                          {n: {"nfsreset_state_dir": f"/s/{n}"} for n in ("node1", "node2")})))
    res = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr + res.stdout


def test_stop_delay_groups_a_delay_resource_before_the_vip_and_moves_the_group():
    """`nfsreset lab --mover pacemaker --gap 12`: a group stops in reverse order, so
    the VIP goes first, then Delay sleeps 12 s, then the new owner starts both."""
    from nfsreset.lab.cluster import DELAY, GROUP, move_target

    cib = ET.fromstring(cib_xml(primitive_xml("198.51.100.10", "ipaddr2", {}), stop_delay=12.0))
    (group,) = cib.iter("group")
    assert group.get("id") == GROUP == move_target(12.0)
    delay, vip = group.findall("primitive")
    assert (delay.get("id"), delay.get("type"), vip.get("id")) == (DELAY, "Delay", RESOURCE)
    params = {nv.get("name"): nv.get("value") for nv in delay.iter("nvpair")}
    assert params == {"startdelay": "0", "stopdelay": "12", "mondelay": "0"}
    stop_op = next(op for op in delay.iter("op") if op.get("name") == "stop")
    assert stop_op.get("timeout") == "42s"          # longer than the delay itself
    (loc,) = cib.iter("rsc_location")
    assert loc.get("rsc") == GROUP
    assert move_target(None) == RESOURCE and not list(ET.fromstring(cib_xml("<primitive/>")).iter("group"))


@pytest.mark.skipif(shutil.which("crm_verify") is None, reason="needs pacemaker-cli-utils (crm_verify)")
def test_stop_delay_cib_passes_crm_verify(tmp_path):
    path = tmp_path / "cib.xml"
    path.write_text(cib_xml(primitive_xml("198.51.100.10", "ocf", {"nfsreset_port": "2049"}), stop_delay=12.0))
    res = subprocess.run(["crm_verify", "--xml-file", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr + res.stdout
