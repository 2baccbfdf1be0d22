"""A pymilvus application with a global-cluster URI and no failover code of its own: creates
the collection, then inserts one row per call until told to stop (stdin closes) and `min_acks`
writes were acknowledged. Prints `ACK <id>` for every acknowledged write and `ERR <id> <msg>`
for every write that raised, so the test knows exactly what it may expect to find."""

import sys
import time

from pymilvus import MilvusClient

uri, collection, min_acks = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = MilvusClient(uri, timeout=60)
if not c.has_collection(collection):
    c.create_collection(collection_name=collection, dimension=8, metric_type="L2")
print("READY", flush=True)

import select

stop = False
acks = 0
i = 0
deadline = time.time() + 300
while not (stop and acks >= min_acks) and time.time() < deadline:
    i += 1
    try:
        c.insert(collection, [{"id": i, "vector": [float(i % 97)] * 8}])
        acks += 1
        print(f"ACK {i}", flush=True)
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        print(f"ERR {i} {str(e)[:300]!r}", flush=True)
    if not stop and select.select([sys.stdin], [], [], 0)[0]:
        stop = sys.stdin.readline() == ""
    time.sleep(0.01)
print("DONE", flush=True)
