"""Helpers the benchmark, fleet and soak scripts share."""
import socket
import struct


def free_port():
    """A loopback TCP port nobody listens on right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
