#!/usr/bin/env python3
"""Benchmarks for the core (driven by scripts/bench-reload): restart pause, spool throughput,
idle cost. Every figure is printed next to an anchor measured in the same run on the same
machine, so the ratios mean something on a shared, noisy host.

- restart pause, from outside: the largest gap between two claims (renames into `cur/`, seen
  through inotify) from the HUP until the new generation has claimed, at a realistic depth
  (DEPTH jobs queued, STORED results kept), and how it grows over the run. Beside it the
  worker's own figure (HUP -> first claim, from `status`). Anchor: one fork+exec+exit of the
  same binary (`gearshift --version`), the floor for anything that re-execs. Counterpart: the
  same worker serving STEADY seconds with no restart, the same largest gap taken from random
  instants over a window as long as a restart: what the disk's own stalls put in that window.
- spool throughput: preloaded `reverse` jobs drained by the worker. Anchor: a Python loop doing
  the same durable file operations per job (claim rename, read, write+fsync result, rename,
  fsync dir, unlink), i.e. what the filesystem costs with no worker at all.
- idle: CPU ticks over 10 s with an empty queue, and resident memory.
- metrics on vs off: spool throughput and restart pause with `[metrics]` on and the endpoint
  scraped every 100 ms (as the observability test's Prometheus does), against the same with
  metrics off, in the same run.
"""
import atexit
import bisect
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsstatus  # noqa: E402
from benchlib import memory_kb  # noqa: E402

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/gearshift")
RELOADS = int(os.environ.get("RELOADS", "100"))
JOBS = int(os.environ.get("JOBS", "5000"))
# The reload benchmark's worker has DEPTH jobs queued and STORED results kept when it starts:
# nothing proportional to either may happen between the exec and the first claim.
DEPTH = int(os.environ.get("DEPTH", "40000"))
STORED = int(os.environ.get("STORED", "100000"))
# Seconds of serving without a restart, for the pause's counterpart (0: skip).
STEADY_SECONDS = int(os.environ.get("STEADY", "10"))

# The claim watcher runs in a process of its own: a thread of this one would stamp an event only
# once it got the GIL back from the polling loop (up to Python's 5 ms switch interval late).
WATCHER = r"""
import ctypes, ctypes.util, os, struct, sys, time
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: never outlives the benchmark
fd = libc.inotify_init1(0)
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x80) < 0:
    sys.exit("inotify on %s: errno %d" % (sys.argv[1], ctypes.get_errno()))
out = os.fdopen(1, "w", buffering=1)
out.write("ready\n")
while True:
    buf = os.read(fd, 1 << 16)
    now = time.monotonic_ns()
    at, n = 0, 0
    while at + 16 <= len(buf):
        n += 1
        at += 16 + struct.unpack_from("iIII", buf, at)[3]
    out.write("%d %d\n" % (now, n))
"""


class Claims:
    """Timestamps (CLOCK_MONOTONIC, ns) of every rename into `path`, taken through inotify by a
    watcher process that does nothing else."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHER, path], stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the claim watcher on {path} did not start")
        self.times = []
        self.lock = threading.Lock()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        for line in self.proc.stdout:
            now, n = map(int, line.split())
            with self.lock:
                self.times.extend([now] * n)

    def since(self, t0):
        with self.lock:
            return [t for t in self.times if t >= t0]

    def until(self, t, limit=2.0):
        """Waits until the watcher has reported events stamped at or after `t` (it lags)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self.lock:
                if self.times and self.times[-1] >= t:
                    return
            time.sleep(0.002)

    def close(self):
        self.proc.kill()
        self.proc.wait()


# Every run's directories (a queue of 40,000 and 100,000 results are most of a gigabyte) go
# under one scratch directory, removed at exit.
WORK = tempfile.mkdtemp(prefix="gs-bench-reload-")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def scratch(prefix):
    return tempfile.mkdtemp(prefix=prefix, dir=WORK)


def write_config(d, concurrency=1, fsync=True, name="config.toml", metrics=None):
    os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(
            f"[worker]\nconcurrency = {concurrency}\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nallow_root = true\n"
            f"[source]\nkind = \"spool\"\ndir = \"spool\"\nfsync = {'true' if fsync else 'false'}\n"
            "[log]\nlevel = \"warn\"\n"
            + (f"[metrics]\nlisten = \"{metrics}\"\n" if metrics else "")
        )
    return path


def free_addr():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


class Scraper:
    """GETs /metrics every 100 ms until stopped; counts answers and failures."""

    def __init__(self, addr):
        self.addr, self.ok, self.failed = addr, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.done.wait(0.1):
            try:
                with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=2) as r:
                    r.read()
                self.ok += 1
            except OSError:
                self.failed += 1

    def stop(self):
        self.done.set()
        self.thread.join()


def status(d):
    return gsstatus.query(os.path.join(d, "state"))


def wait_status(d, pred, limit=60.0, every=0.0005):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        st = status(d)
        if st is not None and pred(st):
            return st
        time.sleep(every)
    raise SystemExit(f"timed out waiting in {d}")


def start(d, cfg):
    log = open(os.path.join(d, "worker.log"), "ab")
    p = subprocess.Popen([BIN, "-c", cfg, "run"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    wait_status(d, lambda s: s.get("state") == "running")
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)


def preload(d, function, payload, count):
    if count <= 0:
        return
    cfg = write_config(d, fsync=False, name="preload.toml")
    subprocess.run([BIN, "-c", cfg, "submit", "--count", str(count), function, payload], check=True, stdout=subprocess.DEVNULL)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def prepare_restart(d, depth=DEPTH, stored=STORED):
    """A spool with `stored` results kept and `depth` jobs queued (results made by the worker
    itself, fsync off, then the queue loaded)."""
    if stored:
        preload(d, "echo", "x", stored)
        cfg = write_config(d, concurrency=2, fsync=False, name="fill.toml")
        p = start(d, cfg)
        wait_status(d, lambda s: s["jobs_completed"] >= stored, limit=900)
        stop(p)
    preload(d, "echo", "x", depth)


class TopUp:
    """Keeps about `depth` jobs queued while the worker drains them (a busy worker with steady
    inflow): submits a batch whenever the queue is a batch short, going by the worker's count of
    finished jobs."""

    def __init__(self, d, depth, batch=4000):
        self.d, self.depth, self.batch = d, depth, batch
        self.submitted = depth
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.done.wait(0.05):
            st = status(self.d)
            if st and self.submitted - st.get("jobs_completed", 0) < self.depth - self.batch:
                preload(self.d, "echo", "x", self.batch)
                self.submitted += self.batch

    def stop(self):
        self.done.set()
        self.thread.join()


def bench_restart(reloads=RELOADS, metrics=None, depth=DEPTH, stored=STORED, steady_s=None):
    d = scratch("gs-bench-reload-")
    cfg = write_config(d, concurrency=1, fsync=True, metrics=metrics)
    prepare_restart(d, depth, stored)
    p = start(d, cfg)
    claims = Claims(os.path.join(d, "spool", "cur"))
    scraper = Scraper(metrics) if metrics else None
    topup = TopUp(d, depth)
    pauses, internal = [], []
    for _ in range(reloads):
        g = wait_status(d, lambda s: s["state"] == "running" and s["first_claim_monotonic_us"] > 0)["generation"]
        time.sleep(0.02)  # a few claims of the old generation before the HUP
        t0 = time.monotonic_ns()
        os.kill(p.pid, signal.SIGHUP)
        # Not a word to the worker while it restarts (every status query is a thread in it, on
        # two cores): look after 25 ms, then every 2 ms.
        time.sleep(0.025)
        st = wait_status(d, lambda s: s["generation"] > g and s["first_claim_monotonic_us"] > 0, every=0.002)
        # The new generation's first claim, as the worker stamped it (CLOCK_MONOTONIC, like
        # ours); the watcher stamps the same rename a little later.
        first = st["first_claim_monotonic_us"] * 1000
        claims.until(first)
        # The largest gap between two claims from the HUP to the new generation's first (the
        # first the watcher stamped after the worker's own stamp, less 0.2 ms: the lane stamps
        # a moment after its rename; the old generation's last claim is milliseconds before):
        # what follows the first claim is the new generation serving, not the restart.
        seen = claims.since(t0)
        cut = next((i for i, t in enumerate(seen) if t >= first - 200_000), len(seen) - 1)
        marks = [t0] + seen[:cut + 1]
        pauses.append(max((b - a for a, b in zip(marks, marks[1:])), default=first - t0) // 1000)
        internal.append(st["first_claim_monotonic_us"] - t0 // 1000)
    steady_s = STEADY_SECONDS if steady_s is None else steady_s
    steady = steady_gaps(claims, pct(internal, 50) * 1000, steady_s) if steady_s and not metrics else []
    topup.stop()
    final = status(d)
    assert final["pid"] == p.pid
    left = len(os.listdir(os.path.join(d, "spool", "new")))
    kept = len(os.listdir(os.path.join(d, "spool", "done")))
    claims.close()
    if scraper:
        scraper.stop()
        assert scraper.failed == 0, f"{scraper.failed} scrapes failed"
    stop(p)
    if metrics:
        return pauses
    # Anchor: a bare start of the same binary.
    spawns = []
    for _ in range(reloads):
        t0 = time.monotonic_ns()
        subprocess.run([BIN, "--version"], stdout=subprocess.DEVNULL, check=True)
        spawns.append((time.monotonic_ns() - t0) // 1000)
    return pauses, internal, spawns, left, kept, steady


def steady_gaps(claims, window_ns, seconds=STEADY_SECONDS, samples=5000):
    """The same worker with no restart: from random instants over `seconds` of serving, the
    largest gap between claims up to the first claim `window_ns` (a restart's length) later,
    as the pause is measured from the HUP. What this disk's stalls alone make of that window."""
    time.sleep(0.5)
    t0 = time.monotonic_ns()
    time.sleep(seconds)
    ts = claims.since(t0)
    out = []
    if len(ts) < 2:
        return out
    rng = random.Random(1)
    for _ in range(samples):
        s = rng.randint(ts[0], max(ts[0], ts[-1] - window_ns - 1))
        i = bisect.bisect_left(ts, s)
        j = min(len(ts) - 1, bisect.bisect_left(ts, s + window_ns))
        marks = [s] + ts[i:j + 1]
        out.append(max(b - a for a, b in zip(marks, marks[1:])) // 1000 if len(marks) > 1 else window_ns // 1000)
    return out


def bench_throughput(concurrency, fsync, metrics=None):
    d = scratch("gs-bench-tput-")
    cfg = write_config(d, concurrency=concurrency, fsync=fsync, metrics=metrics)
    preload(d, "reverse", "x" * 100, JOBS)
    t0 = time.monotonic()
    p = start(d, cfg)
    scraper = Scraper(metrics) if metrics else None
    # Until every result is stored: a result file appears in done/ only once it is durable.
    done = os.path.join(d, "spool", "done")
    deadline = time.monotonic() + 600
    while len(os.listdir(done)) < JOBS:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {JOBS} results in {done}")
        time.sleep(0.002)
    secs = time.monotonic() - t0
    if scraper:
        scraper.stop()
    stop(p)
    return JOBS / secs


def bench_metrics_cost():
    """Metrics off vs on (scraped every 100 ms), alternated to spread the machine's drift."""
    rounds = int(os.environ.get("METRICS_ROUNDS", "3"))
    off, on = [], []
    for _ in range(rounds):
        off.append(bench_throughput(1, False))
        on.append(bench_throughput(1, False, metrics=free_addr()))
    reloads = max(20, RELOADS // 4)
    p_off = bench_restart(reloads, depth=5000, stored=0, steady_s=0)[0]
    p_on = bench_restart(reloads, metrics=free_addr(), depth=5000, stored=0)
    return statistics.median(off), statistics.median(on), pct(p_off, 50), pct(p_on, 50), reloads


def anchor_throughput(fsync):
    """The spool's per-job file operations, in plain Python, with no worker."""
    d = scratch("gs-bench-anchor-")
    preload(d, "reverse", "x" * 100, JOBS)
    spool = os.path.join(d, "spool")
    new, cur, tmp, done = (os.path.join(spool, s) for s in ("new", "cur", "tmp", "done"))
    t0 = time.monotonic()
    for name in sorted(os.listdir(new)):
        os.rename(os.path.join(new, name), os.path.join(cur, name))
        with open(os.path.join(cur, name), "rb") as f:
            data = f.read()
        body = data[data.index(b"\n\n") + 2:][::-1]
        t = os.path.join(tmp, name + ".r")
        fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"GSR1\noutcome=done\n\n" + body)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        os.rename(t, os.path.join(done, name))
        if fsync:
            dfd = os.open(done, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        os.unlink(os.path.join(cur, name))
    return JOBS / (time.monotonic() - t0)


def bench_batch_submit(n=20000):
    """`submit --count` with fsync on (through the journal, one sync per 512 jobs), beside the
    per-job durable submit (write, fsync, rename, fsync the directory) in a Python loop."""
    d = scratch("gs-bench-batch-")
    cfg = write_config(d, fsync=True)
    t0 = time.monotonic()
    subprocess.run([BIN, "-c", cfg, "submit", "--count", str(n), "echo", "x" * 100], check=True, stdout=subprocess.DEVNULL)
    batch = n / (time.monotonic() - t0)
    spool = os.path.join(d, "anchor")
    tmp, new = os.path.join(spool, "tmp"), os.path.join(spool, "new")
    os.makedirs(tmp)
    os.makedirs(new)
    dfd = os.open(new, os.O_RDONLY)
    m = 2000
    t0 = time.monotonic()
    for i in range(m):
        name = f"job-{i}"
        fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"GSJ2\nfunction=echo\n\n" + b"x" * 100)
        os.fsync(fd)
        os.close(fd)
        os.rename(os.path.join(tmp, name), os.path.join(new, name))
        os.fsync(dfd)
    single = m / (time.monotonic() - t0)
    os.close(dfd)
    return batch, single


def bench_submit_latency(n=200):
    """Submit-to-result latency for an instant job (`submit --wait echo`), fsync on, beside a
    plain `submit` (the CLI's own start and the durable enqueue, no waiting)."""
    d = scratch("gs-bench-wait-")
    cfg = write_config(d, concurrency=1)
    p = start(d, cfg)
    wait_status(d, lambda s: s["state"] == "running")
    waits, plain = [], []
    for _ in range(n):
        t0 = time.monotonic_ns()
        out = subprocess.run([BIN, "-c", cfg, "submit", "--wait", "echo", "x"], capture_output=True, check=True)
        waits.append((time.monotonic_ns() - t0) // 1000)
        assert out.stdout == b"x", out
        t0 = time.monotonic_ns()
        subprocess.run([BIN, "-c", cfg, "submit", "echo", "y"], capture_output=True, check=True)
        plain.append((time.monotonic_ns() - t0) // 1000)
    stop(p)
    return waits, plain


def bench_idle():
    d = scratch("gs-bench-idle-")
    cfg = write_config(d, concurrency=1)
    preload(d, "reverse", "x" * 100, 100)
    p = start(d, cfg)
    wait_status(d, lambda s: s["jobs_completed"] >= 100)
    time.sleep(1)

    def ticks():
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    before = ticks()
    time.sleep(10)
    used = ticks() - before
    rss_kb, dirty_kb = memory_kb(p.pid)
    threads = len(os.listdir(f"/proc/{p.pid}/task"))
    stop(p)
    return used, rss_kb, dirty_kb, threads


def main():
    print(f"# gearshift core benchmark ({BIN}, {os.cpu_count()} CPUs)\n")
    pauses, internal, spawns, left, kept, steady = bench_restart()
    p50, p99, mx = pct(pauses, 50), pct(pauses, 99), max(pauses)
    s50 = pct(spawns, 50)
    tenth = max(1, len(pauses) // 10)
    first, last = statistics.median(pauses[:tenth]), statistics.median(pauses[-tenth:])
    print(f"## Restart pause over {RELOADS} consecutive reloads (largest gap between two claims, seen from outside)\n")
    print(f"{DEPTH} jobs queued and {STORED} results kept at the start, the queue kept near {DEPTH} by a submitter; "
          f"{left} queued and {kept} kept at the end; concurrency 1, fsync on, instant jobs.\n")
    print("| measure | p50 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| gearshift restart pause (from outside: inotify on `cur/`) | {p50/1000:.2f} ms | {p99/1000:.2f} ms | {mx/1000:.2f} ms |")
    print(f"| (HUP sent -> first claim, as the worker reports it) | {pct(internal,50)/1000:.2f} ms | {pct(internal,99)/1000:.2f} ms | {max(internal)/1000:.2f} ms |")
    print(f"| anchor: `gearshift --version` fork+exec+exit | {s50/1000:.2f} ms | {pct(spawns,99)/1000:.2f} ms | {max(spawns)/1000:.2f} ms |")
    if steady:
        print(f"| no restart, {STEADY_SECONDS} s of the same worker serving: largest gap from a random instant to the first claim {pct(internal,50)/1000:.2f} ms later | {pct(steady,50)/1000:.2f} ms | {pct(steady,99)/1000:.2f} ms | {max(steady)/1000:.2f} ms |")
    print(f"\nRatios to the anchor's p50: pause p50 {p50/s50:.2f}x, p99 {p99/s50:.2f}x. "
          f"Growth: median of the first {tenth} reloads {first/1000:.2f} ms, of the last {tenth} {last/1000:.2f} ms ({last/first:.2f}x).\n")
    tenths = [statistics.median(pauses[i * tenth:(i + 1) * tenth]) / 1000 for i in range(len(pauses) // tenth)]
    print("Median of each tenth of the reloads, in order: " + ", ".join(f"{t:.2f}" for t in tenths) + " ms.\n")

    if os.environ.get("ONLY") == "restart":
        return
    print(f"## Spool throughput ({JOBS} preloaded `reverse` jobs, 100-byte payloads)\n")
    print("| fsync | anchor: same file ops in a Python loop | gearshift c=1 | ratio | gearshift c=2 | ratio |")
    print("|---|---|---|---|---|---|")
    for fsync in (True, False):
        a = anchor_throughput(fsync)
        c1 = bench_throughput(1, fsync)
        c2 = bench_throughput(2, fsync)
        print(f"| {'on' if fsync else 'off'} | {a:.0f} jobs/s | {c1:.0f} jobs/s | {c1/a:.2f}x | {c2:.0f} jobs/s | {c2/a:.2f}x |")

    batch, single = bench_batch_submit()
    print("## Durable batch submit\n")
    print("| measure | jobs/s |")
    print("|---|---|")
    print(f"| `submit --count 20000`, fsync on (journal: one sync per 512 jobs) | {batch:.0f} |")
    print(f"| anchor: one durable submit per job (write, fsync, rename, fsync dir) in Python | {single:.0f} |")
    print(f"\nRatio: {batch/single:.1f}x\n")

    waits, plain = bench_submit_latency()
    print(f"## Submit to result, instant job ({len(waits)} runs, fsync on, worker idle)\n")
    print("| measure | p50 | p99 |")
    print("|---|---|---|")
    print(f"| `submit --wait echo x` (submit, run, result durable, printed) | {pct(waits,50)/1000:.2f} ms | {pct(waits,99)/1000:.2f} ms |")
    print(f"| anchor: plain `submit echo y` (enqueue only) | {pct(plain,50)/1000:.2f} ms | {pct(plain,99)/1000:.2f} ms |")
    print(f"\nRatio p50: {pct(waits,50)/pct(plain,50):.2f}x a plain submit\n")

    t_off, t_on, p_off, p_on, reloads = bench_metrics_cost()
    print("## Metrics on vs off (on: `[metrics]` listening and scraped every 100 ms)\n")
    print("| measure | metrics off | metrics on | on / off |")
    print("|---|---|---|---|")
    print(f"| spool throughput, c=1, fsync off (median of rounds) | {t_off:.0f} jobs/s | {t_on:.0f} jobs/s | {t_on/t_off:.2f}x |")
    print(f"| per job | {1e6/t_off:.1f} µs | {1e6/t_on:.1f} µs | +{1e6/t_on - 1e6/t_off:.1f} µs |")
    print(f"| restart pause p50 ({reloads} reloads, queue 5000) | {p_off/1000:.2f} ms | {p_on/1000:.2f} ms | {p_on/p_off:.2f}x |\n")

    used, rss_kb, dirty_kb, threads = bench_idle()
    print("\n## Idle worker (concurrency 1, empty queue)\n")
    print(f"- CPU over 10 s: {used} ticks")
    print(f"- RSS: {rss_kb/1024:.1f} MiB (private dirty {dirty_kb/1024:.1f} MiB), threads: {threads}")


if __name__ == "__main__":
    main()
