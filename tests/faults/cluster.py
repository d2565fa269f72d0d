"""What production runs, on loopback: a 3-node ZooKeeper ensemble, MariaDB, two or more app
hosts (separate gunicorn masters, each with its own port, workers and ZooKeeper links) and
nginx balancing over them. The fault scenarios (``tests/faults/scenarios.py``) break it.

::

    app host A (gunicorn :PA) --zk proxies A1..A3--\\
    app host B (gunicorn :PB) --zk proxies B1..B3---+--> ZooKeeper nodes 1..3 (quorum)
        \\______ both ______ db proxy ______________+--> MariaDB (its own datadir and port)
    nginx :PN (deploy/nginx/rainer.conf, upstream = A, B)

Every link a fault needs to cut goes through a ``FaultProxy`` in this process: each host
reaches each ZooKeeper node through its own proxy (a partition of one host is those three
proxies dropping packets), and every host reaches the database through one proxy (a
switchover to a new primary is that proxy pointed elsewhere).

Nothing here touches the shared MariaDB on 3306 or any process it did not start. Processes
are started from the calling thread with a parent-death signal, so call from the main thread
(a thread that starts one and then ends would take the process with it).

Run one by hand (``scripts/cluster``)::

    python3 -m tests.faults.cluster [--hosts 2] [--workers 2] [--period 2]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pymysql

from tests.faults.netproxy import FaultProxy
from tests.zkserver import JVM_OPTS
from tests.zkserver import LOG4J_PROPERTIES
from tests.zkserver import classpath
from tests.zkserver import four_letter_word
from tests.zkserver import free_port
from tests.zkserver import java_executable

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "deploy" / "nginx" / "rainer.conf"
NGINX = "/usr/sbin/nginx"
MARIADBD = "/usr/sbin/mariadbd"
QUORUM_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


class ClusterError(RuntimeError):
    """A piece of the cluster did not start or answer in time."""


def _pdeathsig(sig: int = signal.SIGTERM):
    def set_it() -> None:  # pragma: no cover - runs in the child
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            pass

    return set_it


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something true (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------- ZooKeeper


class ZkNode:
    """One member of the ensemble: its ports, directory and JVM."""

    def __init__(self, number: int, base: Path) -> None:
        self.number = number
        self.dir = base / f"zk{number}"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.election_port = free_port()
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "zookeeper.log"

    def mode(self) -> str:
        """``leader``, ``follower``, ``standalone``, ``no quorum`` or ``down`` (``srvr``)."""
        reply = four_letter_word("127.0.0.1", self.client_port, "srvr", 1.0)
        if not reply:
            return "down"
        match = re.search(r"^Mode: (\w+)", reply, re.MULTILINE)
        return match.group(1) if match else "no quorum"

    def __repr__(self) -> str:
        return f"<zk{self.number} :{self.client_port} {'up' if self.running else 'down'}>"


class ZooKeeperEnsemble:
    """Three (or ``size``) ZooKeeper servers forming one quorum on loopback.

    Each has its own client, quorum and election port (``server.N=127.0.0.1:peer:election``)
    and ``myid``; the leader is found with the ``srvr`` four-letter word.
    """

    def __init__(self, base: Path, size: int = 3, tick_time: int = 500) -> None:
        self.base = base
        self.tick_time = tick_time
        self.nodes = [ZkNode(n, base) for n in range(1, size + 1)]

    @property
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{n.client_port}" for n in self.nodes)

    def _write_config(self, node: ZkNode) -> Path:
        data = node.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "myid").write_text(f"{node.number}\n")
        servers = [f"server.{n.number}=127.0.0.1:{n.peer_port}:{n.election_port}"
                   for n in self.nodes]
        config = node.dir / "zoo.cfg"
        config.write_text("\n".join([
            f"tickTime={self.tick_time}",
            "initLimit=20",
            "syncLimit=6",  # a follower that hears nothing from its leader for 3 s leaves it
            f"dataDir={data}",
            f"clientPort={node.client_port}",
            "clientPortAddress=127.0.0.1",
            "minSessionTimeout=1000",
            "maxSessionTimeout=60000",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
            "forceSync=no",  # a process kill keeps the page cache; fsync would only slow us
            "quorumListenOnAllIPs=false",
            *servers,
            "",
        ]))
        (node.dir / "log4j.properties").write_text(LOG4J_PROPERTIES.format(log=node.log_path))
        return config

    def start_node(self, node: ZkNode) -> None:
        if node.running:
            return
        config = self._write_config(node)
        node._log = open(node.log_path, "ab")
        node.process = subprocess.Popen(
            [java_executable(), *JVM_OPTS, "-Xmx128m",
             f"-Dlog4j.configuration=file:{node.dir / 'log4j.properties'}",
             f"-Dzookeeper.log.dir={node.dir}", "-cp", classpath(), QUORUM_MAIN, str(config)],
            stdin=subprocess.DEVNULL, stdout=node._log, stderr=subprocess.STDOUT,
            cwd=node.dir, preexec_fn=_pdeathsig(signal.SIGKILL),
        )

    def start(self, timeout: float = 60) -> None:
        for node in self.nodes:
            self.start_node(node)
        self.wait_quorum(timeout)

    def kill(self, node: ZkNode) -> None:
        """SIGKILL one server (no goodbye to its peers or clients)."""
        if node.process is not None:
            node.process.kill()
            node.process.wait()
        if node._log is not None:
            node._log.close()
            node._log = None

    def modes(self) -> dict[int, str]:
        return {n.number: (n.mode() if n.running else "down") for n in self.nodes}

    def leader(self) -> ZkNode | None:
        for node in self.nodes:
            if node.running and node.mode() == "leader":
                return node
        return None

    def serving(self) -> bool:
        """A quorum is up: one leader, and every running node leads or follows."""
        modes = [m for m in self.modes().values() if m != "down"]
        return modes.count("leader") == 1 and all(m in ("leader", "follower") for m in modes)

    def wait_quorum(self, timeout: float = 30) -> float:
        """Wait until every running node serves under one leader; returns the seconds taken."""
        started = time.monotonic()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise ClusterError(f"zk{node.number} exited:\n{tail(node.log_path)}")
        wait_for(self.serving, timeout, f"a ZooKeeper quorum ({self.modes()})", 0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
            if node._log is not None:
                node._log.close()
                node._log = None


# ---------------------------------------------------------------------- MariaDB


class MariaDb:
    """A MariaDB server of our own: its own datadir (``mariadb-install-db``), port and socket,
    started with ``--no-defaults`` so nothing of the system server's configuration applies.

    Killing it (``kill9``) affects nobody else.
    """

    def __init__(self, base: Path, name: str = "db", flush_log_at_trx_commit: int = 1) -> None:
        self.dir = base / name
        self.name = name
        self.port = free_port()
        self.flush_log_at_trx_commit = flush_log_at_trx_commit
        self.process: subprocess.Popen | None = None

    @property
    def datadir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "error.log"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def install(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {result.stdout}{result.stderr}")

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        if not (self.datadir / "mysql").exists():
            self.install()
        self.process = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.dir / 'mysqld.sock'}",
             f"--pid-file={self.dir / 'mysqld.pid'}", f"--log-error={self.log_path}",
             "--user=root", "--skip-name-resolve", "--skip-log-bin",
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M",
             f"--innodb-flush-log-at-trx-commit={self.flush_log_at_trx_commit}",
             "--max-connections=500", "--character-set-server=utf8mb4"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_pdeathsig(signal.SIGKILL),
        )

        def answering() -> bool:
            if self.process.poll() is not None:
                raise ClusterError(f"mariadbd {self.name} exited:\n{tail(self.log_path)}")
            try:
                self.connect().close()
                return True
            except pymysql.MySQLError:
                return False

        wait_for(answering, timeout, f"MariaDB {self.name} on port {self.port}", 0.1)

    def connect(self, database: str | None = None, **kwargs) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=database,
                               autocommit=True, connect_timeout=3, read_timeout=30, **kwargs)

    def execute(self, sql: str, args=None, database: str | None = None) -> list[tuple]:
        with self.connect(database) as conn, conn.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())

    def kill9(self) -> None:
        """SIGKILL mariadbd: what is not on disk (or in the OS page cache) is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client_args(self) -> list[str]:
        return ["--no-defaults", "--protocol=tcp", "-h127.0.0.1", f"-P{self.port}", "-uroot"]

    def dump(self, database: str) -> bytes:
        result = subprocess.run(
            ["mariadb-dump", *self.client_args(), "--single-transaction", "--databases", database],
            capture_output=True, timeout=120,
        )
        if result.returncode != 0:
            raise ClusterError(f"mariadb-dump failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def load(self, sql: bytes) -> None:
        result = subprocess.run(["mariadb", *self.client_args()], input=sql, capture_output=True,
                                timeout=120)
        if result.returncode != 0:
            raise ClusterError(
                f"loading into {self.name} failed: {result.stderr.decode(errors='replace')}")


# ---------------------------------------------------------------------- app hosts


class AppHost:
    """One app host: a gunicorn master (``config/gunicorn.conf.py``) with its workers, in a
    process group of its own, reaching ZooKeeper through its own proxies."""

    def __init__(self, name: str, base: Path, env: dict[str, str], workers: int = 2) -> None:
        self.name = name
        self.dir = base / f"host-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = env
        self.workers = workers
        self.extra_args = ""
        self.process: subprocess.Popen | None = None
        self._log = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "gunicorn.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, extra_args: str | None = None) -> None:
        """Start the master; ``extra_args`` go to gunicorn as ``GUNICORN_CMD_ARGS``."""
        if self.running:
            return
        if extra_args is not None:
            self.extra_args = extra_args
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAINER_", "PROMETHEUS_", "GUNICORN_"))}
        env.update(self.env)
        env["RAINER_BIND"] = f"127.0.0.1:{self.port}"
        env["RAINER_WORKERS"] = str(self.workers)
        if self.extra_args:
            env["GUNICORN_CMD_ARGS"] = self.extra_args
        self.starts += 1
        self._log = open(self.log_path, "ab")
        self._log.write(f"=== start {self.starts} of host {self.name} {self.extra_args}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_pdeathsig(signal.SIGTERM),
        )

    def worker_pids(self) -> set[int]:
        if not self.running:
            return set()
        master = self.process.pid
        pids = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[-1].split()
                if fields[0] != "Z" and int(fields[1]) == master:
                    pids.add(int(entry.name))
        return pids

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait until every worker answers ``/readyz`` 200 (database, ZooKeeper, mirror)."""
        from tests.faults.history import http

        started = time.monotonic()

        def ready() -> bool:
            if not self.running:
                raise ClusterError(f"host {self.name} exited:\n{tail(self.log_path)}")
            if len(self.worker_pids()) < self.workers:
                return False
            # Several in a row: each lands on some worker, so all of them are likely ready.
            return all(http("GET", self.url + "/readyz", timeout=3)[0] == 200
                       for _ in range(3 * self.workers))

        wait_for(ready, timeout, f"host {self.name} ready", 0.1)
        return time.monotonic() - started

    def hup(self) -> None:
        """Graceful reload: new workers, then the old ones finish and exit."""
        os.kill(self.process.pid, signal.SIGHUP)

    def kill9(self) -> None:
        """SIGKILL the master and every worker at once: the whole host is gone.

        Returns once its port refuses connections: reaping the master does not mean its
        workers, which hold the listening socket too, have finished dying, and a connection
        accepted into the backlog meanwhile is reset with the request already sent (a 502
        that nginx may not retry for a POST) instead of refused and routed elsewhere."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                except OSError:
                    break
                time.sleep(0.01)
        self._close_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.process is not None:
            try:  # leftover workers of a master that died first
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------- nginx


def render_site(site: str, listen_port: int, upstreams: list[int], prefix: Path) -> str:
    """deploy/nginx/rainer.conf, listening on a loopback port, its upstream the given hosts,
    inside a minimal nginx.conf whose files live under ``prefix``."""

    def replace_once(pattern: str, replacement: str, text: str) -> str:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise ClusterError(f"{pattern!r} is not in {SITE} exactly once")
        return text

    servers = "\n    ".join(f"server 127.0.0.1:{port};" for port in upstreams)
    site = replace_once(r"^\s*listen 80;$", f"    listen 127.0.0.1:{listen_port};", site)
    site = replace_once(r"^\s*listen \[::\]:80;$", "", site)
    site = replace_once(r"server 127\.0\.0\.1:8080;", servers, site)
    # The micro-cache's directory, which a production host makes (see the site's header).
    site = replace_once(r"proxy_cache_path /var/cache/nginx/rainer ",
                        f"proxy_cache_path {prefix / 'cache'} ", site)
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log {prefix / "access.log"} combined;
{temp_paths}
{site}
}}
"""


class NginxBalancer:
    """nginx in the foreground with the production site balancing over every app host."""

    def __init__(self, base: Path, upstreams: list[int]) -> None:
        self.prefix = base / "nginx"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_site(SITE.read_text(), self.port, upstreams, self.prefix))
        self.error_log = self.prefix / "error.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log),
             "-g", f"daemon off; pid {self.prefix / 'nginx.pid'};"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=_pdeathsig(signal.SIGTERM),
        )
        import socket

        def listening() -> bool:
            if self.process.poll() is not None:
                raise ClusterError(f"nginx exited: {tail(self.error_log)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, timeout, "nginx listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------------- the cluster


class Cluster:
    """Everything above, wired as production is. ``start()`` brings it up; ``close()`` ends
    every process it started and removes its directory unless told to keep it."""

    database = "rainer_faults"
    table = "rainer"

    def __init__(self, base: Path | None = None, hosts: int = 2, workers: int = 2,
                 period: float = 2.0, session_timeout: float = 4.0, keep: bool = False,
                 gunicorn_args: str = "") -> None:
        self._own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="rainer-cluster-")).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.period = period
        self.session_timeout = session_timeout
        self.zk_path = "/rainer-faults-" + uuid.uuid4().hex[:8]
        self.ensemble = ZooKeeperEnsemble(self.base)
        self.db = MariaDb(self.base, "db1")
        #: Every host reaches the database through this proxy (the switchover moves it).
        self.db_proxy: FaultProxy | None = None
        self.hosts: list[AppHost] = []
        self.zk_proxies: dict[str, list[FaultProxy]] = {}
        self.host_count = hosts
        #: Extra gunicorn settings of every host (``GUNICORN_CMD_ARGS``), e.g. --log-level debug.
        self.gunicorn_args = gunicorn_args
        self.workers = workers
        self.nginx: NginxBalancer | None = None
        self._admin = None
        self.spare_dbs: list[MariaDb] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Cluster:
        try:
            self.ensemble.start()
            self.db.start()
            self.db.execute(f"CREATE DATABASE IF NOT EXISTS {self.database} CHARACTER SET utf8mb4")
            self.db_proxy = FaultProxy(self.db.address, "db")
            for index in range(self.host_count):
                name = "ABCDEFGH"[index]
                proxies = [FaultProxy(node.address, f"{name}-zk{node.number}")
                           for node in self.ensemble.nodes]
                self.zk_proxies[name] = proxies
                env = {
                    "RAINER_DATABASE_URL":
                        f"mysql://root@127.0.0.1:{self.db_proxy.port}/{self.database}",
                    "RAINER_TABLE": self.table,
                    "RAINER_ZK_HOSTS": ",".join(p.address for p in proxies),
                    "RAINER_ZK_PATH": self.zk_path,
                    "RAINER_PUBLISH_PERIOD": str(self.period),
                    "RAINER_ZK_SESSION_TIMEOUT": str(self.session_timeout),
                }
                host = AppHost(name, self.base, env, self.workers)
                host.extra_args = self.gunicorn_args
                self.hosts.append(host)
            # The first host creates the table; then the others start beside it.
            self.hosts[0].start()
            self.hosts[0].wait_ready()
            for host in self.hosts[1:]:
                host.start()
            for host in self.hosts[1:]:
                host.wait_ready()
            self.nginx = NginxBalancer(self.base, [h.port for h in self.hosts])
            self.nginx.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.stop()
                self._admin.close()
            except Exception:
                pass
            self._admin = None
        if self.nginx is not None:
            self.nginx.stop()
        for host in self.hosts:
            host.stop()
        for proxies in self.zk_proxies.values():
            for proxy in proxies:
                proxy.close()
        if self.db_proxy is not None:
            self.db_proxy.close()
        for db in (self.db, *self.spare_dbs):
            db.stop()
        self.ensemble.stop()
        if self._own_base and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ views

    @property
    def url(self) -> str:
        """The balanced entry point (nginx)."""
        return self.nginx.url

    def host(self, name: str) -> AppHost:
        return next(h for h in self.hosts if h.name == name)

    def admin(self):
        """A kazoo client straight to the ensemble (no proxy), for dumps and elections."""
        from kazoo.client import KazooClient
        from kazoo.retry import KazooRetry

        if self._admin is None:
            # Its own logger: the faults make kazoo warn about every dropped connection.
            quiet = logging.getLogger("tests.faults.admin-kazoo")
            quiet.setLevel(logging.ERROR)
            self._admin = KazooClient(
                hosts=self.ensemble.hosts, timeout=10, logger=quiet,
                connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
                command_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
            )
            self._admin.start(timeout=30)
        return self._admin

    def contenders(self) -> list[str]:
        """The publisher election's contenders, the leader first (``hostname:pid``)."""
        return self.admin().Election(self.zk_path + "/election").contenders()

    def publisher(self) -> tuple[AppHost | None, int | None]:
        """The host and worker pid that lead the publisher election now."""
        contenders = self.contenders()
        if not contenders:
            return None, None
        pid = int(contenders[0].rsplit(":", 1)[1])
        for host in self.hosts:
            if pid in host.worker_pids():
                return host, pid
        return None, pid

    def logs(self) -> dict[str, Path]:
        """Every log file worth keeping after a failed check."""
        paths = {f"gunicorn-{h.name}.log": h.log_path for h in self.hosts}
        paths.update({f"zk{n.number}.log": n.log_path for n in self.ensemble.nodes})
        for db in (self.db, *self.spare_dbs):
            paths[f"mariadb-{db.name}.log"] = db.log_path
        if self.nginx is not None:
            paths["nginx-error.log"] = self.nginx.error_log
            paths["nginx-access.log"] = self.nginx.prefix / "access.log"
        return paths

    def describe(self) -> str:
        lines = [
            f"nginx            {self.url}/diary",
            *(f"host {h.name}           {h.url}/diary  (workers {sorted(h.worker_pids())}; "
              f"ZooKeeper via {','.join(p.address for p in self.zk_proxies[h.name])})"
              for h in self.hosts),
            f"ZooKeeper        {self.ensemble.hosts}  modes {self.ensemble.modes()}",
            f"ZooKeeper path   {self.zk_path}",
            f"MariaDB          mysql://root@127.0.0.1:{self.db.port}/{self.database} "
            f"(the hosts use the proxy at :{self.db_proxy.port})",
            f"directory        {self.base}",
        ]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster", description="Run a loopback Rainer cluster until Ctrl-C.")
    parser.add_argument("--hosts", type=int, default=2, help="app hosts (gunicorn masters)")
    parser.add_argument("--workers", type=int, default=2, help="workers per host")
    parser.add_argument("--period", type=float, default=2.0, help="RAINER_PUBLISH_PERIOD")
    parser.add_argument("--session-timeout", type=float, default=4.0,
                        help="RAINER_ZK_SESSION_TIMEOUT")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to keep everything (default: a temporary directory)")
    args = parser.parse_args(argv)
    for tool in (NGINX, MARIADBD):
        if not os.access(tool, os.X_OK):
            print(f"{tool} is missing (scripts/with-services installs it)", file=sys.stderr)
            return 1
    cluster = Cluster(args.dir, hosts=args.hosts, workers=args.workers, period=args.period,
                      session_timeout=args.session_timeout, keep=args.dir is not None)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with cluster:
        print(cluster.describe(), flush=True)
        print("Ctrl-C stops it.", flush=True)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
