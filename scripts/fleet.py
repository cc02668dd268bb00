#!/usr/bin/env python3
"""A fleet on one machine (driven by scripts/fleet): S gearmand hosts, H gearshift worker hosts
(each connected to every server) and a client host, each in its own network namespace, joined
by veth pairs to a bridge in a namespace of its own (so the machine's own network is never
touched). Addresses are 198.18.0.0/24, inside 198.18.0.0/15 (RFC 2544, network benchmarks).

The client speaks the Gearman protocol itself, as libgearman clients do: each foreground job
has a unique id, goes to the server picked by crc32(unique) % S, and moves on to the next
server when one refuses, drops or times out the job. Job executables append the job's unique id
to a per-host log, so a job run twice is counted.

Runs each scenario, prints a table, and exits 0 only if every scenario met its bound. Every
namespace, link and process it makes is removed at the end, also when interrupted; leftovers
of an earlier run that was killed are removed first.

    scripts/fleet [--servers 3] [--workers 4] [--jobs 400] [--short] [--bin PATH --bin-b PATH]
"""
import argparse
import datetime
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsstatus  # noqa: E402
from benchlib import read_packet  # noqa: E402

PREFIX = "gsf"
NET = "198.18.0"
PORT = 4730
FUNCTION = "work"

# ---------------------------------------------------------------------------------------------
# The client (runs inside the client namespace: `fleet.py client ...`).

SUBMIT_JOB, JOB_CREATED, WORK_STATUS, WORK_COMPLETE, WORK_FAIL = 7, 8, 12, 13, 14
SUBMIT_JOB_BG = 18
WORK_EXCEPTION, WORK_DATA, WORK_WARNING, ERROR = 25, 28, 29, 19


def packet(kind, *args):
    data = b"\0".join(args)
    return b"\0REQ" + struct.pack(">II", kind, len(data)) + data


def submit_once(server, unique, payload, timeout):
    """One foreground attempt: ("done", result) or ("failed", why); raises on a server fault."""
    host, port = server.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.settimeout(timeout)
        s.sendall(packet(SUBMIT_JOB, FUNCTION.encode(), unique.encode(), payload.encode()))
        handle = None
        while True:
            kind, data = read_packet(s)
            if kind == JOB_CREATED:
                handle = data
            elif kind == WORK_COMPLETE and data.startswith(handle + b"\0"):
                return "done", data[len(handle) + 1:].decode(errors="replace")
            elif kind in (WORK_FAIL, WORK_EXCEPTION) and handle and data.startswith(handle):
                return "failed", data[len(handle) + 1:].decode(errors="replace")
            elif kind == ERROR:
                raise ConnectionError(f"server error: {data!r}")


def submit_background(server, unique, payload):
    """One background submission: True once the server said JOB_CREATED (it holds the job)."""
    host, port = server.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.settimeout(5)
        s.sendall(packet(SUBMIT_JOB_BG, FUNCTION.encode(), unique.encode(), payload.encode()))
        kind, _ = read_packet(s)
        return kind == JOB_CREATED


def client_main(args):
    servers = args.servers.split(",")
    results = {}
    lock = threading.Lock()
    counter = [0]

    def next_index():
        """At least --jobs jobs, and more until --until exists (load through a whole scenario)."""
        with lock:
            i = counter[0]
            if i >= args.jobs and not (args.until and not os.path.exists(args.until)):
                return None
            counter[0] += 1
            return i

    def run():
        while True:
            i = next_index()
            if i is None:
                return
            unique = f"{args.run}-{i}"
            payload = f"job-{args.run}-{i}"
            first = zlib.crc32(unique.encode()) % len(servers)
            if args.background_every and i % args.background_every == 0:
                # A background job: handed to one server, the client does not wait for it.
                unique = f"bg-{unique}"
                created = None
                for k in range(len(servers)):
                    server = servers[(first + k) % len(servers)]
                    try:
                        if submit_background(server, unique, payload):
                            created = server
                            break
                    except (OSError, ConnectionError):
                        time.sleep(0.05)
                with lock:
                    results[i] = {"unique": unique, "background": True, "created": created}
                continue
            t0 = time.monotonic()
            outcome, attempts, errors = None, 0, []
            deadline = t0 + args.deadline
            k = 0
            while outcome is None and time.monotonic() < deadline:
                server = servers[(first + k) % len(servers)]
                k += 1
                attempts += 1
                try:
                    outcome = submit_once(server, unique, payload, args.timeout)
                except (OSError, ConnectionError) as e:
                    errors.append(f"{server}: {e}")
                    time.sleep(0.05)
            with lock:
                results[i] = {
                    "unique": unique,
                    "expected": payload.upper(),
                    "outcome": outcome[0] if outcome else "lost",
                    "result": outcome[1] if outcome else None,
                    "attempts": attempts,
                    "seconds": time.monotonic() - t0,
                    "errors": errors[-3:],
                }

    threads = [threading.Thread(target=run) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        json.dump(results, f)


# ---------------------------------------------------------------------------------------------
# A delaying relay (runs inside a server namespace: `fleet.py relay ...`), for kernels without
# netem: every chunk read is written on after 20 ms +- 5 ms (order kept), and 1% of chunks wait
# a further 200 ms, the retransmission timeout a lost segment costs TCP. Both directions.


def relay_main(args):
    import random
    host, port = args.listen.rsplit(":", 1)
    to_host, to_port = args.to.rsplit(":", 1)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(256)

    def pipe(src, dst):
        pending = queue.Queue()
        last = [0.0]

        def reader():
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                delay = (args.delay_ms + random.uniform(-args.jitter_ms, args.jitter_ms)) / 1000
                if random.random() < args.loss:
                    delay += args.rto_ms / 1000
                due = max(last[0], time.monotonic() + delay)
                last[0] = due
                pending.put((due, data))
                if not data:
                    return

        def writer():
            while True:
                due, data = pending.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        for f in (reader, writer):
            threading.Thread(target=f, daemon=True).start()

    while True:
        conn, _ = srv.accept()
        try:
            up = socket.create_connection((to_host, int(to_port)), timeout=5)
            up.settimeout(None)
        except OSError:
            conn.close()
            continue
        for s in (conn, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe(conn, up)
        pipe(up, conn)


# ---------------------------------------------------------------------------------------------
# The fleet.


def sh(*cmd, check=True):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def leftovers(prefix=PREFIX):
    """Namespaces of an earlier run (ours only: those named with `prefix`)."""
    ns = [l.split()[0] for l in sh("ip", "netns", "list", check=False).stdout.splitlines() if l.startswith(prefix + "-")]
    return ns


def make_hosts(prefix, ips):
    """A namespace PREFIX-HOST per host in `ips` (host -> address), each joined by a veth pair
    to a bridge in a namespace of its own (PREFIX-net): the machine's own network is untouched."""
    net = f"{prefix}-net"
    sh("ip", "netns", "add", net)
    sh("ip", "-n", net, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", net, "link", "set", "br0", "up")
    for h, ip in ips.items():
        ns = f"{prefix}-{h}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{prefix}{h}a", "type", "veth", "peer", "name", f"{prefix}{h}b")
        sh("ip", "link", "set", f"{prefix}{h}a", "netns", ns)
        sh("ip", "link", "set", f"{prefix}{h}b", "netns", net)
        sh("ip", "-n", ns, "link", "set", f"{prefix}{h}a", "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", net, "link", "set", f"{prefix}{h}b", "master", "br0")
        sh("ip", "-n", net, "link", "set", f"{prefix}{h}b", "up")


def remove_hosts(prefix):
    """Every namespace named with `prefix`, and anything still running in one (a job process)."""
    for ns in leftovers(prefix):
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)


class Fleet:
    def __init__(self, args, root):
        self.args, self.root = args, root
        self.procs = {}  # name -> Popen
        self.servers = [f"s{i + 1}" for i in range(args.servers)]
        self.workers = [f"w{i + 1}" for i in range(args.workers)]
        self.hosts = self.servers + self.workers + ["c"]
        self.ip = {h: f"{NET}.{10 + i + 1}" for i, h in enumerate(self.servers)}
        self.ip.update({h: f"{NET}.{20 + i + 1}" for i, h in enumerate(self.workers)})
        self.ip["c"] = f"{NET}.31"
        self.addrs = [f"{self.ip[s]}:{PORT}" for s in self.servers]
        self.bin_dir = os.path.join(root, "bin")
        self.splay = None

    def ns(self, host):
        return f"{PREFIX}-{host}"

    # -- set-up and tear-down --

    def up(self):
        make_hosts(PREFIX, self.ip)
        os.makedirs(self.bin_dir)
        shutil.copy(self.args.bin, os.path.join(self.bin_dir, "gearshift"))
        for s in self.servers:
            self.start_server(s)
        for w in self.workers:
            self.write_worker(w)
            self.start_worker(w)
        self.wait_all_connected(30)

    def down(self):
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        remove_hosts(PREFIX)

    def exec_in(self, host, *cmd, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kw)

    def start_server(self, s):
        log = open(os.path.join(self.root, f"gearmand-{s}.log"), "ab")
        self.procs[s] = self.exec_in(
            s, "gearmand", "-L", self.ip[s], "-p", str(PORT), "-t", "2", "-l", "stderr",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listening = sh("ip", "netns", "exec", self.ns(s), "ss", "-H", "-ltn", f"sport = :{PORT}", check=False)
            if listening.stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"gearmand on {s} did not listen")

    def kill_server(self, s):
        p = self.procs.pop(s)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def worker_dir(self, w):
        return os.path.join(self.root, w)

    def write_worker(self, w, extra=""):
        d = self.worker_dir(w)
        os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
        job = os.path.join(d, "jobs", f"{FUNCTION}.sh")
        # Each run leaves the job's unique id behind, so a job run twice is counted.
        text = f"#!/bin/sh\necho \"$GEARSHIFT_UNIQUE\" >> {d}/runs.log\nsleep 0.05\ntr a-z A-Z\n"
        # Written once, by rename: /bin/sh reads its script after exec, so a script truncated in
        # place while jobs run it runs empty (exit 0, no output: a wrong result, measured here).
        if not os.path.exists(job) or open(job).read() != text:
            tmp = os.path.join(d, "jobs", f".{FUNCTION}.sh.tmp")  # hidden: never a function
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755)
            os.replace(tmp, job)
        servers = ", ".join(f'"{a}"' for a in self.addrs)
        splay = f'restart_splay = "{self.splay}"\n' if self.splay else ""
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(
                f"[worker]\nconcurrency = {self.args.lanes}\njobs_dir = \"jobs\"\nstate_dir = \"state\"\n"
                f"allow_root = true\n{splay}"
                f"[source]\nkind = \"gearman\"\nservers = [{servers}]\nclient_id = \"{w}\"\n"
                "io_timeout = \"2s\"\nreconnect_max = \"1s\"\ndead_peer_timeout = \"4s\"\n"
                f"[log]\nlevel = \"info\"\n{extra}"
            )

    def start_worker(self, w):
        d = self.worker_dir(w)
        log = open(os.path.join(d, "worker.log"), "ab")
        self.procs[w] = self.exec_in(
            w, os.path.join(self.bin_dir, "gearshift"), "-c", os.path.join(d, "config.toml"), "run",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )

    def reconfigure(self, extra="", limit=60):
        """Writes every worker's config (with the current splay) and waits until each runs it."""
        import hashlib
        shas = {}
        for w in self.workers:
            self.write_worker(w, extra)
            with open(os.path.join(self.worker_dir(w), "config.toml"), "rb") as fh:
                shas[w] = hashlib.sha256(fh.read()).hexdigest()
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            sts = {w: self.status(w) or {} for w in self.workers}
            if all(sts[w].get("config_sha256") == shas[w] and sts[w].get("state") == "running" for w in self.workers):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def status(self, w):
        return gsstatus.query(os.path.join(self.worker_dir(w), "state"))

    def connected(self, w, addr=None):
        st = self.status(w)
        if not st:
            return False
        views = [v for v in st.get("servers", []) if addr is None or v["address"] == addr]
        return bool(views) and all(v["lanes_connected"] == self.args.lanes for v in views)

    def wait_all_connected(self, limit, addr=None, workers=None):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if all(self.connected(w, addr) for w in (workers or self.workers)):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def wait_all(self, pred, limit):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            sts = [self.status(w) for w in self.workers]
            if all(s is not None and pred(s) for s in sts):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    # -- load --

    def run_clients(self, run, jobs, during=None):
        """Submits `jobs` foreground jobs from the client host; `during` runs meanwhile."""
        out = os.path.join(self.root, f"client-{run}.json")
        until = os.path.join(self.root, f"client-{run}.until")
        p = self.exec_in(
            "c", sys.executable, os.path.abspath(__file__), "client",
            "--servers", ",".join(self.addrs), "--jobs", str(jobs), "--run", run,
            "--concurrency", str(self.args.client_concurrency), "--timeout", "15",
            "--deadline", "120", "--out", out, "--until", until, "--background-every", "10",
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, f"client-{run}.log"), "ab"),
        )
        extra = during() if during else None
        # Load until a second after the disruption is over.
        time.sleep(1.0 if during else 0.0)
        open(until, "w").close()
        p.wait(timeout=600)
        with open(out) as f:
            results = json.load(f)
        background = [r for r in results.values() if r.get("background")]
        rows = [r for r in results.values() if not r.get("background")]
        jobs = len(rows)

        def runs_of(prefix):
            runs = {}
            for w in self.workers:
                try:
                    with open(os.path.join(self.worker_dir(w), "runs.log")) as f:
                        for line in f:
                            u = line.strip()
                            if u.startswith(prefix):
                                runs[u] = runs.get(u, 0) + 1
                except FileNotFoundError:
                    pass
            return runs

        # Background jobs still queued drain within seconds; those a server lost never run.
        created = {r["unique"] for r in background if r["created"]}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not created <= set(runs_of("bg-" + run + "-")):
            time.sleep(0.2)
        bg_runs = runs_of("bg-" + run + "-")
        runs = runs_of(run + "-")
        correct = sum(1 for r in rows if r["outcome"] == "done" and r["result"] == r["expected"])
        return {
            "jobs": jobs,
            "correct": correct,
            "lost": sum(1 for r in rows if r["outcome"] == "lost") + (jobs - len(rows)),
            "failed": sum(1 for r in rows if r["outcome"] == "failed"),
            "wrong": sum(1 for r in rows if r["outcome"] == "done" and r["result"] != r["expected"]),
            "duplicated": sum(1 for n in runs.values() if n > 1),
            "retried": sum(1 for r in rows if r["attempts"] > 1),
            "background": {
                "submitted": len(background),
                "refused": sum(1 for r in background if not r["created"]),
                "ran": sum(1 for u in created if u in bg_runs),
                "lost": sum(1 for u in created if u not in bg_runs),
                "twice": sum(1 for n in bg_runs.values() if n > 1),
            },
            "extra": extra,
        }

    def log_matches(self, w, pattern, since_wall):
        """(time, match) of each line of worker `w`'s log matching `pattern` after `since_wall`."""
        pat = re.compile(r"^(\S+Z) " + pattern)
        found = []
        with open(os.path.join(self.worker_dir(w), "worker.log"), errors="replace") as f:
            for line in f:
                m = pat.match(line)
                if m:
                    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                    if t >= since_wall:
                        found.append((t, m))
        return found

    def splay_draws(self, since_wall):
        """The delay (ms) each worker drew for its binary-changed restart after `since_wall`."""
        draws = []
        for w in self.workers:
            found = self.log_matches(w, r"INFO .* binary changed: restarting in (\d+) ms", since_wall)
            if found:
                draws.append(int(found[0][1].group(2)))
        return draws

    def restarts_spread(self, since_wall):
        """Seconds between the first and the last worker's restart after `since_wall`, each taken
        when its splay ended and the restart began (its drain), not when its new generation
        served: jobs still running then make the drains end together (a run had three hosts
        whose splays ended 1.4 s apart serve within 0.1 s of each other)."""
        stamps = sorted(t for w in self.workers
                        for t, _ in self.log_matches(w, r"INFO .* restarting after \d+ running job", since_wall)[:1])
        return (stamps[-1] - stamps[0]) if len(stamps) == len(self.workers) else None

    def connects_per_second(self, since_wall):
        """Peak connections made to the servers in any one-second window after `since_wall`."""
        stamps = [t for w in self.workers
                  for t, _ in self.log_matches(w, r"INFO .* gearman \S+: connected as", since_wall)]
        stamps.sort()
        peak, j = 0, 0
        for i, t in enumerate(stamps):
            while stamps[j] < t - 1.0:
                j += 1
            peak = max(peak, i - j + 1)
        return peak, len(stamps), (stamps[-1] - stamps[0]) if stamps else 0.0


# ---------------------------------------------------------------------------------------------
# Scenarios. Each returns a row: name, counts, time to recover, bound, met.


def row(name, r, recover, bound, met, note=""):
    bg = r.get("background")
    if bg:
        bg_note = (f"background: {bg['submitted']} submitted, {bg['ran']} ran, {bg['lost']} lost by a server, "
                   f"{bg['twice']} ran twice, {bg['refused']} not accepted")
        note = f"{note}; {bg_note}" if note else bg_note
    return {"scenario": name, **{k: r.get(k, "-") for k in ("jobs", "correct", "lost", "duplicated", "failed")},
            "recover": recover, "bound": bound, "met": met, "note": note, "bg": bg}


def clean(r):
    return r["lost"] == 0 and r["failed"] == 0 and r["wrong"] == 0 and r["correct"] == r["jobs"]


def bg_clean(r):
    """Every background job a server accepted ran (where no server died)."""
    return r["background"]["lost"] == 0


def steady(f, jobs):
    r = f.run_clients("steady", jobs)
    return row("steady state", r, "-", "all correct, none lost, none run twice (background too)",
               clean(r) and r["duplicated"] == 0 and bg_clean(r) and r["background"]["twice"] == 0)


def server_killed(f, jobs):
    s = f.servers[0]
    addr = f"{f.ip[s]}:{PORT}"
    marks = {}

    def during():
        time.sleep(1.0)
        f.kill_server(s)
        time.sleep(3.0)
        f.start_server(s)
        marks["restarted"] = time.monotonic()
        marks["reconnect"] = f.wait_all_connected(30, addr=addr)

    r = f.run_clients("gearmand-killed", jobs, during)
    rec = marks.get("reconnect")
    ok = clean(r) and rec is not None and rec <= 3.0
    return row(f"gearmand {s} killed 3 s, restarted", r, f"{rec:.2f} s" if rec is not None else "never",
               "none lost (clients retry), reconnect <= 3 s (reconnect_max 1 s + io_timeout 2 s)", ok,
               f"{r['retried']} jobs retried on another server")


def link_down(f, jobs):
    w = f.workers[0]
    marks = {}

    def during():
        time.sleep(1.0)
        sh("ip", "-n", f.ns(w), "link", "set", "eth0", "down")
        t0 = time.monotonic()
        noticed = None
        while time.monotonic() - t0 < 10.0:
            st = f.status(w)
            if noticed is None and st and all(v["lanes_connected"] == 0 for v in st["servers"]):
                noticed = time.monotonic() - t0
            time.sleep(0.1)
        sh("ip", "-n", f.ns(w), "link", "set", "eth0", "up")
        marks["noticed"] = noticed
        marks["reconnect"] = f.wait_all_connected(30, workers=[w])

    r = f.run_clients("link-down", jobs, during)
    rec, noticed = marks.get("reconnect"), marks.get("noticed")
    ok = r["lost"] == 0 and r["wrong"] == 0 and r["failed"] == 0 and rec is not None and rec <= 3.0 \
        and noticed is not None and noticed <= 5.0 and bg_clean(r)
    note = (f"dead peer noticed after {noticed:.1f} s (dead_peer_timeout 4 s); " if noticed is not None else
            "dead peer not noticed in 10 s; ") + f"{r['retried']} jobs resubmitted by the client, {r['duplicated']} run twice"
    return row(f"worker {w} link down 10 s", r, f"{rec:.2f} s" if rec is not None else "never",
               "none lost, none wrong; half-open noticed <= 5 s (dead_peer_timeout 4 s + 1 s); reconnect <= 3 s after the link is back", ok, note)


def netem_available(f):
    r = sh("ip", "netns", "exec", f.ns("c"), "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms", check=False)
    if r.returncode == 0:
        sh("ip", "netns", "exec", f.ns("c"), "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        return True, ""
    return False, r.stderr.strip() or "tc failed"


def latency(f, jobs):
    """20 ms +- 5 ms and 1% loss on every link: with netem where the kernel has it, else with
    delaying relays in front of every gearmand (both directions; a lost segment is emulated
    by the 200 ms retransmission timeout it costs)."""
    name = "20 ms +- 5 ms, 1% loss on every link"
    ok, why = netem_available(f)
    relays = []
    if ok:
        how = "tc netem on every host's link"
        for h in f.hosts:
            sh("ip", "netns", "exec", f.ns(h), "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
               "delay", "20ms", "5ms", "loss", "1%")
    else:
        how = f"no netem in this kernel ({why}): userspace relays in front of each gearmand, 20 +- 5 ms each way, 1% of chunks +200 ms"
        plain = list(f.addrs)
        for s in f.servers:
            relays.append(f.exec_in(
                s, sys.executable, os.path.abspath(__file__), "relay",
                "--listen", f"{f.ip[s]}:{PORT + 10}", "--to", f"{f.ip[s]}:{PORT}",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(f.root, f"relay-{s}.log"), "ab"),
            ))
        time.sleep(0.5)
        f.addrs = [f"{f.ip[s]}:{PORT + 10}" for s in f.servers]
        if f.reconfigure("# through the relays\n") is None or f.wait_all_connected(30) is None:
            raise RuntimeError("workers did not connect through the relays")
    try:
        t0 = time.monotonic()
        r = f.run_clients("latency", jobs)
        secs = time.monotonic() - t0
    finally:
        if ok:
            for h in f.hosts:
                sh("ip", "netns", "exec", f.ns(h), "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        else:
            f.addrs = plain
            f.reconfigure("# direct again\n")
            for p in relays:
                p.kill()
                p.wait()
            f.wait_all_connected(30)
    per_lane = r["correct"] / secs / (len(f.workers) * f.args.lanes)
    return row(name, r, "-", "none lost, none failed", clean(r) and bg_clean(r),
               f"{per_lane:.1f} jobs/s per lane ({how}; a job sleeps 50 ms, a lane needs a round trip per job)")


def deploy(f, jobs, splay):
    """Drops binary B (or A again) over the one every worker host runs; all switch, none lost."""
    f.splay = splay
    # The splay setting is itself a config change (splayed by the old setting): wait for it.
    if f.reconfigure(f"# deploy {splay}\n") is None:
        raise RuntimeError("workers did not take the new config")
    f.wait_all_connected(30)
    target = f.args.bin_b if f.current_bin != f.args.bin_b else f.args.bin
    sha = sh("sha256sum", target).stdout.split()[0]
    marks = {}

    def during():
        time.sleep(1.0)
        tmp = os.path.join(f.bin_dir, ".gearshift.new")
        shutil.copy(target, tmp)
        marks["wall"] = time.time()
        t0 = time.monotonic()
        os.rename(tmp, os.path.join(f.bin_dir, "gearshift"))
        marks["switched"] = f.wait_all(lambda s: s.get("binary_sha256") == sha and s["state"] == "running", 120)
        marks["t0"] = t0

    r = f.run_clients(f"deploy-{'splay' if splay else 'nosplay'}", jobs, during)
    f.current_bin = target
    sw = marks.get("switched")
    time.sleep(1.5)
    peak, total, spread = f.connects_per_second(marks["wall"])
    ok = clean(r) and bg_clean(r) and sw is not None
    name = f"fleet deploy, restart_splay {splay or 'off'}"
    note = f"peak {peak} connects/s at the servers ({total} connects over {spread:.1f} s)"
    if splay:
        # Each host draws its delay at random: four draws can fall within a second of each other
        # (about 3% of runs with 5 s). So the check is that the restarts follow the draws: every
        # host drew one, and the new generations spread at least as far as the draws did (less
        # 1 s). A restart makes no connects (each lane's connections cross the exec); a host
        # that connects anew does it at its restart.
        draws = f.splay_draws(marks["wall"])
        drawn = (max(draws) - min(draws)) / 1000.0 if len(draws) == len(f.workers) else None
        restarts = f.restarts_spread(marks["wall"])
        ok = ok and drawn is not None and restarts is not None and restarts >= drawn - 1.0
        note += f"; delays drawn {sorted(draws)} ms, the restarts began spread over {restarts or 0:.1f} s"
    return row(name, r, f"{sw:.2f} s" if sw is not None else "never",
               "every host switches, none lost" + (", restarts follow each host's splay delay" if splay else ""),
               ok, note)


def config_change(f, jobs):
    marks = {}

    def during():
        time.sleep(1.0)
        marks["switched"] = f.reconfigure("# fleet config change\n")

    r = f.run_clients("config-change", jobs, during)
    sw = marks.get("switched")
    return row(f"fleet config change, restart_splay {f.splay or 'off'}", r,
               f"{sw:.2f} s" if sw is not None else "never", "every host reloads, none lost",
               clean(r) and bg_clean(r) and sw is not None)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    c.add_argument("--servers", required=True)
    c.add_argument("--jobs", type=int, required=True)
    c.add_argument("--run", required=True)
    c.add_argument("--concurrency", type=int, default=8)
    c.add_argument("--timeout", type=float, default=15)
    c.add_argument("--deadline", type=float, default=120)
    c.add_argument("--out", required=True)
    c.add_argument("--until", help="keep submitting until this file exists")
    c.add_argument("--background-every", type=int, default=0, help="every Nth job is a background job")
    rl = sub.add_parser("relay")
    rl.add_argument("--listen", required=True)
    rl.add_argument("--to", required=True)
    rl.add_argument("--delay-ms", type=float, default=20)
    rl.add_argument("--jitter-ms", type=float, default=5)
    rl.add_argument("--loss", type=float, default=0.01)
    rl.add_argument("--rto-ms", type=float, default=200)
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--client-concurrency", type=int, default=8)
    ap.add_argument("--splay", default="5s")
    ap.add_argument("--short", action="store_true", help="fewer jobs, no latency scenario (CI)")
    ap.add_argument("--bin", required=False)
    ap.add_argument("--bin-b", required=False, help="a second build, for the deploy scenario")
    args = ap.parse_args()
    if args.cmd == "client":
        return client_main(args)
    if args.cmd == "relay":
        return relay_main(args)
    if os.geteuid() != 0:
        print("scripts/fleet needs root (network namespaces)", file=sys.stderr)
        return 2
    for ns in leftovers():
        sh("ip", "netns", "del", ns, check=False)
    root = tempfile.mkdtemp(prefix="gs-fleet-")
    f = Fleet(args, root)
    f.current_bin = args.bin
    rows = []

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    # Also when started where SIGINT is ignored (a background job of a script).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        f.up()
        jobs = args.jobs
        rows.append(steady(f, jobs))
        rows.append(server_killed(f, jobs))
        rows.append(link_down(f, jobs))
        if not args.short:
            rows.append(latency(f, jobs // 2))
        if args.bin_b:
            rows.append(deploy(f, jobs, None))
            rows.append(deploy(f, jobs, args.splay))
        rows.append(config_change(f, jobs))
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
    print(f"# fleet: {args.servers} gearmand, {args.workers} workers x {args.lanes} lanes, 1 client host "
          f"({args.client_concurrency} at once), {NET}.0/24\n")
    print("| scenario | jobs | correct | lost | run twice | failed | time to recover | bound | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        met = "skipped" if r["met"] is None else ("yes" if r["met"] else "**NO**")
        print(f"| {r['scenario']} | {r['jobs']} | {r['correct']} | {r['lost']} | {r['duplicated']} | {r['failed']} "
              f"| {r['recover']} | {r['bound']} | {met} |")
    notes = [f"- {r['scenario']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        print("\n" + "\n".join(notes))
    failed = [r for r in rows if r["met"] is False]
    if failed:
        print(f"\n{len(failed)} scenario(s) missed their bound; logs kept in {root}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
