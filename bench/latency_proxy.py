#!/usr/bin/env python3
"""TCP proxy that adds a fixed one-way delay in each direction, for bench/bench.sh.

    latency_proxy.py UPSTREAM_PORT DELAY_MS [--parent PID]

Listens on 127.0.0.1 (an ephemeral port, printed on the first line of stdout), forwards
each connection to 127.0.0.1:UPSTREAM_PORT and delays every chunk by DELAY_MS in each
direction (so the round trip gains 2 x DELAY_MS). Each chunk is stamped when it is read
and written when due, in order, so the delay does not add up and the bandwidth is not
limited by it. Bounded: it exits when PID (default: the parent process) is gone.
"""
import asyncio
import os
import sys
import time


async def pump(reader, writer, delay):
    queue = asyncio.Queue()

    async def rx():
        try:
            while True:
                data = await reader.read(256 * 1024)
                queue.put_nowait((time.monotonic() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((time.monotonic(), b""))

    task = asyncio.create_task(rx())
    try:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()


async def handle(creader, cwriter, upstream_port, delay):
    try:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        cwriter.close()
        return
    for w in (cwriter, uwriter):
        sock = w.get_extra_info("socket")
        if sock is not None:
            import socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pump(creader, uwriter, delay), pump(ureader, cwriter, delay))
    for w in (cwriter, uwriter):
        w.close()


async def main():
    args = sys.argv[1:]
    parent = os.getppid()
    if "--parent" in args:
        i = args.index("--parent")
        parent = int(args[i + 1])
        del args[i:i + 2]
    upstream_port, delay = int(args[0]), float(args[1]) / 1000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream_port, delay), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    while True:
        await asyncio.sleep(1)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
