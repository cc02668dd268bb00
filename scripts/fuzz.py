#!/usr/bin/env python3
"""Mutation fuzzing of what reaches a worker from outside, against the real binary.

  fuzz.py BIN SECONDS [zeromq] [http] [gearman] [amqp] [jobs] [spool] [config]

zeromq:  hostile ZMTP conversations (valid ones mutated: bit flips, cuts, inserts, repeats,
         lengths of 0 .. 2^64-1, written in random chunks) from six threads, HUPs now and then,
         while a pyzmq REQ client sends a job every 20 ms and must get every answer.
http:    3,000 idle `/metrics` connections and 3,000 half-written status requests held open,
         junk requests (random bytes, 100 KB headers, 70 KB paths, huge Content-Length), while
         a scraper and `gearshift status` must be answered every time.
gearman: a fake gearmand answering the worker's packets with random, valid-framed ones (job
         assignments with random arguments, unexpected types, errors, cut packets), mutated
         ones, and now and then a server that stops reading behind large jobs; HUPs now and
         then: the worker must stay up and answer `status`.
amqp:    a fake broker that speaks the handshake, then sends deliveries (random properties:
         escape sequences, invalid UTF-8, headers nested deep, bodies over the limit), mutated
         ones, and odd frames (closes with hostile text, cancels, heartbeats, lone headers and
         bodies, huge sizes, random methods), confirms or refuses the replies, stalls for
         seconds now and then, HUPs now and then: the worker must keep running jobs and answer `status`.
jobs:    job executables that misbehave (crash, random exit codes, 300 KB results over the
         limit, 2 MB of stderr, escape sequences, stdout closed early, background children,
         a setsid daemon, TERM ignored past the timeout, ten children, stdin unread or read
         in part, a missing interpreter, an unknown function) from a submitter, HUPs now and
         then: every job gets its outcome, and no job process outlives the worker.
spool:   what the worker's user could leave in the spool (junk, mutated job files and journal
         segments, links, FIFOs, directories, sparse 1 GiB files, hard links, hostile names)
         in every directory, while a client submits (every job must get its right result)
         and `result` is asked of what was planted (never a hang), HUPs now and then.
config:  mutations of the shipped config files through `check --config-only`: exit 0 or 1
         (never a crash), every error with file:line:col, and none in the parser's own words
         for a mistake we name (printed: the distinct messages, for a person to read); and
         configs rewritten in TOML's other forms for the same tables (a header, an inline
         table, dotted keys), which must be judged exactly as the original.

Every worker must hold its RSS, log no panic, dead thread, ERROR or raw control character,
print none in `status`, still restart on a HUP (a new generation within 15 s), and end
within 2 s of a second TERM. Exit 0 when every part held. Not in CI: a timing-rich run, by hand like the soak.
"""

import collections
import json
import os
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port  # noqa: E402

BIN = os.path.abspath(sys.argv[1])
SECS = float(sys.argv[2])
HERE = os.path.dirname(os.path.abspath(__file__))
failures = []
# What a terminal or a log parser would act on: text from outside must arrive escaped.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def fail(what):
    failures.append(what)
    print("FAILED:", what, flush=True)


def start(d, config):
    os.makedirs(d + "/jobs", exist_ok=True)
    with open(d + "/config.toml", "w") as f:
        f.write(config)
    w = subprocess.Popen([BIN, "-c", d + "/config.toml", "run", "--log-file", d + "/log"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while subprocess.run([BIN, "-c", d + "/config.toml", "status"], capture_output=True).returncode:
        if time.time() > deadline or w.poll() is not None:
            fail(f"{d}: the worker did not start")
            break
        time.sleep(0.05)
    return w


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1])
    except (OSError, StopIteration):
        return 0


def finish(name, d, w, rss, expected_errors=None):
    """Checks and ends a worker: alive, bounded RSS, a clean log (no ERROR but those the part
    provokes on purpose, `expected_errors`), a second TERM obeyed."""
    if w.poll() is not None:
        fail(f"{name}: the worker died ({w.returncode})")
        return
    if rss and max(rss) > 4 * min(rss) + 20000:
        fail(f"{name}: RSS grew from {min(rss)} to {max(rss)} KiB")
    restarts_after_a_hup(d, w)
    w.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    t = time.time()
    w.send_signal(signal.SIGTERM)
    try:
        w.wait(timeout=5)
        if time.time() - t > 2:
            fail(f"{name}: {time.time() - t:.1f} s after the second TERM")
    except subprocess.TimeoutExpired:
        fail(f"{name}: still running 5 s after the second TERM")
        w.kill()
    with open(d + "/log", errors="replace") as f:
        log = f.read().splitlines()
    bad = [l for l in log if (" ERROR " in l and not (expected_errors and re.search(expected_errors, l)))
           or "panic" in l or ("thread" in l and "died" in l)]
    if bad:
        fail(f"{name}: {len(bad)} bad log lines, the first: {bad[0][:300]}")
    raw = [l for l in log if CONTROL.search(l)]
    if raw:
        fail(f"{name}: {len(raw)} log lines with raw control characters, the first: {raw[0][:300]!r}")
    print(f"{name}: RSS {min(rss or [0])}-{max(rss or [0])} KiB, {len(log)} log lines", flush=True)


def sample(w, stop, rss, hup_every=None):
    last_hup = time.time()
    while time.time() < stop and w.poll() is None:
        time.sleep(0.25)
        rss.append(rss_kib(w.pid))
        if hup_every and time.time() - last_hup > hup_every:
            os.kill(w.pid, signal.SIGHUP)
            last_hup = time.time()


def fake_server(serve, stop):
    """A listener on a free loopback port, each connection given to `serve` in a thread of its
    own until `stop`; its port."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)

    def accept():
        while time.time() < stop:
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(c,), daemon=True).start()
        srv.close()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def ask_through_hups(d, w, stop, stats, rss):
    """Until `stop`: a HUP every 3 s, and `status` every second, which must answer with no raw
    control character."""
    t = threading.Thread(target=sample, args=(w, stop, rss, 3))
    t.start()
    while time.time() < stop:
        time.sleep(1)
        r = subprocess.run([BIN, "-c", d + "/config.toml", "status"], capture_output=True, timeout=30)
        stats["status" if r.returncode == 0 else "status failed"] += 1
        said = (r.stdout + r.stderr).decode(errors="replace").replace("\n", "").replace("\t", "")
        if CONTROL.search(said):
            fail(f"{d}: status printed raw control characters: {said[:300]!r}")
    t.join()


def generation(d):
    r = subprocess.run([BIN, "-c", d + "/config.toml", "status", "--json"], capture_output=True, timeout=30)
    try:
        return json.loads(r.stdout)["generation"]
    except (ValueError, KeyError):
        return None


def restarts_after_a_hup(d, w):
    """The worker is not wedged: a HUP still makes a new generation, within 15 s."""
    before, t = generation(d), time.time()
    if w.poll() is not None or before is None:
        return
    os.kill(w.pid, signal.SIGHUP)
    while time.time() - t < 15:
        now = generation(d)
        if now is not None and now > before:
            return
        time.sleep(0.1)
    fail(f"{d}: no new generation 15 s after a HUP (still {before})")


# ZeroMQ: ZMTP 3 with the NULL mechanism, as libzmq speaks it.
def frame(body, more=False, cmd=False):
    flags = (1 if more else 0) | (4 if cmd else 0)
    if len(body) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def zmtp_stream():
    prop = lambda n, v: bytes([len(n)]) + n + struct.pack(">I", len(v)) + v
    kind = random.choice([b"REQ", b"DEALER", b"REQ", b"PUB", b"ROUTER"])
    out = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    out += frame(b"\x05READY" + prop(b"Socket-Type", kind) + prop(b"Identity", b""), cmd=True)
    for _ in range(random.randint(0, 6)):
        r = random.random()
        if r < 0.1:
            out += frame(b"\x04PING\x00\x05ab", cmd=True)
        elif r < 0.2:
            out += frame(b"", True) + frame(b"x", True) + frame(b"y", True) + frame(b"z")
        elif r < 0.3:
            out += frame(b"", True) + frame(os.urandom(random.randint(0, 6000)))
        else:
            fn = random.choice([None, b"reverse", b"echo", b"nope", b""])
            body = os.urandom(random.randint(0, 300))
            out += frame(b"", True) + (frame(fn, True) if fn is not None else b"") + frame(body)
    return out


def mutate(b):
    b = bytearray(b)
    for _ in range(random.randint(1, 8)):
        if not b:
            break
        op, i = random.random(), random.randrange(len(b))
        if op < 0.3:
            b[i] ^= 1 << random.randrange(8)
        elif op < 0.5:
            b[i] = random.choice([0, 1, 2, 3, 4, 5, 6, 0x7f, 0x80, 0xff])
        elif op < 0.6:
            del b[i:i + random.randint(1, 16)]
        elif op < 0.7:
            b[i:i] = os.urandom(random.randint(1, 16))
        elif op < 0.8:
            b[i:i] = b[i:i + random.randint(1, 64)] * random.randint(2, 20)
        elif op < 0.9:
            b = b[:i]
        else:
            b[i:i + 8] = struct.pack(">Q", random.choice([0, 1, 255, 256, 2**31, 2**63, 2**64 - 1, 4097]))
    return bytes(b)


def fuzz_zeromq(base):
    import zmq
    d, port = base + "/zeromq", free_port()
    w = start(d, f"""[worker]\nconcurrency = 2\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
max_payload_bytes = 4096\n[source]\nkind = "zeromq"\nbind = ["tcp://127.0.0.1:{port}"]
function = "reverse"\nreply = "id"\ndir = "spool"\nfsync = false\n""")
    stop, stats, rss = time.time() + SECS, collections.Counter(), []

    def hostile():
        while time.time() < stop:
            data = zmtp_stream()
            if random.random() < 0.85:
                data = mutate(data)
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=2)
                c.settimeout(0.3)
                i = 0
                while i < len(data):
                    n = random.choice([len(data), 1, 7, 64, 1000])
                    c.sendall(data[i:i + n])
                    i += n
                try:
                    c.recv(65536)
                except socket.timeout:
                    pass
                c.close()
                stats["connections"] += 1
            except ConnectionRefusedError:
                stats["refused"] += 1
            except OSError:
                stats["closed by the worker"] += 1

    def legit():
        ctx = zmq.Context()
        while time.time() < stop:
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
            for _ in range(3):  # lazy pirate: a request read across an exec is not answered
                s.send_multipart([b"reverse", b"hello"])
                if s.poll(3000):
                    r = s.recv_multipart()
                    stats["answered" if r and not r[0].startswith(b"ERROR") else "wrong"] += 1
                    break
                s.close()
                s = ctx.socket(zmq.REQ)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"tcp://127.0.0.1:{port}")
            else:
                stats["unanswered"] += 1
            s.close()
            time.sleep(0.02)

    threads = [threading.Thread(target=hostile) for _ in range(6)] + [threading.Thread(target=legit)]
    for t in threads:
        t.start()
    sample(w, stop, rss, hup_every=2)
    for t in threads:
        t.join()
    print("zeromq:", dict(stats), flush=True)
    if stats["refused"] or stats["wrong"] or stats["unanswered"] or not stats["answered"]:
        fail(f"zeromq: {dict(stats)}")
    finish("zeromq", d, w, rss)


def fuzz_http(base):
    d, port = base + "/http", free_port()
    w = start(d, f"""[worker]\nconcurrency = 1\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
[metrics]\nlisten = "127.0.0.1:{port}"\n""")
    sock = d + "/state/worker/gearshift.sock"
    stop, held, stats, rss = time.time() + SECS, [], collections.Counter(), []

    def hold(connect):
        while time.time() < stop and len(held) < 6000:
            try:
                held.append(connect())
            except OSError:
                time.sleep(0.01)

    def http_conn():
        c = socket.create_connection(("127.0.0.1", port), timeout=1)
        c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        return c

    def unix_conn():
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(1)
        c.connect(sock)
        c.send(b"sta")
        return c

    def junk():
        while time.time() < stop:
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=1)
                c.sendall(random.choice([
                    b"GET /metrics HTTP/1.1\r\nX: " + b"a" * random.randint(0, 100000) + b"\r\n\r\n",
                    os.urandom(random.randint(1, 5000)),
                    b"GET " + b"/" * 70000 + b" HTTP/1.0\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\n\r\n" * 50]))
                c.settimeout(0.5)
                c.recv(100000)
                c.close()
            except OSError:
                pass

    def legit():
        while time.time() < stop:
            began, step = time.monotonic(), "connect"
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                step = "send"
                c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                step = "answer"
                data = b""
                while True:
                    x = c.recv(65536)
                    if not x:
                        break
                    data += x
                first = data.split(b"\r\n")[0]
                if b" 200 " in first:
                    stats["scraped"] += 1
                else:
                    stats["scrape failed"] += 1
                    print(f"http: a scrape was answered {first[:80]!r} ({len(data)} bytes, "
                          f"{time.monotonic() - began:.3f} s)", flush=True)
            except OSError as e:
                stats["scrape failed"] += 1
                print(f"http: a scrape failed at its {step} after {time.monotonic() - began:.3f} s: {e!r}",
                      flush=True)
            r = subprocess.run([BIN, "-c", d + "/config.toml", "status"], capture_output=True, timeout=20)
            stats["status" if r.returncode == 0 else "status failed"] += 1
            time.sleep(0.2)

    threads = [threading.Thread(target=hold, args=(http_conn,)), threading.Thread(target=hold, args=(unix_conn,)),
               threading.Thread(target=junk), threading.Thread(target=junk), threading.Thread(target=legit)]
    for t in threads:
        t.start()
    sample(w, stop, rss)
    for t in threads:
        t.join()
    print(f"http: {dict(stats)}, {len(held)} idle connections held", flush=True)
    if stats["scrape failed"] or stats["status failed"] or not stats["scraped"]:
        fail(f"http: {dict(stats)}")
    for c in held:
        c.close()
    finish("http", d, w, rss)


def fuzz_gearman(base):
    d = base + "/gearman"
    os.makedirs(d + "/jobs", exist_ok=True)
    with open(d + "/jobs/cat.sh", "w") as f:
        f.write("#!/bin/sh\ncat\n")
    os.chmod(d + "/jobs/cat.sh", 0o755)
    stop, stats, rss = time.time() + SECS, collections.Counter(), []
    word = lambda n=20: bytes(random.choice(b"abcxyz0123456789\0-:") for _ in range(random.randint(0, n)))

    def pkt(kind, *args, magic=b"\0RES"):
        body = b"\0".join(args)
        return magic + struct.pack(">II", kind, len(body)) + body

    def serve(c):
        stats["connections"] += 1
        c.settimeout(0.05)
        try:
            while time.time() < stop:
                try:
                    if not c.recv(65536):
                        return
                except socket.timeout:
                    pass
                fn = random.choice([b"echo", b"reverse", b"cat", b"sleep", b"nope", b""])
                out = random.choice([
                    pkt(11, word(), fn, word(200)), pkt(31, word(), fn, word(), word(200)),
                    pkt(39, word(), fn, word(), word(), word(200)), pkt(6), pkt(10), pkt(19, word(), word(300)),
                    pkt(17, word(50)), pkt(random.randint(0, 60), *[word() for _ in range(random.randint(0, 5))]),
                    pkt(31, word(), fn, word()), pkt(31, b"h", b"sleep", b"u", b"500"),
                    pkt(31, word(), fn, word(), word(), magic=b"\0REQ")])
                r = random.random()
                if r < 0.01:
                    c.sendall(out[:random.randint(0, len(out))])
                    return
                if r < 0.06:
                    out = mutate(out)
                elif r < 0.07:
                    # A server that stops reading: large jobs whose results fill its socket.
                    big = pkt(11, word(), b"cat", os.urandom(random.randint(100000, 400000)))
                    c.settimeout(2)
                    for _ in range(8):
                        c.sendall(big)
                    stats["stalls"] += 1
                    time.sleep(random.uniform(2, 8))
                    c.settimeout(0.05)
                c.sendall(out)
                stats["packets"] += 1
                if random.random() < 0.3:
                    time.sleep(random.random() * 0.01)
        except OSError:
            pass
        finally:
            c.close()

    port = fake_server(serve, stop)
    w = start(d, f"""[worker]\nconcurrency = 4\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
builtins = true\n[source]\nkind = "gearman"\nservers = ["127.0.0.1:{port}"]\nreconnect_max = "200ms"\n""")
    ask_through_hups(d, w, stop, stats, rss)
    print("gearman:", dict(stats), flush=True)
    if stats["status failed"] or not stats["packets"]:
        fail(f"gearman: {dict(stats)}")
    finish("gearman", d, w, rss)


def fuzz_amqp(base):
    d = base + "/amqp"
    stop, stats, rss = time.time() + SECS, collections.Counter(), []
    nasty = [b"\x1b[31mred\x1b[0m", b"two\nlines", b"nul\0", "\u00e9t\u00e9".encode(), b"\xff\xfe",
             b"x" * 255, b"\x1b]0;title\x07", b"\r\x08\x08ok"]
    fr = lambda kind, ch, p: struct.pack(">BHI", kind, ch, len(p)) + p + b"\xce"
    meth = lambda ch, c, m, a=b"": fr(1, ch, struct.pack(">HH", c, m) + a)
    short = lambda b: bytes([len(b[:255])]) + b[:255]
    longstr = lambda b: struct.pack(">I", len(b)) + b

    def table():
        r = random.random()
        if r < 0.5:
            return longstr(short(b"k") + b"S" + longstr(random.choice(nasty)) + short(b"n") + b"I\0\0\0\1")
        if r < 0.7:  # field arrays nested deep
            v = b"V"
            for _ in range(random.randint(1, 120)):
                v = b"A" + longstr(v)
            return longstr(short(b"deep") + v)
        return longstr(os.urandom(random.randint(0, 40)))

    def message(ch, tag, frame_max):
        flags, props = 0, b""
        fields = [(1 << 13, table), (1 << 12, lambda: bytes([random.choice([1, 2])])),
                  (1 << 10, lambda: short(random.choice(nasty))), (1 << 9, lambda: short(b"amq.gen-reply")),
                  (1 << 7, lambda: short(random.choice(nasty + [b"m%d" % tag]))),
                  (1 << 5, lambda: short(random.choice([b"echo", b"reverse", b"nope", b""] + nasty)))]
        for bit, make in fields:
            if random.random() < 0.4:
                flags |= bit
                props += make()
        body = os.urandom(random.choice([0, 5, 300, 5000, 70000]))
        out = meth(ch, 60, 60, short(b"ctag") + struct.pack(">QB", tag, random.random() < 0.1) +
                   short(b"") + short(b"q"))
        out += fr(2, ch, struct.pack(">HHQH", 60, 0, len(body), flags) + props)
        step = max(1, frame_max - 8)
        for i in range(0, len(body), step):
            out += fr(3, ch, body[i:i + step])
        return out

    def oddity(ch, tag):
        return random.choice([
            meth(ch, 20, 40, struct.pack(">H", 406) + short(random.choice(nasty)) + b"\0" * 4),
            meth(0, 10, 50, struct.pack(">H", random.choice([320, 541, 0])) + short(random.choice(nasty)) +
                 b"\0" * 4),
            meth(ch, 60, 30, short(b"ctag") + b"\0"), meth(0, 10, 60, short(random.choice(nasty))),
            meth(0, 10, 61), fr(8, 0, b""), meth(ch, random.randint(0, 90), random.randint(0, 130),
                                                 os.urandom(random.randint(0, 30))),
            fr(2, ch, struct.pack(">HHQH", 60, 0, 3, 0)), fr(3, ch, b"abc"),
            meth(ch, 60, 60, short(b"ctag") + struct.pack(">QB", tag, 0) + short(b"") + short(b"q")) +
            fr(2, ch, struct.pack(">HHQH", 60, 0, random.choice([2**63, 2**40, 10**7]), 0)) +
            fr(3, ch, os.urandom(4000)),
            meth(ch, 60, 80, struct.pack(">QB", random.randint(0, 2**64 - 1), 1)),
            struct.pack(">BHI", 1, ch, random.choice([2**31, 2**32 - 1, 10**6])),
            os.urandom(random.randint(1, 50))])

    def serve(c):
        stats["connections"] += 1
        c.settimeout(0.02)
        buf, frame_max, ch, consuming, tag, unacked, prefetch, published = b"", 131072, 1, False, 0, 0, 1, 0
        try:
            c.recv(8)
            c.sendall(meth(0, 10, 10, b"\0\x09" + longstr(b"") + longstr(random.choice(
                [b"PLAIN AMQPLAIN", b"PLAIN", b"EXTERNAL \x1b[2J"])) + longstr(b"en_US")))
            while time.time() < stop:
                try:
                    got = c.recv(65536)
                    if not got:
                        return
                    buf += got
                except socket.timeout:
                    pass
                while len(buf) >= 8:
                    kind, chan, size = struct.unpack(">BHI", buf[:7])
                    if len(buf) < size + 8:
                        break
                    payload, buf = buf[7:7 + size], buf[size + 8:]
                    if kind != 1:
                        continue
                    cls, m = struct.unpack(">HH", payload[:4])
                    reply = {(10, 11): None, (10, 40): meth(0, 10, 41, short(b"")), (20, 10): None,
                             (85, 10): meth(chan, 85, 11), (60, 10): meth(chan, 60, 11),
                             (50, 10): meth(chan, 50, 11, short(b"q") + b"\0" * 8),
                             (40, 10): meth(chan, 40, 11), (50, 20): meth(chan, 50, 21),
                             (60, 20): meth(chan, 60, 21, short(b"ctag")),
                             (60, 30): meth(chan, 60, 31, short(b"ctag")), (20, 40): meth(chan, 20, 41),
                             (10, 50): meth(0, 10, 51)}.get((cls, m), b"")
                    if (cls, m) == (10, 11):
                        frame_max = random.choice([0, 4096, 131072])
                        reply = meth(0, 10, 30, struct.pack(">HIH", 0, frame_max, random.choice([0, 1, 60])))
                    elif (cls, m) == (10, 31):
                        frame_max = struct.unpack(">I", payload[6:10])[0]
                    elif (cls, m) == (20, 10):
                        ch = chan
                        reply = meth(ch, 20, 11, longstr(b""))
                    elif (cls, m) == (60, 10):
                        prefetch = struct.unpack(">H", payload[8:10])[0]
                    elif (cls, m) == (60, 20):
                        consuming = True
                    elif (cls, m) == (60, 40):
                        published += 1
                        stats["replies"] += 1
                        reply = random.choice([meth(chan, 60, 80, struct.pack(">QB", published, 0))] * 8 +
                                              [meth(chan, 60, 120, struct.pack(">QB", published, 0)), b""])
                    elif (cls, m) in ((60, 80), (60, 90), (60, 120)):
                        stats[{80: "acked", 90: "rejected", 120: "nacked"}[m]] += 1
                        unacked = max(0, unacked - 1)
                    if reply:
                        c.sendall(reply)
                    if (cls, m) == (10, 50):
                        return
                if consuming and (unacked < prefetch or random.random() < 0.05):
                    tag += 1
                    unacked += 1
                    r = random.random()
                    out = message(ch, tag, frame_max or 131072)
                    if r < 0.1:
                        out = mutate(out)
                    elif r < 0.2:
                        out = oddity(ch, tag)
                    elif r < 0.21:
                        c.sendall(out[:random.randint(0, len(out))])
                        return
                    elif r < 0.23:
                        # A broker that stalls: reads nothing, sends nothing (nor heartbeats).
                        stats["stalls"] += 1
                        time.sleep(random.uniform(2, 8))
                    c.sendall(out)
                    stats["deliveries"] += 1
        except OSError:
            pass
        finally:
            c.close()

    port = fake_server(serve, stop)
    w = start(d, f"""[worker]\nconcurrency = 2\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
builtins = true\nmax_payload_bytes = 65536\n[source]\nkind = "amqp"
url = "amqp://guest:guest@127.0.0.1:{port}/%2f"\nqueue = "q"\nfunction = "reverse"
reconnect_max = "200ms"\nio_timeout = "2s"\n""")
    ask_through_hups(d, w, stop, stats, rss)
    print("amqp:", dict(stats), flush=True)
    if stats["status failed"] or not stats["acked"]:
        fail(f"amqp: {dict(stats)}")
    # A reply the broker refuses is lost, and said at ERROR.
    finish("amqp", d, w, rss, expected_errors="refused its reply")


# Job executables that misbehave, one function each (payload on stdin, result on stdout).
CHAOS_JOBS = {
    "ok": "cat",
    "crash": "kill -SEGV $$",
    "exit": "exit $(( $(od -An -N1 -tu1 /dev/urandom) % 256 ))",
    "flood": "head -c 300000 /dev/zero | tr '\\0' x",
    "stderr": "head -c 2000000 /dev/urandom >&2; echo done",
    "escapes": "printf '\\033]0;title\\007\\033[2J\\377\\n' >&2; printf '\\033[31mred'",
    "closeout": "exec >&-; sleep 1",
    "background": "(sleep 3; echo late) & echo now",
    "daemon": "setsid sh -c 'sleep 5' >/dev/null 2>&1 < /dev/null & echo spawned",
    "ignoreterm": "trap '' TERM; sleep 10",
    "forks": "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; wait",
    "noread": "echo ignored",
    "partial": "head -c 10 >/dev/null; echo partial",
    "slow": "sleep 0.$(( $(od -An -N1 -tu1 /dev/urandom) % 10 )); cat",
}


def fuzz_jobs(base):
    d = base + "/jobs"
    os.makedirs(d + "/jobs", exist_ok=True)
    for name, body in CHAOS_JOBS.items():
        with open(f"{d}/jobs/{name}", "w") as f:
            f.write(f"#!/bin/sh\n{body}\n")
        os.chmod(f"{d}/jobs/{name}", 0o755)
    with open(d + "/jobs/noexec", "w") as f:
        f.write("#!/nonexistent/interpreter\n")
    os.chmod(d + "/jobs/noexec", 0o755)
    w = start(d, """[worker]\nconcurrency = 4\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
job_timeout = "2s"\nmax_payload_bytes = 100000\n[source]\nkind = "spool"\ndir = "spool"\nfsync = false\n""")
    stop, stats, rss, ids = time.time() + SECS, collections.Counter(), [], []

    def submit():
        names = list(CHAOS_JOBS) + ["noexec", "missing"]
        while time.time() < stop:
            fn = random.choice(names)
            payload = os.urandom(random.choice([0, 10, 5000, 90000]))
            r = subprocess.run([BIN, "-c", d + "/config.toml", "submit", fn], input=payload,
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                ids.append(r.stdout.decode().strip())
                stats["submitted"] += 1
            else:
                stats["submit failed"] += 1
                fail(f"jobs: submit {fn}: exit {r.returncode}: {r.stderr[:200]!r}")
            time.sleep(0.1)  # about as many as four lanes get through (a few take 2 s)

    threads = [threading.Thread(target=submit)]
    for t in threads:
        t.start()
    ask_through_hups(d, w, stop, stats, rss)
    for t in threads:
        t.join()
    # Every job ends, in a bounded time: its result stored (done or failed).
    deadline, left = time.time() + 60, list(ids)
    while left and time.time() < deadline:
        left = [i for i in left if subprocess.run([BIN, "-c", d + "/config.toml", "result", i],
                                                  capture_output=True).returncode not in (0, 1)]
        if left:
            time.sleep(1)
    stats["unfinished"] = len(left)
    print("jobs:", dict(stats), flush=True)
    if left or not stats["submitted"]:
        fail(f"jobs: {len(left)} of {len(ids)} jobs without an outcome 60 s after the last, e.g. {left[:3]}")
    finish("jobs", d, w, rss)
    # Nothing a job started outlives the worker, in its process group or in a session of its own.
    time.sleep(0.5)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            if b"GEARSHIFT_WORKER=" in env and d.encode() in env:
                left.append(pid)
        except OSError:
            pass
    if left:
        fail(f"jobs: {len(left)} job processes outlived the worker: {left[:10]}")


def fuzz_spool(base):
    import hashlib
    d = base + "/spool"
    w = start(d, """[worker]\nconcurrency = 2\njobs_dir = "jobs"\nstate_dir = "state"\nallow_root = true
builtins = true\n[source]\nkind = "spool"\ndir = "spool"\nfsync = false\n""")
    stop, stats, rss, legit = time.time() + SECS, collections.Counter(), [], []
    sp = d + "/spool"
    job_id = lambda: "f%024x-%04x-0" % (random.getrandbits(96), random.getrandbits(16))

    def job_file(fn, payload):
        return (f"GSJ2\nfunction={fn}\nsubmitted={int(time.time() * 1000)}\nattempts=0\n"
                f"length={len(payload)}\nsha256={hashlib.sha256(payload).hexdigest()}\n\n").encode() + payload

    def put(path, data):
        # Never blocks on a FIFO planted before, never follows a planted link.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def get(path):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read(65536) if stat.S_ISREG(os.fstat(fd).st_mode) else b""

    def plant():
        """What the worker's user (every job runs as it) could leave in the spool."""
        while time.time() < stop:
            where = sp + "/" + random.choice(["new", "new", "cur", "done", "failed", "rejected", "journal",
                                              "results", "tmp"])
            name = random.choice([job_id(), job_id(), ".hidden", "a\x1bb\nc", "x" * 250, "s-0-0-0.done",
                                  "s-%016x-%08x-1-1.done" % (random.getrandbits(64), random.getrandbits(32))])
            path = where + "/" + name
            kind = random.random()
            try:
                if kind < 0.3:
                    body = job_file(random.choice(["reverse", "echo", "nope", "\x1b[2J"]), os.urandom(50))
                    put(path, mutate(body) if random.random() < 0.5 else body)
                elif kind < 0.45:
                    segs = [f for f in os.listdir(sp + "/journal") if not f.startswith(".")]
                    if segs:
                        put(sp + "/journal/" + name, mutate(get(sp + "/journal/" + random.choice(segs))))
                elif kind < 0.6:
                    put(path, os.urandom(random.randint(0, 5000)))
                elif kind < 0.7:
                    os.symlink(random.choice(["/etc/shadow", "/dev/zero", "/", "nowhere", sp + "/new"]), path)
                elif kind < 0.78:
                    os.mkfifo(path)
                elif kind < 0.86:
                    os.mkdir(path)
                elif kind < 0.9:
                    put(path, b"")
                    os.truncate(path, random.choice([1 << 30, 1 << 20]))
                else:
                    os.link("/etc/hostname", path)
                stats["planted"] += 1
            except (OSError, IndexError):
                pass
            time.sleep(0.02)

    def submit():
        while time.time() < stop:
            payload = os.urandom(8).hex()
            r = subprocess.run([BIN, "-c", d + "/config.toml", "submit", "reverse", payload],
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                legit.append((r.stdout.decode().strip(), payload))
            else:
                stats["submit failed"] += 1
                fail(f"spool: submit: exit {r.returncode}: {r.stderr[:300]!r}")
            time.sleep(0.03)

    def read_planted():
        while time.time() < stop:
            try:
                names = [n for n in os.listdir(sp + "/done") if n.startswith("f")]
            except OSError:
                names = []
            for n in random.sample(names, min(3, len(names))):
                try:
                    r = subprocess.run([BIN, "-c", d + "/config.toml", "result", n], capture_output=True, timeout=10)
                    stats[f"result exit {r.returncode}"] += 1
                    if CONTROL.search((r.stderr).decode(errors="replace").replace("\n", "")):
                        fail(f"spool: result printed raw control characters: {r.stderr[:200]!r}")
                except subprocess.TimeoutExpired:
                    fail(f"spool: `result {n}` still running after 10 s")
            time.sleep(0.1)

    threads = [threading.Thread(target=f) for f in (plant, submit, read_planted)]
    for t in threads:
        t.start()
    ask_through_hups(d, w, stop, stats, rss)
    for t in threads:
        t.join()
    # Every job a client submitted has its right result.
    deadline, wrong, left = time.time() + 60, 0, list(legit)
    while left and time.time() < deadline:
        still = []
        for i, payload in left:
            r = subprocess.run([BIN, "-c", d + "/config.toml", "result", i], capture_output=True)
            if r.returncode == 0:
                wrong += r.stdout.decode(errors="replace") != payload[::-1]
            elif r.returncode in (1, 2):
                wrong += 1
                fail(f"spool: job {i} ended {r.returncode}: {r.stderr[:200]!r}")
            else:
                still.append((i, payload))
        left = still
        if left:
            time.sleep(1)
    stats["submitted"], stats["wrong"], stats["unfinished"] = len(legit), wrong, len(left)
    print("spool:", dict(stats), flush=True)
    if wrong or left or not legit:
        fail(f"spool: {wrong} wrong and {len(left)} unfinished of {len(legit)} submitted")
    # What was planted is set aside, each said at ERROR.
    finish("spool", d, w, rss, expected_errors=r"; rejected: set aside as ")


# Configs with every table the file knows, for the rewriting in other TOML forms.
FORM_BASES = [
    '[worker]\nallow_root = true\nconcurrency = 2\n[source]\nkind = "gearman"\n'
    'servers = ["tls://127.0.0.1:4730"]\nio_timeout = "5s"\n[source.tls]\nca_file = "ca.pem"\n'
    'cert_file = "c.pem"\nkey_file = "k.pem"\nserver_name = "gm"\n[functions.a]\ntimeout = "1m"\n'
    '[functions."b.c"]\ntimeout = 5\n[metrics]\nlisten = "127.0.0.1:9100"\n[log]\nlevel = "debug"\n',
    '[worker]\nallow_root = true\n[source]\nkind = "amqp"\nurls = ["amqp://127.0.0.1:5672/%2f"]\n'
    'queue = "jobs"\nprefetch = 4\npersistent_replies = false\n[source.declare]\nexchange = "x"\ntype = "topic"\n'
    'routing_key = "a.#"\nqueue_type = "quorum"\n[functions.f]\ntimeout = "none"\n',
    '[worker]\nallow_root = true\nmax_age = "1h30m"\n[source]\nkind = "zeromq"\n'
    'bind = ["tcp://127.0.0.1:5555"]\nfunction = "ingest"\nreply = "id"\nmin_free = "5%"\n'
    '[log]\nformat = "json"\n',
]


def toml_key(k):
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_forms(doc):
    """`doc` written again with each table, at random, as a header, inline or in dotted keys."""
    headers = []

    def dotted(out, prefix, table):
        for k, v in table.items():
            if isinstance(v, dict) and random.random() < 0.7:
                dotted(out, prefix + [toml_key(k)], v)
            else:
                out.append(".".join(prefix + [toml_key(k)]) + " = " + toml_value(v))

    def body(path, table):
        out = []
        for k, v in table.items():
            form = random.choice(["header", "inline", "dotted"]) if isinstance(v, dict) else "value"
            if form == "header":
                headers.append((path + [toml_key(k)], v))
            elif form == "dotted":
                dotted(out, [toml_key(k)], v)
            else:
                out.append(f"{toml_key(k)} = {toml_value(v)}")
        return out

    lines = body([], doc)
    while headers:
        path, table = headers.pop(0)
        lines.append("[" + ".".join(path) + "]")
        lines.extend(body(path, table))
    return "\n".join(lines) + "\n"


def judged(path):
    """`check --config-only` of `path`: its exit and its words, without position and digest."""
    r = subprocess.run([BIN, "-c", path, "check", "--config-only"], capture_output=True)
    said = (r.stdout + r.stderr).decode(errors="replace")
    said = re.sub(r"\S+?:\d+:\d+: ", "", said.replace(path, "F"))
    return r.returncode, re.sub(r"sha256 [0-9a-f]{64}", "sha256", said)


def fuzz_forms(d, n):
    import tomllib
    text = random.choice(FORM_BASES)
    doc = tomllib.loads(text)
    with open(d + "/a.toml", "w") as f:
        f.write(text)
    with open(d + "/b.toml", "w") as f:
        f.write(toml_forms(doc))
    a, b = judged(d + "/a.toml"), judged(d + "/b.toml")
    if a != b:
        fail(f"config: the same tables in another TOML form judged otherwise: {a!r} / {b!r}")
        os.replace(d + "/b.toml", d + f"/forms-{n}.toml")


def fuzz_config(base):
    d = base + "/config"
    os.makedirs(d, exist_ok=True)
    tokens = ["=", '"', "'", "[", "]", "{", "}", ",", ".", "#", "\n", " ", "true", "1", "-1", "1.5",
              '"x"', "[[a]]", "[a]", "a = 1", '"""', "'''", "\\", "0x1f", "1e400", "99999999999999999999",
              ":", "\t", "inf", "2026-01-01", "\r", "\x00", "\x1b[31m", "%", "@", "//", "::1", "?", "&",
              "tcp://", "ipc://", "amqp:", "65536", "\\u00"]
    jargon = re.compile(r"^(invalid string|invalid array|expected newline|invalid key$|"
                        r"invalid table header; expected newline|duplicate key|missing field|"
                        r"invalid escape sequence|invalid unicode|expected struct|expected a sequence|"
                        r"invalid inline table|invalid table header; expected `\.`, `\]\]`|"
                        r"invalid (hexadecimal|octal|binary) integer|invalid floating-point number|"
                        r"invalid integer; expected|invalid time|invalid date-time|invalid table header$|"
                        r"invalid type: |.*expected a borrowed string|.*expected (i64|u64|u32|f64)\b)")
    bases = [HERE + "/../config.toml", HERE + "/config.production.toml"]
    seen, runs, forms = collections.Counter(), 0, 0
    stop = time.time() + SECS
    while time.time() < stop:
        if random.random() < 0.1:
            forms += 1
            fuzz_forms(d, forms)
            continue
        with open(random.choice(bases)) as f:
            text = f.read()
        for _ in range(random.randint(1, 3)):
            i = random.randrange(len(text) + 1)
            op = random.random()
            if op < 0.4:
                text = text[:i] + random.choice(tokens) + text[i:]
            elif op < 0.7:
                text = text[:i] + text[i + random.randint(1, 5):]
            else:
                text = text[:i] + random.choice(tokens) + text[i + random.randint(1, 5):]
        with open(d + "/c.toml", "w") as f:
            f.write(text)
        r = subprocess.run([BIN, "-c", d + "/c.toml", "check", "--config-only"], capture_output=True)
        runs += 1
        err = r.stderr.decode(errors="replace").strip()
        if r.returncode not in (0, 1) or "panick" in err:
            fail(f"config: exit {r.returncode}: {err[:300]}")
            with open(d + f"/crash-{runs}.toml", "w") as f:
                f.write(text)
        if CONTROL.search(err.replace("\n", "").replace("\t", "")):
            fail(f"config: raw control characters in {err[:300]!r}")
        if r.returncode == 1:
            m = re.match(r"^gearshift: \S+?:\d+:\d+: (.*)", err.splitlines()[0] if err else "")
            if not m:
                fail(f"config: no file:line:col in {err[:200]!r}")
                continue
            said = re.sub(r'"[^"]*"', '"…"', re.sub(r"`[^`]*`", "`…`", m.group(1)))[:100]
            seen[said] += 1
            if jargon.match(m.group(1)):
                fail(f"config: the parser's words: {m.group(1)[:200]}")
                with open(d + f"/words-{runs}.toml", "w") as f:
                    f.write(text)
    print(f"config: {forms} rewritings in other TOML forms, {runs} mutations, {len(seen)} distinct messages:", flush=True)
    for said, n in seen.most_common():
        print(f"  {n:5} {said}")


def main():
    parts = sys.argv[3:] or ["zeromq", "http", "gearman", "amqp", "jobs", "spool", "config"]
    base = tempfile.mkdtemp(prefix="gs-fuzz-")
    for p in parts:
        {"zeromq": fuzz_zeromq, "http": fuzz_http, "gearman": fuzz_gearman, "amqp": fuzz_amqp, "jobs": fuzz_jobs, "spool": fuzz_spool, "config": fuzz_config}[p](base)
    if failures:
        print(f"\n{len(failures)} failure(s); the workers' directories are in {base}")
        sys.exit(1)
    if os.environ.get("FUZZ_KEEP"):
        print(f"\nthe workers' directories are in {base}")
    else:
        subprocess.run(["rm", "-rf", base])
    print("\nevery part held")


main()
