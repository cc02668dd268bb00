#!/usr/bin/env python3
"""The AMQP fleet on one machine (driven by scripts/fleet --amqp, and by scripts/test): a
3-node RabbitMQ cluster, H gearshift worker hosts and a client host, each in its own network
namespace on a bridge (198.18.1.0/24, inside 198.18.0.0/15, RFC 2544). The workers consume a
quorum queue replicated on the three nodes (declared by the workers: `queue_type = "quorum"`),
each knowing every node (`urls`, failover).

The client (pika, in its own namespace) publishes persistent jobs with publisher confirms, each
with a message id, to the nodes in turn; a publish that is not confirmed (its node died, its
connection broke) is published again on the next node, as a careful publisher does. Job
executables append the message id to a per-host log, so every confirmed job can be checked to
have run, and a job run twice is counted.

Scenarios: steady state; one node killed (kill -9) under load and started again; a worker's
link cut for 10 s under load. Bounds: nothing confirmed is lost; duplicates are counted (a
redelivery after a lost ack is AMQP's at-least-once); the workers all consume again within a
bound. Prints a table and exits 0 only if every scenario met its bound.

    scripts/fleet_amqp.py --bin PATH [--workers 3] [--jobs 400]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsstatus  # noqa: E402
from fleet import make_hosts, remove_hosts, sh  # noqa: E402

PREFIX = "gsq"
NET = "198.18.1"
PORT = 5672
QUEUE = "work"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
COOKIE = "GEARSHIFTFLEETCOOKIE"


# ---------------------------------------------------------------------------------------------
# The client (runs inside the client namespace: `fleet_amqp.py client ...`).


def client_main(args):
    import pika

    nodes = args.nodes.split(",")
    ids = [f"{args.run}-{i}" for i in range(args.jobs)]
    confirmed, republished = set(), 0
    node = 0
    conn = ch = None
    pending = list(ids)
    deadline = time.monotonic() + args.deadline
    until = args.until
    pace = args.pace
    while pending and time.monotonic() < deadline:
        if ch is None:
            try:
                params = pika.ConnectionParameters(nodes[node % len(nodes)], 5672, socket_timeout=2,
                                                   blocked_connection_timeout=5, heartbeat=5)
                conn = pika.BlockingConnection(params)
                ch = conn.channel()
                ch.confirm_delivery()
            except Exception:
                ch = None
                node += 1
                time.sleep(0.2)
                continue
        mid = pending[0]
        try:
            ch.basic_publish("", QUEUE, mid.encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=mid, type="work"),
                             mandatory=True)
            confirmed.add(mid)
            pending.pop(0)
        except Exception:
            # Not confirmed: its node or connection went away. Publish it again elsewhere.
            republished += 1
            try:
                conn.close()
            except Exception:
                pass
            ch = None
            node += 1
            continue
        if pace:
            time.sleep(pace)
        if until and not pending and not os.path.exists(until):
            pass
    if ch is not None:
        try:
            conn.close()
        except Exception:
            pass
    with open(args.out, "w") as f:
        json.dump({"confirmed": sorted(confirmed), "unconfirmed": pending, "republished": republished}, f)
    return 0


# ---------------------------------------------------------------------------------------------


class Fleet:
    def __init__(self, args, root):
        self.args, self.root = args, root
        self.procs = {}
        self.nodes = ["r1", "r2", "r3"]
        self.workers = [f"w{i + 1}" for i in range(args.workers)]
        self.hosts = self.nodes + self.workers + ["c"]
        self.ip = {h: f"{NET}.{10 + i + 1}" for i, h in enumerate(self.nodes)}
        self.ip.update({h: f"{NET}.{20 + i + 1}" for i, h in enumerate(self.workers)})
        self.ip["c"] = f"{NET}.31"
        self.bin = os.path.join(root, "gearshift")

    def ns(self, host):
        return f"{PREFIX}-{host}"

    def exec_in(self, host, *cmd, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kw)

    def up(self):
        make_hosts(PREFIX, self.ip)
        shutil.copy(self.args.bin, self.bin)
        for n in self.nodes:
            self.start_node(n)
        for n in self.nodes:
            self.wait_node(n, 90)
        for n in self.nodes[1:]:
            self.ctl(n, "stop_app")
            self.ctl(n, "join_cluster", self.node_name(self.nodes[0]))
            self.ctl(n, "start_app")
        for w in self.workers:
            self.write_worker(w)
            self.start_worker(w)
        if self.wait_consuming(60) is None:
            raise RuntimeError("the workers did not all consume")

    def down(self):
        for p in list(self.procs.values()):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    p.kill()
        remove_hosts(PREFIX)

    # -- the broker nodes --

    def node_name(self, n):
        return f"rabbit@{self.ip[n]}"

    def node_env(self, n):
        d = os.path.join(self.root, n)
        return dict(os.environ, HOME=d, RABBITMQ_NODENAME=self.node_name(n), RABBITMQ_USE_LONGNAME="true",
                    RABBITMQ_MNESIA_BASE=os.path.join(d, "mnesia"), RABBITMQ_LOG_BASE=os.path.join(d, "log"),
                    RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, "plugins"),
                    RABBITMQ_CONFIG_FILE=os.path.join(d, "rabbitmq"))

    def start_node(self, n):
        d = os.path.join(self.root, n)
        os.makedirs(d, exist_ok=True)
        cookie = os.path.join(d, ".erlang.cookie")
        if not os.path.exists(cookie):
            with open(cookie, "w") as f:
                f.write(COOKIE)
            os.chmod(cookie, 0o400)
        with open(os.path.join(d, "plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.default = {self.ip[n]}:{PORT}\nloopback_users = none\n")
        log = open(os.path.join(d, "out.log"), "ab")
        self.procs[n] = self.exec_in(n, SERVER, env=self.node_env(n), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)

    def wait_node(self, n, limit):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if sh("ip", "netns", "exec", self.ns(n), "ss", "-H", "-ltn", f"sport = :{PORT}", check=False).stdout.strip():
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"RabbitMQ on {n} did not start; see {self.root}/{n}/out.log")

    def ctl(self, n, *args):
        r = subprocess.run(["ip", "netns", "exec", self.ns(n), CTL, "-n", self.node_name(n), *args],
                           env=self.node_env(n), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {n}: {r.stderr.strip()}")
        return r.stdout

    def kill_node(self, n):
        p = self.procs.pop(n)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    # -- the workers --

    def worker_dir(self, w):
        return os.path.join(self.root, w)

    def write_worker(self, w):
        d = self.worker_dir(w)
        os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
        job = os.path.join(d, "jobs", "work.sh")
        tmp = os.path.join(d, "jobs", ".work.sh.tmp")
        with open(tmp, "w") as f:
            # One short line in one write (O_APPEND): lanes running at once never interleave.
            f.write(f"#!/bin/sh\nread -r p\necho \"$p\" >> {d}/runs.log\nsleep 0.02\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, job)
        urls = ", ".join(f'"amqp://guest:guest@{self.ip[n]}:{PORT}/%2f"' for n in self.nodes)
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(
                f"[worker]\nconcurrency = {self.args.lanes}\njobs_dir = \"jobs\"\nstate_dir = \"state\"\n"
                "allow_root = true\njob_timeout = \"20m\"\n"
                f"[source]\nkind = \"amqp\"\nurls = [{urls}]\nqueue = \"{QUEUE}\"\nfunction = \"work\"\n"
                "heartbeat = \"2s\"\nio_timeout = \"2s\"\nreconnect_max = \"1s\"\n"
                "[source.declare]\nqueue_type = \"quorum\"\n[log]\nlevel = \"info\"\n"
            )

    def start_worker(self, w):
        d = self.worker_dir(w)
        log = open(os.path.join(d, "worker.log"), "ab")
        self.procs[w] = self.exec_in(w, self.bin, "-c", os.path.join(d, "config.toml"), "run",
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                     start_new_session=True)

    def status(self, w):
        return gsstatus.query(os.path.join(self.worker_dir(w), "state"))

    def reconnects(self):
        total = 0
        for w in self.workers:
            st = self.status(w) or {}
            total += sum(v.get("reconnects", 0) for v in st.get("servers", []))
        return total

    def consuming(self, w):
        st = self.status(w)
        return bool(st) and sum(v["lanes_connected"] for v in st.get("servers", [])) == self.args.lanes

    def wait_consuming(self, limit, workers=None):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if all(self.consuming(w) for w in (workers or self.workers)):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    # -- load --

    def runs(self, prefix):
        counts = {}
        for w in self.workers:
            try:
                with open(os.path.join(self.worker_dir(w), "runs.log")) as f:
                    for line in f:
                        u = line.strip()
                        if u.startswith(prefix):
                            counts[u] = counts.get(u, 0) + 1
            except FileNotFoundError:
                pass
        return counts

    def load(self, run, jobs, during=None):
        out = os.path.join(self.root, f"client-{run}.json")
        nodes = ",".join(self.ip[n] for n in self.nodes)
        p = self.exec_in("c", "/usr/bin/python3", os.path.abspath(__file__), "client", "--nodes", nodes,
                         "--jobs", str(jobs), "--run", run, "--out", out, "--pace", "0.005",
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, f"client-{run}.log"), "ab"))
        extra = during() if during else None
        p.wait(timeout=600)
        with open(out) as f:
            r = json.load(f)
        confirmed = set(r["confirmed"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not confirmed <= set(self.runs(run + "-")):
            time.sleep(0.2)
        runs = self.runs(run + "-")
        return {
            "jobs": jobs,
            "confirmed": len(confirmed),
            "unconfirmed": len(r["unconfirmed"]),
            "republished": r["republished"],
            "ran": sum(1 for m in confirmed if m in runs),
            "lost": sum(1 for m in confirmed if m not in runs),
            "twice": sum(1 for n in runs.values() if n > 1),
            "extra": extra,
        }


def row(name, r, recover, bound, met, note=""):
    return {"scenario": name, **{k: r.get(k) for k in ("jobs", "confirmed", "lost", "twice")},
            "recover": recover, "bound": bound, "met": met, "note": note}


def steady(f, jobs):
    r = f.load("steady", jobs)
    ok = r["lost"] == 0 and r["twice"] == 0 and r["confirmed"] == jobs
    return row("steady state", r, "-", "every confirmed job ran once", ok)


def node_killed(f, jobs):
    # The node the first worker consumes from (workers spread over the nodes).
    views = (f.status(f.workers[0]) or {}).get("servers", [])
    used = [v["address"] for v in views if v.get("lanes_connected")]
    n = next((m for m in f.nodes if used and f"@{f.ip[m]}:" in used[0]), f.nodes[0])
    marks = {}

    def during():
        time.sleep(1.0)
        before = f.reconnects()
        f.kill_node(n)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10.0:
            if f.reconnects() > before and all(f.consuming(w) for w in f.workers):
                marks["failover"] = time.monotonic() - t0
                break
            time.sleep(0.05)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
        f.start_node(n)
        f.wait_node(n, 90)
        marks["back"] = f.wait_consuming(30)

    r = f.load("node-killed", jobs, during)
    rec = marks.get("failover")
    ok = r["lost"] == 0 and r["confirmed"] == jobs and rec is not None and rec <= 5.0 and marks.get("back") is not None
    return row(f"RabbitMQ node {n} killed 5 s, started again", r, f"{rec:.2f} s" if rec is not None else "never",
               "nothing confirmed lost; workers on it consume on another node <= 5 s", ok,
               f"{r['republished']} publishes not confirmed and sent again by the client, {r['twice']} jobs run twice")


def link_cut(f, jobs):
    w = f.workers[0]
    marks = {}

    def during():
        time.sleep(1.0)
        sh("ip", "-n", f.ns(w), "link", "set", "eth0", "down")
        time.sleep(10.0)
        sh("ip", "-n", f.ns(w), "link", "set", "eth0", "up")
        marks["back"] = f.wait_consuming(30, workers=[w])

    r = f.load("link-cut", jobs, during)
    rec = marks.get("back")
    ok = r["lost"] == 0 and r["confirmed"] == jobs and rec is not None and rec <= 10.0
    return row(f"worker {w} link cut 10 s", r, f"{rec:.2f} s" if rec is not None else "never",
               "nothing confirmed lost; consuming again <= 10 s after the link is back", ok,
               f"{r['twice']} jobs run twice (unacknowledged on the cut connection, delivered again)")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    c.add_argument("--nodes", required=True)
    c.add_argument("--jobs", type=int, required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--deadline", type=float, default=180)
    c.add_argument("--pace", type=float, default=0.0)
    c.add_argument("--until")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--bin")
    args = ap.parse_args()
    if args.cmd == "client":
        return client_main(args)
    if os.geteuid() != 0:
        print("the AMQP fleet needs root (network namespaces)", file=sys.stderr)
        return 2
    remove_hosts(PREFIX)
    root = tempfile.mkdtemp(prefix="gs-fleet-amqp-")
    f = Fleet(args, root)
    rows = []

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, interrupted)
    try:
        f.up()
        rows.append(steady(f, args.jobs))
        rows.append(node_killed(f, args.jobs))
        rows.append(link_cut(f, args.jobs))
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}): cleaning up", file=sys.stderr)
        f.down()
        shutil.rmtree(root, ignore_errors=True)
        return 130
    except Exception:
        f.down()
        print(f"logs kept in {root}", file=sys.stderr)
        raise
    f.down()
    print(f"# AMQP fleet: a 3-node RabbitMQ cluster (quorum queue), {args.workers} workers x {args.lanes} lanes, "
          f"1 publishing client, {NET}.0/24\n")
    print("| scenario | jobs | confirmed | lost | run twice | time to recover | bound | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['jobs']} | {r['confirmed']} | {r['lost']} | {r['twice']} | {r['recover']} "
              f"| {r['bound']} | {'yes' if r['met'] else '**NO**'} |")
    notes = [f"- {r['scenario']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        print("\n" + "\n".join(notes))
    failed = [r for r in rows if not r["met"]]
    if failed:
        print(f"\n{len(failed)} scenario(s) missed their bound; logs kept in {root}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
