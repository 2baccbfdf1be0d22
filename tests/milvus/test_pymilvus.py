"""pymilvus, unchanged, against tandem: every RPC tandem serves, through a cluster and through
the gateway (with an alternative behind it), and the errors a Milvus user expects.

Run by scripts/test with the pymilvus versions it installs:
    TANDEM_BIN=.../tandem python tests/milvus/test_pymilvus.py
"""

import json
import math
import random
import sys
import time
import unittest

import pymilvus
from pymilvus import DataType, MilvusClient, MilvusException

from harness import Deployment, ReplicatedDeployment

DEPLOYMENT = None


def setUpModule():
    global DEPLOYMENT
    DEPLOYMENT = Deployment().start()


def tearDownModule():
    failed = DEPLOYMENT.stop()
    if failed:
        raise RuntimeError(f"processes ended badly: {failed}")


def l2(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def rand_vectors(n, dim, seed):
    r = random.Random(seed)
    return [[r.uniform(-1, 1) for _ in range(dim)] for _ in range(n)]


class MilvusAsserts:
    def assertMilvusError(self, code, needle, fn, *args, **kwargs):
        with self.assertRaises(MilvusException) as cm:
            fn(*args, **kwargs)
        e = cm.exception
        if code is not None:
            self.assertEqual(e.code, code, e)
        self.assertIn(needle, e.message)
        return e


class Endpoint(MilvusAsserts):
    """Every test runs against each endpoint: a subclass names it."""

    which = None

    def setUp(self):
        self.c = MilvusClient(DEPLOYMENT.uri(self.which))
        self.name = f"{self._testMethodName[5:35]}_{self.which}"
        if self.c.has_collection(self.name):
            self.c.drop_collection(self.name)

    def tearDown(self):
        self.c.drop_collection(self.name)
        self.c.close()

    # ---- the quick-start flow ---------------------------------------------------------------

    def test_quickstart_flow(self):
        c, name = self.c, self.name
        c.create_collection(collection_name=name, dimension=5)
        self.assertTrue(c.has_collection(name))
        self.assertIn(name, c.list_collections())
        colors = ["green", "blue", "red", "grey"]
        data = [{"id": i, "vector": v, "color": f"{colors[i % 4]}_{i}", "n": i} for i, v in enumerate(rand_vectors(100, 5, 1))]
        res = c.insert(collection_name=name, data=data)
        self.assertEqual(res["insert_count"], 100)
        self.assertEqual(sorted(res["ids"]), list(range(100)))

        hits = c.search(collection_name=name, data=[data[0]["vector"]], limit=3, filter='color like "red%"', output_fields=["color"])[0]
        self.assertEqual(len(hits), 3)
        for h in hits:
            self.assertTrue(h["entity"]["color"].startswith("red_"), h)
            self.assertEqual(h["id"] % 4, 2)
        # COSINE (the quick create's metric): larger is closer, the first hit is the best.
        self.assertGreaterEqual(hits[0]["distance"], hits[-1]["distance"])

        rows = c.query(collection_name=name, filter="id in [0, 1, 2]", output_fields=["vector", "color"])
        self.assertEqual(sorted(r["id"] for r in rows), [0, 1, 2])
        by_id = {r["id"]: r for r in rows}
        self.assertEqual(by_id[1]["color"], "blue_1")
        self.assertEqual(len(by_id[1]["vector"]), 5)
        # As inserted, though the collection compares by COSINE.
        for got, want in zip(by_id[1]["vector"], data[1]["vector"]):
            self.assertAlmostEqual(got, want, places=6)

        got = c.get(collection_name=name, ids=[5, 6])
        self.assertEqual(sorted(r["id"] for r in got), [5, 6])
        self.assertEqual({r["id"]: r["n"] for r in got}, {5: 5, 6: 6})

        self.assertEqual(c.query(collection_name=name, filter="", output_fields=["count(*)"])[0]["count(*)"], 100)
        self.assertEqual(c.delete(collection_name=name, ids=[0, 1])["delete_count"], 2)
        deleted = c.delete(collection_name=name, filter='color like "grey%"')["delete_count"]
        self.assertEqual(deleted, 25)
        self.assertEqual(c.query(collection_name=name, filter="", output_fields=["count(*)"])[0]["count(*)"], 73)
        self.assertEqual(c.query(collection_name=name, filter="n >= 10 and n < 20", output_fields=["count(*)"])[0]["count(*)"], 7)
        c.drop_collection(name)
        self.assertFalse(c.has_collection(name))

    # ---- schemas, types, JSON, auto_id -------------------------------------------------------

    def typed_schema(self, auto_id=False):
        s = self.c.create_schema(auto_id=auto_id, enable_dynamic_field=True)
        s.add_field("pk", DataType.INT64, is_primary=True)
        s.add_field("emb", DataType.FLOAT_VECTOR, dim=4)
        s.add_field("i8", DataType.INT8)
        s.add_field("i16", DataType.INT16)
        s.add_field("i32", DataType.INT32)
        s.add_field("i64", DataType.INT64)
        s.add_field("f", DataType.FLOAT)
        s.add_field("d", DataType.DOUBLE)
        s.add_field("b", DataType.BOOL)
        s.add_field("s", DataType.VARCHAR, max_length=16)
        s.add_field("j", DataType.JSON)
        return s

    def typed_row(self, i, with_pk=True):
        row = {
            "emb": [float(i), 1.0, 0.0, 0.5],
            "i8": -i % 128,
            "i16": i * 100,
            "i32": i * 100000,
            "i64": i * 10**12,
            "f": 0.1 * i,
            "d": 0.1 * i,
            "b": i % 2 == 0,
            "s": f"s{i}",
            "j": {"k": i, "tags": ["a", "b"] if i % 2 else [], "nested": {"x": i % 3}},
            "extra": f"e{i}",
        }
        if with_pk:
            row["pk"] = i
        return row

    def test_every_scalar_type_json_and_dynamic_fields(self):
        c, name = self.c, self.name
        idx = c.prepare_index_params()
        idx.add_index(field_name="emb", index_type="HNSW", metric_type="IP", params={"M": 8, "efConstruction": 64})
        c.create_collection(collection_name=name, schema=self.typed_schema(), index_params=idx)
        desc = c.describe_collection(name)
        types = {f["name"]: f["type"] for f in desc["fields"]}
        self.assertEqual(types["i8"], DataType.INT8)
        self.assertEqual(types["f"], DataType.FLOAT)
        self.assertEqual(types["j"], DataType.JSON)
        self.assertEqual(next(f for f in desc["fields"] if f["name"] == "s")["params"]["max_length"], 16)
        self.assertTrue(desc["enable_dynamic_field"])
        c.insert(name, [self.typed_row(i) for i in range(10)])

        r = c.get(name, ids=[3], output_fields=["*"])[0]
        self.assertEqual((r["i8"], r["i16"], r["i32"], r["i64"]), (-3 % 128, 300, 300000, 3 * 10**12))
        self.assertAlmostEqual(r["f"], 0.3, places=6)
        self.assertEqual(r["d"], 0.1 * 3)
        self.assertEqual((r["b"], r["s"], r["extra"]), (False, "s3", "e3"))
        self.assertEqual(r["j"], {"k": 3, "tags": ["a", "b"], "nested": {"x": 0}})

        def ids(expr):
            return sorted(x["pk"] for x in c.query(name, filter=expr, output_fields=["pk"]))

        self.assertEqual(ids('j["k"] >= 7'), [7, 8, 9])
        self.assertEqual(ids('j["nested"]["x"] == 2'), [2, 5, 8])
        self.assertEqual(ids('j["tags"][0] == "a" and b == false'), [1, 3, 5, 7, 9])
        self.assertEqual(ids('extra in ["e1", "e4"]'), [1, 4])
        self.assertEqual(ids('s like "s1%" or i16 == 500'), [1, 5])
        self.assertEqual(ids("not (i32 > 200000) and d < 0.15"), [0, 1])

        index = c.describe_index(name, index_name="emb")
        self.assertEqual((index["index_type"], index["metric_type"], str(index["M"])), ("HNSW", "IP", "8"))

        # Bad rows change nothing and name the bad value.
        before = c.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]
        bad = self.typed_row(100)
        bad["s"] = "x" * 17
        self.assertMilvusError(1100, "at most 16", c.insert, name, [bad])
        bad = self.typed_row(101)
        bad["i8"] = 300
        with self.assertRaises(Exception):
            c.insert(name, [bad])
        self.assertEqual(c.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"], before)

    def test_auto_id_assigns_unique_ids(self):
        c, name = self.c, self.name
        idx = c.prepare_index_params()
        idx.add_index(field_name="emb", index_type="FLAT", metric_type="L2")
        c.create_collection(collection_name=name, schema=self.typed_schema(auto_id=True), index_params=idx)
        first = c.insert(name, [self.typed_row(i, with_pk=False) for i in range(5)])["ids"]
        second = c.insert(name, [self.typed_row(i, with_pk=False) for i in range(5, 8)])["ids"]
        self.assertEqual(len(set(first) | set(second)), 8)
        got = c.get(name, ids=list(second), output_fields=["i16"])
        self.assertEqual(sorted(r["i16"] for r in got), [500, 600, 700])
        self.assertMilvusError(None, "auto_id", c.upsert, name, [self.typed_row(9)])

    def plain_collection(self, dim, dynamic=False):
        """An Int64 key "id" and a vector "vector" of `dim`, no index."""
        s = self.c.create_schema(auto_id=False, enable_dynamic_field=dynamic)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        self.c.create_collection(collection_name=self.name, schema=s)

    # ---- indexes, load state, flush, statistics ----------------------------------------------

    def test_index_load_flush_and_statistics(self):
        c, name = self.c, self.name
        self.plain_collection(8)
        idx = c.prepare_index_params()
        idx.add_index(field_name="vector", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 4})
        c.create_index(name, idx)
        self.assertEqual(c.list_indexes(name), ["vector"])
        d = c.describe_index(name, index_name="vector")
        self.assertEqual((d["index_type"], d["metric_type"], str(d["nlist"])), ("IVF_FLAT", "L2", "4"))
        c.load_collection(name)
        self.assertEqual(str(c.get_load_state(name)["state"]), "Loaded")
        vecs = rand_vectors(300, 8, 2)
        c.insert(name, [{"id": i, "vector": v} for i, v in enumerate(vecs)])
        c.flush(name)
        self.assertEqual(int(c.get_collection_stats(name)["row_count"]), 300)
        c.release_collection(name)
        c.load_collection(name)
        # Replicas are the cluster's replica groups; this one has no query nodes: one replica.
        c.load_collection(name, replica_number=1)
        self.assertMilvusError(1100, "replica_number 2", c.load_collection, name, replica_number=2)
        # That replica: the cluster's own process (node 1) leads the collection's shards.
        (replica,) = c.describe_replica(name)
        self.assertEqual((replica.id, tuple(replica.group_nodes)), (1, (1,)))
        self.assertEqual(len(replica.shards), c.describe_collection(name)["num_shards"])
        self.assertTrue(all(s.shard_leader == 1 for s in replica.shards), replica)
        c.drop_index(name, index_name="vector")
        self.assertEqual(c.describe_index(name, index_name="vector")["index_type"], "FLAT")
        # An index on a field that does not exist names it.
        bad = c.prepare_index_params()
        bad.add_index(field_name="nope", index_type="FLAT", metric_type="L2")
        self.assertMilvusError(1100, "nope", c.create_index, name, bad)
        bad = c.prepare_index_params()
        bad.add_index(field_name="vector", index_type="DISKANN", metric_type="L2")
        self.assertMilvusError(1100, "DISKANN", c.create_index, name, bad)

    # ---- search: exactness, offset, output, errors --------------------------------------------

    def test_flat_search_is_exact_and_pages_with_offset(self):
        c, name = self.c, self.name
        s = c.create_schema(auto_id=False, enable_dynamic_field=True)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=6)
        idx = c.prepare_index_params()
        idx.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        c.create_collection(collection_name=name, schema=s, index_params=idx)
        vecs = rand_vectors(500, 6, 3)
        c.insert(name, [{"id": i, "vector": v, "tag": i % 5} for i, v in enumerate(vecs)])
        queries = rand_vectors(3, 6, 4)
        res = c.search(name, data=queries, limit=10, search_params={"metric_type": "L2"}, output_fields=["tag", "vector"])
        for q, hits in zip(queries, res):
            truth = sorted(range(500), key=lambda i: l2(q, vecs[i]))[:10]
            self.assertEqual([h["id"] for h in hits], truth)
            for h in hits:
                # Milvus reports squared L2 for L2.
                self.assertTrue(math.isclose(h["distance"], l2(q, vecs[h["id"]]), rel_tol=1e-4, abs_tol=1e-5), h)
                self.assertEqual(h["entity"]["tag"], h["id"] % 5)
                self.assertEqual(len(h["entity"]["vector"]), 6)
        page = c.search(name, data=queries[:1], limit=5, offset=5, search_params={"metric_type": "L2"})[0]
        self.assertEqual([h["id"] for h in page], [h["id"] for h in res[0]][5:10])
        filtered = c.search(name, data=queries[:1], limit=5, filter="tag == 2")[0]
        self.assertTrue(all(h["id"] % 5 == 2 for h in filtered))
        q = c.query(name, filter="tag == 1", output_fields=["tag"], limit=4, offset=2)
        all_ones = sorted(x["id"] for x in c.query(name, filter="tag == 1", output_fields=["tag"]))
        self.assertEqual(len(all_ones), 100)
        self.assertEqual(len(q), 4)

        self.assertMilvusError(1100, "metric type not match", c.search, name, data=queries[:1], limit=3, search_params={"metric_type": "IP"})
        self.assertMilvusError(None, "dimensions", c.search, name, data=[[0.0] * 5], limit=3)
        self.assertMilvusError(1100, "syntax error", c.search, name, data=queries[:1], limit=3, filter="tag >")
        self.assertMilvusError(1100, "not Json", c.search, name, data=queries[:1], limit=3, filter='id["a"] == 1')
        self.assertMilvusError(None, "json_contains", c.search, name, data=queries[:1], limit=3, filter="json_contains(tag, 1)")
        self.assertMilvusError(None, "range search", c.search, name, data=queries[:1], limit=3, search_params={"params": {"radius": 1.0}})
        self.assertMilvusError(100, "not found", c.search, "no_such_collection", data=queries[:1], limit=3)
        self.assertMilvusError(1100, "empty expression", c.query, name, filter="")

    def test_metric_set_by_an_index_created_after_inserting(self):
        c, name = self.c, self.name
        self.plain_collection(2)
        c.insert(name, [{"id": 1, "vector": [10.0, 0.0]}, {"id": 2, "vector": [0.9, 0.5]}])
        idx = c.prepare_index_params()
        idx.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 8, "efConstruction": 32})
        c.create_index(name, idx)
        hits = c.search(name, data=[[1.0, 0.1]], limit=2, search_params={"metric_type": "COSINE"})[0]
        self.assertEqual([h["id"] for h in hits], [1, 2])
        self.assertAlmostEqual(hits[0]["distance"], 1.0 / math.sqrt(1.01), places=5)

    def test_upsert_replaces_rows(self):
        c, name = self.c, self.name
        c.create_collection(collection_name=name, dimension=3, metric_type="L2")
        c.insert(name, [{"id": i, "vector": [float(i), 0, 0], "v": "old"} for i in range(4)])
        res = c.upsert(name, [{"id": 1, "vector": [9.0, 9, 9], "v": "new"}, {"id": 7, "vector": [7.0, 0, 0], "v": "new"}])
        self.assertEqual(res["upsert_count"], 2)
        rows = {r["id"]: r for r in c.query(name, filter="id in [1, 7]", output_fields=["v", "vector"])}
        self.assertEqual((rows[1]["v"], rows[7]["v"]), ("new", "new"))
        self.assertAlmostEqual(rows[1]["vector"][0], 9.0)
        self.assertEqual(c.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"], 5)

    # ---- consistency ----------------------------------------------------------------------

    def test_every_consistency_level_reads_and_strong_and_session_see_the_write(self):
        c, name = self.c, self.name
        c.create_collection(collection_name=name, dimension=3, metric_type="L2", consistency_level="Session")
        for i in range(20):
            c.insert(name, [{"id": i, "vector": [float(i), 0.0, 0.0]}])
            for level in ("Strong", "Session"):
                got = c.query(name, filter=f"id == {i}", output_fields=["id"], consistency_level=level)
                self.assertEqual([r["id"] for r in got], [i], f"{level} read missed write {i}")
            hit = c.search(name, data=[[float(i), 0.0, 0.0]], limit=1, consistency_level="Strong")[0][0]
            self.assertEqual(hit["id"], i)
        for level in ("Bounded", "Eventually"):
            c.query(name, filter="id >= 0", output_fields=["id"], consistency_level=level)

    # ---- lower-level RPCs ------------------------------------------------------------------

    def test_version_health_timestamps_flush_state_and_unsupported_rpcs(self):
        c, name = self.c, self.name
        self.assertEqual(c.get_server_version(), "v2.3.5")
        handler = c._get_connection()
        from pymilvus.grpc_gen import milvus_pb2

        health = handler._stub.CheckHealth(milvus_pb2.CheckHealthRequest())
        self.assertTrue(health.isHealthy)
        c.create_collection(collection_name=name, dimension=3)
        ts = c.insert(name, [{"id": 1, "vector": [1.0, 2.0, 3.0]}])
        t1 = handler.alloc_timestamp()
        t2 = handler.alloc_timestamp()
        self.assertGreater(t1, 0)
        self.assertGreaterEqual(t2, t1)
        # Hybrid timestamps: the physical part is wall-clock milliseconds.
        self.assertLess(abs((t1 >> 18) - time.time() * 1000), 60_000)
        st = handler._stub.GetFlushState(milvus_pb2.GetFlushStateRequest(collection_name=name))
        self.assertTrue(st.flushed)
        e = self.assertMilvusError(None, "CreatePartition", c.create_partition, name, "p1")
        self.assertIn("tandem does not serve", e.message)
        self.assertMilvusError(None, "partition", c.insert, name, [{"id": 2, "vector": [1.0, 2.0, 3.0]}], partition_name="p1")

    def test_missing_collections(self):
        c = self.c
        self.assertFalse(c.has_collection("never_created"))
        c.drop_collection("never_created")
        self.assertMilvusError(100, "not found", c.describe_collection, "never_created")
        self.assertMilvusError(100, "not found", c.insert, "never_created", [{"id": 1, "vector": [1.0]}])


class ThroughTheLeader(Endpoint, unittest.TestCase):
    which = "leader"


class ThroughTheGateway(Endpoint, unittest.TestCase):
    which = "gateway"


class OnTheAlternative(unittest.TestCase):
    def test_writes_are_refused_naming_the_leader_and_reads_follow(self):
        leader = MilvusClient(DEPLOYMENT.uri("leader"))
        alt = MilvusClient(DEPLOYMENT.uri("alternative"))
        name = "alt_follow"
        if leader.has_collection(name):
            leader.drop_collection(name)
        with self.assertRaises(MilvusException) as cm:
            alt.create_collection(collection_name=name, dimension=3)
        self.assertEqual(cm.exception.code, 2)
        self.assertIn(DEPLOYMENT.uri("leader").split("//")[1], cm.exception.message)
        leader.create_collection(collection_name=name, dimension=3)
        ts = leader.insert(name, [{"id": 1, "vector": [1.0, 0.0, 0.0], "k": "v"}])
        deadline = time.time() + 20
        while not alt.has_collection(name):
            self.assertLess(time.time(), deadline, "the alternative never showed the collection")
            time.sleep(0.05)
        rows = alt.query(name, filter="id == 1", output_fields=["k"], consistency_level="Strong")
        self.assertEqual(rows[0]["k"], "v")
        with self.assertRaises(MilvusException):
            alt.insert(name, [{"id": 2, "vector": [1.0, 0.0, 0.0]}])
        leader.drop_collection(name)


class WithQueryNodes(MilvusAsserts, unittest.TestCase):
    """load_collection's replica_number on a cluster with two replica groups: that many groups
    hold the collection's copies; release lets the query nodes go, and the cluster serves it."""

    @classmethod
    def setUpClass(cls):
        cls.deployment = ReplicatedDeployment().start()

    @classmethod
    def tearDownClass(cls):
        failed = cls.deployment.stop()
        if failed:
            raise RuntimeError(f"processes ended badly: {failed}")

    def wait_copies(self, name, groups, per_node):
        """Until the collection's replica groups are `groups` and the nodes hold `per_node`."""
        deadline = time.time() + 60
        while True:
            info = self.deployment.info()
            (coll,) = [c for c in info["collections"] if c["name"] == name]
            held = [q["segments"] for q in info["query_nodes"]]
            if coll["replica_groups"] == groups and held == per_node:
                return
            self.assertLess(time.time(), deadline, f"groups {coll['replica_groups']}, copies {held}; want {groups}, {per_node}")
            time.sleep(0.1)

    @staticmethod
    def leaders(c, name):
        """Per replica, the node ids leading its shards, as describe_replica reports them."""
        return [{s.shard_leader for s in r.shards} for r in c.describe_replica(name)]

    def test_replica_number_chooses_the_groups_that_hold_the_collection(self):
        c = MilvusClient(self.deployment.uri("leader"))
        name = "replicated"
        s = c.create_schema(auto_id=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
        c.create_collection(collection_name=name, schema=s)
        idx = c.prepare_index_params()
        idx.add_index(field_name="vector", index_type="HNSW", metric_type="L2", params={"M": 8, "efConstruction": 64})
        c.create_index(name, idx)
        vecs = rand_vectors(800, 8, 7)
        c.insert(name, [{"id": i, "vector": v} for i, v in enumerate(vecs)])
        c.flush(name)
        # Never loaded: every group holds it.
        deadline = time.time() + 60
        while True:
            info = self.deployment.info()
            (coll,) = [x for x in info["collections"] if x["name"] == name]
            held = [q["segments"] for q in info["query_nodes"]]
            if coll["sealed_segments"] > 0 and held == [coll["sealed_segments"]] * 2:
                sealed = coll["sealed_segments"]
                break
            self.assertLess(time.time(), deadline, f"copies {held}")
            time.sleep(0.1)
        self.assertEqual(len(c.describe_replica(name)), 2)

        def nearest(i):
            return c.search(name, data=[vecs[i]], limit=1, consistency_level="Strong")[0][0]["id"]

        # One replica: group 0 (query node 2, beside the cluster's own process, node 1).
        c.load_collection(name, replica_number=1)
        self.wait_copies(name, [0], [sealed, 0])
        self.assertEqual([(r.id, tuple(r.group_nodes)) for r in c.describe_replica(name)], [(1, (1, 2))])
        # Its shards are led by the group's query node: it keeps and searches their growing rows.
        self.assertEqual(self.leaders(c, name), [{2}])
        self.assertEqual(nearest(5), 5)
        # Two: both groups again.
        c.load_collection(name, replica_number=2)
        self.wait_copies(name, [0, 1], [sealed, sealed])
        self.assertEqual([(r.id, tuple(r.group_nodes)) for r in c.describe_replica(name)], [(1, (1, 2)), (2, (1, 3))])
        self.assertEqual(self.leaders(c, name), [{2}, {3}])
        # More than the groups: refused, naming it, and nothing changes.
        self.assertMilvusError(1100, "replica_number 3", c.load_collection, name, replica_number=3)
        self.assertEqual(len(c.describe_replica(name)), 2)
        # Released: the query nodes let go, and the cluster's process serves the collection.
        c.release_collection(name)
        self.wait_copies(name, [], [0, 0])
        self.assertEqual([(r.id, tuple(r.group_nodes)) for r in c.describe_replica(name)], [(1, (1,))])
        self.assertEqual(self.leaders(c, name), [{1}])
        self.assertEqual(nearest(700), 700)
        c.drop_collection(name)
        c.close()


if __name__ == "__main__":
    print(f"pymilvus {pymilvus.__version__}", flush=True)
    result = unittest.main(exit=False, verbosity=2).result
    run, bad = result.testsRun, len(result.failures) + len(result.errors)
    print(f"pymilvus {pymilvus.__version__}: {run - bad} passed, {bad} failed, {len(result.skipped)} skipped")
    sys.exit(1 if bad or result.skipped else 0)
