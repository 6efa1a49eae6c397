"""Cluster settings without sockets: node tags in session ids, StaticPeers, Cluster's checks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamkit.session.cluster import (
    MAX_NODE_TAG,
    Address,
    Cluster,
    PeerDirectory,
    StaticPeers,
    check_address,
    check_node,
    format_address,
    node_of,
    tagged_session_id,
)
from streamkit.session.protocol import SESSION_ID_SIZE
from tests.test_hub_redis import HIDE_REDIS, run_python

KEY = b"k" * 32
TAGS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
    min_size=1,
    max_size=MAX_NODE_TAG,
)


@given(TAGS)
def test_a_tagged_session_id_names_its_node(tag: str) -> None:
    session_id = tagged_session_id(tag)
    assert len(session_id) == SESSION_ID_SIZE
    assert node_of(session_id) == tag


def test_tagged_ids_are_random_past_the_tag() -> None:
    ids = {tagged_session_id("abcdefgh") for _ in range(1000)}
    assert len(ids) == 1000  # 7 random bytes each


@given(st.binary(min_size=0, max_size=20))
def test_any_bytes_give_a_valid_tag_or_none(session_id: bytes) -> None:
    tag = node_of(session_id)
    if tag is not None:
        assert check_node(tag) == tag
        assert len(session_id) == SESSION_ID_SIZE


@pytest.mark.parametrize(
    "session_id",
    [bytes(16), b"\x09" + b"a" * 15, b"\x01!" + bytes(14), b"\x01a" + bytes(13), b"\xff" * 16],
)
def test_untagged_ids_carry_no_node(session_id: bytes) -> None:
    assert node_of(session_id) is None


@pytest.mark.parametrize("node", ["", "abcdefghi", "a b", "é", "a/b", "a:1"])
def test_a_bad_node_tag_names_the_rule(node: str) -> None:
    with pytest.raises(ValueError, match="must be 1 to 8 ASCII letters, digits"):
        check_node(node)


def test_a_node_tag_is_a_string() -> None:
    with pytest.raises(TypeError, match="a node tag is a str, not bytes"):
        check_node(b"a")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("10.0.0.1", 7001), ("10.0.0.1", 7001)),
        (["::1", 0], ("::1", 0)),
        ("/run/node.sock", "/run/node.sock"),
        (Path("/run/node.sock"), "/run/node.sock"),
    ],
)
def test_addresses_are_normalised(address: object, expected: Address) -> None:
    assert check_address(address) == expected


@pytest.mark.parametrize(
    "address", [("h", 70000), ("h", "1"), ("h",), "", b"/x", ("h", True), None, 7001]
)
def test_bad_addresses_are_refused(address: object) -> None:
    with pytest.raises(ValueError, match=r"a peer address is \(host, port\) or a Unix socket path"):
        check_address(address)


def test_addresses_format_for_messages() -> None:
    assert format_address(("10.0.0.1", 1)) == "10.0.0.1:1"
    assert format_address(("::1", 1)) == "[::1]:1"
    assert format_address("/x.sock") == "/x.sock"


async def test_static_peers_look_nodes_up() -> None:
    peers = StaticPeers({"a": ("10.0.0.1", 7001), "b": "/run/b.sock"})
    assert isinstance(peers, PeerDirectory)
    assert await peers.lookup("a") == ("10.0.0.1", 7001)
    assert await peers.lookup("b") == "/run/b.sock"
    assert await peers.lookup("c") is None
    await peers.join("a", ("0.0.0.0", 7001))
    with pytest.raises(ValueError, match=r"node 'c' is not in the static peer list \(a, b\)"):
        await peers.join("c", ("h", 1))
    await peers.leave()


def test_static_peers_check_their_entries() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        StaticPeers({})
    with pytest.raises(ValueError, match="must be 1 to 8"):
        StaticPeers({"far-too-long": ("h", 1)})
    with pytest.raises(ValueError, match="the address of node 'a'"):
        StaticPeers({"a": ("h", -1)})


def test_a_cluster_listens_on_its_static_entry_by_default() -> None:
    peers = StaticPeers({"a": ("10.0.0.1", 7001), "b": ("10.0.0.2", 7001)})
    cluster = Cluster("a", peers, KEY)
    assert cluster.listen_address == ("10.0.0.1", 7001)
    assert Cluster("a", peers, KEY, listen=["0.0.0.0", 7001]).listen_address == ("0.0.0.0", 7001)  # type: ignore[arg-type]
    assert KEY not in repr(cluster).encode()  # the key stays out of logs


class _Directory:
    async def join(self, node: str, address: Address) -> None:
        pass

    async def lookup(self, node: str) -> Address | None:
        return None

    async def leave(self) -> None:
        pass


def test_cluster_settings_are_checked() -> None:
    peers = StaticPeers({"a": ("10.0.0.1", 7001)})
    with pytest.raises(ValueError, match="the cluster key is 8 bytes; it needs at least 16"):
        Cluster("a", peers, b"k" * 8)
    with pytest.raises(TypeError, match="the cluster key is bytes, not str"):
        Cluster("a", peers, "k" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"node 'b' is not in the static peer list \(a\)"):
        Cluster("b", peers, KEY)
    with pytest.raises(ValueError, match="listen is needed"):
        Cluster("a", _Directory(), KEY)
    with pytest.raises(TypeError, match="peers must be a peer directory"):
        Cluster("a", {"a": ("h", 1)}, KEY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relay_timeout must be > 0"):
        Cluster("a", peers, KEY, relay_timeout=0)
    with pytest.raises(ValueError, match="advertise is"):
        Cluster("a", peers, KEY, advertise=("h", -1))
    with pytest.raises(ValueError, match="must be 1 to 8"):
        Cluster("", peers, KEY)
    cluster = Cluster("a", _Directory(), KEY, listen="/x.sock", ssl=ssl.create_default_context())
    assert cluster.listen_address == "/x.sock"


def test_the_cluster_modules_export_what_they_say() -> None:
    import streamkit.session
    import streamkit.session.cluster
    import streamkit.session.redis
    import streamkit.session.relay

    for module in (streamkit.session.cluster, streamkit.session.relay, streamkit.session.redis):
        for name in module.__all__:
            assert hasattr(module, name), name
    for name in ("Cluster", "ClusterStats", "PeerDirectory", "StaticPeers", "ServerStats"):
        assert name in streamkit.session.__all__, name
        assert getattr(streamkit.session, name) is getattr(
            streamkit.session.cluster if name != "ServerStats" else streamkit.session.server, name
        )


def test_a_cluster_imports_no_redis() -> None:
    done = run_python(
        "import sys, streamkit, streamkit.session, streamkit.session.redis\n"
        "from streamkit.session import *\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_redis_py_redis_peers_name_the_extra() -> None:
    done = run_python(
        HIDE_REDIS
        + "from streamkit.session.redis import RedisPeers\n"
        + "try:\n"
        + "    RedisPeers('redis://127.0.0.1:6379/0')\n"
        + "except ImportError as exc:\n"
        + "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "streamkit[redis]"' in done.stdout
