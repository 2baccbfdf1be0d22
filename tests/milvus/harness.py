"""Starts real tandem processes for the pymilvus tests: a leading cluster, an alternative that
follows it (direct transport), and a gateway in front of both, each on a free port, stopped by
PID. The binary comes from TANDEM_BIN (scripts/test sets it)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, name, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


class Deployment:
    """leader <- alternative (direct), gateway over both."""

    def __init__(self):
        self.bin = os.environ.get("TANDEM_BIN")
        if not self.bin or not os.access(self.bin, os.X_OK):
            raise RuntimeError(f"TANDEM_BIN={self.bin!r} is not an executable tandem binary")
        self.dir = tempfile.mkdtemp(prefix="tandem-pymilvus-")
        self.procs = []
        self.leader_port = free_port()
        self.alt_port = free_port()
        self.gateway_port = free_port()

    def _spawn(self, name, args, port):
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        p = subprocess.Popen([self.bin, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append((name, p))
        wait_port(port, p, name)
        return p

    def start(self):
        leader = f"127.0.0.1:{self.leader_port}"
        self._spawn("leader", ["cluster", "--listen", leader, "--data-dir", os.path.join(self.dir, "leader"), "--cluster-id", "dc1"], self.leader_port)
        self._spawn(
            "alternative",
            ["cluster", "--listen", f"127.0.0.1:{self.alt_port}", "--data-dir", os.path.join(self.dir, "alt"), "--cluster-id", "dc2", "--follow", f"http://{leader}"],
            self.alt_port,
        )
        self._spawn(
            "gateway",
            ["gateway", "--listen", f"127.0.0.1:{self.gateway_port}", "--cluster", f"dc1=http://{leader}", "--cluster", f"dc2=http://127.0.0.1:{self.alt_port}"],
            self.gateway_port,
        )
        return self

    def uri(self, which):
        port = {"leader": self.leader_port, "alternative": self.alt_port, "gateway": self.gateway_port}[which]
        return f"http://127.0.0.1:{port}"

    def stop(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        failed = [n for n, p in self.procs if p.returncode not in (0, -signal.SIGTERM)]
        if failed:
            for n in failed:
                with open(os.path.join(self.dir, f"{n}.log"), "rb") as f:
                    print(f"--- {n} log ---\n" + f.read().decode(errors="replace")[-4000:])
        shutil.rmtree(self.dir, ignore_errors=True)
        return failed


class ReplicatedDeployment(Deployment):
    """One cluster with two replica groups of one query node each (docs/scaling.md), sealing
    every 200 rows so a small collection has sealed segments to place."""

    def __init__(self):
        super().__init__()
        self.node_ports = [free_port(), free_port()]

    def start(self):
        for i, port in enumerate(self.node_ports):
            scratch = os.path.join(self.dir, f"query-node-{i}")
            self._spawn(f"query-node-{i}", ["query-node", "--listen", f"127.0.0.1:{port}", "--scratch-dir", scratch], port)
        config = os.path.join(self.dir, "cluster.toml")
        groups = ", ".join(f'["http://127.0.0.1:{p}"]' for p in self.node_ports)
        with open(config, "w") as f:
            f.write(f"[segment]\nseal_rows = 200\n\n[query_nodes]\ngroups = [{groups}]\n")
        leader = f"127.0.0.1:{self.leader_port}"
        args = ["cluster", "--config", config, "--listen", leader, "--data-dir", os.path.join(self.dir, "leader"), "--cluster-id", "dc1"]
        self._spawn("leader", args, self.leader_port)
        return self

    def info(self):
        """`tandem info --json` of the cluster: its collections' replica groups and the copies
        each query node holds."""
        out = subprocess.run([self.bin, "info", "--json", "--endpoint", self.uri("leader")], check=True, capture_output=True, timeout=30)
        return json.loads(out.stdout)
