"""pycapnp over TLS with client certificates, against `capgate serve --tls-cert ...
--client-ca ... --require-client-cert --policy tests/interop/tls_policy.toml`.

pycapnp passes extra arguments of AsyncIoStream.create_connection to asyncio's
create_connection, so TLS is Python's `ssl` module: an SSLContext trusting the CA and holding
the client certificate.

Usage: python tls_client.py HOST PORT CERT_DIR
"""

import asyncio
import os
import ssl
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "schema", "store.capnp")
store_capnp = capnp.load(SCHEMA)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


async def connect(host, port, certs, who):
    ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, f"{who}.pem"), os.path.join(certs, f"{who}.key"))
    stream = await capnp.AsyncIoStream.create_connection(
        host=host, port=int(port), ssl=ctx, server_hostname="localhost"
    )
    return capnp.TwoPartyClient(stream).bootstrap().cast_as(store_capnp.Store)


async def main(host, port, certs):
    admin = await connect(host, port, certs, "admin")
    await admin.namespace("tls").ns.put("k", b"from admin")
    print("ok: admin (cert_cn = admin) may put over TLS")

    reader = await connect(host, port, certs, "reader")
    got = await reader.namespace("tls").ns.get("k")
    check(got.found and bytes(got.value) == b"from admin", "reader reads over TLS")
    try:
        await reader.namespace("tls").ns.put("k", b"x")
        raise AssertionError("reader put was allowed")
    except capnp.KjException as e:
        check('not allowed for client "reader"' in e.description, f"reader put denied: {e.description}")
    print("all TLS interop checks passed")


if __name__ == "__main__":
    asyncio.run(capnp.run(main(*sys.argv[1:])))
