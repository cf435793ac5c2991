"""pycapnp against `capgate serve --policy tests/interop/policy.toml`: a denied call shows the
permission-denied text and kind in Python; an over-rate burst shows Overloaded.

Usage: python policy_client.py HOST PORT
"""

import asyncio
import os
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "schema", "store.capnp")
store_capnp = capnp.load(SCHEMA)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


async def main(host, port):
    stream = await capnp.AsyncIoStream.create_connection(host=host, port=int(port))
    store = capnp.TwoPartyClient(stream).bootstrap().cast_as(store_capnp.Store)

    ns = store.namespace("interop").ns
    got = await ns.get("k")
    check(not got.found, "allowed call (Namespace.get via Reader.get) works")

    try:
        await ns.put("k", b"v")
        raise AssertionError("put was allowed")
    except capnp.KjException as e:
        check(
            'permission denied: Namespace.put is not allowed for client "reader"' in e.description,
            f"denied call text: {e.description}",
        )
        check(e.type == "FAILED", f"denied call kind: {e.type}")

    # The burst is 20 at 1 call/s: 40 calls at once, some must be Overloaded.
    results = await asyncio.gather(*[store.namespaces() for _ in range(40)], return_exceptions=True)
    overloaded = [r for r in results if isinstance(r, capnp.KjException)]
    check(len(overloaded) >= 18, f"{len(overloaded)} of 40 calls over the burst were refused")
    check(all(r.type == "OVERLOADED" for r in overloaded), "refused with kind OVERLOADED")
    check(
        all("calls_per_second = 1 with burst = 20 exceeded" in r.description for r in overloaded),
        f"overload text: {overloaded[0].description}",
    )
    print("all policy interop checks passed")


if __name__ == "__main__":
    asyncio.run(capnp.run(main(*sys.argv[1:])))
