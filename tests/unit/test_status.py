from cfnode.node.status import entry_addresses, join_command, render_table
from cfnode.protocol.records import PeerState, StageAnnouncement

OWNER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def peer(name: str, stage: int, *maddrs: str, state: PeerState = PeerState.ONLINE) -> StageAnnouncement:
    return StageAnnouncement(peer_id=name, stage=stage, state=state, step=0, throughput=0.0, load=0, grad_norm=None,
                             source="fresh", maddrs=list(maddrs))


def test_entry_addresses_one_per_online_peer_round_robin_over_stages():
    stage_map = {
        1: [peer("a", 1, "/ip4/127.0.0.1/tcp/1/p2p/a", "/ip4/10.0.0.1/tcp/1/p2p/a"), peer("b", 1, "/ip4/b/p2p/b")],
        2: [peer("c", 2, "/ip4/127.0.0.1/tcp/3/p2p/c"), peer("d", 2, "/ip4/d/p2p/d", state=PeerState.JOINING)],
        3: [peer("e", 3)],  # an older peer that announces no address
    }
    # a routable address before loopback; stage 2's JOINING peer and stage 3's address-less one are skipped
    assert entry_addresses(stage_map) == ["/ip4/10.0.0.1/tcp/1/p2p/a", "/ip4/127.0.0.1/tcp/3/p2p/c",
                                          "/ip4/b/p2p/b"]
    assert entry_addresses(stage_map, limit=1) == ["/ip4/10.0.0.1/tcp/1/p2p/a"]
    assert entry_addresses({1: [], 2: []}) == []


def report(**changes) -> dict:
    data = {"run_id": "r", "num_stages": 1, "recovery": "checkfree",
            "stages": [{"stage": 1, "online": 1, "peers": []}], "spec_owner": OWNER,
            "addresses": ["/ip4/10.0.0.1/tcp/1/p2p/a", "/ip4/10.0.0.2/tcp/1/p2p/b"]}
    data.update(changes)
    return data


def test_the_table_ends_with_a_join_line():
    command = join_command(report())
    assert command == (f"cfnode join --initial-peers /ip4/10.0.0.1/tcp/1/p2p/a --initial-peers "
                       f"/ip4/10.0.0.2/tcp/1/p2p/b --spec-owner {OWNER}")
    lines = render_table(report()).splitlines()
    assert lines[-2] == f"spec owner (signs the run spec): {OWNER}"
    assert lines[-1] == f"join through any of these: {command}"


def test_no_join_line_without_an_address_or_an_owner():
    assert join_command(report(addresses=[])) is None
    assert "no online peer announces an address" in render_table(report(addresses=[]))
    table = render_table(report(spec_owner=None))
    assert "spec owner" not in table and "join through" not in table
