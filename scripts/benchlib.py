"""Helpers the benchmark, fleet and soak scripts share."""
import random
import socket
import struct


def free_port():
    """A loopback TCP port nobody listens on right now, above the kernel's ephemeral ports
    (Linux: 32768-60999). One from among them could be taken while its server was down: the
    soak's RabbitMQ, killed and started again, once failed with `eaddrinuse`, its port held by
    one of the many connects its clients and the worker made to it meanwhile (a connect to a
    loopback port nobody listens on can be given that very port as its own, and connect to
    itself)."""
    for _ in range(1000):
        port = random.randrange(61000, 65000)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise SystemExit("no free loopback port in 61000..65000")


def memory_kb(pid):
    """(resident, private dirty) memory of `pid` in KiB: RSS counts shared library pages too;
    private dirty is what this process alone costs the machine."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    dirty = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            dirty = sum(int(l.split()[1]) for l in f if l.startswith("Private_Dirty:"))
    except OSError:
        pass
    return rss, dirty


def proc_stats(pid):
    """(CPU ticks, resident KiB, private dirty KiB) of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return (ticks, *memory_kb(pid))


def read_packet(sock):
    """One Gearman packet from `sock`: (type, body)."""
    head = read_exact(sock, 12)
    kind, size = struct.unpack(">II", head[4:])
    return kind, read_exact(sock, size)


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by the server")
        buf += chunk
    return buf
