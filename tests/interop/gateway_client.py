"""A pycapnp client of `capgate gateway` in front of a foreign Store server (store_server.py
or cxx/store_server.c++), for tests/interop/gateway.sh.

Usage: python gateway_client.py MODE UPSTREAM-LOG (tcp HOST PORT | unix PATH) [ARG...]

UPSTREAM-LOG is the upstream's stdout: its `call ...` lines say what reached it, its last
`live ...` line how many of its capabilities are alive. Modes:

  scenario  every Store, Namespace, Reader and Subscription method through the gateway, the
            upstream calling a Watcher implemented here, pipelining, the upstream's exception
            texts, concurrent calls, a large value, an oversized one (the gateway must run
            with --max-message-bytes "5 MiB"), and capability release both ways (the
            upstream frees what the client dropped, the client's Watcher is freed once the
            upstream drops it, everything is freed when the client disconnects).
  policy    the gateway denies Namespace.put/sub/watch (gateway_policy.toml): the client sees
            the denial's text, the upstream never sees the calls, a denied call's Watcher is
            released, allowed calls on the same connection work.
  churn     through a gateway with tight quotas (gateway_quotas.toml: max_exports = 8,
            max_open_answers = 16): hundreds of capabilities and calls, each released or
            finished, never reach them (the gateway's accounting sees every Release and
            Finish, both ways); holding 9 upstream capabilities at once aborts the connection
            with the max_exports reason.
  kill PID PORT
            a long poll is in flight through the gateway; the upstream (PID, listening on
            127.0.0.1:PORT) is killed: the call fails naming the upstream, and so does a new
            connection while it is down.
  fresh     a new connection works (after the upstream was restarted).

Exits non-zero with a message on the first failure.
"""

import asyncio
import gc
import os
import re
import signal
import socket
import sys
import time
import weakref

import capnp

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "schema", "store.capnp")
store_capnp = capnp.load(SCHEMA)

LIVE_KINDS = ("namespaces", "readers", "subscriptions", "watchers")


class Watcher(store_capnp.Watcher.Server):
    def __init__(self):
        self.events = asyncio.Queue()

    async def changed(self, key, value, deleted, **kwargs):
        self.events.put_nowait((key, bytes(value), deleted))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


class Upstream:
    """What the upstream's log says."""

    def __init__(self, path):
        self.path = path
        self.since = 0

    def mark(self):
        """From now on, calls() sees only the calls logged after this."""
        self.since = len(self.lines(everything=True))

    def lines(self, everything=False):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        return lines if everything else lines[self.since :]

    def calls(self, prefix):
        return [l for l in self.lines() if l.startswith("call " + prefix)]

    def live(self):
        last = [l for l in self.lines(everything=True) if l.startswith("live ")]
        if not last:
            return {}
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", last[-1])}

    async def until_live(self, want, what, timeout=10):
        """Waits until every count in `want` is as given."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.live()
            if all(got.get(k) == v for k, v in want.items()):
                check(True, what)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: upstream has {got}, expected {want}")
            gc.collect()
            await asyncio.sleep(0.02)


async def until(cond, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        gc.collect()
        await asyncio.sleep(0.02)
    check(True, what)


async def connect(target):
    if target[0] == "tcp":
        stream = await capnp.AsyncIoStream.create_connection(host=target[1], port=int(target[2]))
    else:
        stream = await capnp.AsyncIoStream.create_unix_connection(path=target[1])
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(store_capnp.Store)


async def expect_error(call, texts, what, kind="FAILED"):
    """Awaits `call`, which must fail with every text of `texts` in its description."""
    try:
        await call
    except capnp.KjException as e:
        for t in texts:
            if t not in e.description:
                raise AssertionError(f"{what}: {t!r} not in {e.description!r}")
        if kind is not None and e.type != kind:
            raise AssertionError(f"{what}: kind {e.type}, expected {kind} ({e.description})")
        first = e.description.strip().splitlines()[-1]
        check(True, f"{what}: {first}")
        return e
    raise AssertionError(f"{what}: the call succeeded")


async def scenario(up, target):
    tag = f"gw-{os.getpid()}"
    up.mark()
    client, store = await connect(target)
    await store.namespaces()
    print("ok: bootstrap through the gateway")
    base = up.live()
    check(all(k in base for k in LIVE_KINDS), f"upstream reports live capabilities: {base}")
    base = {k: base[k] for k in LIVE_KINDS}

    # Store.namespace, Namespace.put/get/list/delete.
    ns = (await store.namespace(tag)).ns
    await ns.put("a", b"1")
    await ns.put("b", b"2")
    await ns.put("other", b"3")
    got = await ns.get("a")
    check(got.found and bytes(got.value) == b"1", "put then get")
    check(not (await ns.get("missing")).found, "get of a missing key: found = false")
    check(list((await ns.list("")).keys) == ["a", "b", "other"], "list all keys")
    check(list((await ns.list("o")).keys) == ["other"], "list by prefix")
    check((await ns.delete("b")).existed, "delete of a key that exists")
    check(not (await ns.delete("b")).existed, "delete of a key that does not")
    check(tag in list((await store.namespaces()).names), "Store.namespaces lists it")
    check(len(up.calls("Namespace.put key=")) == 3, "the puts reached the upstream")

    # Pipelined chain: sub of sub, used before any answer arrives.
    deep = store.namespace(tag).ns.sub("x").ns.sub("y").ns
    put = deep.put("k", b"deep")
    got = await store.namespace(tag).ns.sub("x").ns.sub("y").ns.get("k")
    await put
    check(got.found and bytes(got.value) == b"deep", "pipelined chain put and get")
    del deep, put, got

    # The attenuated view: only Reader's methods.
    reader = (await ns.readOnly()).reader
    check(list((await reader.list("")).keys) == ["a", "other"], "readOnly().list")
    check(bytes((await reader.get("a")).value) == b"1", "readOnly().get")
    check(up.live()["readers"] == base["readers"] + 1, "the upstream holds the Reader")

    # Callbacks: the upstream calls a Watcher implemented here, in order.
    watcher = Watcher()
    watcher_ref = weakref.ref(watcher)
    sub = (await ns.watch(watcher)).subscription
    await ns.put("w", b"x")
    await ns.put("w", b"y")
    await ns.delete("w")
    events = [await asyncio.wait_for(watcher.events.get(), 5) for _ in range(3)]
    check(
        events == [("w", b"x", False), ("w", b"y", False), ("w", b"", True)],
        "the upstream called the Watcher for each change, in order",
    )
    await sub.cancel()
    await ns.put("after-cancel", b"z")
    await asyncio.sleep(0.2)
    check(watcher.events.empty(), "no calls after Subscription.cancel")
    # The client drops the Subscription (and with it the watch call's answer): the upstream
    # frees it and releases the Watcher; the Release comes through the gateway and frees
    # the Python object (pycapnp holds an exported capability until its peer releases it).
    del sub, watcher
    await up.until_live(
        {"subscriptions": base["subscriptions"], "watchers": base["watchers"]},
        "a dropped Subscription is released, the upstream's delivery ends",
    )
    await until(lambda: watcher_ref() is None, "the Watcher is released once the upstream drops it")

    # Long poll: Namespace.wait returns once another call puts the key.
    waiting = asyncio.ensure_future(ns.wait("later"))
    await asyncio.sleep(0.1)
    check(not waiting.done(), "wait blocks until the key exists")
    await ns.put("later", b"now")
    check(bytes((await asyncio.wait_for(waiting, 5)).value) == b"now", "wait returns the value")

    # The upstream's exceptions, with its text, and pipelined calls on a failed answer.
    await expect_error(store.namespace(""), ["invalid namespace name"], "Store.namespace(\"\")")
    await expect_error(
        store.namespace("").ns.get("k"), ["invalid namespace name"], "a call pipelined on it"
    )
    await expect_error(ns.sub(""), ["invalid namespace name"], "Namespace.sub(\"\")")

    # Namespace.remove / Store.remove: the removed namespace's capabilities fail, a long
    # poll on it ends with the upstream's error.
    child = (await ns.sub("child")).ns
    await child.put("k", b"v")
    polling = asyncio.ensure_future(child.wait("never"))
    await asyncio.sleep(0.1)
    check((await ns.remove("child")).existed, "Namespace.remove of a sub-namespace")
    check(not (await ns.remove("child")).existed, "Namespace.remove of one that is gone")
    await expect_error(child.get("k"), ["namespace no longer exists"], "a call on a removed namespace")
    await expect_error(
        asyncio.wait_for(polling, 5), ["namespace no longer exists"], "a long poll on it"
    )
    del child, polling

    # Many calls at once on one connection (under the default max_inflight_calls = 128),
    # and a large value (several segments).
    results = await asyncio.gather(*[ns.put(f"c{i:03}", b"v" * i) for i in range(100)])
    check(len(results) == 100, "100 concurrent puts")
    got = await asyncio.gather(*[ns.get(f"c{i:03}") for i in range(100)])
    check(all(bytes(g.value) == b"v" * i for i, g in enumerate(got)), "100 concurrent gets")
    del results, got
    big = os.urandom(3 << 20)
    await ns.put("big", big)
    check(bytes((await ns.get("big")).value) == big, "a 3 MiB value round trip")

    # An oversized message (gateway.sh runs these gateways with --max-message-bytes "5 MiB"):
    # the gateway refuses it with the reason and never relays it; other connections go on.
    # Just over the limit, so the gateway's bounded linger drains it all (see gateway.sh).
    big_client, big_store = await connect(target)
    await expect_error(
        big_store.namespace(tag).ns.put("oversized", b"x" * ((5 << 20) + 4096)),
        ["max_message_bytes = 5242880"],
        "an oversized message is refused by the gateway",
        kind=None,
    )
    check(up.calls("Namespace.put key=oversized") == [], "the upstream never saw it")
    check(bytes((await ns.get("a")).value) == b"1", "the other connection goes on")
    big_client.close()
    del big_client, big_store

    # Capability release: what the client drops, the upstream frees.
    held = up.live()
    check(
        held["namespaces"] > base["namespaces"] and held["readers"] == base["readers"] + 1,
        f"the upstream holds the client's capabilities: {held}",
    )
    del reader
    await up.until_live({"readers": base["readers"]}, "a dropped Reader is released")
    del ns, waiting
    await up.until_live(base, f"every dropped capability is released: {base}")

    # The connection still works, and the gateway drops everything when the client leaves.
    ns = store.namespace(tag).ns
    reader = ns.readOnly().reader
    watcher = Watcher()
    sub = (await ns.watch(watcher)).subscription
    check(list((await reader.list("c00")).keys)[:2] == ["c000", "c001"], "new calls after releases")
    check(up.live()["subscriptions"] == base["subscriptions"] + 1, "held again")
    check((await store.remove(tag)).existed, "Store.remove")
    check(tag not in list((await store.namespaces()).names), "Store.namespaces no longer lists it")
    client.close()
    del client, store, ns, reader, sub
    await up.until_live({k: 0 for k in LIVE_KINDS},
                        "the upstream frees everything once the client disconnects")
    print("all gateway interop checks passed")


async def policy(up, target):
    tag = f"gw-policy-{os.getpid()}"
    up.mark()
    client, store = await connect(target)
    ns = store.namespace(tag).ns
    got = await ns.get("k")
    check(not got.found, "allowed: Store.namespace and Reader.get")

    e = await expect_error(
        ns.put("k", b"v"),
        ['permission denied: Namespace.put is not allowed for client "reader"'],
        "Namespace.put denied",
    )
    check(e.type == "FAILED", f"denied call kind: {e.type}")
    await expect_error(
        ns.sub("x").ns.get("k"),
        ['permission denied: Namespace.sub is not allowed for client "reader"'],
        "a call pipelined on a denied one gets the same denial",
    )
    watcher = Watcher()
    watcher_ref = weakref.ref(watcher)
    await expect_error(
        ns.watch(watcher),
        ['permission denied: Namespace.watch is not allowed for client "reader"'],
        "Namespace.watch denied",
    )
    del watcher
    await until(lambda: watcher_ref() is None, "the denied call's Watcher is released by the gateway")

    got = await ns.get("k")
    check(not got.found, "after the denied put, get: not found")
    check(list((await ns.list("")).keys) == [], "list: empty")
    for denied in ("Namespace.put", "Namespace.sub", "Namespace.watch"):
        check(up.calls(denied) == [], f"the upstream never saw {denied}")
    check(len(up.calls(f"Store.namespace name={tag}")) >= 1, "the upstream saw the allowed calls")
    await store.namespaces()
    check(len(up.calls("Store.namespaces")) == 1, "allowed calls on the same connection still work")
    client.close()
    print("all gateway policy interop checks passed")


async def churn(up, target):
    tag = f"gw-churn-{os.getpid()}"
    client, store = await connect(target)
    await store.namespaces()
    base = up.live()
    rounds = 150
    for i in range(rounds):
        ns = (await store.namespace(tag)).ns
        await ns.put("k", b"%d" % i)
        reader = (await ns.readOnly()).reader
        sub_ns = (await ns.sub("s")).ns
        got = await reader.get("k")
        assert bytes(got.value) == b"%d" % i, got
        watcher = Watcher()
        sub = (await sub_ns.watch(watcher)).subscription
        await sub_ns.put("w", b"x")
        await asyncio.wait_for(watcher.events.get(), 5)
        await sub.cancel()
        del ns, reader, sub_ns, got, watcher, sub
        gc.collect()
    check(True, f"{rounds} rounds of 4 upstream capabilities, a Watcher and 8 calls each")
    await up.until_live({k: base[k] for k in LIVE_KINDS}, "the upstream released them all")
    check(list((await store.namespace(tag).ns.list("")).keys) == ["k"], "the connection still works")

    # The quota is enforced: the Store and 7 Namespaces are 8 capabilities; the 8th
    # Namespace's Return makes 9 and the gateway aborts the connection with the reason.
    held = []
    try:
        for i in range(8):
            held.append((await store.namespace(f"{tag}-{i}")).ns)
        await store.namespaces()
        raise AssertionError("9 capabilities held under max_exports = 8")
    except capnp.KjException as e:
        check(len(held) == 7, f"the Store and {len(held)} Namespaces held, the next one cut the connection off")
        check("max_exports = 8 exceeded" in e.description, f"with the reason: {e.description}")
    client.close()


async def kill(up, target, pid, upstream_port):
    up.mark()
    client, store = await connect(target)
    ns = store.namespace(f"gw-kill-{os.getpid()}").ns
    waiting = asyncio.ensure_future(ns.wait("never"))
    # In flight upstream once a later call on the same connection came back.
    await store.namespaces()
    await until(lambda: len(up.calls("Namespace.wait key=never")) >= 1, "the long poll reached the upstream")
    check(not waiting.done(), "the long poll is in flight")
    os.kill(pid, signal.SIGKILL)
    e = await expect_error(asyncio.wait_for(waiting, 10), ["upstream"], "in-flight call when the upstream dies", kind=None)
    check("capgate: upstream tcp://127.0.0.1:" in e.description, "the gateway names the upstream")
    await expect_error(store.namespaces(), ["upstream"], "a later call on that connection", kind=None)
    client.close()
    # Once the upstream's listening socket is gone too (it closes after its connections: a
    # connect in between is accepted, then reset)...
    def refused():
        try:
            socket.create_connection(("127.0.0.1", upstream_port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True
    await until(refused, "the upstream no longer accepts connections")
    # A new connection while the upstream is down: told at once, naming it.
    started = time.monotonic()
    _, store = await connect(target)
    await expect_error(store.namespaces(), ["upstream", "unreachable"], "a new connection while it is down", kind=None)
    check(time.monotonic() - started < 4, "told at once, not after the connect timeout")
    print("all upstream-killed checks passed")


async def fresh(up, target):
    _, store = await connect(target)
    ns = store.namespace(f"gw-fresh-{os.getpid()}").ns
    await ns.put("k", b"again")
    check(bytes((await ns.get("k")).value) == b"again", "a new connection is served by the restarted upstream")


async def main(argv):
    mode, log = argv[0], Upstream(argv[1])
    if mode == "kill":
        target, pid, port = argv[2:-2], int(argv[-2]), int(argv[-1])
        await kill(log, target, pid, port)
    else:
        await {"scenario": scenario, "policy": policy, "churn": churn, "fresh": fresh}[mode](log, argv[2:])


if __name__ == "__main__":
    asyncio.run(capnp.run(main(sys.argv[1:])))
