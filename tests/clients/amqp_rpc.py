#!/usr/bin/python3
"""RPC client (pika, as a Python service would use it): publishes COUNT requests of FUNCTION to
QUEUE (default exchange), each with reply_to (an exclusive queue of its own) and a
correlation_id, then collects the replies until every one is in or TIMEOUT seconds pass.
Prints one JSON line: sent, answered, wrong, duplicates, failed, missing.

usage: amqp_rpc.py URL QUEUE FUNCTION COUNT TIMEOUT
The payload of request i is "job-<i>"; a right answer is its reverse (the `reverse` built-in).
"""
import json
import sys
import time

import pika

url, queue, function, count, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
replies = ch.queue_declare(queue="", exclusive=True).method.queue
answers = {}
dup = wrong = failed = 0


def on_reply(_ch, _method, props, body):
    global dup, wrong, failed
    cid = props.correlation_id
    if cid in answers:
        dup += 1
        return
    answers[cid] = body
    outcome = (props.headers or {}).get("x-gearshift-outcome")
    if isinstance(outcome, bytes):
        outcome = outcome.decode()
    if outcome != "done":
        failed += 1
    elif body.decode()[::-1] != cid:
        wrong += 1


ch.basic_consume(queue=replies, on_message_callback=on_reply, auto_ack=True)
for i in range(count):
    ch.basic_publish(
        exchange="",
        routing_key=queue,
        body=f"job-{i}".encode(),
        properties=pika.BasicProperties(
            reply_to=replies, correlation_id=f"job-{i}", type=function, delivery_mode=2
        ),
    )
deadline = time.monotonic() + timeout
while len(answers) < count and time.monotonic() < deadline:
    conn.process_data_events(time_limit=0.2)
print(json.dumps({"sent": count, "answered": len(answers), "wrong": wrong, "duplicates": dup,
                  "failed": failed, "missing": count - len(answers)}))
conn.close()
