"""FlowKey is a named tuple (speed); what the dataclass it replaced promised still holds."""
import json
import pickle

from nfsreset.engine import flow_json
from nfsreset.core.model import Flow, FlowKey

K = FlowKey("198.51.100.10", 2049, "198.51.100.100", 800)


def test_same_text_hash_and_order_as_the_dataclass():
    assert repr(K) == "FlowKey(vip='198.51.100.10', vport=2049, client='198.51.100.100', cport=800)"
    assert str(K) == "198.51.100.10:2049 <- 198.51.100.100:800"
    assert str(FlowKey("2001:db8::10", 2049, "2001:db8::100", 1)) == "[2001:db8::10]:2049 <- [2001:db8::100]:1"
    # the frozen dataclass hashed the tuple of its fields and ordered by them, field by field
    assert hash(K) == hash(("198.51.100.10", 2049, "198.51.100.100", 800))
    ks = [FlowKey("198.51.100.9", 2050, "198.51.100.1", 1), FlowKey("198.51.100.10", 2049, "198.51.100.2", 9),
          FlowKey("198.51.100.10", 2049, "198.51.100.100", 5), K]
    assert sorted(ks) == sorted(ks, key=lambda k: (k.vip, k.vport, k.client, k.cport))
    assert K.family == 4 and FlowKey("2001:db8::10", 1, "2001:db8::1", 2).family == 6
    assert pickle.loads(pickle.dumps(K)) == K and type(pickle.loads(pickle.dumps(K))) is FlowKey


def test_immutable_and_json_unchanged():
    try:
        K.cport = 1                                                   # type: ignore[misc]
    except AttributeError:
        pass
    assert K.cport == 800 and not hasattr(K, "__dict__")
    assert json.dumps(flow_json(Flow(K, "ESTABLISHED"))) == (
        '{"vip": "198.51.100.10", "vport": 2049, "client": "198.51.100.100", "cport": 800, "state": "ESTABLISHED"}')
