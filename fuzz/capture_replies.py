#!/usr/bin/env python3
"""Seeds for the nbd_reply_machine fuzz target: real replies of qemu-nbd and nbdkit.

Serves a 1 MiB sparse image (data in its first 4 KiB and last 512 bytes), negotiates like
cbtstream, sends the requests of the target's REQUESTS table (cookie = index + 1) and
records every reply byte until the server has been quiet for a second (qemu-nbd drops
replies still in flight when NBD_CMD_DISC arrives, so that goes last). Each seed is the
target's input: mode byte, context id, reply bytes.

    python3 fuzz/capture_replies.py fuzz/corpus/nbd_reply_machine
"""
import os, socket, struct, subprocess, sys, tempfile, time

REQUESTS = [(0, 0, 65536), (7, 0, 1 << 20), (0, (1 << 20) - 512, 4096), (0, 512, 512)]
IHAVEOPT = 0x49484156454F5054


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            raise EOFError("server closed")
        out += got
    return out


def option(s, opt, data):
    """Send an option; return its replies up to the final one as (type, data)."""
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        _magic, _opt, typ, length = struct.unpack(">QIII", recv_exact(s, 20))
        replies.append((typ, recv_exact(s, length)))
        if typ == 1 or typ & 0x80000000:
            return replies


def capture(sock_path, structured, extended, block_status):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):  # the socket file can appear before the server listens
        try:
            s.connect(sock_path)
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    if extended:
        assert option(s, 11, b"")[-1][0] == 1, "no extended headers"
    elif structured:
        assert option(s, 8, b"")[-1][0] == 1, "no structured replies"
    name = struct.pack(">I", 0)
    ctx = 0
    if block_status:
        q = b"base:allocation"
        for typ, data in option(s, 10, name + struct.pack(">II", 1, len(q)) + q):
            if typ == 4:
                ctx = struct.unpack(">I", data[:4])[0]
    assert option(s, 7, name + struct.pack(">H", 0))[-1][0] == 1, "GO refused"
    reqs = b""
    for i, (cmd, off, length) in enumerate(REQUESTS):
        if cmd == 7 and not block_status:
            continue
        reqs += request(extended, cmd, i + 1, off, length)
    s.sendall(reqs)
    s.settimeout(1.0)
    out = b""
    try:
        while got := s.recv(1 << 16):
            out += got
    except TimeoutError:
        pass
    s.sendall(request(extended, 2, 0, 0, 0))
    s.close()
    mode = (1 if structured else 0) | (2 if extended else 0)
    return bytes([mode]) + struct.pack(">I", ctx) + out


def request(extended, cmd, cookie, off, length):
    if extended:
        return struct.pack(">IHHQQQ", 0x21E41C71, 0, cmd, cookie, off, length)
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, off, length)


def serve(argv, sock):
    p = subprocess.Popen(argv)
    for _ in range(100):
        if os.path.exists(sock):
            return p
        time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"{argv[0]} did not start")


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
            f.write(bytes(range(256)) * 16)
            f.seek((1 << 20) - 512)
            f.write(b"\xab" * 512)
        cases = [
            ("qemu_structured", ["qemu-nbd", "-r", "-f", "raw"], True, False, True),
            ("qemu_extended", ["qemu-nbd", "-r", "-f", "raw"], True, True, True),
            ("nbdkit_structured", ["nbdkit", "-r", "file"], True, False, True),
            ("nbdkit_simple", ["nbdkit", "-r", "--no-sr", "file"], False, False, False),
        ]
        for name, server, structured, extended, block_status in cases:
            sock = os.path.join(d, name + ".sock")
            if server[0] == "qemu-nbd":
                argv = server + ["-k", sock, img]
            else:
                argv = ["nbdkit", "-f", "-U", sock] + server[1:] + [img]
            p = serve(argv, sock)
            try:
                seed = capture(sock, structured, extended, block_status)
            finally:
                p.terminate()
                p.wait()
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(seed)
            print(f"{name}: {len(seed)} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
