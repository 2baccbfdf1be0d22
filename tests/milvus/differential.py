"""The same pymilvus workload against real Milvus 2.3.5 and against tandem: they must agree.

    python tests/milvus/differential.py            (scripts/differential installs and runs it)

Starts the `milvus` PyPI package's standalone Milvus 2.3.5 and a `tandem cluster` (TANDEM_BIN),
runs `scenario()` on each with pymilvus's ORM (the API pymilvus 2.3 offers), and compares what
came back: FLAT search ids and their order, distances (L2, IP, COSINE; 1e-4 relative), query
rows, counts after filters and deletes, upserts, and the error code each bad input gets
(where Milvus 2.3.5 answers its undefined code 65535, any error agrees).
Prints every disagreement and exits non-zero when there is one.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from pymilvus import Collection, CollectionSchema, DataType, FieldSchema, MilvusException, connections, utility

sys.path.insert(0, os.path.dirname(__file__))
from harness import free_port, wait_port  # noqa: E402

DIM = 16
N = 2000


def rows(seed):
    r = random.Random(seed)
    pks = list(range(N))
    vecs = [[round(r.uniform(-1, 1), 3) for _ in range(DIM)] for _ in range(N)]
    cats = [i % 5 for i in range(N)]
    prices = [round(r.uniform(0, 100), 2) for _ in range(N)]
    names = [f"n{i}" for i in range(N)]
    return pks, vecs, cats, prices, names


def error_code(fn):
    try:
        fn()
        return "no error"
    except MilvusException as e:
        return f"code {e.code}"


def scenario(alias):
    out = {}
    for name in ("d_l2", "d_ip", "d_cos", "d_bad"):
        if utility.has_collection(name, using=alias):
            utility.drop_collection(name, using=alias)
    fields = [
        FieldSchema("pk", DataType.INT64, is_primary=True),
        FieldSchema("vec", DataType.FLOAT_VECTOR, dim=DIM),
        FieldSchema("cat", DataType.INT64),
        FieldSchema("price", DataType.DOUBLE),
        FieldSchema("name", DataType.VARCHAR, max_length=32),
    ]
    pks, vecs, cats, prices, names = rows(7)
    queries = [vecs[3], vecs[500], [0.1] * DIM, [-0.5] * DIM, vecs[1999]]
    for metric, cname in (("L2", "d_l2"), ("IP", "d_ip"), ("COSINE", "d_cos")):
        c = Collection(cname, CollectionSchema(fields, enable_dynamic_field=True), using=alias, consistency_level="Strong")
        for start in range(0, N, 500):
            c.insert([pks[start : start + 500], vecs[start : start + 500], cats[start : start + 500], prices[start : start + 500], names[start : start + 500]])
        c.create_index("vec", {"index_type": "FLAT", "metric_type": metric, "params": {}})
        c.load()
        res = c.search(queries, "vec", {"metric_type": metric, "params": {}}, limit=10)
        out[f"{metric} search ids"] = [list(h.ids) for h in res]
        out[f"{metric} search distances"] = [[round(d, 4) for d in h.distances] for h in res]
        res = c.search(queries[:2], "vec", {"metric_type": metric, "params": {}}, limit=5, expr="cat in [1, 3] and price < 50")
        out[f"{metric} filtered search ids"] = [list(h.ids) for h in res]
        res = c.search(queries[:2], "vec", {"metric_type": metric, "params": {}, "offset": 5}, limit=5)
        out[f"{metric} offset search ids"] = [list(h.ids) for h in res]
    c = Collection("d_l2", using=alias)
    got = c.query("pk < 20", output_fields=["cat", "price", "name"])
    out["query pk < 20"] = sorted((r["pk"], r["cat"], r["price"], r["name"]) for r in got)
    for expr in ['cat == 2', 'name like "n1%"', 'not (cat in [0, 1])', "price >= 10.5 and price < 20", "pk in [1, 2, 3, 999999]", "cat != 4 or price > 90"]:
        out[f"count {expr}"] = c.query(expr, output_fields=["count(*)"])[0]["count(*)"]
    c.delete("pk in [0, 1, 2, 3, 4]")
    out["count after delete"] = c.query("pk >= 0", output_fields=["count(*)"])[0]["count(*)"]
    out["query deleted"] = c.query("pk in [0, 1, 5]", output_fields=["pk"])
    out["query deleted"] = sorted(r["pk"] for r in out["query deleted"])
    c.upsert([[5, 100000], [[0.0] * DIM, [1.0] * DIM], [9, 9], [1.5, 2.5], ["up5", "up100000"]])
    got = c.query("pk in [5, 100000]", output_fields=["cat", "price", "name"])
    out["after upsert"] = sorted((r["pk"], r["cat"], r["price"], r["name"]) for r in got)
    out["count after upsert"] = c.query("pk >= 0", output_fields=["count(*)"])[0]["count(*)"]

    # Replicas: one on a server with one query node (Milvus standalone; tandem without query
    # nodes), and two refused. (Release is not compared: tandem keeps serving a released
    # collection from the cluster's process, docs/milvus.md.)
    c.load(replica_number=1)
    out["replicas after load(1)"] = len(c.get_replicas().groups)
    out["error: load 2 replicas on one node"] = error_code(lambda: c.load(replica_number=2))
    out["replicas after the refused load"] = len(c.get_replicas().groups)

    out["has missing"] = utility.has_collection("d_missing", using=alias)
    out["error: describe missing"] = error_code(lambda: Collection("d_missing", using=alias))
    out["error: search wrong dim"] = error_code(lambda: c.search([[0.0] * (DIM - 1)], "vec", {"metric_type": "L2"}, limit=3))
    out["error: bad expr"] = error_code(lambda: c.query("pk <", output_fields=["pk"]))
    out["error: unknown field in expr, static schema"] = error_code(lambda: Collection("d_static", CollectionSchema(fields[:2]), using=alias).query("nosuch == 1"))
    out["error: metric mismatch"] = error_code(lambda: c.search([queries[0]], "vec", {"metric_type": "IP"}, limit=3))
    out["error: varchar too long"] = error_code(lambda: c.insert([[7777], [[0.0] * DIM], [1], [1.0], ["x" * 40]]))
    out["error: insert missing field"] = error_code(lambda: c.insert([[7778], [[0.0] * DIM], [1], [1.0]]))
    utility.drop_collection("d_static", using=alias)
    for name in ("d_l2", "d_ip", "d_cos"):
        utility.drop_collection(name, using=alias)
    return out


def start_milvus(base):
    from milvus import default_server

    default_server.set_base_dir(os.path.join(base, "milvus"))
    default_server.start()
    return default_server, f"http://127.0.0.1:{default_server.listen_port}"


def start_tandem(base):
    port = free_port()
    bin_ = os.environ["TANDEM_BIN"]
    log = open(os.path.join(base, "tandem.log"), "wb")
    p = subprocess.Popen([bin_, "cluster", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(base, "tandem")], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, p, "tandem cluster")
    return p, f"http://127.0.0.1:{port}"


def close(a, b):
    # Milvus 2.3 answers many bad inputs with its undefined code 65535 (later versions with
    # specific ones, as tandem does): the kind is "an error", and any error code agrees with it.
    if a == "code 65535" and isinstance(b, str) and b.startswith("code "):
        return True
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def main():
    base = tempfile.mkdtemp(prefix="tandem-differential-")
    milvus, tandem = None, None
    try:
        milvus, muri = start_milvus(base)
        tandem, turi = start_tandem(base)
        connections.connect("milvus", uri=muri)
        connections.connect("tandem", uri=turi)
        t0 = time.time()
        want = scenario("milvus")
        t1 = time.time()
        got = scenario("tandem")
        t2 = time.time()
    finally:
        if tandem is not None:
            tandem.terminate()
            tandem.wait(timeout=30)
        if milvus is not None:
            milvus.stop()
        shutil.rmtree(base, ignore_errors=True)
    diffs = [k for k in want if not close(want[k], got.get(k))]
    for k in diffs:
        print(f"DIFFERENT {k}:\n  milvus 2.3.5: {json.dumps(want[k])[:400]}\n  tandem:       {json.dumps(got.get(k))[:400]}")
    print(f"differential: {len(want) - len(diffs)} of {len(want)} outcomes agree with Milvus 2.3.5 (milvus {t1 - t0:.1f}s, tandem {t2 - t1:.1f}s)")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
