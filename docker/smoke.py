"""The deployment's smoke test, with Milvus's own SDK (pymilvus) through the DC2 gateway:
create a collection, insert, search and query it back with read-your-writes (Session, the
default), then read the same rows from DC2's cluster directly, which got them over the broker
from DC1's leader. Run by docker/smoke, which makes the venv.

    python smoke.py GATEWAY_URI DC2_CLUSTER_URI
"""
import random
import sys
import time

from pymilvus import MilvusClient

gateway, dc2_cluster = sys.argv[1], sys.argv[2]
name = "smoke"
c = MilvusClient(uri=gateway)
if c.has_collection(name):
    c.drop_collection(name)
c.create_collection(collection_name=name, dimension=4)
rng = random.Random(7)
rows = [{"id": i, "vector": [rng.random() for _ in range(4)]} for i in range(200)]
assert c.insert(collection_name=name, data=rows)["insert_count"] == 200
# Read-your-writes through the gateway, whichever cluster it picks.
hits = c.search(collection_name=name, data=[rows[17]["vector"]], limit=3)[0]
assert hits[0]["id"] == 17, hits
count = c.query(collection_name=name, filter="", output_fields=["count(*)"])[0]["count(*)"]
assert count == 200, count
print(f"through the DC2 gateway ({gateway}): wrote 200 rows, read them back, nearest of row 17 is 17")

# DC2's own cluster: an alternative following the leader in DC1 through the broker.
alt = MilvusClient(uri=dc2_cluster)
deadline = time.time() + 30
while True:
    got = alt.query(collection_name=name, filter="id in [0, 17, 199]", output_fields=["vector"], consistency_level="Eventually")
    if len(got) == 3:
        break
    assert time.time() < deadline, f"DC2's cluster has {len(got)} of the 3 rows after 30 s"
    time.sleep(0.2)
by_id = {r["id"]: r["vector"] for r in got}
for i in (0, 17, 199):
    assert all(abs(a - b) < 1e-6 for a, b in zip(by_id[i], rows[i]["vector"])), (i, by_id[i])
print(f"DC2's cluster ({dc2_cluster}) serves the same rows")
c.drop_collection(name)
