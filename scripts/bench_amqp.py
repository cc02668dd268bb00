#!/usr/bin/python3
"""AMQP drain benchmark (driven by scripts/bench-amqp).

One private RabbitMQ node (Debian's rabbitmq-server without systemd, on free loopback ports).
Each row: JOBS persistent messages are published into a durable queue (`gearshift submit
--count`, confirmed), then the consumer(s) start and the time until the broker reports no
message ready is the drain time (the last in-flight deliveries, at most one per consumer, are
not waited for). gearshift: the amqp source, prefetch 1, the built-in `echo` function, one
process with 1 or 4 lanes, with `busy_poll` at its default and off. PHP: the PHP daemons' consumer (php-amqp, qos 1, manual ack), 1 or 4
processes; at 4, also one PHP process with one connection and 4 channels (qos 1 each), which
the daemons do not run: it shows what a shared connection saves the broker. Reports jobs/s,
the ratio to PHP at the same concurrency, CPU time per job (all the consumer's processes, and
the broker's) and memory. Best of ROUNDS (default 2) per row.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, proc_stats  # noqa: E402

import pika

GEARSHIFT, PHP_CONSUMER = sys.argv[1:3]
JOBS = int(os.environ.get("JOBS", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class Broker:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "rabbit")
        os.makedirs(self.dir)
        self.port, dist, self.epmd = free_port(), free_port(), free_port()
        with open(os.path.join(self.dir, "plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        self.env = dict(os.environ, HOME=self.dir, RABBITMQ_NODENAME=f"bench{self.port}@localhost",
                        RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(dist),
                        ERL_EPMD_PORT=str(self.epmd), RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
                        RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir, "plugins"),
                        RABBITMQ_CONFIG_FILE=os.path.join(self.dir, "rabbitmq"))
        self.boot()

    def boot(self):
        """Starts the node (again, after `kill`: the same ports and the same store) and waits
        until it takes a connection."""
        out = open(os.path.join(self.dir, "out.log"), "a")
        self.proc = subprocess.Popen([SERVER], env=self.env, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit("RabbitMQ did not start")
                time.sleep(0.2)
        self.ch = self.conn.channel()

    def kill(self):
        """Kills the node at once (SIGKILL to its session), as a crash would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2f"

    def ready(self, queue):
        return self.ch.queue_declare(queue, passive=True).method.message_count

    def stop(self):
        self.kill()
        # epmd refuses -kill while it still lists the node just killed: ask again for up to 2 s
        # (once was not enough: every run left an epmd daemon behind).
        deadline = time.monotonic() + 2
        while True:
            out = subprocess.run(["epmd", "-port", str(self.epmd), "-kill"], capture_output=True, text=True)
            said = out.stdout + out.stderr
            if "Killed" in said or "Cannot connect" in said or time.monotonic() > deadline:
                break
            time.sleep(0.1)


def broker_ticks(broker):
    """CPU ticks of every process of the broker's session (beam.smp and its helpers)."""
    sid, ticks = os.getsid(broker.proc.pid), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks


def stats(pids):
    ticks = rss = dirty = 0
    for pid in pids:
        t, r, d = proc_stats(pid)
        ticks, rss, dirty = ticks + t, rss + r, dirty + d
    return ticks, rss, dirty


def run(kind, concurrency, broker, workdir, n):
    queue = f"bench-{kind.split()[0].lower()}-{concurrency}-{n}"
    cfg = os.path.join(workdir, f"{queue}.toml")
    os.makedirs(os.path.join(workdir, "jobs"), exist_ok=True)
    with open(cfg, "w") as f:
        f.write(f"[worker]\nconcurrency = {concurrency}\nstate_dir = \"state-{queue}\"\nallow_root = true\n"
                f"builtins = true\njob_timeout = \"20m\"\n[log]\nlevel = \"warn\"\n"
                f"[source]\nkind = \"amqp\"\nurl = \"{broker.url()}\"\nqueue = \"{queue}\"\nfunction = \"echo\"\n"
                + ("busy_poll = \"0\"\n" if "busy_poll" in kind else "")
                + "[source.declare]\n")
    broker.ch.queue_declare(queue, durable=True)
    subprocess.run([GEARSHIFT, "-c", cfg, "submit", "--count", str(JOBS), "echo", "ticket,login,42"],
                   check=True, stdout=subprocess.DEVNULL)
    assert broker.ready(queue) == JOBS, "preload"
    if kind.startswith("gearshift"):
        cmds = [[GEARSHIFT, "-c", cfg, "run"]]
    elif "one connection" in kind:
        cmds = [["php", PHP_CONSUMER, str(broker.port), queue, str(concurrency)]]
    else:
        cmds = [["php", PHP_CONSUMER, str(broker.port), queue]] * concurrency
    b0 = broker_ticks(broker)
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    deadline = t0 + 600
    while broker.ready(queue) > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not drain the queue")
        time.sleep(0.01)
    secs = time.monotonic() - t0
    bticks = broker_ticks(broker) - b0
    ticks, rss, dirty = stats([p.pid for p in procs])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    broker.ch.queue_delete(queue)
    hz = os.sysconf("SC_CLK_TCK")
    return JOBS / secs, rss, dirty, ticks / hz / JOBS * 1e6, bticks / hz / JOBS * 1e6


def main():
    workdir = tempfile.mkdtemp(prefix="gs-bench-amqp-")
    broker = Broker(workdir)
    try:
        print(f"# AMQP consumers draining {JOBS} persistent messages (prefetch 1, manual ack), one RabbitMQ node, {os.cpu_count()} CPUs\n")
        print("| consumer | concurrency | jobs/s | vs PHP | CPU per job | the broker's CPU per job | RSS | private dirty |")
        print("|---|---|---|---|---|---|---|---|")
        n = 0
        for concurrency in (1, 4):
            results = {}
            for _ in range(ROUNDS):
                kinds = ["PHP php-amqp", "gearshift", "gearshift, busy_poll off"]
                if concurrency > 1:
                    kinds.append("PHP php-amqp, one process, one connection, a channel each")
                for kind in kinds:
                    n += 1
                    r = run(kind, concurrency, broker, workdir, n)
                    if kind not in results or r[0] > results[kind][0]:
                        results[kind] = r
            php = results["PHP php-amqp"][0]
            for kind, (rate, rss, dirty, cpu_us, broker_us) in results.items():
                print(f"| {kind} | {concurrency} | {rate:,.0f} | {rate / php:.2f}x | {cpu_us:.0f} µs | {broker_us:.0f} µs | {rss / 1024:.1f} MiB | {dirty / 1024:.1f} MiB |")
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
