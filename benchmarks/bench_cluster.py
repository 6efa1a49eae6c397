"""Sessions on a cluster behind a load balancer: resumes relayed to their owner, and their cost.

    python benchmarks/bench_cluster.py [--quick] [--sessions 2000] [--groups 50]
                                       [--cut-every 0.1] [--echo-every 1] [--json PATH]

Four node processes serve resumable sessions (an echo handler), each its own
node of one cluster (``serve_resumable(..., cluster=...)``), their cluster
ports on Unix sockets. :class:`streamkit.testing.Balancer` instances in a
process of their own spread connections over the nodes' public ports, round
robin: ``--groups`` of them (50), each for its share of the sessions, so a
cut can take one group's connections.

1. **Resumes.** ``--sessions`` sessions (2,000) open through the balancers.
   *Storms*: every connection cut at once, and the time until every session
   has echoed a frame again (so has resumed, through whichever node) gives
   the resumes per second, with the share the owners got relayed by another
   node (three storms). *Cuts*: a cut every ``--cut-every`` seconds (0.1)
   for a while, each session echoing a numbered frame every
   ``--echo-every`` seconds (1): *rolling*, each cut takes the connections
   of one group in turn (40 sessions; every session cut every 5 s); *all*,
   each cut takes every connection. For each: resumes welcomed while the
   cuts went on, per second, the share relayed, relays that failed, and
   how long after the last cut every session had echoed again; then the
   sessions lost (none) and the frames echoed, each back once, in order. A
   storm of 2,000 takes this machine longer than 100 ms, so with every
   connection cut every 100 ms few resumes or none complete: none is lost,
   and each completes once the cuts stop. One machine runs every process
   (clients, balancers, four nodes) on its cores, so these rates are the
   simulation's, not a node's: on N machines each node handles its share of
   the resumes and of the relays.
2. **Relay cost.** One session uploads frames to its owner, a node of its
   own, straight (client -> owner), beside one session that reaches the
   same owner through another node (client -> front -> owner), alternately
   in the same run, best of the repeats; no balancer in either path. The
   relayed session is made by pointing a Unix-socket symlink at the owner
   to open it, then at the front and dropping the connection: its resume
   lands on the front, which relays it. The ratio is relayed / straight, as
   measured on this machine, where the front competes for the cores of the
   client and the owner; the CPU seconds per GB each process spends say
   what it would be with a core each (the nodes on machines of their own):
   the busiest process sets the pace, straight and relayed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import secrets
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

from _harness import receive_from_child

from streamkit.session import (
    Backoff,
    ClientSession,
    ServerSession,
    SessionSettings,
    connect_resumable,
    connect_resumable_unix,
    serve_resumable,
    serve_resumable_unix,
)
from streamkit.session.cluster import Cluster, StaticPeers
from streamkit.testing import Balancer

NODES = ("a", "b", "c", "d")
_SPAWN = multiprocessing.get_context("spawn")
#: Clients that come back at once after a cut, and keep trying through a busy minute.
CLIENT = SessionSettings(
    reconnect_backoff=Backoff(initial=0.01, maximum=0.5), max_reconnect_time=120.0
)
DONE = b"done"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- a node ---------------------------------------------------------------------------------


async def _echo(session: ServerSession) -> None:
    async for payload in session:
        await session.send(payload)


async def _sink(session: ServerSession) -> None:
    """Take frames until DONE, then answer it (the upload of phase 2)."""
    async for payload in session:
        if payload == DONE:
            await session.send(DONE)


async def _node(
    name: str, directory: str, key: bytes, public: str | None, pipe: Connection
) -> None:
    peers = StaticPeers({node: os.path.join(directory, f"{node}.cluster") for node in NODES})
    cluster = Cluster(name, peers, key)
    if public is None:
        server = await serve_resumable(
            _echo, "127.0.0.1", 0, cluster=cluster, max_sessions=20_000, resume_timeout=120
        )
        pipe.send(server.port)
    else:
        server = await serve_resumable_unix(_sink, public, cluster=cluster)
        pipe.send(public)
    loop = asyncio.get_running_loop()
    while (command := await loop.run_in_executor(None, pipe.recv)) != "stop":
        pipe.send(time.process_time() if command == "cpu" else server.stats)
    pipe.send(server.stats)
    server.close()
    await server.wait_closed()


def _node_main(name: str, directory: str, key: bytes, public: str | None, pipe: Connection) -> None:
    _raise_fd_limit()
    asyncio.run(_node(name, directory, key, public, pipe))


# -- the balancer ------------------------------------------------------------------------------


async def _balance(ports: list[int], groups: int, cut_every: float, pipe: Connection) -> None:
    """``groups`` balancers over the nodes, each for its share of the sessions."""
    async with contextlib.AsyncExitStack() as stack:
        balancers = [
            await stack.enter_async_context(Balancer([("127.0.0.1", port) for port in ports]))
            for _ in range(groups)
        ]
        pipe.send([balancer.port for balancer in balancers])
        loop = asyncio.get_running_loop()

        async def cut(rolling: bool) -> None:
            turn = 0
            while True:
                await asyncio.sleep(cut_every)
                for balancer in balancers[turn % groups :][:1] if rolling else balancers:
                    balancer.cut()
                turn += 1

        cutting: asyncio.Task[None] | None = None
        while (command := await loop.run_in_executor(None, pipe.recv)) != "stop":
            if command == "cut once":
                for balancer in balancers:
                    balancer.cut()
            elif command in ("cut all", "cut rolling"):
                cutting = asyncio.create_task(cut(command == "cut rolling"))
            elif cutting is not None:  # "stop cutting"
                cutting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cutting
            pipe.send(sum(balancer.stats.cuts for balancer in balancers))


def _balancer_main(ports: list[int], groups: int, cut_every: float, pipe: Connection) -> None:
    _raise_fd_limit()
    asyncio.run(_balance(ports, groups, cut_every, pipe))


class _Child:
    """A spawned process and our end of its pipe."""

    def __init__(self, role: str, target: Any, *args: Any) -> None:
        self.role = role
        self.pipe, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=target, args=(*args, child), daemon=True)
        self.process.start()
        child.close()

    def recv(self) -> Any:
        return receive_from_child(self.pipe, self.process, self.role)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


# -- phase 1: resumes ------------------------------------------------------------------------


class _Cluster:
    """The node processes and the balancer of phase 1."""

    def __init__(self, directory: str, groups: int, cut_every: float) -> None:
        key = secrets.token_bytes(32)
        self.nodes = [
            _Child(f"node {name}", _node_main, name, directory, key, None) for name in NODES
        ]
        self.balancer: _Child | None = None
        ports = [node.recv() for node in self.nodes]
        self.balancer = _Child("balancer", _balancer_main, ports, groups, cut_every)
        self.ports: list[int] = self.balancer.recv()

    def tell_balancer(self, command: str) -> int:
        """Send the balancer ``command``; the cuts it made so far."""
        assert self.balancer is not None
        self.balancer.pipe.send(command)
        cuts: int = self.balancer.recv()
        return cuts

    def stats(self) -> tuple[int, int, int]:
        """Resumes welcomed, of them relayed, and relays failed, over every node so far."""
        for node in self.nodes:
            node.pipe.send("stats")
        stats = [node.recv() for node in self.nodes]
        return (
            sum(each.resumes for each in stats),
            sum(each.cluster.relayed_in for each in stats),
            sum(each.cluster.relays_failed for each in stats),
        )

    def stop(self) -> None:
        for child in (*self.nodes, self.balancer):
            if child is not None:
                child.stop()


async def _echo_once(session: ClientSession, number: int) -> None:
    payload = number.to_bytes(8, "big") + bytes(56)
    await session.send(payload)
    echo = await session.recv()
    if echo != payload:
        raise AssertionError(f"session {session.id}: frame {number} came back as {echo!r}")


async def _client(
    session: ClientSession, stop: asyncio.Event, every: float, first: int, echoed: list[float]
) -> int:
    """Echo a numbered frame every ``every`` seconds until ``stop``; the frames echoed.

    ``echoed[0]`` is when the last echo came back.
    """
    number = first
    while not stop.is_set():
        await _echo_once(session, number)
        echoed[0] = time.perf_counter()
        number += 1
        await asyncio.sleep(every)
    return number - first


def _measured(cluster: _Cluster, before: tuple[int, int, int], seconds: float) -> dict[str, Any]:
    after = cluster.stats()
    resumes, relayed, failed = (now - then for now, then in zip(after, before, strict=True))
    return {
        "seconds": seconds,
        "resumes": resumes,
        "resumes_per_s": resumes / seconds,
        "relayed_share": relayed / resumes if resumes else 0.0,
        "failed": failed,
    }


async def _cuts(
    cluster: _Cluster, echoed: list[list[float]], how: str, seconds: float
) -> dict[str, Any]:
    """Cut for ``seconds`` (``how``: "cut all" or "cut rolling"); what the nodes did meanwhile."""
    before = cluster.stats()
    cuts_before = cluster.tell_balancer(how)
    await asyncio.sleep(seconds)
    cuts = cluster.tell_balancer("stop cutting") - cuts_before
    measured = _measured(cluster, before, seconds)
    measured["cuts"] = cuts
    # Every session back (an echo since the cuts stopped) before what comes next.
    stopped = time.perf_counter()
    while min(last for (last,) in echoed) < stopped:  # a lost session is reported after
        if time.perf_counter() - stopped > CLIENT.max_reconnect_time:
            break
        await asyncio.sleep(0.1)
    measured["back_in"] = time.perf_counter() - stopped
    return measured


async def _resumes(
    cluster: _Cluster, sessions: int, storms: int, seconds: float, every: float
) -> dict[str, Any]:
    opened: list[ClientSession] = []
    ports = cluster.ports
    start = time.perf_counter()
    while len(opened) < sessions:  # in batches: thousands at once would time out
        batch = min(100, sessions - len(opened))
        first = len(opened)
        opened += await asyncio.gather(
            *(
                connect_resumable("127.0.0.1", ports[n % len(ports)], settings=CLIENT)
                for n in range(first, first + batch)
            )
        )
    _progress(f"{sessions} sessions open in {time.perf_counter() - start:.1f} s")
    try:
        # Storms: every connection cut at once; timed until every session has
        # echoed a frame again (so has resumed, through any node).
        rows = []
        for storm in range(storms):
            before = cluster.stats()
            cluster.tell_balancer("cut once")
            start = time.perf_counter()
            await asyncio.gather(*(_echo_once(session, storm) for session in opened))
            rows.append(_measured(cluster, before, time.perf_counter() - start))
        # Cuts every cut_every seconds while the sessions echo: of one group
        # of sessions in turn, then of every connection; then every session
        # carries on (none lost, every frame back once, in order).
        stop = asyncio.Event()
        echoed = [[0.0] for _ in opened]
        clients = [
            asyncio.create_task(_client(session, stop, every, storms, last))
            for session, last in zip(opened, echoed, strict=True)
        ]
        rolling = await _cuts(cluster, echoed, "cut rolling", seconds)
        everything = await _cuts(cluster, echoed, "cut all", seconds)
        stop.set()
        results = await asyncio.gather(*clients, return_exceptions=True)
        lost = [result for result in results if isinstance(result, BaseException)]
        for failure in lost[:3]:
            _progress(f"a session failed: {failure!r}")
        frames = sum(result for result in results if isinstance(result, int))
        return {
            "sessions": sessions,
            "groups": len(ports),
            "storms": rows,
            "rolling": rolling,
            "all": everything,
            "lost": len(lost),
            "frames": frames,
        }
    finally:
        await asyncio.gather(*(session.close() for session in opened), return_exceptions=True)


def _progress(message: str) -> None:
    print(f"  ({message})", file=sys.stderr, flush=True)


def _phase_resumes(
    directory: str, sessions: int, groups: int, seconds: float, cut_every: float, echo_every: float
) -> dict[str, Any]:
    cluster = _Cluster(directory, groups, cut_every)
    try:
        return asyncio.run(_resumes(cluster, sessions, 3, seconds, echo_every))
    finally:
        cluster.stop()


# -- phase 2: one relayed session against a straight one -------------------------------------


async def _upload(session: ClientSession, payload: bytes, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await session.send(payload)
    await session.send(DONE)
    assert await session.recv() == DONE
    return time.perf_counter() - start


async def _relay_cost(
    directory: str, nodes: list[_Child], sizes: list[int], repeat: int, megabytes: int
) -> list[Any]:
    owner, front, link = (os.path.join(directory, name) for name in ("a.public", "b.public", "ab"))
    os.symlink(owner, link)
    straight = await connect_resumable_unix(owner, settings=CLIENT)
    relayed = await connect_resumable_unix(link, settings=CLIENT)
    os.unlink(link)
    os.symlink(front, link)
    relayed.reconnect()  # its resume reaches the front, which relays it to the owner
    rows = []
    try:
        for size in sizes:
            payload = b"x" * size
            count = max(100, megabytes * 1024 * 1024 // size)
            await _upload(straight, payload, count // 10)  # warm up both
            await _upload(relayed, payload, count // 10)
            times: dict[str, list[float]] = {"straight": [], "relayed": []}
            # CPU seconds of the client, the owner and the front, for each path.
            cpu = {path: [0.0, 0.0, 0.0] for path in times}
            for _ in range(repeat):
                for path, session in (("straight", straight), ("relayed", relayed)):
                    before = [time.process_time(), *_cpu(nodes)]
                    times[path].append(await _upload(session, payload, count))
                    after = [time.process_time(), *_cpu(nodes)]
                    for side in range(3):
                        cpu[path][side] += after[side] - before[side]
            best = {path: count * size / min(runs) / 1e6 for path, runs in times.items()}
            gigabytes = repeat * count * size / 1e9
            per_gb = {path: [spent / gigabytes for spent in sides] for path, sides in cpu.items()}
            rows.append(
                {"payload": size, "frames": count, "mb_per_s": best, "cpu_s_per_gb": per_gb}
            )
        assert relayed.stats.reconnects == 1 and straight.stats.reconnects == 0
    finally:
        await straight.close()
        await relayed.close()
    return rows


def _cpu(nodes: list[_Child]) -> list[float]:
    """The CPU seconds each node process has used."""
    for node in nodes:
        node.pipe.send("cpu")
    return [node.recv() for node in nodes]


def _phase_relay_cost(directory: str, sizes: list[int], repeat: int, megabytes: int) -> list[Any]:
    key = secrets.token_bytes(32)
    nodes = [
        _Child(f"node {name}", _node_main, name, directory, key, f"{directory}/{name}.public")
        for name in ("a", "b")
    ]
    try:
        for node in nodes:
            node.recv()
        rows = asyncio.run(_relay_cost(directory, nodes, sizes, repeat, megabytes))
        for node in nodes:
            node.pipe.send("stop")
        stats = [node.recv() for node in nodes]
        assert stats[0].cluster.relayed_in == 1 and stats[1].cluster.relayed_out == 1
    finally:
        for node in nodes:
            node.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run, fewer repeats")
    parser.add_argument("--sessions", type=int, default=2000, help="sessions in phase 1 (2000)")
    parser.add_argument("--cut-every", type=float, default=0.1, help="seconds between cuts (0.1)")
    parser.add_argument(
        "--groups", type=int, default=50, help="balancers, each for its share of the sessions (50)"
    )
    parser.add_argument(
        "--echo-every", type=float, default=1.0, help="seconds between a session's echoes (1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    seconds = 5.0 if args.quick else 15.0
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        print(f"{len(NODES)} nodes behind a round-robin balancer, {args.sessions} sessions")
        resumes = _phase_resumes(
            directory, args.sessions, args.groups, seconds, args.cut_every, args.echo_every
        )
        print(f"storms: every connection cut at once, until all {args.sessions} have echoed again")
        print(f"{'storm':>8} {'seconds':>8} {'resumes':>8} {'resumes/s':>10} {'relayed':>8}")
        for number, storm in enumerate(resumes["storms"], 1):
            print(
                f"{number:>8} {storm['seconds']:>8.2f} {storm['resumes']:>8} "
                f"{storm['resumes_per_s']:>10,.0f} {storm['relayed_share']:>8.0%}"
            )
        group = args.sessions // args.groups
        print(
            f"a cut every {args.cut_every:g} s for {seconds:.0f} s, each session echoing a "
            f"frame every {args.echo_every:g} s; rolling: the {group} sessions of one of "
            f"{args.groups} balancers in turn, all: every connection"
        )
        print(
            f"{'cut':>8} {'cuts':>5} {'resumes':>8} {'resumes/s':>10} {'relayed':>8} "
            f"{'failed':>7} {'all back in':>12}"
        )
        for name in ("rolling", "all"):
            row = resumes[name]
            print(
                f"{name:>8} {row['cuts']:>5} {row['resumes']:>8} {row['resumes_per_s']:>10,.0f} "
                f"{row['relayed_share']:>8.0%} {row['failed']:>7} {row['back_in']:>10.1f} s"
            )
        print(
            f"sessions lost: {resumes['lost']}; frames echoed: {resumes['frames']}, "
            "every one back once, in order"
        )
        print()
        repeat = 2 if args.quick else 5
        megabytes = 32 if args.quick else 128
        print(
            f"one session uploading {megabytes} MiB to its owner: straight, or relayed by "
            f"another node; best of {repeat}, alternately"
        )
        rows = _phase_relay_cost(directory, [4096, 65536], repeat, megabytes)
        print(
            f"{'payload':>8} {'straight MB/s':>14} {'relayed MB/s':>13} {'ratio':>6}   "
            f"{'CPU s/GB: client':>16} {'owner':>6} {'front':>6}   {'one core each':>13}"
        )
        for row in rows:
            rates, cpu = row["mb_per_s"], row["cpu_s_per_gb"]
            row["ratio"] = rates["relayed"] / rates["straight"]
            # With a core for each process (the nodes on machines of their own),
            # the busiest one sets the pace: its CPU per GB, straight and relayed.
            row["one_core_each"] = max(cpu["straight"][:2]) / max(cpu["relayed"])
            client, owner, front = cpu["relayed"]
            print(
                f"{row['payload']:>8} {rates['straight']:>14,.1f} {rates['relayed']:>13,.1f} "
                f"{row['ratio']:>6.2f}   {client:>16.2f} {owner:>6.2f} {front:>6.2f}   "
                f"{row['one_core_each']:>13.2f}"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version, "resumes": resumes, "relay": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
