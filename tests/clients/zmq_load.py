#!/usr/bin/python3
"""Load for the ZeroMQ source's tests (pyzmq, a client nobody here wrote the protocol of).

    zmq_load.py ENDPOINT CLIENTS MESSAGES [PROBE_HOST:PORT]

CLIENTS REQ clients each send MESSAGES [function, payload] requests ("reverse", or the
function in $ZMQ_FUNCTION; a unique payload), the lazy pirate way: wait up to 2 s for the answer, else close the socket, open a new
one and send again (up to 30 tries). With PROBE_HOST:PORT, a prober opens a TCP connection there
every 2 ms and counts refusals. Prints JSON: {"acked": [[answer, payload], ...], "errors": [...],
"refused": N, "probes": N, "resent": N}.
"""
import json
import os
import socket
import sys
import threading
import time

import zmq

endpoint, clients, messages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
probe = sys.argv[4] if len(sys.argv) > 4 else None
function = os.environ.get("ZMQ_FUNCTION", "reverse").encode()
ctx = zmq.Context()
lock = threading.Lock()
acked, errors = [], []
resent = [0]
stop = threading.Event()
probes, refused = [0], [0]


def client(n):
    sock = None
    for i in range(messages):
        payload = f"c{n}-m{i}".encode()
        for _ in range(30):
            if sock is None:
                sock = ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
            sock.send_multipart([function, payload])
            if sock.poll(2000, zmq.POLLIN):
                answer = sock.recv_multipart()[-1].decode()
                with lock:
                    (errors if answer.startswith("ERROR") else acked).append([answer, payload.decode()])
                break
            sock.close()
            sock = None
            with lock:
                resent[0] += 1
        else:
            with lock:
                errors.append(["no answer", payload.decode()])
    if sock is not None:
        sock.close()


def prober():
    host, port = probe.rsplit(":", 1)
    while not stop.is_set():
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            refused[0] += 1
        except OSError:
            pass
        probes[0] += 1
        time.sleep(0.002)


threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
if probe:
    p = threading.Thread(target=prober, daemon=True)
    p.start()
for t in threads:
    t.start()
for t in threads:
    t.join()
stop.set()
print(json.dumps({"acked": acked, "errors": errors, "refused": refused[0], "probes": probes[0], "resent": resent[0]}))
