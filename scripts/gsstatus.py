"""The worker's status over its socket, for the scripts (bench_reload.py, fleet.py)."""
import json
import os
import socket


def query(state_dir):
    """The status document of the worker whose state_dir is `state_dir`, or None."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(os.path.join(state_dir, "worker", "gearshift.sock"))
        s.sendall(b"status\n")
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                # An older worker closes with our request unread, after its answer.
                break
            if not chunk:
                break
            data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None
    finally:
        s.close()
