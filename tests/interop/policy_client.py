"""pycapnp against `capgate serve --policy tests/interop/policy.toml`: a denied call shows the
permission-denied text and kind in Python; an over-rate burst shows Overloaded, and so does a
method over its own rule (Reader.list), with the rule's text.

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

    # The method rule on Reader.list (burst 3 at 1 call/s): 10 at once, most refused by name,
    # while other methods are not.
    results = await asyncio.gather(*[ns.list("") for _ in range(10)], return_exceptions=True)
    refused = [r for r in results if isinstance(r, capnp.KjException)]
    check(len(refused) >= 6, f"{len(refused)} of 10 Reader.list calls over the method rule were refused")
    check(all(r.type == "OVERLOADED" for r in refused), "method rule refusals have kind OVERLOADED")
    text = 'overloaded: Reader.list refused: calls_per_second = 1 with burst = 3 exceeded for client "reader"'
    check(all(text in r.description for r in refused), f"method rule text: {refused[0].description}")
    got = await ns.get("k")
    check(not got.found, "Reader.get is not limited by the Reader.list rule")

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
