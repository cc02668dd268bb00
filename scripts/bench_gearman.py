#!/usr/bin/env python3
"""Gearman worker benchmark (driven by scripts/bench-gearman): gearshift against a libgearman C
worker and a php-gearman worker, all in one run on one gearmand.

For each worker and concurrency (1 and 4): preload JOBS background `reverse` jobs, start the
worker(s), and time until gearmand reports the queue empty. Concurrency 4 means four lanes in one
gearshift process, and four processes of the C and PHP workers. Reports jobs/s, the ratio to the
C worker at the same concurrency, resident memory, and CPU time per job. "gearshift +metrics"
is the same worker with `[metrics]` on and its endpoint scraped every 100 ms.
"""
import threading
import urllib.request
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

GEARSHIFT, CWORKER, PHPWORKER = sys.argv[1:4]
JOBS = int(os.environ.get("JOBS", "50000"))
ROUNDS = int(os.environ.get("ROUNDS", "1"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return ticks, rss


def run(kind, concurrency, port, workdir):
    addr = f"127.0.0.1:{port}"
    cfg = os.path.join(workdir, "config.toml")
    os.makedirs(os.path.join(workdir, "jobs"), exist_ok=True)
    metrics = f"127.0.0.1:{free_port()}" if kind == "gearshift +metrics" else None
    with open(cfg, "w") as f:
        f.write(
            f"[worker]\nconcurrency = {concurrency}\nstate_dir = \"state-{kind.replace(' ', '')}-{concurrency}\"\nallow_root = true\n"
            f"[source]\nkind = \"gearman\"\nservers = [\"{addr}\"]\n[log]\nlevel = \"warn\"\n"
            + (f"[metrics]\nlisten = \"{metrics}\"\n" if metrics else "")
        )
    subprocess.run(
        [GEARSHIFT, "-c", cfg, "submit", "--background", "--count", str(JOBS), "--concurrency", "4", "reverse", "x" * 100],
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
    ticks, rss = 0, 0
    for p in procs:
        t, r = proc_stats(p.pid)
        ticks += t
        rss += r
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    hz = os.sysconf("SC_CLK_TCK")
    return JOBS / secs, rss, ticks / hz / JOBS * 1e6


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
        print(f"# Gearman workers draining {JOBS} background `reverse` jobs (100-byte payloads), one gearmand (-t 2), {os.cpu_count()} CPUs\n")
        print("| worker | concurrency | jobs/s | vs C | RSS | CPU per job |")
        print("|---|---|---|---|---|---|")
        for concurrency in (1, 4):
            results = {}
            for kind in ("C libgearman", "gearshift", "gearshift +metrics", "PHP php-gearman"):
                best = None
                for _ in range(ROUNDS):
                    r = run(kind, concurrency, port, workdir)
                    if best is None or r[0] > best[0]:
                        best = r
                results[kind] = best
            c_rate = results["C libgearman"][0]
            for kind, (rate, rss, cpu_us) in results.items():
                print(f"| {kind} | {concurrency} | {rate:,.0f} | {rate / c_rate:.2f}x | {rss / 1024:.1f} MiB | {cpu_us:.1f} µs |")
    finally:
        gm.send_signal(signal.SIGTERM)
        gm.wait(timeout=10)


if __name__ == "__main__":
    main()
