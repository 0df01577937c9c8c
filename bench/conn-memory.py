#!/usr/bin/env python3
"""Memory per open connection: opens COUNT TLS connections to a running tern, sends one keep-alive request on
each and reads its answer, holds them all idle, and prints the server's resident memory before and after.

    (scripts/demo.sh > /dev/null 2>&1 &)      # builds tern and the file-path plugin, then serves on :8443
    python3 bench/conn-memory.py --pid "$(pgrep -f '^target/release/tern demo')" --count 3000

Loopback is exempt from tern's per-client admission limits by default, so one client may hold thousands; the
connections close when this script ends. Needs only Python's standard library.
"""

import argparse
import socket
import ssl
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the tern process")
    parser.add_argument("--count", type=int, default=3000, help="connections to hold")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--name", default="www.example.test", help="SNI and Host")
    parser.add_argument("--ca", default="target/tern-demo/ca.crt", help="CA that signed the name's certificate")
    args = parser.parse_args()

    context = ssl.create_default_context(cafile=args.ca)
    request = f"GET / HTTP/1.1\r\nHost: {args.name}\r\n\r\n".encode()
    before = rss_kib(args.pid)
    held = []
    for _ in range(args.count):
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", args.port)), server_hostname=args.name)
        tls.sendall(request)
        if not tls.recv(65536).startswith(b"HTTP/1.1 200"):
            raise SystemExit("the request was not answered with 200")
        held.append(tls)
    time.sleep(1)
    after = rss_kib(args.pid)
    per = (after - before) / args.count
    print(f"{args.count} idle keep-alive TLS connections: RSS {before} -> {after} KiB, {per:.1f} KiB per connection")


if __name__ == "__main__":
    main()
