#!/usr/bin/python3
"""ZeroMQ ingest benchmark (driven by scripts/bench-zeromq).

Each row: CLIENTS REQ clients (separate processes, pyzmq) send MESSAGES [function, payload]
requests in all, as fast as the answers come, to one server; the rate is messages answered per
second. Servers: gearshift's zeromq source with fsync on (every answer means the job is durable:
journal, one sync per batch) and off; the PHP daemons' REP loop (php-zmq; recv, send 'TRUE',
stores nothing); the same loop appending and fsyncing each message before it answers.
Then error answers: eight clients naming a function no one serves, with JOB_FILES executables of
other names in `jobs_dir` (each such name is looked up there), against the same clients naming
no function at all (refused before any lookup). Last, the restart pause of an idle worker on a zeromq source (HUP -> its lanes serving, as the
worker reports it in `status`). A second table says where each server's CPU went: per message, in all and by thread (from
/proc/PID/task: a thread's name as the kernel has it), with the context switches, the clients'
own CPU per message (timed in their loops) and how busy the whole machine was meanwhile; then
the disk's sync (wall and CPU) and two ceilings on the durable rate (from time and from CPU). In
gearshift, "zeromq" is the ingress (it reads the clients' sockets, stores and answers; the
worker has no libzmq thread), "lane-N" the lanes, "spool-commit" the group commit; in the PHP
loop, "ZMQbg/IO/0" is libzmq's I/O thread.
"""
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port  # noqa: E402

import zmq

GEARSHIFT, PHP_LOOP = sys.argv[1:3]
MESSAGES = int(os.environ.get("MESSAGES", "20000"))
# HUPs of an idle worker for its restart pause.
RESTARTS = int(os.environ.get("RESTARTS", "20"))
# Executables in `jobs_dir` for the rejection row (0: skip it).
JOB_FILES = int(os.environ.get("JOB_FILES", "300"))


def client(endpoint, n, start, spent, function=b"echo"):
    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.connect(endpoint)
    start.wait()
    cpu = time.process_time()
    for i in range(n):
        s.send_multipart([function, b"ticket,login,%d" % i])
        s.recv()
    with spent.get_lock():
        spent.value += time.process_time() - cpu
    s.close()


def machine():
    """(busy, all) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def drive(endpoint, clients, function=b"echo"):
    """(messages answered per second, the clients' CPU seconds in their loops, the share of
    the machine's CPU time busy meanwhile)."""
    start, spent = multiprocessing.Event(), multiprocessing.Value("d", 0.0)
    per = MESSAGES // clients
    procs = [multiprocessing.Process(target=client, args=(endpoint, per, start, spent, function)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    m0, t0 = machine(), time.monotonic()
    start.set()
    for p in procs:
        p.join()
    took, m1 = time.monotonic() - t0, machine()
    return per * clients / took, spent.value, (m1[0] - m0[0]) / max(1, m1[1] - m0[1])


def threads(pid):
    """{thread name: (CPU ticks, context switches)} of process `pid`, summed by name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = sum(int(l.split()[1]) for l in f if "ctxt_switches" in l)
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ticks, n = out.get(name, (0, 0))
        out[name] = (ticks + int(fields[11]) + int(fields[12]), n + switches)
    return out


def measured(pid, endpoint, clients):
    """The rate, where the server's CPU went per message (see threads), the clients' CPU per
    message (µs, in their loops) and how busy the machine was."""
    before = threads(pid)
    rate, spent, busy = drive(endpoint, clients)
    after = threads(pid)
    hz, n = os.sysconf("SC_CLK_TCK"), MESSAGES // clients * clients
    per = {k: ((v[0] - before.get(k, (0, 0))[0]) / hz / n * 1e6, (v[1] - before.get(k, (0, 0))[1]) / n)
           for k, v in after.items()}
    return rate, {k: v for k, v in per.items() if v[0] > 0.05 or v[1] > 0.01}, spent / n * 1e6, busy


CPU = []


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def worker(fsync, workdir, job_files=0):
    """A gearshift worker on a zeromq source in a scratch directory, `job_files` executables
    in its `jobs_dir`: (process, config, port)."""
    port = free_port()
    d = tempfile.mkdtemp(dir=workdir)
    os.makedirs(os.path.join(d, "jobs"))
    for i in range(job_files):
        path = os.path.join(d, "jobs", f"task{i}.sh")
        with open(path, "w") as f:
            f.write("#!/bin/sh\ncat\n")
        os.chmod(path, 0o755)
    # Old enough that the worker may keep its listing of `jobs_dir` (watch::Offers).
    time.sleep(1.1 if job_files else 0)
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write(
            "[worker]\nconcurrency = 2\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nallow_root = true\n"
            f"[source]\nkind = \"zeromq\"\nbind = [\"tcp://127.0.0.1:{port}\"]\ndir = \"spool\"\n"
            f"fsync = {'true' if fsync else 'false'}\n[log]\nlevel = \"warn\"\n"
        )
    p = subprocess.Popen([GEARSHIFT, "-c", cfg, "run"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, cfg, port


def gearshift(clients, fsync, workdir):
    p, _, port = worker(fsync, workdir)
    try:
        time.sleep(0.3)
        rate, per, own, busy = measured(p.pid, f"tcp://127.0.0.1:{port}", clients)
        CPU.append((clients, f"gearshift, fsync {'on' if fsync else 'off'}", per, own, busy, rate))
        return rate
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def rejections(workdir, clients=8):
    """Messages the worker answers with an error, from `clients` REQ clients: naming a function
    no one serves, with JOB_FILES executables of other names in `jobs_dir` (each such name is
    looked up there: a deploy's new file may serve it), against naming no function at all (a
    name that is none, refused before any lookup). (unknown/s, no name/s)."""
    p, _, port = worker(False, workdir, JOB_FILES)
    try:
        time.sleep(0.3)
        endpoint = f"tcp://127.0.0.1:{port}"
        unknown = drive(endpoint, clients, b"nobody_serves_this")[0]
        malformed = drive(endpoint, clients, b"no name")[0]
        return unknown, malformed
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def idle_restarts(workdir, n=RESTARTS):
    """The restart pause of an idle worker on a zeromq source, as it reports it (`status`:
    from the HUP until the new generation's lanes serve), over `n` HUPs: (p50, max) in ms."""
    p, cfg, _ = worker(True, workdir)

    def status():
        out = subprocess.run([GEARSHIFT, "-c", cfg, "status", "--json"], capture_output=True, text=True).stdout
        return json.loads(out) if out.strip() else {}

    try:
        gen = status().get("generation", 1)
        pauses = []
        for _ in range(n):
            time.sleep(0.3)
            p.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            s = {}
            while time.monotonic() < deadline:
                time.sleep(0.05)
                s = status()
                if s.get("generation") == gen + 1 and s.get("last_restart_pause_us"):
                    break
            gen += 1
            pauses.append(s.get("last_restart_pause_us", 0) / 1000)
        return statistics.median(pauses), max(pauses)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def php(clients, fsync, workdir):
    port = free_port()
    args = ["php", PHP_LOOP, f"tcp://127.0.0.1:{port}"]
    if fsync:
        args.append(os.path.join(tempfile.mkdtemp(dir=workdir), "messages.log"))
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        rate, per, own, busy = measured(p.pid, f"tcp://127.0.0.1:{port}", clients)
        CPU.append((clients, "REP loop, fsync per message" if fsync else "PHP REP loop", per, own, busy, rate))
        return rate
    finally:
        p.kill()
        p.wait()


def sync_latency(workdir, n=2000):
    """The disk's floor under a durable answer: the median wall time of one small overwrite
    and fdatasync of a file whose blocks are written already (as the worker's journal does),
    and the CPU time each took on average (on a VM the device's notifications cost CPU)."""
    path = os.path.join(workdir, "sync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\0" * (n * 256 + 4096))
        os.fsync(fd)
        times, cpu = [], time.process_time()
        for i in range(n):
            t = time.perf_counter()
            os.pwrite(fd, b"r" * 200, i * 256)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu) / n
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times), cpu


def main():
    workdir = tempfile.mkdtemp(prefix="gs-bench-zeromq-", dir="/var/tmp")
    try:
        table(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def table(workdir):
    print(f"# ZeroMQ ingest: {MESSAGES} REQ requests per row, {os.cpu_count()} CPUs\n")
    print("| clients | PHP REP loop (stores nothing) | REP loop, fsync per message | gearshift, fsync on | vs PHP | vs fsync loop | gearshift, fsync off | vs PHP |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in (1, 8):
        plain = php(clients, False, workdir)
        synced = php(clients, True, workdir)
        on = gearshift(clients, True, workdir)
        off = gearshift(clients, False, workdir)
        print(f"| {clients} | {plain:,.0f}/s | {synced:,.0f}/s | {on:,.0f}/s | {on / plain:.2f}x | {on / synced:.2f}x | {off:,.0f}/s | {off / plain:.2f}x |")
    floor, sync_cpu = sync_latency(workdir)
    print("\n| clients | server | CPU per message | context switches per message | by thread: CPU µs (switches) per message | clients' CPU per message | machine busy |")
    print("|---|---|---|---|---|---|---|")
    for clients, server, per, own, busy, _ in CPU:
        cpu, switches = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        by = ", ".join(f"{k} {v[0]:.1f} ({v[1]:.2f})" for k, v in sorted(per.items(), key=lambda kv: -kv[1][0]))
        print(f"| {clients} | {server} | {cpu:.1f} µs | {switches:.2f} | {by} | {own:.1f} µs | {busy * 100:.0f}% |")
    # Two ceilings on a durable rate. Time: each client has one request out, and its answer
    # waits for at least one sync on top of the round trip one client alone makes to gearshift
    # without fsync. CPU: the clients' CPU and the server's per message, every CPU busy.
    plain = {c: r for c, s, _, _, _, r in CPU if s == "PHP REP loop"}
    solo = 1 / next(r for c, s, _, _, _, r in CPU if c == 1 and s == "gearshift, fsync off")
    print(f"\nThe disk's sync (overwrite + fdatasync, median of 2000): {floor * 1e6:.0f} µs, of which {sync_cpu * 1e6:.0f} µs of CPU "
          "(mean; gearshift pays it once per batch, the fsync loop once per message). Ceilings on the durable rate, "
          "the lower of: each client's round trip alone to gearshift without fsync plus one sync; and every CPU busy with the "
          "clients' and gearshift's CPU per message as measured in its row (fsync on):")
    for clients, server, per, own, busy, rate in CPU:
        if server != "gearshift, fsync on":
            continue
        by_time = clients / (solo + floor)
        by_cpu = os.cpu_count() / ((own + sum(v[0] for v in per.values())) / 1e6)
        top = min(by_time, by_cpu)
        print(f"- {clients} client(s): time {by_time:,.0f}/s, CPU {by_cpu:,.0f}/s: at most {top / plain[clients]:.2f}x the PHP loop; "
              f"gearshift did {rate / top:.0%} of it, with the machine {busy:.0%} busy")
    if JOB_FILES:
        unknown, malformed = rejections(workdir)
        print(f"\nError answers, 8 clients, fsync off: a function no one serves, {JOB_FILES} executables of other names in `jobs_dir`: "
              f"{unknown:,.0f}/s; a name that is none (refused before any lookup): {malformed:,.0f}/s; **{unknown / malformed:.2f}x**")
    if RESTARTS == 0:
        return
    p50, worst = idle_restarts(workdir)
    print(f"\nRestart pause of an idle worker (fsync on), HUP -> its lanes serving, as it reports it, {RESTARTS} HUPs: p50 {p50:.2f} ms, max {worst:.2f} ms")


if __name__ == "__main__":
    main()
