#!/usr/bin/env python3
"""Gearman worker benchmark (driven by scripts/bench-gearman): gearshift against a libgearman C
worker and a php-gearman worker, all in one run on one gearmand.

For each worker and concurrency (1 and 4): preload JOBS background `reverse` jobs, start the
worker(s), and time until gearmand reports the queue empty. Concurrency 4 means four lanes in one
gearshift process, and four processes of the C and PHP workers. Reports jobs/s, the ratio to the
C worker at the same concurrency, resident memory, and CPU time per job. "gearshift +metrics"
is the same worker with `[metrics]` on and its endpoint scraped every 100 ms; "gearshift TLS"
reaches the same gearmand through stunnel (TLS 1.3, certificates made with openssl), as a
`tls://` server. "gearshift +bad servers" is configured with a silent server (accepts, never
answers) and a trickling one (a byte a second) before the real one: the healthy server's rate
next to them (they must cost only their own connections).

Then the restart pause with Gearman, from outside: two foreground clients keep `reverse` jobs
flowing to a gearshift worker (concurrency 1); after each HUP, the largest gap between two
completed jobs until the new generation has claimed one (RELOADS times, default 50), beside a
bare fork+exec+exit of the same binary. ONLY=pause runs that part alone.
"""
import struct
import threading
import urllib.request
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, proc_stats  # noqa: E402

GEARSHIFT, CWORKER, PHPWORKER = sys.argv[1:4]
JOBS = int(os.environ.get("JOBS", "50000"))
ROUNDS = int(os.environ.get("ROUNDS", "1"))


def admin_status(port):
    """Queued (total) jobs for `reverse` via the text admin protocol."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"status\n")
        data = b""
        while not data.endswith(b".\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        parts = line.split("\t")
        if parts[0] == "reverse":
            return int(parts[1])
    return 0


TLS = {}


def tls_setup(workdir, port):
    """A CA and a server certificate, and stunnel on a free port in front of gearmand."""
    def ossl(*a):
        subprocess.run(["openssl", *a], cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench-ca")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "s.key", "-out", "s.csr", "-subj", "/CN=127.0.0.1")
    with open(os.path.join(workdir, "s.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "s.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "s.crt", "-days", "2", "-extfile", "s.ext")
    tport = free_port()
    conf = os.path.join(workdir, "stunnel.conf")
    with open(conf, "w") as f:
        f.write(f"foreground = yes\npid =\noutput = {workdir}/stunnel.log\n[g]\naccept = 127.0.0.1:{tport}\n"
                f"connect = 127.0.0.1:{port}\ncert = {workdir}/s.crt\nkey = {workdir}/s.key\n")
    p = subprocess.Popen(["stunnel4", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", tport), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    TLS.update(port=tport, ca=os.path.join(workdir, "ca.crt"), proc=p)


def bad_servers():
    """A silent server (accepts, never answers) and a trickling one (a NOOP, one byte a second),
    on loopback ports, served by daemon threads for the rest of the run."""
    noop = b"\0RES\0\0\0\x06\0\0\0\0"

    def serve(listener, talk):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    def silent(conn):
        held.append(conn)

    def trickle(conn):
        try:
            while True:
                for b in noop:
                    conn.send(bytes([b]))
                    time.sleep(1)
        except OSError:
            pass

    held, addrs = [], []
    for talk in (silent, trickle):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        threading.Thread(target=serve, args=(listener, talk), daemon=True).start()
        addrs.append(f"127.0.0.1:{listener.getsockname()[1]}")
    return addrs


BAD = []


def run(kind, concurrency, port, workdir):
    addr = f"127.0.0.1:{port}"
    cfg = os.path.join(workdir, "config.toml")
    os.makedirs(os.path.join(workdir, "jobs"), exist_ok=True)
    metrics = f"127.0.0.1:{free_port()}" if kind == "gearshift +metrics" else None
    server = f"tls://127.0.0.1:{TLS['port']}" if kind == "gearshift TLS" else addr
    if kind == "gearshift +bad servers":
        if not BAD:
            BAD.extend(bad_servers())
        servers = ", ".join(f'"{a}"' for a in BAD + [server]) + ']\nio_timeout = "2s"'
    else:
        servers = f'"{server}"]'
    with open(cfg, "w") as f:
        f.write(
            f"[worker]\nconcurrency = {concurrency}\nstate_dir = \"state-{kind.replace(' ', '')}-{concurrency}\"\nallow_root = true\nbuiltins = true\n"
            f"[source]\nkind = \"gearman\"\nservers = [{servers}\n"
            + (f"[source.tls]\nca_file = \"{TLS['ca']}\"\n" if kind == "gearshift TLS" else "")
            + "[log]\nlevel = \"warn\"\n"
            + (f"[metrics]\nlisten = \"{metrics}\"\n" if metrics else "")
        )
    preload = cfg + ".preload"
    with open(preload, "w") as f:
        f.write(f"[source]\nkind = \"gearman\"\nservers = [\"{addr}\"]\n")
    subprocess.run(
        [GEARSHIFT, "-c", preload, "submit", "--background", "--count", str(JOBS), "--concurrency", "4", "reverse", "x" * 100],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    assert admin_status(port) == JOBS, "preload"
    if kind.startswith("gearshift"):
        cmds = [[GEARSHIFT, "-c", cfg, "run"]]
    elif kind == "C libgearman":
        cmds = [[CWORKER, "127.0.0.1", str(port)]] * concurrency
    else:
        cmds = [["php", PHPWORKER, "127.0.0.1", str(port)]] * concurrency
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    done = threading.Event()

    def scrape():
        while not done.wait(0.1):
            try:
                with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=2) as r:
                    r.read()
            except OSError:
                pass

    scraper = threading.Thread(target=scrape, daemon=True) if metrics else None
    if scraper:
        scraper.start()
    deadline = t0 + 600
    while admin_status(port) > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not drain the queue")
        time.sleep(0.01)
    secs = time.monotonic() - t0
    done.set()
    if scraper:
        scraper.join()
    ticks, rss, dirty = 0, 0, 0
    for p in procs:
        t, r, d = proc_stats(p.pid)
        ticks += t
        rss += r
        dirty += d
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    hz = os.sysconf("SC_CLK_TCK")
    return JOBS / secs, rss, dirty, ticks / hz / JOBS * 1e6


SUBMIT_JOB, JOB_CREATED, WORK_COMPLETE = 7, 8, 13


# A foreground client is a process of its own: a thread of this one would stamp a completion
# only once it got the GIL back (up to Python's 5 ms switch interval late).
CLIENT = r"""
import ctypes, ctypes.util, socket, struct, sys, time
ctypes.CDLL(ctypes.util.find_library("c")).prctl(1, 9)  # dies with the benchmark
def read(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf
out = open(1, "w", buffering=1)
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as s:
    data = b"\0".join([b"reverse", b"", b"abc"])
    req = b"\0REQ" + struct.pack(">II", 7, len(data)) + data
    while True:
        s.sendall(req)
        while True:
            kind, size = struct.unpack(">II", read(s, 12)[4:])
            read(s, size)
            if kind == 13:
                out.write("%d\n" % time.monotonic_ns())
                break
"""


def foreground(port, times):
    """Starts a client process that submits `reverse` jobs one after another on one connection;
    a thread here collects the time of each completion (stamped by the client)."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port)], stdout=subprocess.PIPE, text=True)

    def collect():
        for line in proc.stdout:
            times.append(int(line))

    threading.Thread(target=collect, daemon=True).start()
    return proc


def gs_status(state_dir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gsstatus
    return gsstatus.query(state_dir)


def pause(port, workdir):
    """HUP -> next job completed by the new generation, as clients see it (largest gap)."""
    reloads = int(os.environ.get("RELOADS", "50"))
    cfg = os.path.join(workdir, "pause.toml")
    state = os.path.join(workdir, "state-pause")
    os.makedirs(os.path.join(workdir, "jobs"), exist_ok=True)
    with open(cfg, "w") as f:
        f.write(
            f"[worker]\nconcurrency = 1\nstate_dir = \"{state}\"\nallow_root = true\nbuiltins = true\n"
            f"[source]\nkind = \"gearman\"\nservers = [\"127.0.0.1:{port}\"]\n[log]\nlevel = \"warn\"\n"
        )
    p = subprocess.Popen([GEARSHIFT, "-c", cfg, "run"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(pred, limit=30, every=0.0005):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            st = gs_status(state)
            if st and pred(st):
                return st
            time.sleep(every)
        raise SystemExit("gearshift did not get there")

    wait(lambda s: s.get("state") == "running")
    times = []
    clients = [foreground(port, times) for _ in range(2)]
    gaps = []
    try:
        for _ in range(reloads):
            g = wait(lambda s: s["state"] == "running" and s["first_claim_monotonic_us"] > 0)["generation"]
            time.sleep(0.02)
            t0 = time.monotonic_ns()
            p.send_signal(signal.SIGHUP)
            # Not a word to the worker while it restarts: look after 25 ms, then every 2 ms.
            time.sleep(0.025)
            st = wait(lambda s: s["generation"] > g and s["first_claim_monotonic_us"] > 0, every=0.002)
            # The new generation's first job (GRAB answered, as the worker stamped it); the
            # window ends at its completion, as its client stamped it.
            first = st["first_claim_monotonic_us"] * 1000
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not any(t >= first for t in list(times)):
                time.sleep(0.002)
            done = sorted(t for t in list(times) if t >= t0)
            cut = next((i for i, t in enumerate(done) if t >= first), len(done) - 1)
            marks = [t0] + done[:cut + 1]
            gaps.append(max((b - a for a, b in zip(marks, marks[1:])), default=first - t0) // 1000)
    finally:
        for c in clients:
            c.kill()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    spawns = []
    for _ in range(reloads):
        t = time.monotonic_ns()
        subprocess.run([GEARSHIFT, "--version"], stdout=subprocess.DEVNULL, check=True)
        spawns.append((time.monotonic_ns() - t) // 1000)
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]
    a = pct(spawns, 50)
    print(f"\n## Restart pause with Gearman ({reloads} reloads, concurrency 1, two foreground clients)\n")
    print("| measure | p50 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| largest gap between completed jobs, HUP -> new generation serving | {pct(gaps, 50)/1000:.2f} ms | {pct(gaps, 99)/1000:.2f} ms | {max(gaps)/1000:.2f} ms |")
    print(f"| anchor: `gearshift --version` fork+exec+exit | {a/1000:.2f} ms | {pct(spawns, 99)/1000:.2f} ms | {max(spawns)/1000:.2f} ms |")
    print(f"\nRatios to the anchor's p50: p50 {pct(gaps, 50)/a:.2f}x, p99 {pct(gaps, 99)/a:.2f}x\n")


def main():
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="gs-bench-gearman-")
    gm = subprocess.Popen(
        ["gearmand", "-L", "127.0.0.1", "-p", str(port), "-t", "2", "-l", os.path.join(workdir, "gearmand.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if os.environ.get("ONLY") == "pause":
            pause(port, workdir)
            return
        tls_setup(workdir, port)
        print(f"# Gearman workers draining {JOBS} background `reverse` jobs (100-byte payloads), one gearmand (-t 2), {os.cpu_count()} CPUs\n")
        print("| worker | concurrency | jobs/s | vs C | RSS | private dirty | CPU per job |")
        print("|---|---|---|---|---|---|---|")
        for concurrency in (1, 4):
            results = {}
            for kind in ("C libgearman", "gearshift", "gearshift +metrics", "gearshift TLS", "gearshift +bad servers", "PHP php-gearman"):
                best = None
                for _ in range(ROUNDS):
                    r = run(kind, concurrency, port, workdir)
                    if best is None or r[0] > best[0]:
                        best = r
                results[kind] = best
            c_rate = results["C libgearman"][0]
            for kind, (rate, rss, dirty, cpu_us) in results.items():
                print(f"| {kind} | {concurrency} | {rate:,.0f} | {rate / c_rate:.2f}x | {rss / 1024:.1f} MiB | {dirty / 1024:.1f} MiB | {cpu_us:.1f} µs |")
        pause(port, workdir)
    finally:
        if "proc" in TLS:
            TLS["proc"].kill()
        gm.send_signal(signal.SIGTERM)
        gm.wait(timeout=10)
        # Each run left its directory (configs, logs, state) in /tmp.
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
