"""A pycapnp (Cap'n Proto C++) server for the demo Store schema (schema/store.capnp): the
upstream the gateway interop test (gateway.sh) puts `capgate gateway` in front of.

Usage: python store_server.py (tcp HOST PORT | unix PATH)

PORT may be 0 (any free port). Prints `listening on tcp://HOST:PORT` (or `listening on
unix:PATH`) once it accepts connections, then one line per call it receives (`call
Interface.method key=...`) and one `live ...` line each time the number of its live
capabilities changes, so a test can tell what reached it and what was released.
Errors are plain Python exceptions: pycapnp sends their text (a traceback ending in the
message) as the remote exception's description.
"""

import asyncio
import os
import signal
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "schema", "store.capnp")
store_capnp = capnp.load(SCHEMA)

MAX_NAME_BYTES = 256
MAX_PENDING_CHANGES = 64

LIVE = {"stores": 0, "namespaces": 0, "readers": 0, "subscriptions": 0, "watchers": 0}


def log(line):
    print(line, flush=True)


def live(kind, delta):
    LIVE[kind] += delta
    log("live " + " ".join(f"{k}={v}" for k, v in LIVE.items()))


class Tracked:
    """Counts itself in LIVE while pycapnp holds it (the capability is referenced)."""

    kind = None

    def __init__(self):
        live(self.kind, 1)

    def __del__(self):
        live(self.kind, -1)


class Ns:
    """One namespace's data."""

    def __init__(self):
        self.keys = {}
        self.children = {}
        self.watchers = {}  # id -> asyncio.Queue
        self.changed = asyncio.Event()
        self.removed = False

    def notify(self, key, value, deleted):
        self.changed.set()
        self.changed = asyncio.Event()
        for wid, queue in list(self.watchers.items()):
            if queue.qsize() >= MAX_PENDING_CHANGES:
                # Too slow (or gone): dropped rather than buffered.
                end_watch(self, wid)
            else:
                queue.put_nowait((key, value, deleted))

    def drop(self):
        """Removed with everything below it: long polls wake to find it gone."""
        self.removed = True
        self.changed.set()
        for wid in list(self.watchers):
            end_watch(self, wid)
        for child in self.children.values():
            child.drop()
        self.children.clear()


def end_watch(ns, wid):
    """Ends a watch: its deliverer sends what is queued, then stops."""
    queue = ns.watchers.pop(wid, None)
    if queue is not None:
        queue.put_nowait(None)


def alive(ns):
    if ns.removed:
        raise RuntimeError(
            "namespace no longer exists: it was removed (Store.remove or Namespace.remove)"
        )
    return ns


def check_name(name):
    if not name:
        raise ValueError("invalid namespace name: it must not be empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"invalid namespace name: {len(name.encode())} bytes exceed max_name_bytes = {MAX_NAME_BYTES}"
        )


ROOT = Ns()
NEXT_WATCH_ID = [0]


def open_child(parent, name):
    check_name(name)
    alive(parent)
    if name not in parent.children:
        parent.children[name] = Ns()
    return parent.children[name]


def remove_child(parent, name):
    alive(parent)
    ns = parent.children.pop(name, None)
    if ns is None:
        return False
    ns.drop()
    return True


class ReaderMixin:
    async def get(self, key, _context, **kwargs):
        log(f"call Reader.get key={key}")
        ns = alive(self.ns)
        r = _context.results
        if key in ns.keys:
            r.value = ns.keys[key]
            r.found = True
        else:
            r.found = False

    async def list(self, prefix, _context, **kwargs):
        log(f"call Reader.list prefix={prefix}")
        ns = alive(self.ns)
        _context.results.keys = sorted(k for k in ns.keys if k.startswith(prefix))


class ReaderImpl(ReaderMixin, Tracked, store_capnp.Reader.Server):
    kind = "readers"

    def __init__(self, ns):
        super().__init__()
        self.ns = ns


class SubscriptionImpl(Tracked, store_capnp.Subscription.Server):
    kind = "subscriptions"

    def __init__(self, ns, wid):
        super().__init__()
        self.ns = ns
        self.wid = wid

    async def cancel(self, _context, **kwargs):
        log("call Subscription.cancel")
        end_watch(self.ns, self.wid)

    def __del__(self):
        end_watch(self.ns, self.wid)
        super().__del__()


async def deliver(watcher, queue, ns, wid):
    """Calls the client's watcher for each change, in order, until the watch ends (None is
    queued) or the watcher fails (its client is gone)."""
    live("watchers", 1)
    try:
        while (change := await queue.get()) is not None:
            try:
                await watcher.changed(*change)
            except capnp.KjException as e:
                log(f"watcher failed; dropping it: {e.description}")
                end_watch(ns, wid)
                break
    finally:
        del watcher
        live("watchers", -1)


class NamespaceImpl(ReaderMixin, Tracked, store_capnp.Namespace.Server):
    kind = "namespaces"

    def __init__(self, ns):
        super().__init__()
        self.ns = ns

    async def put(self, key, value, _context, **kwargs):
        log(f"call Namespace.put key={key}")
        ns = alive(self.ns)
        value = bytes(value)
        ns.keys[key] = value
        ns.notify(key, value, False)

    async def delete(self, key, _context, **kwargs):
        log(f"call Namespace.delete key={key}")
        ns = alive(self.ns)
        existed = ns.keys.pop(key, None) is not None
        if existed:
            ns.notify(key, b"", True)
        _context.results.existed = existed

    async def sub(self, name, _context, **kwargs):
        log(f"call Namespace.sub name={name}")
        _context.results.ns = NamespaceImpl(open_child(self.ns, name))

    async def readOnly(self, _context, **kwargs):
        log("call Namespace.readOnly")
        _context.results.reader = ReaderImpl(alive(self.ns))

    async def watch(self, watcher, _context, **kwargs):
        log("call Namespace.watch")
        ns = alive(self.ns)
        # The Watcher is held by the delivery task below: release the params now (else they,
        # and the Watcher with them, stay until the caller's Finish).
        _context.release_params()
        NEXT_WATCH_ID[0] += 1
        wid = NEXT_WATCH_ID[0]
        queue = asyncio.Queue()  # at most MAX_PENDING_CHANGES and the end
        ns.watchers[wid] = queue
        asyncio.ensure_future(deliver(watcher, queue, ns, wid))
        _context.results.subscription = SubscriptionImpl(ns, wid)

    async def wait(self, key, _context, **kwargs):
        log(f"call Namespace.wait key={key}")
        while True:
            ns = alive(self.ns)
            if key in ns.keys:
                _context.results.value = ns.keys[key]
                return
            await ns.changed.wait()

    async def remove(self, name, _context, **kwargs):
        log(f"call Namespace.remove name={name}")
        _context.results.existed = remove_child(self.ns, name)


class StoreImpl(Tracked, store_capnp.Store.Server):
    kind = "stores"

    async def namespace(self, name, _context, **kwargs):
        log(f"call Store.namespace name={name}")
        _context.results.ns = NamespaceImpl(open_child(ROOT, name))

    async def namespaces(self, _context, **kwargs):
        log("call Store.namespaces")
        _context.results.names = sorted(ROOT.children)

    async def remove(self, name, _context, **kwargs):
        log(f"call Store.remove name={name}")
        _context.results.existed = remove_child(ROOT, name)


async def serve(stream):
    await capnp.TwoPartyServer(stream, bootstrap=StoreImpl()).on_disconnect()


async def main(argv):
    if argv[0] == "tcp":
        server = await capnp.AsyncIoStream.create_server(serve, argv[1], int(argv[2]))
        host, port = server.sockets[0].getsockname()[:2]
        where = f"tcp://{host}:{port}"
    elif argv[0] == "unix":
        if os.path.exists(argv[1]):
            os.unlink(argv[1])
        server = await capnp.AsyncIoStream.create_unix_server(serve, argv[1])
        where = f"unix:{argv[1]}"
    else:
        raise SystemExit(__doc__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    log(f"listening on {where}")
    async with server:
        await stop.wait()
    if argv[0] == "unix" and os.path.exists(argv[1]):
        os.unlink(argv[1])


if __name__ == "__main__":
    asyncio.run(capnp.run(main(sys.argv[1:])))
