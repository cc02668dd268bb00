#!/usr/bin/python3
"""Chaos soak (driven by scripts/soak): a worker of each source kind under four clients of its
own kind while a chaos thread, at random instants 0.1-1 s apart, sends HUPs (1-5 at once),
rewrites config.toml (concurrency 1-4, and back from an invalid one), adds and removes job
executables, deploys a new binary over the worker's path (and a broken one, refused), kills it
with -9 and starts it again, stops and starts it, freezes it (SIGSTOP, its jobs running on)
0.2-3 s, and kills gearmand or RabbitMQ (-9) and starts it again, and freezes them 0.2-3 s. Then every job a client was told was taken must
have its right result, the worker must answer `status`, and its log must hold no panic, no dead
thread and no ERROR line.

    soak.py BIN SECONDS SOURCE...      (SOURCE: spool, zeromq, gearman, amqp)

Exit 0 when every source held; prints one summary line per source.
"""
import collections
import datetime
import hashlib
import json
import os
import random
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchlib import free_port, read_packet  # noqa: E402

BUILD = os.path.abspath(sys.argv[1])
SECONDS = float(sys.argv[2])
SOURCES = sys.argv[3:] or ["spool", "zeromq", "gearman", "amqp"]
CLIENTS = 4
# The chaos acts at random instants GAP/10 to GAP seconds apart (SOAK_GAP; 1 by default).
GAP = float(os.environ.get("SOAK_GAP", "1"))
# SOAK_USER=nobody: started as root, the worker drops to this user, as in production (root's
# CLI then reads and writes a spool that user owns); unset, it runs as root (allow_root).
USER = os.environ.get("SOAK_USER")
RUN_AS = f'user = "{USER}"' if USER else "allow_root = true"
# SOAK_DISK=256M: the spool (spool and zeromq sources) lives on a tmpfs of this size, and the
# chaos also fills it to the last byte now and then (a file of root's beside the spool), for
# 0.2-2 s: submits are refused, results wait in memory, the worker is degraded, then recovers.
# A submit refused for the full disk (or for min_free) is not taken, and counted.
DISK = os.environ.get("SOAK_DISK")
# SOAK_FSYNC=0: the spool and ZeroMQ sources with `fsync = false` (each lane stores its own
# result; durable through a killed process, not a crashed machine).
FSYNC = "" if os.environ.get("SOAK_FSYNC", "1") != "0" else "fsync = false\n"
# SOAK_QUORUM=1: the AMQP source's queue is a quorum queue (on this one node), not a classic one.
QUORUM = os.environ.get("SOAK_QUORUM") == "1"
# SOAK_TRUE=1: the ZeroMQ source answers TRUE (`reply = "true"`, as the PHP daemons do): its jobs
# reach the lanes without a file and their outcomes go to results logs, so no result can be
# looked up by id. Its clients' jobs run `record`, which appends the payload to a file beside
# the spool; every payload answered TRUE must be there once the worker has drained (runs
# twice are counted: at least once).
TRUE = os.environ.get("SOAK_TRUE") == "1"
# SOAK_ONCE=1: every source's clients' jobs run `record` too (their results are checked as
# usual), and the runs twice are counted.
RECORD = TRUE or os.environ.get("SOAK_ONCE") == "1"
# SOAK_NOKILL=1: no kill -9, no forced stop, no broker killed and no server frozen among the
# chaos: every restart and stop is a clean one and no server redelivers, so with SOAK_TRUE or
# SOAK_ONCE a job a client sent once that ran twice fails the run (a pyzmq client's resend of a
# message whose answer came later than its 2 s is counted apart: a second copy was sent).
NOKILL = os.environ.get("SOAK_NOKILL") == "1"
# SOAK_NPROC=200 (with SOAK_USER): the worker runs with that limit on its user's processes and
# threads (RLIMIT_NPROC), and the chaos now and then takes every one left for 0.2-2 s (sleeps
# of that user's): jobs cannot start, threads cannot be made, a restart meets that.
NPROC = int(os.environ.get("SOAK_NPROC", "0"))
if NPROC and not USER:
    raise SystemExit("SOAK_NPROC needs SOAK_USER (root is held to no process limit)")
# SOAK_NOFILE=1: now and then the chaos leaves the worker no descriptor to make for 0.2-2 s (its
# soft RLIMIT_NOFILE set to the number it holds, then put back): accepts, job starts, spool
# files, config reads and a restart meet EMFILE; it must say so, lose nothing and recover.
NOFILE = os.environ.get("SOAK_NOFILE") == "1"
FUNCS = ["reverse", "echo", "sha256", "upper"]


LAST_SLEEP = [0.0]


def expect(function, payload):
    if function == "reverse":
        return payload[::-1]
    if function in ("echo", "sleep", "record"):
        return payload
    if function == "sha256":
        return hashlib.sha256(payload.encode()).hexdigest()
    return payload.upper()


def job(n, i):
    """The next job of client `n`: an instant one with a unique payload, or (client 0, at most
    every 2 s) a `sleep` of 0.1-2 s, its payload the milliseconds, so that restarts, stops and a
    second TERM meet running jobs."""
    if n == 0 and time.monotonic() - LAST_SLEEP[0] > 2:
        LAST_SLEEP[0] = time.monotonic()
        return "sleep", str(random.randint(100, 2000))
    function = "record" if RECORD else random.choice(FUNCS)
    return function, f"c{n}-m{i}-" + "x" * random.randint(0, 50)


def alive(pid):
    """Whether any thread of `pid` still runs: its leader shows as a zombie as soon as it has
    ended, while the other threads still end (and hold the pidfile's lock), and its parent
    (init, for a daemon) may reap it seconds later."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            pass
    return False


def process_state(pid):
    """The state letter of `pid`'s leader (R, S, D, T, Z), or '-' once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "-"


class Soak:
    def __init__(self, kind):
        self.kind = kind
        self.d = tempfile.mkdtemp(prefix=f"gs-soak-{kind}-")
        os.chmod(self.d, 0o755)  # the worker's user, when it drops to one, must pass
        os.makedirs(f"{self.d}/jobs")
        os.makedirs(f"{self.d}/bin")
        self.bin = f"{self.d}/bin/gearshift"
        shutil.copy(BUILD, self.bin)
        self.put_job("upper", "tr a-z A-Z")
        self.runs = f"{self.d}/runs"
        self.recorded = RECORD
        self.twice = 0  # jobs that ran more than once (`record`'s lines)
        self.owed = 0  # bytes `record` is to write for the jobs taken so far
        if self.recorded:
            with open(self.runs, "w"):
                pass
            os.chmod(self.runs, 0o666)  # the worker's user, when it drops to one, appends
            # Builtins only (no fork of its own: SOAK_NPROC takes the user's processes away).
            self.put_job("record", f'IFS= read -r p || true\nprintf "%s\\n" "$p" >> {self.runs}\nprintf "%s" "$p"')
        self.cfg = f"{self.d}/config.toml"
        self.port = free_port()
        self.lock = threading.Lock()
        self.taken = []  # (answer: job id or None, function, payload)
        self.resent = set()  # payloads a pyzmq client sent again after no answer
        self.errors = []
        self.stop = threading.Event()
        self.actions = {}
        self.frozen = threading.Lock()  # one freeze of the worker at a time; held while it lasts
        self.problems = []
        self.refused = 0
        self.refused_full = 0  # submits and messages refused for the chaos's full disk
        self.held = 0  # `gearshift submit`s to a ZeroMQ worker the chaos froze: not sent
        self.good_binary = True  # the path holds a binary that runs (not the chaos's broken one)
        self.forced = []  # seconds from a second TERM to the worker gone
        self.slow_stops = []  # those over 0.5 s, with the states the worker was seen in
        self.kills = []  # when the chaos sent kill -9 (wall clock, as the log's)
        self.broken_config = False
        self.broker = self.gearmand = None
        self.disk = DISK if kind in ("spool", "zeromq") else None
        self.spool = "spool"
        if self.disk:
            os.makedirs(f"{self.d}/disk")
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.disk},mode=0755", "tmpfs",
                            f"{self.d}/disk"], check=True)
            self.spool = "disk/spool"
        if kind == "amqp":
            import bench_amqp

            self.broker = bench_amqp.Broker(self.d)
            self.broker.ch.queue_declare("soak", durable=True,
                                         arguments={"x-queue-type": "quorum"} if QUORUM else None)
            # Sent: confirmed by the broker; tried: published, a confirm perhaps lost with it.
            self.answers, self.sent, self.tried, self.duplicates, self.reconnects = {}, {}, {}, 0, 0
        if kind == "gearman":
            self.start_gearmand()
        self.write_config(2)

    def put_job(self, name, body):
        tmp = f"{self.d}/jobs/.{name}.tmp"
        with open(tmp, "w") as f:
            f.write(f"#!/bin/sh\n{body}\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, f"{self.d}/jobs/{name}.sh")

    def write_config(self, concurrency, broken=False):
        source = {
            "spool": f'kind = "spool"\ndir = "{self.spool}"\nmax_attempts = 100\n{FSYNC}',
            "zeromq": f'kind = "zeromq"\nbind = ["tcp://127.0.0.1:{self.port}"]\nreply = "{"true" if TRUE else "id"}"\n'
            f'dir = "{self.spool}"\nmax_attempts = 100\n{FSYNC}',
            "gearman": f'kind = "gearman"\nservers = ["127.0.0.1:{self.port}"]\nio_timeout = "2s"\n'
            'reconnect_max = "1s"\nmax_attempts = 100\n',
            "amqp": f'kind = "amqp"\nurl = "{self.broker.url() if self.broker else ""}"\nqueue = "soak"\n'
            f'io_timeout = "2s"\nreconnect_max = "1s"\nmax_attempts = 100\nprefetch = {random.randint(1, 4)}\n',
        }[self.kind]
        text = (f'[worker]\nconcurrency = {concurrency}\njobs_dir = "jobs"\nstate_dir = "state"\n'
                f'{RUN_AS}\nbuiltins = true\njob_timeout = "20m"\n\n[source]\n{source}')
        if broken:
            text = text.replace("concurrency = ", "concurrency == ", 1)
        with open(self.cfg + ".tmp", "w") as f:
            f.write(text)
        os.rename(self.cfg + ".tmp", self.cfg)

    def start_gearmand(self):
        self.gearmand = subprocess.Popen(
            ["gearmand", "--listen=127.0.0.1", f"--port={self.port}", "--log-file=none", "--threads=2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a group of its own, for the chaos's SIGSTOP
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)

    def gs(self, *args, binary=None, timeout=60):
        return subprocess.run([binary or BUILD, "-c", self.cfg, *args], capture_output=True, text=True,
                              timeout=timeout)

    def pid(self):
        try:
            with open(f"{self.d}/state/gearshift.pid") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def deploy(self, good=True):
        """A new binary over the worker's path (the build with bytes appended: another sha256,
        the same program), or a broken one (its pre-flight fails, the worker refuses it)."""
        tmp = f"{self.d}/bin/.gearshift.tmp"
        if good:
            shutil.copy(BUILD, tmp)
            with open(tmp, "ab") as f:
                f.write(os.urandom(16))
        else:
            with open(tmp, "w") as f:
                f.write("#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, self.bin)
        self.good_binary = good

    def start(self):
        if not self.good_binary:
            self.deploy(good=True)
        limit = ["prlimit", f"--nproc={NPROC}"] if NPROC else []
        r = subprocess.run([*limit, self.bin, "-c", self.cfg, "start"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            self.problems.append(f"start: exit {r.returncode}: {r.stderr.strip()[:300]}")

    # Clients, one kind each.

    def took(self, answer, function, payload):
        if self.recorded and self.kind == "zeromq" and TRUE and function != "record":
            return  # a `sleep` answered TRUE: nothing to look for
        with self.lock:
            self.taken.append((answer, function, payload))
            if function == "record":
                self.owed += len(payload.encode()) + 1

    def pace(self):
        """With `record` (a shell, some ms a job) the clients would queue jobs faster than the
        worker runs them, and the run would end with a backlog no drain finishes: a client
        waits while the jobs taken and not yet run hold more than about 2,000 lines."""
        while self.recorded and not self.stop.is_set():
            try:
                behind = self.owed - os.path.getsize(self.runs)
            except OSError:
                return
            if behind < 64 << 10:
                return
            time.sleep(0.05)

    def client_spool(self, n):
        """`gearshift submit`: into the spool, or to the ZeroMQ source's socket (it resends
        until answered, three tries of 5 s); prints the job id either way."""
        i = 0
        while not self.stop.is_set():
            self.pace()
            function, payload = job(n, i)
            i += 1
            r = self.gs("submit", function, payload)
            if r.returncode == 0:
                self.took(r.stdout.strip(), function, payload)
            elif r.returncode == 6 and "config.toml:" in r.stderr and self.broken_config:
                with self.lock:
                    self.refused += 1  # the chaos's invalid config: the CLI cannot read it either
            elif self.disk and ((r.returncode == 6 and "No space left on device" in r.stderr)
                                or (r.returncode == 1 and "ERROR not stored" in r.stderr)):
                with self.lock:
                    self.refused_full += 1  # a full disk (or min_free reached): not taken, said so
            elif r.returncode == 5 and "is stopped" in r.stderr:
                with self.lock:
                    self.held += 1  # the chaos froze the worker: not sent (not taken), said so
                time.sleep(0.05)
            else:
                with self.lock:
                    self.errors.append((r.returncode, r.stderr.strip()[:200]))

    def client_zeromq(self, n):
        if n == CLIENTS - 1:
            return self.client_spool(n)  # one of the four is `gearshift submit`
        import zmq

        ctx = zmq.Context.instance()
        sock, i = None, 0
        while not self.stop.is_set():
            self.pace()
            function, payload = job(n, i)
            i += 1
            tries, refused_until = 0, time.monotonic() + 60
            while tries < 60:  # the lazy pirate: resend on a new socket after 2 s
                tries += 1
                if sock is None and tries > 1:
                    with self.lock:
                        self.resent.add(payload)  # a copy may be taken twice
                if sock is None:
                    sock = ctx.socket(zmq.REQ)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(f"tcp://127.0.0.1:{self.port}")
                sock.send_multipart([function.encode(), payload.encode()])
                if sock.poll(2000, zmq.POLLIN):
                    answer = sock.recv_multipart()[-1].decode()
                    if answer.startswith("ERROR not stored") and self.disk and time.monotonic() < refused_until:
                        with self.lock:
                            self.refused_full += 1  # a full disk (or min_free reached): again
                        if self.stop.is_set():
                            break  # not taken, and the run is over
                        tries -= 1
                        time.sleep(0.05)
                        continue
                    if answer.startswith("ERROR"):
                        with self.lock:
                            self.errors.append((answer, function, payload))
                    else:
                        self.took(answer, function, payload)
                    break
                sock.close()
                sock = None
            else:
                with self.lock:
                    self.errors.append(("no answer in 60 tries", function, payload))
        if sock is not None:
            sock.close()

    def client_gearman(self, n):
        i = 0
        while not self.stop.is_set():
            self.pace()
            function, payload = job(n, i)
            i += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                    body = b"\0".join([function.encode(), f"u{n}-{i}".encode(), payload.encode()])
                    sock.sendall(b"\0REQ" + struct.pack(">II", 7, len(body)) + body)  # SUBMIT_JOB
                    while True:
                        kind, body = read_packet(sock)
                        if kind in (8, 12, 28, 29):  # JOB_CREATED, STATUS, DATA, WARNING
                            continue
                        if kind == 13:  # WORK_COMPLETE
                            self.took(body.split(b"\0", 1)[1].decode(), function, payload)
                        else:
                            with self.lock:
                                self.errors.append((f"packet {kind}", function, payload, body[:200]))
                        break
            except (OSError, ConnectionError):
                time.sleep(0.05)  # gearmand restarting: its queue went with it

    def client_amqp(self, n):
        """Publishes RPC jobs (persistent, confirmed) 20 at a time and takes their replies from a
        durable queue of its own; a job is sent once the broker confirmed it. Through the
        chaos's broker kills it connects again (a publish whose confirm never came is not sent:
        its reply, if any, is counted but not owed)."""
        import pika

        replies, i, mine, conn = f"replies{n}", 0, [], None
        waiting = set()  # sent, no reply yet: with `record` at most 100 (a shell a job is slower)

        def on_reply(ch, method, props, body):
            waiting.discard(props.correlation_id)
            with self.lock:
                if props.correlation_id in self.answers:
                    self.duplicates += 1
                else:
                    self.answers[props.correlation_id] = (body.decode(), (props.headers or {}).get("x-gearshift-outcome"))
            # Acknowledged once recorded: with auto_ack the replies on their way when the broker
            # was killed were gone (the broker counts them delivered as it sends them).
            ch.basic_ack(method.delivery_tag)

        def connect():
            c = pika.BlockingConnection(pika.URLParameters(self.broker.url()))
            ch = c.channel()
            ch.confirm_delivery()
            ch.queue_declare(queue=replies, durable=True)
            ch.basic_qos(prefetch_count=100)
            ch.basic_consume(queue=replies, on_message_callback=on_reply)
            return c, ch

        def settled():
            with self.lock:
                return all(p in self.answers for p in mine)

        deadline = None
        while True:
            if deadline is None and self.stop.is_set():
                deadline = time.monotonic() + 120
            if deadline is not None and (settled() or time.monotonic() > deadline):
                break
            try:
                if conn is None:
                    conn, ch = connect()
                if deadline is None and (len(waiting) < 100 or not RECORD):
                    for _ in range(20):
                        function, payload = job(n, i)
                        i += 1
                        cid = f"c{n}-m{i}"
                        with self.lock:
                            self.tried[cid] = (function, payload)
                        ch.basic_publish(exchange="", routing_key="soak", body=payload.encode(),
                                         properties=pika.BasicProperties(reply_to=replies, correlation_id=cid,
                                                                         type=function, delivery_mode=2))
                        mine.append(cid)
                        waiting.add(cid)
                        with self.lock:
                            self.sent[cid] = (function, payload)
                conn.process_data_events(time_limit=0.05 if deadline is None else 0.2)
            except (pika.exceptions.AMQPError, OSError):
                # The broker killed (or starting again): a new connection once it takes one.
                with self.lock:
                    self.reconnects += 1
                waiting.clear()  # a publish the broker took down with it is never answered
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
                time.sleep(0.2)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def fill(self):
        """Fills the spool's file system to the last byte (a file of root's beside the spool),
        holds it full 0.2-2 s, and frees it."""
        filler = f"{self.d}/disk/filler"
        with open(filler, "wb", buffering=0) as f:
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass
        time.sleep(random.uniform(0.2, 2.0))
        os.unlink(filler)

    def out_of_processes(self):
        """Takes every process the worker's user has left (sleeps of that user, in a group of
        their own), holds them 0.2-2 s, and gives them back."""
        import pwd

        user = pwd.getpwnam(USER)
        hog = subprocess.Popen(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "sh", "-c",
             f"i=0; while [ $i -lt {NPROC} ]; do sleep 30 & i=$((i+1)); done; wait"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(random.uniform(0.2, 2.0))
        try:
            os.killpg(hog.pid, signal.SIGKILL)
        except OSError:
            pass
        hog.wait()

    def out_of_descriptors(self, pid):
        """Sets the worker's soft descriptor limit to what it holds for 0.2-2 s, then back."""
        import resource

        try:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            held = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(held, soft), hard))
        except OSError:
            return
        time.sleep(random.uniform(0.2, 2.0))
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        except OSError:
            pass

    def freeze_worker(self, pid, seconds):
        """Stops the worker's process (not its jobs) for `seconds`, unless it is already."""
        if not self.frozen.acquire(blocking=False):
            return
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(seconds)
        except OSError:
            pass
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
            self.frozen.release()

    def freeze(self, pid, seconds):
        """Stops the server's process group for `seconds` (never the soak's own)."""
        try:
            if os.getpgid(pid) == os.getpgid(0):
                raise SystemExit("the server shares the soak's process group")
            os.killpg(os.getpgid(pid), signal.SIGSTOP)
            time.sleep(seconds)
        except OSError:
            pass
        finally:
            try:
                os.killpg(os.getpgid(pid), signal.SIGCONT)
            except OSError:
                pass

    def chaos(self):
        choices = ["hup"] * 4 + ["config"] * 3 + ["jobs"] * 2 + ["reload", "deploy", "bad deploy", "bad config",
                                                                  "stop and start", "worker frozen"]
        if not NOKILL:
            choices += ["kill -9", "forced stop"]
        if self.kind == "gearman":
            # A gearmand killed takes its queue along: nothing it handed out comes back.
            choices += ["gearmand killed"] + ([] if NOKILL else ["server frozen"])
        if self.kind == "amqp" and not NOKILL:
            choices += ["broker killed", "server frozen"]
        if self.disk:
            choices += ["disk full"] * 2
        if NPROC:
            choices += ["out of processes"] * 2
        if NOFILE:
            choices += ["out of descriptors"] * 2
        while not self.stop.wait(random.uniform(GAP / 10, GAP)):
            action = random.choice(choices)
            self.actions[action] = self.actions.get(action, 0) + 1
            pid = self.pid()
            if action == "hup" and pid:
                for _ in range(random.randint(1, 5)):
                    try:
                        os.kill(pid, signal.SIGHUP)
                    except ProcessLookupError:
                        pass
            elif action == "config":
                self.write_config(random.randint(1, 4))
            elif action == "bad config":
                self.broken_config = True
                self.write_config(2, broken=True)
                time.sleep(random.uniform(0.1, 0.6))
                self.write_config(random.randint(1, 4))
                time.sleep(0.2)  # a submit that read the invalid file may still be saying so
                self.broken_config = False
            elif action == "jobs":
                name = f"extra{random.randint(0, 3)}"
                if os.path.exists(f"{self.d}/jobs/{name}.sh"):
                    os.unlink(f"{self.d}/jobs/{name}.sh")
                else:
                    self.put_job(name, "cat")
            elif action == "deploy":
                self.deploy(good=True)
            elif action == "bad deploy":
                self.deploy(good=False)
                time.sleep(random.uniform(0.5, 2.0))
                self.deploy(good=True)
            elif action == "kill -9" and pid:
                self.kills.append(time.time())
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(0.05)
                self.start()
            elif action == "stop and start":
                r = self.gs("stop", "--timeout", "30s")
                if r.returncode != 0:
                    self.problems.append(f"stop: exit {r.returncode}: {r.stderr.strip()[:300]}")
                self.start()
            elif action == "reload":
                r = self.gs("reload", "--timeout", "30s")
                # 1: refused (a deploy's verdict pending, say); 5: pending, the worker frozen
                if r.returncode not in (0, 1) and not (r.returncode == 5 and "is stopped" in r.stderr):
                    self.problems.append(f"reload: exit {r.returncode}: {r.stderr.strip()[:300]}")
            elif action == "worker frozen" and pid:
                # SIGSTOP the worker alone (a paused VM, a swap storm, a cgroup frozen) for
                # 0.2-3 s, its jobs running on; the other actions go on meanwhile: HUPs, files
                # and binaries wait for it.
                threading.Thread(target=self.freeze_worker, args=(pid, random.uniform(0.2, 3)),
                                 daemon=True).start()
            elif action == "forced stop" and pid:
                # TERM, and TERM again: running jobs are interrupted (and run again later),
                # and the worker must be gone within 2 s of the second (woken first if frozen).
                # No freeze may start meanwhile: its SIGSTOP landing after the SIGCONT below
                # would hold the worker stopped between the TERMs, timing the chaos, not the
                # worker. One under way has sent its SIGSTOP already (it takes the lock first):
                # the SIGCONT wakes the worker from it.
                holding = self.frozen.acquire(timeout=0.05)
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGTERM)
                    time.sleep(random.uniform(0, 0.2))
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                second = time.monotonic()
                states = set()
                while alive(pid) and time.monotonic() - second < 10:
                    states.add(process_state(pid))
                    time.sleep(0.005)
                took = time.monotonic() - second
                if holding:
                    self.frozen.release()
                self.forced.append(took)
                if took > 0.5:
                    # Said with the states the worker was seen in (T: stopped), to tell next time.
                    self.slow_stops.append(f"{took * 1000:.0f} ms ({','.join(sorted(states))})")
                if took > 2:
                    self.problems.append(f"a second TERM took {took:.2f} s to end the worker")
                self.start()
            elif action == "out of processes":
                self.out_of_processes()
            elif action == "out of descriptors" and pid:
                self.out_of_descriptors(pid)
            elif action == "disk full":
                self.fill()
            elif action == "broker killed":
                # A crash: what it had confirmed (persistent, in a durable queue) survives it,
                # and so must every reply the worker had published for one.
                self.broker.kill()
                time.sleep(random.uniform(0, 2))
                try:
                    self.broker.boot()
                except SystemExit:
                    self.problems.append(f"RabbitMQ did not start again (the soak's fault, not the "
                                         f"worker's): {self.d}/rabbit/out.log")
                    return
            elif action == "server frozen":
                # SIGSTOP: its connections open, nothing answered, for 0.2-3 s (past the
                # worker's io_timeout of 2 s at times); the other actions go on meanwhile.
                group = (self.gearmand or self.broker.proc).pid
                threading.Thread(target=self.freeze, args=(group, random.uniform(0.2, 3)), daemon=True).start()
            elif action == "gearmand killed":
                self.gearmand.kill()
                self.gearmand.wait()
                time.sleep(random.uniform(0, 2))
                self.start_gearmand()

    def results(self):
        """Every job a client was told was taken, with its right result."""
        if self.kind == "amqp":
            missing = [p for p in self.sent if p not in self.answers]
            wrong = [(p, a) for p, a in self.answers.items()
                     if a[0] != expect(*self.tried[p]) or a[1] not in (b"done", "done")]
            if self.recorded:
                self.runs_twice(self.ran())
            return len(self.sent), missing, wrong
        if self.kind == "gearman":
            wrong = [t for t in self.taken if t[0] != expect(t[1], t[2])]
            if self.recorded:
                self.runs_twice(self.ran())
            return len(self.taken), [], wrong
        if self.recorded and self.kind == "zeromq" and TRUE:
            return self.recorded_results()
        pending, wrong, missing, right = list(self.taken), [], [], [0]
        deadline = time.monotonic() + 180
        while pending and time.monotonic() < deadline:
            left, lock = [], threading.Lock()

            def look(part):
                for job in part:
                    try:
                        r = self.gs("result", job[0])
                        ok = r.returncode == 0 and r.stdout.rstrip("\n") == expect(job[1], job[2])
                    except Exception as e:  # a look that failed is a job not seen done
                        r, ok = None, False
                        with lock:
                            missing.append((job, repr(e)))
                        continue
                    with lock:
                        if ok:
                            right[0] += 1
                        elif r.returncode == 5:
                            left.append(job)
                        elif r.returncode == 0:
                            wrong.append((job, r.stdout[:100]))
                        else:
                            missing.append((job, r.returncode, r.stderr.strip()[:200]))

            parts = [pending[k::4] for k in range(4)]
            threads = [threading.Thread(target=look, args=(p,)) for p in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pending = left
            if pending:
                time.sleep(1)
        if right[0] + len(wrong) + len(missing) + len(pending) != len(self.taken):
            self.problems.append(f"{len(self.taken)} jobs taken, but {right[0]} right, {len(wrong)} wrong, "
                                 f"{len(missing)} missing and {len(pending)} unfinished")
        if self.recorded:
            self.runs_twice(self.ran())
        return len(self.taken), missing + pending, wrong

    def ran(self):
        """How many times each payload ran (`record` writes a line for each run)."""
        with open(self.runs, errors="replace") as f:
            return collections.Counter(f.read().splitlines())

    def runs_twice(self, ran):
        """Counts the jobs that ran more than once; with SOAK_NOKILL any one a client sent once
        fails the run."""
        sent = [p for f, p in (self.sent.values() if self.kind == "amqp" else
                               ((t[1], t[2]) for t in self.taken)) if f == "record"]
        self.twice = sum(1 for p in sent if ran[p] > 1)
        if NOKILL:
            # `gearshift submit` to a ZeroMQ source resends on its own: its copies may be two.
            twice = [p for p in sent if ran[p] > 1 and p not in self.resent
                     and not (self.kind == "zeromq" and p.startswith(f"c{CLIENTS - 1}-"))]
            if twice:
                self.problems.append(f"{len(twice)} jobs sent once ran twice with no kill: {twice[:3]}")

    def recorded_results(self):
        """`SOAK_TRUE`: every payload answered TRUE was run (its line in `runs`)."""
        wrong = [t for t in self.taken if t[0] != "TRUE"]
        deadline, missing = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            ran = self.ran()
            missing = [t for t in self.taken if ran[t[2]] == 0]
            if not missing:
                break
            time.sleep(1)
        self.runs_twice(ran)
        return len(self.taken), missing, wrong

    def run(self):
        self.start()
        clients = [threading.Thread(target=getattr(self, f"client_{self.kind}"), args=(n,)) for n in range(CLIENTS)]
        chaos = threading.Thread(target=self.chaos)
        for t in clients + [chaos]:
            t.start()
        time.sleep(SECONDS)
        self.stop.set()
        with self.frozen:  # a freeze of the worker under way ends first
            pass
        chaos.join()
        if not self.good_binary:
            self.deploy(good=True)
        if self.pid() is None or self.gs("status").returncode != 0:
            self.start()
        for t in clients:
            t.join()
        status = self.gs("status", "--json")
        if status.returncode != 0:
            self.problems.append(f"status at the end: exit {status.returncode}: {status.stderr.strip()[:300]}")
        # The last deploy is taken up, however many the chaos made meanwhile: within the
        # settle (0.5 s), the pre-flight and a restart.
        with open(self.bin, "rb") as f:
            deployed = hashlib.sha256(f.read()).hexdigest()
        deadline, running = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            r = self.gs("status", "--json")
            running = json.loads(r.stdout).get("binary_sha256") if r.returncode == 0 else None
            if running == deployed:
                break
            time.sleep(0.2)
        if running != deployed:
            self.problems.append(f"the binary deployed last ({deployed[:12]}) is not running 20 s "
                                 f"after the chaos ended ({(running or '-')[:12]} is)")
        count, missing, wrong = self.results()
        with open(f"{self.d}/state/gearshift.log", errors="replace") as f:
            log = f.read().splitlines()
        # The chaos's own refusals are errors the worker must log, and so is a rollback after
        # a kill -9 that met a new binary before it served (a death before serving, which the
        # worker cannot tell from a crash); any other is not expected.
        def expected(line):
            if "deploy: refused" in line or "reload refused" in line:
                return True
            if "rolled back from" in line and "died before it was serving" in line:
                at = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
                return any(0 <= at - k < 5 for k in self.kills)
            # The chaos's full disk, and its user out of processes: the worker must say so (and
            # recover: the results check).
            if NPROC and "Resource temporarily unavailable" in line:
                return True
            if NOFILE and ("Too many open files" in line or "os error 24" in line):
                return True
            return bool(self.disk) and ("No space left on device" in line or "os error 28" in line)

        bad = [line for line in log if "panic" in line or "thread died" in line
               or (" ERROR " in line and not expected(line))]
        reasons = {}
        for line in log:
            said = re.search(r" g\d+ (.+?): re-exec ", line)
            if said:
                reasons[said.group(1)] = reasons.get(said.group(1), 0) + 1
        refusals = sum(1 for line in log if " ERROR " in line and expected(line))
        stop = self.gs("stop", "--timeout", "60s")
        if stop.returncode != 0:
            self.problems.append(f"final stop: exit {stop.returncode}")
        if self.gearmand:
            self.gearmand.kill()
        if self.broker:
            self.broker.stop()
        acts = ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items()))
        ok = not (missing or wrong or bad or self.problems or self.errors)
        print(f"{self.kind}: {count} jobs taken, {len(missing)} missing, {len(wrong)} wrong, "
              f"{len(self.errors)} client errors, {len(bad)} unexpected log lines ({len(log)} lines, "
              f"{refusals} refusals of the chaos's invalid config and broken binaries, rollbacks after its kill -9"
              f"{' and full disk errors' if self.disk else ''}); "
              f"{f'{self.refused_full} submits refused for the full disk; ' if self.disk else ''}"
              f"{f'{self.held} submits not sent to the frozen worker; ' if self.held else ''}"
              f"{f'{self.duplicates} replies twice, {self.reconnects} client reconnects; ' if self.broker else ''}"
              f"{f'{self.twice} run twice; ' if self.recorded else ''}"
              f"second TERM to exit at most {max(self.forced, default=0) * 1000:.0f} ms"
              f"{f' (over 0.5 s: {len(self.slow_stops)}, ' + '; '.join(self.slow_stops[:5]) + ')' if self.slow_stops else ''}; "
              f"chaos: {acts}; re-execs: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}: "
              f"{'held' if ok else 'FAILED'}", flush=True)
        for x in (missing[:5] + wrong[:5] + bad[:5] + self.problems[:5] + self.errors[:5]):
            print("   ", str(x)[:400], flush=True)
        if ok:
            if self.disk:
                subprocess.run(["umount", f"{self.d}/disk"], check=False)
            shutil.rmtree(self.d, ignore_errors=True)
        else:
            print(f"    kept for a look: {self.d}", flush=True)
        return ok


held = [Soak(kind).run() for kind in SOURCES]
sys.exit(0 if all(held) else 1)
