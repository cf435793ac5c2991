"""A pycapnp (Cap'n Proto C++) client exercising a running `capgate serve`.

Usage: python store_client.py (tcp HOST PORT | unix PATH)

Checks bootstrap, a pipelined chain, a Watcher implemented in Python and called by the
server, a remote exception's text, and that an oversized message is refused with the reason
while a fresh connection is served. Exits non-zero with a message on the first failure.
"""

import asyncio
import os
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "schema", "store.capnp")
store_capnp = capnp.load(SCHEMA)


class Watcher(store_capnp.Watcher.Server):
    def __init__(self):
        self.events = asyncio.Queue()

    async def changed(self, key, value, deleted, **kwargs):
        self.events.put_nowait((key, bytes(value), deleted))


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


async def connect(target):
    if target[0] == "tcp":
        stream = await capnp.AsyncIoStream.create_connection(host=target[1], port=int(target[2]))
    else:
        stream = await capnp.AsyncIoStream.create_unix_connection(path=target[1])
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(store_capnp.Store)


async def main(target):
    client, store = await connect(target)

    # Bootstrap and a plain call.
    await store.namespaces()
    print("ok: bootstrap")

    # Pipelined chain: every call is sent before the first answer arrives.
    c = store.namespace("py").ns.sub("b").ns.sub("c").ns
    await c.put("k", b"from python")
    got = await store.namespace("py").ns.sub("b").ns.sub("c").ns.get("k")
    check(got.found and bytes(got.value) == b"from python", "pipelined chain get")
    names = (await store.namespaces()).names
    check("py" in list(names), "namespaces lists 'py'")

    # Inherited methods through the attenuated Reader view.
    reader = store.namespace("py").ns.sub("b").ns.sub("c").ns.readOnly().reader
    listed = await reader.list("")
    check(list(listed.keys) == ["k"], "readOnly().list sees the key")

    # Callback: the server calls a Watcher implemented here.
    watcher = Watcher()
    ns = store.namespace("py").ns
    sub = (await ns.watch(watcher)).subscription
    await ns.put("w", b"1")
    key, value, deleted = await asyncio.wait_for(watcher.events.get(), 5)
    check((key, value, deleted) == ("w", b"1", False), "watcher called with the change")
    await ns.delete("w")
    key, value, deleted = await asyncio.wait_for(watcher.events.get(), 5)
    check((key, deleted) == ("w", True), "watcher called for the delete")
    await sub.cancel()

    # Long poll: wait returns once another call puts the key.
    later = f"later-{os.getpid()}"
    waiting = asyncio.ensure_future(ns.wait(later))
    await asyncio.sleep(0.05)
    check(not waiting.done(), "wait blocks until the key exists")
    await ns.put(later, b"now")
    check(bytes((await asyncio.wait_for(waiting, 5)).value) == b"now", "wait returns the value")

    # Remote exception text.
    try:
        await store.namespace("")
        raise AssertionError("empty namespace name accepted")
    except capnp.KjException as e:
        check("invalid namespace name" in str(e), f"remote exception text: {e.description}")

    # Oversized message: refused with the reason; a new connection is served at once.
    big_client, big_store = await connect(target)
    try:
        await big_store.namespace("py").ns.put("big", b"x" * (5 << 20))
        raise AssertionError("oversized message accepted")
    except capnp.KjException as e:
        check("max_message_bytes" in str(e), f"oversized message refused: {e.description}")
    _, fresh = await connect(target)
    check("py" in list((await fresh.namespaces()).names), "a new connection is served")
    print("all interop checks passed")


if __name__ == "__main__":
    asyncio.run(capnp.run(main(sys.argv[1:])))
