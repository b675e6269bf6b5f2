#!/usr/bin/env python3
"""The peer: the outbox relay a team writes by hand, to compare outbox-relay with.

    loop {
        select a batch of pending rows ORDER BY id (in a transaction);
        produce each (acks=all, enable.idempotence, the relay's lz4/linger/partitioner);
        flush;
        UPDATE ... mark by id (or DELETE by id);
        commit
    }

until a select finds nothing pending. Prints one JSON line with its own figures:
rows retired, the rows of the first batch, the time from the first commit to the last,
and its CPU time and peak RSS (librdkafka's threads included).

psycopg 3 and confluent-kafka, pinned in bench/requirements.txt.
"""

import argparse
import json
import resource
import sys
import time

import psycopg
from confluent_kafka import KafkaException, Producer

SELECT = (
    "SELECT id, aggregate_type, aggregate_id, event_type, payload::text, event_id::text "
    "FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT %s"
)
MARK = (
    "UPDATE outbox SET sent_at = now(), kafka_partition = u.p, kafka_offset = u.o "
    "FROM unnest(%s::bigint[], %s::int[], %s::bigint[]) AS u(id, p, o) "
    "WHERE outbox.id = u.id"
)
DELETE = "DELETE FROM outbox WHERE id = ANY(%s::bigint[])"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", default="outbox.event.order")
    ap.add_argument("--mode", choices=["mark", "delete"], default="mark")
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()

    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "client.id": "outbox-relay-bench-peer",
        }
    )
    producer.list_topics(args.topic, timeout=10)

    conn = psycopg.connect(args.dsn, autocommit=False)
    total = 0
    batches = 0
    first_commit_rows = 0
    first_commit_at = None
    started = time.monotonic()
    while True:
        with conn.cursor() as cur:
            cur.execute(SELECT, (args.batch,))
            rows = cur.fetchall()
            if not rows:
                conn.commit()
                break
            acked = {}
            failed = []

            def delivered(err, msg, row_id):
                if err is None:
                    acked[row_id] = (msg.partition(), msg.offset())
                else:
                    failed.append((row_id, err))

            for row_id, agg_type, agg_id, event_type, payload, event_id in rows:
                headers = [("id", event_id), ("event_type", event_type), ("aggregate_type", agg_type)]
                while True:
                    try:
                        producer.produce(
                            args.topic,
                            key=agg_id,
                            value=payload,
                            headers=headers,
                            on_delivery=lambda err, msg, row_id=row_id: delivered(err, msg, row_id),
                        )
                        break
                    except BufferError:
                        producer.poll(0.005)
                producer.poll(0)
            producer.flush()
            if failed:
                raise KafkaException(failed[0][1])
            ids = list(acked.keys())
            if args.mode == "mark":
                parts = [acked[i][0] for i in ids]
                offsets = [acked[i][1] for i in ids]
                cur.execute(MARK, (ids, parts, offsets))
            else:
                cur.execute(DELETE, (ids,))
        conn.commit()
        total += len(rows)
        batches += 1
        if first_commit_at is None:
            first_commit_at = time.monotonic()
            first_commit_rows = len(rows)
    ended = time.monotonic()
    conn.close()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, as the relay is measured: ru_maxrss would carry the bench's own high-water
    # mark over from the fork that started this process.
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "rows": total,
                "batches": batches,
                "first_commit_rows": first_commit_rows,
                "seconds_total": ended - started,
                "seconds_from_first_commit": ended - (first_commit_at or ended),
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "max_rss_bytes": hwm_kb * 1024,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
