"""The nftables JSON documents the guard builds, checked without a kernel.

The same documents are sent to a real kernel in tests/ns/test_guard.py; here
we pin their shape (what nft 1.0.6 accepts) and the pure parsing of listings.
"""
import subprocess
import sys

import pytest

from nfsreset.kernel import guard as G
from nfsreset.core.model import FlowKey

K4 = FlowKey("198.51.100.10", 2049, "198.51.100.100", 800)
K4B = FlowKey("198.51.100.11", 2049, "198.51.100.100", 800)
K6 = FlowKey("2001:db8::10", 2049, "2001:db8::100", 801)
K_MAPPED = FlowKey("::ffff:198.51.100.10", 2049, "::ffff:198.51.100.100", 802)


def _verbs(cmds):
    """[(verb, kind, name)] of a command list."""
    out = []
    for c in cmds:
        ((verb, body),) = c.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj.get("name") or obj.get("chain")))
    return out


def test_module_import_stays_light():
    # Hooks must reach their first packet fast: no libnftables at import.
    code = "import sys, nfsreset.kernel.guard; print('nftables' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_every_document_starts_with_schema_metainfo():
    doc = G.document([{"list": {"tables": {}}}])
    assert doc["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert doc["nftables"][1] == {"list": {"tables": {}}}


def test_skeleton_for_a_new_table_has_everything_in_order():
    v = _verbs(G.skeleton())
    assert v[0] == ("add", "table", "nfsreset")
    assert [n for verb, kind, n in v if kind == "set"] == ["stale4", "stale6", "quarantine4", "quarantine6"]
    # chains before flush before rules, or the transaction fails
    first_rule = next(i for i, x in enumerate(v) if x[1] == "rule")
    assert ("add", "chain", "guard") in v[:first_rule] and ("flush", "chain", "guard") in v[:first_rule]
    assert [n for verb, kind, n in v if kind == "rule"] == ["guard"] * 4 + ["quarantine"] * 2


def test_skeleton_leaves_out_sets_that_exist():
    # Re-adding a set that nft made `dynamic` fails with EEXIST (see module doc).
    v = _verbs(G.skeleton(existing_sets={"stale4", "quarantine6"}))
    assert [n for verb, kind, n in v if kind == "set"] == ["stale6", "quarantine4"]
    assert ("flush", "chain", "guard") in v  # rules are always rebuilt


def test_stale_sets_are_concatenated_with_timeout_and_counter():
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in G.skeleton() if "set" in c.get("add", {})}
    assert sets["stale4"]["type"] == ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"]
    assert sets["stale6"]["type"] == ["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"]
    for name in ("stale4", "stale6"):
        assert sets[name]["flags"] == ["timeout"]
        assert sets[name]["stmt"] == [{"counter": None}]
        assert sets[name]["family"] == "inet" and sets[name]["table"] == "nfsreset"
    assert sets["quarantine4"]["type"] == "ipv4_addr" and sets["quarantine6"]["type"] == "ipv6_addr"


def test_chains_hook_input_for_guard_and_output_for_quarantine():
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in G.skeleton() if "chain" in c.get("add", {})}
    assert chains["guard"]["hook"] == "input" and chains["guard"]["policy"] == "accept"
    assert chains["quarantine"]["hook"] == "output" and chains["quarantine"]["policy"] == "accept"


@pytest.mark.parametrize("family,l3", [(4, "ip"), (6, "ip6")])
def test_guard_rule_rejects_only_non_syn_non_rst_keyed_from_the_client(family, l3):
    reject, syn = G.guard_rules(family)
    expr = reject["rule"]["expr"]
    # flag test comes first so element counters count only rejected segments
    assert expr[0] == {"match": {"op": "!", "left": {"payload": {"protocol": "tcp", "field": "flags"}},
                                 "right": ["syn", "rst"]}}
    concat = expr[1]["match"]["left"]["concat"]
    assert [p["payload"]["field"] for p in concat] == ["saddr", "sport", "daddr", "dport"]
    assert [p["payload"]["protocol"] for p in concat] == [l3, "tcp", l3, "tcp"]
    assert expr[1]["match"]["right"] == f"@stale{family}"
    assert expr[2] == {"reject": {"type": "tcp reset"}}

    sexpr = syn["rule"]["expr"]
    assert sexpr[0]["match"]["right"] == "syn"
    assert sexpr[0]["match"]["left"]["&"][1] == ["syn", "rst", "ack"]  # a pure SYN, not SYN-ACK
    assert sexpr[1]["set"]["op"] == "delete" and sexpr[1]["set"]["set"] == f"@stale{family}"
    assert sexpr[1]["set"]["elem"]["concat"] == concat


def test_without_syn_delete_only_reject_rules():
    assert len(G.guard_rules(4, syn_delete=False)) == 1
    rules = [c for c in G.skeleton(syn_delete=False) if "rule" in c.get("add", {})]
    assert not any("set" in e for r in rules for e in r["add"]["rule"]["expr"])


@pytest.mark.parametrize("family,l3", [(4, "ip"), (6, "ip6")])
def test_quarantine_rule_drops_by_source_only_while_it_is_not_local(family, l3):
    expr = G.quarantine_rule(family)["rule"]["expr"]
    # `ip saddr @quarantine4 fib saddr type != local drop`, exactly as nft 1.0.6's
    # `nft -j list` prints the rule made with the CLI: an element left behind
    # cannot mute a VIP that is configured again.
    assert expr == [{"match": {"op": "==", "left": {"payload": {"protocol": l3, "field": "saddr"}},
                               "right": f"@quarantine{family}"}},
                    {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["saddr"]}},
                               "right": "local"}},
                    {"drop": None}]


def test_quarantine_rules_do_not_share_mutable_parts():
    a, b = G.quarantine_rule(4), G.quarantine_rule(4)
    a["rule"]["expr"][1]["match"]["right"] = "unicast"
    assert b["rule"]["expr"][1]["match"]["right"] == "local"


def test_release_deletes_exactly_the_named_elements():
    cmds = G.release_commands(G.group_stale([K4, K6]), {"2001:DB8::10", "198.51.100.11", "198.51.100.10"})
    assert cmds == G.delete_stale_commands(G.group_stale([K4, K6])) + [
        {"delete": {"element": {"family": "inet", "table": "nfsreset", "name": "quarantine4",
                                "elem": ["198.51.100.10", "198.51.100.11"]}}},
        {"delete": {"element": {"family": "inet", "table": "nfsreset", "name": "quarantine6",
                                "elem": ["2001:db8::10"]}}}]
    assert G.release_commands({}, ()) == []


def test_stale_elements_client_first_with_timeout_and_dedup():
    cmds = G.add_stale_commands(G.group_stale([K4, K6, K4, K_MAPPED]), 120)
    assert len(cmds) == 2
    e4, e6 = (c["add"]["element"] for c in cmds)
    assert e4["name"] == "stale4" and e6["name"] == "stale6"
    assert e4["elem"] == [
        {"elem": {"val": {"concat": ["198.51.100.100", 800, "198.51.100.10", 2049]}, "timeout": 120}},
        {"elem": {"val": {"concat": ["198.51.100.100", 802, "198.51.100.10", 2049]}, "timeout": 120}},
    ]
    assert e6["elem"] == [{"elem": {"val": {"concat": ["2001:db8::100", 801, "2001:db8::10", 2049]}, "timeout": 120}}]


def test_delete_elements_are_bare_concats():
    (cmd,) = G.delete_stale_commands(G.group_stale([K6]))
    assert cmd == {"delete": {"element": {"family": "inet", "table": "nfsreset", "name": "stale6",
                                          "elem": [{"concat": ["2001:db8::100", 801, "2001:db8::10", 2049]}]}}}


@pytest.mark.parametrize("bad", [
    FlowKey("198.51.100.10", 2049, "2001:db8::100", 800),   # mixed families
    FlowKey("198.51.100.10", 0, "198.51.100.100", 800),
    FlowKey("198.51.100.10", 2049, "198.51.100.100", 70000),
    FlowKey("not-an-ip", 2049, "198.51.100.100", 800),
])
def test_bad_keys_are_refused(bad):
    with pytest.raises(ValueError):
        G.group_stale([bad])


@pytest.mark.parametrize("timeout", [0, -1, 1.5, None])
def test_bad_timeouts_are_refused(timeout):
    with pytest.raises(ValueError):
        G.add_stale_commands(G.group_stale([K4]), timeout)


def test_quarantine_elements_pick_the_family_and_normalise():
    assert G.quarantine_commands("::ffff:198.51.100.10", add=True) == [
        {"add": {"element": {"family": "inet", "table": "nfsreset", "name": "quarantine4", "elem": ["198.51.100.10"]}}}]
    assert G.quarantine_commands("2001:DB8::10", add=False) == [
        {"delete": {"element": {"family": "inet", "table": "nfsreset", "name": "quarantine6", "elem": ["2001:db8::10"]}}}]


def test_delete_table_is_add_then_delete():
    assert G.delete_table_commands() == [{"add": {"table": {"family": "inet", "name": "nfsreset"}}},
                                         {"delete": {"table": {"family": "inet", "name": "nfsreset"}}}]


# A listing as nft 1.0.6 prints it (abridged from a real `list table`).
LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "nfsreset", "handle": 1}},
    {"set": {"family": "inet", "name": "stale4", "table": "nfsreset",
             "type": ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"], "handle": 3, "size": 65536,
             "flags": ["timeout"],
             "elem": [{"elem": {"val": {"concat": ["198.51.100.100", 40000, "198.51.100.10", 2049]},
                                "timeout": 120, "expires": 119, "counter": {"packets": 3, "bytes": 156}}}],
             "stmt": [{"counter": None}]}},
    {"set": {"family": "inet", "name": "stale6", "table": "nfsreset",
             "type": ["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"], "handle": 4, "flags": ["timeout"],
             "elem": [{"elem": {"val": {"concat": ["2001:db8::100", 801, "2001:db8::10", 2049]},
                                "timeout": 120, "expires": 100, "counter": {"packets": 0, "bytes": 0}}}],
             "stmt": [{"counter": None}]}},
    {"set": {"family": "inet", "name": "quarantine4", "table": "nfsreset", "type": "ipv4_addr", "handle": 5}},
    {"set": {"family": "inet", "name": "quarantine6", "table": "nfsreset", "type": "ipv6_addr", "handle": 6,
             "elem": ["2001:db8::10"]}},
    {"chain": {"family": "inet", "table": "nfsreset", "name": "guard", "handle": 7}},
]}


def test_parse_stale_gives_server_side_keys_and_rejected_counts():
    assert G.parse_stale(LISTING) == [
        (FlowKey("198.51.100.10", 2049, "198.51.100.100", 40000), 3),
        (FlowKey("2001:db8::10", 2049, "2001:db8::100", 801), 0),
    ]


def test_parse_quarantined_and_emptiness():
    assert G.parse_quarantined(LISTING) == {"2001:db8::10"}
    assert G.table_present(LISTING) and not G.is_empty(LISTING)
    assert G.set_names(LISTING) == {"stale4", "stale6", "quarantine4", "quarantine6"}
    emptied = {"nftables": [dict(item) if "set" not in item else {"set": {k: v for k, v in item["set"].items()
                                                                          if k != "elem"}}
                            for item in LISTING["nftables"]]}
    assert G.table_present(emptied) and G.is_empty(emptied)
    assert not G.table_present({}) and G.parse_stale({}) == [] and G.parse_quarantined({}) == set()


def test_dry_run_builds_documents_and_sends_nothing():
    g = G.Guard(dry_run=True)
    assert g.add_stale([K4, K4B, K6, K4], timeout_s=30) == 3
    g.quarantine("2001:db8::10")
    assert g.remove_stale([K6]) == 1
    g.lift_quarantine("2001:db8::10")
    g.remove_all()
    g.prune()
    assert g.stale() == [] and g.quarantined() == set()
    docs = g.documents
    assert len(docs) == 5
    add_doc = docs[0]["nftables"]
    assert add_doc[0] == {"metainfo": {"json_schema_version": 1}}
    assert add_doc[1:] == G.skeleton() + G.add_stale_commands(G.group_stale([K4, K4B, K6]), 30)
    assert docs[1]["nftables"][1:] == G.skeleton() + G.quarantine_commands("2001:db8::10", add=True)
    assert docs[2]["nftables"][1:] == G.delete_stale_commands(G.group_stale([K6]))
    assert docs[3]["nftables"][1:] == G.quarantine_commands("2001:db8::10", add=False)
    assert docs[4]["nftables"][1:] == G.delete_table_commands()


def test_dry_run_with_no_keys_builds_nothing():
    g = G.Guard(dry_run=True)
    assert g.add_stale([]) == 0
    assert g.documents == []


def test_one_line_error_text():
    err = ("internal:0:0-0: Error: Could not process rule: File exists\n\n"
           "internal:0:0-0: Error: Could not process rule: File exists\n\n")
    assert G._one_line(err) == "Could not process rule: File exists"
    assert G._one_line("") == "no error text"
