#!/usr/bin/env python3
"""Hold many idle keep-alive callers on a proxy, for benches/load.sh's memory figure.

    idle_callers.py PORT COUNT AUTHORIZATION

Opens COUNT connections to 127.0.0.1:PORT, makes one GET on each (with the given
Authorization header) and reads its answer whole, then leaves every connection open and
idle. Prints "ready <answered> <failed>" once all are done, then waits until its stdin
closes (the benchmark reads the proxy's memory in between) and closes them all.
"""

import asyncio
import resource
import sys


async def call_once(port, auth, sem):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                "GET /api/v2/users/me HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: {auth}\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        await reader.readexactly(length)
        return writer, status


async def main():
    port, count, auth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Not all at once: a burst of 10,000 connects overflows the listen backlog.
    sem = asyncio.Semaphore(256)
    results = await asyncio.gather(
        *(call_once(port, auth, sem) for _ in range(count)), return_exceptions=True
    )
    held = [r[0] for r in results if not isinstance(r, BaseException)]
    answered = sum(1 for r in results if not isinstance(r, BaseException) and r[1] < 300)
    print(f"ready {answered} {count - answered}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


asyncio.run(main())
