"""`tandem bench milvus`: the same pymilvus workload against the real Milvus 2.3.5 standalone
engine (PyPI package `milvus`) and against a tandem cluster, one after the other.

Run by `tandem bench milvus`, which writes this file out and runs it with the venv
`scripts/differential` makes (milvus 2.3.5, pymilvus 2.3.7). Per server: ingest rows/s, time
until indexed and loaded, the server's peak RSS, and per HNSW ef of the sweep: sequential search
p50/p99, QPS with concurrent clients and recall@10 against exact ground truth. The vectors are a
Gaussian mixture, or a .npy file (`--file`, e.g. `./scripts/dataset`'s real embeddings). Prints
one JSON document on stdout.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from pymilvus import Collection, CollectionSchema, DataType, FieldSchema, connections, utility


def dataset(n, dim, nq, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (100, dim)).astype(np.float32)
    which = rng.integers(0, 100, n + nq)
    pts = centers[which] + rng.normal(0, 0.3, (n + nq, dim)).astype(np.float32)
    return pts[:n], pts[n:]


def file_dataset(path, n, nq):
    """The first n + nq rows of a .npy file (as `tandem bench search --file` reads it), the last
    nq of them held out as queries."""
    rows = np.load(path, mmap_mode="r")
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise SystemExit(f"--file {path}: a 2-d array of vectors is needed, not shape {rows.shape}")
    rows = np.ascontiguousarray(rows[: n + nq], dtype=np.float32)
    if len(rows) <= nq:
        raise SystemExit(f"--file {path} has {len(rows)} vectors: it needs more than --queries {nq}")
    return rows[:-nq], rows[-nq:]


def ground_truth(base, queries, metric):
    """Exact top-10 ids per query under `metric` (L2, IP or COSINE)."""
    if metric == "COSINE":
        unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
        base, queries = unit(base), unit(queries)
    truth = []
    norms = (base * base).sum(1)
    for i in range(0, len(queries), 100):
        q = queries[i : i + 100]
        # Smaller is nearer: L2 distance (without the query's own norm), or minus the similarity.
        d = norms[None, :] - 2 * q @ base.T if metric == "L2" else -(q @ base.T)
        truth.extend(np.argsort(d, axis=1)[:, :10].tolist())
    return truth


def peak_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server, base_dir):
    if server == "milvus":
        from milvus import default_server

        default_server.set_base_dir(os.path.join(base_dir, "milvus"))
        default_server.start()
        return (lambda: default_server.stop()), default_server.server_proc.pid, f"http://127.0.0.1:{default_server.listen_port}"
    port = free_port()
    log = open(os.path.join(base_dir, "tandem.log"), "wb")
    p = subprocess.Popen([os.environ["TANDEM_BIN"], "cluster", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(base_dir, "tandem")], stdout=log, stderr=subprocess.STDOUT)
    import socket

    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)

    def stop():
        p.terminate()
        p.wait(timeout=60)

    return stop, p.pid, f"http://127.0.0.1:{port}"


def run(server, a, base, queries, truth):
    tmp = tempfile.mkdtemp(prefix=f"tandem-bench-{server}-")
    stop, pid, uri = start(server, tmp)
    out = {"server": server}
    try:
        alias = server
        connections.connect(alias, uri=uri)
        name = "bench_milvus"
        if utility.has_collection(name, using=alias):
            utility.drop_collection(name, using=alias)
        fields = [FieldSchema("pk", DataType.INT64, is_primary=True), FieldSchema("vec", DataType.FLOAT_VECTOR, dim=a.dim)]
        c = Collection(name, CollectionSchema(fields), using=alias, shards_num=1)
        t0 = time.time()
        for i in range(0, len(base), a.batch):
            chunk = base[i : i + a.batch]
            c.insert([list(range(i, i + len(chunk))), chunk])
        out["ingest_rows_per_s"] = round(len(base) / (time.time() - t0), 1)
        t1 = time.time()
        c.create_index("vec", {"index_type": "HNSW", "metric_type": a.metric, "params": {"M": 16, "efConstruction": 200}})
        c.flush()
        utility.wait_for_index_building_complete(name, using=alias)
        c.load()
        out["indexed_and_loaded_s"] = round(time.time() - t1, 2)
        out["sweep"] = [search_at(c, alias, uri, name, a, ef, queries, truth) for ef in a.ef]
        out["clients"] = a.clients
        out["peak_rss_mb"] = peak_rss_mb(pid)
        utility.drop_collection(name, using=alias)
        connections.disconnect(alias)
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def search_at(c, alias, uri, name, a, ef, queries, truth):
    """Sequential p50/p99 and recall@10 over the queries, then QPS with concurrent clients, at one
    HNSW ef."""
    params = {"metric_type": a.metric, "params": {"ef": ef}}
    # Warm up, then sequential latency.
    for q in queries[:20]:
        c.search([q.tolist()], "vec", params, limit=10, consistency_level="Eventually")
    lat, found = [], []
    for q in queries:
        s = time.perf_counter()
        r = c.search([q.tolist()], "vec", params, limit=10, consistency_level="Eventually")
        lat.append((time.perf_counter() - s) * 1000)
        found.append(list(r[0].ids))
    lat.sort()
    out = {"ef": ef}
    out["p50_ms"] = round(lat[len(lat) // 2], 3)
    out["p99_ms"] = round(lat[int(len(lat) * 0.99) - 1], 3)
    out["recall_at_10"] = round(sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / (10 * len(truth)), 4)
    # Concurrent clients, each with its own connection.
    done = [0] * a.clients
    stop_at = time.time() + a.qps_secs

    def client(k):
        al = f"{alias}_{k}"
        connections.connect(al, uri=uri)
        cc = Collection(name, using=al)
        i = k
        while time.time() < stop_at:
            cc.search([queries[i % len(queries)].tolist()], "vec", params, limit=10, consistency_level="Eventually")
            done[k] += 1
            i += a.clients
        connections.disconnect(al)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    t2 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["qps"] = round(sum(done) / (time.time() - t2), 1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--servers", default="milvus,tandem")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--ef", default="64", help="HNSW ef, or a comma-separated sweep")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--qps-secs", type=float, default=15.0)
    p.add_argument("--file", help=".npy vectors instead of the Gaussian mixture (the last --queries rows are the queries)")
    p.add_argument("--metric", default="L2", choices=["L2", "IP", "COSINE"])
    a = p.parse_args()
    a.ef = [int(e) for e in a.ef.split(",")]
    if a.file:
        base, queries = file_dataset(a.file, a.n, a.queries)
        a.n, a.dim = base.shape
        source = f"file:{a.file}"
    else:
        base, queries = dataset(a.n, a.dim, a.queries, 42)
        source = "gaussian_mixture(clusters=100, seed=42)"
    truth = ground_truth(base, queries, a.metric)
    results = [run(s, a, base, queries, truth) for s in a.servers.split(",")]
    index = "HNSW M=16 efConstruction=200"
    print(json.dumps({"n": a.n, "dim": a.dim, "queries": a.queries, "source": source, "metric": a.metric, "index": index, "results": results}))


if __name__ == "__main__":
    sys.exit(main())
