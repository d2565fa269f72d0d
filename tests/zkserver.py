"""Run a real standalone ZooKeeper for the test suite (stdlib only).

Uses the ZooKeeper shipped by Debian's ``zookeeper`` package
(``/usr/share/java/zookeeper.jar`` and the jars it depends on) and starts
``org.apache.zookeeper.server.ZooKeeperServerMain`` with a generated
``zoo.cfg`` bound to 127.0.0.1 on a free port.

Library use::

    with ZooKeeperServer(tmp_path) as zk:
        client = KazooClient(hosts=zk.hosts)
        ...
        zk.restart()          # same port, same data

Command line (used by scripts/test)::

    python3 -m tests.zkserver start --dir D   # detached; prints 127.0.0.1:PORT
    python3 -m tests.zkserver stop --dir D
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

JAVA_DIR = Path("/usr/share/java")
CONF_DIR = Path("/etc/zookeeper/conf")
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"

# zookeeper.jar's manifest Class-Path already references most of these, but
# listing them explicitly keeps us independent of the manifest.  Only the
# ones that exist are used.  slf4j-log4j12 + log4j-1.2 give us a real log
# (without a binding slf4j silently drops everything).
JARS = (
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "slf4j-api.jar",
    "slf4j-log4j12.jar",
    "log4j-1.2.jar",
    "metrics-core.jar",
    "commons-cli.jar",
    "commons-io.jar",
    "jackson-annotations.jar",
    "jackson-core.jar",
    "jackson-databind.jar",
    "snappy-java.jar",
    "netty-buffer.jar",
    "netty-common.jar",
    "netty-handler.jar",
    "netty-transport.jar",
    "netty-transport-native-epoll.jar",
    "netty-transport-native-unix-common.jar",
    "netty-resolver.jar",
    "netty-codec.jar",
)

LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.Append=true
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} - %-5p [%t:%C{{1}}@%L] - %m%n
"""

JVM_OPTS = (
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
    "-Dzookeeper.jmx.log4j.disable=true",
)

#: A ZooKeeper as deployed, for benchmarks (``--production``): the JVM's default collector and
#: full JIT, a heap for 100k znodes and their watches, and an fsync per log write. The tests'
#: options above start faster and cost more CPU per request (C1 code only): a benchmark of
#: writes with ZooKeeper measured against them charged that to Rainer.
PRODUCTION_JVM_OPTS = (
    "-Xms512m",
    "-Xmx1g",
    "-Djava.awt.headless=true",
    "-Dzookeeper.jmx.log4j.disable=true",
)

PID_FILE = "zk.pid"
PORT_FILE = "zk.port"


def classpath() -> str:
    """The Java classpath for a standalone ZooKeeper server."""
    main_jar = JAVA_DIR / "zookeeper.jar"
    if not main_jar.exists():
        raise RuntimeError(
            f"{main_jar} not found: install Debian's 'zookeeper' package "
            "(apt-get install zookeeper)"
        )
    parts = [str(CONF_DIR)]
    parts += [str(JAVA_DIR / j) for j in JARS if (JAVA_DIR / j).exists()]
    return os.pathsep.join(parts)


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return os.path.join(java_home, "bin", "java")
    java = shutil.which("java")
    if not java:
        raise RuntimeError("java not found: install default-jre-headless")
    return java


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def four_letter_word(host: str, port: int, word: str, timeout: float = 2.0) -> str:
    """Send a 4lw command and return the full reply ('' on connection errors)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(word.encode("ascii"))
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


def _set_pdeathsig():  # pragma: no cover - runs in the child
    """Have the kernel SIGTERM the JVM if the spawning thread dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ZooKeeperServer:
    """A standalone ZooKeeper server process living in ``data_dir``.

    ``port`` defaults to a free loopback port chosen at the first start and
    kept for later restarts.  ``detached=True`` puts the JVM in its own
    session so it outlives this Python process (used by the CLI); otherwise
    the JVM gets SIGTERM from the kernel when the thread that started it
    dies, so an aborted test run leaves no stray server behind.
    """

    host = "127.0.0.1"

    def __init__(self, data_dir, port: int | None = None, *, tick_time: int = 500,
                 min_session_timeout: int = 1000, max_session_timeout: int = 60000,
                 detached: bool = False, production: bool = False):
        self.production = production
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.tick_time = tick_time
        self.min_session_timeout = min_session_timeout
        self.max_session_timeout = max_session_timeout
        self.detached = detached
        self.process: subprocess.Popen | None = None
        self._log_fh = None

    # paths -----------------------------------------------------------------
    @property
    def zk_data_dir(self) -> Path:
        return self.data_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "zoo.cfg"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "zookeeper.log"

    @property
    def hosts(self) -> str:
        if self.port is None:
            raise RuntimeError("ZooKeeperServer has not been started yet")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # lifecycle -------------------------------------------------------------
    def _write_config(self):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.zk_data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join([
                f"tickTime={self.tick_time}",
                f"dataDir={self.zk_data_dir}",
                f"clientPort={self.port}",
                f"clientPortAddress={self.host}",
                f"minSessionTimeout={self.min_session_timeout}",
                f"maxSessionTimeout={self.max_session_timeout}",
                "maxClientCnxns=0",
                "admin.enableServer=false",
                "4lw.commands.whitelist=*",
                # Tests: durable across process restarts (the page cache survives), and
                # skipping fsync keeps writes fast. As deployed (benchmarks): synced.
                f"forceSync={'yes' if self.production else 'no'}",
                "autopurge.snapRetainCount=3",
                "autopurge.purgeInterval=0",
                "",
            ])
        )
        (self.data_dir / "log4j.properties").write_text(
            LOG4J_PROPERTIES.format(log=self.log_path)
        )

    def command(self) -> list[str]:
        return [
            java_executable(),
            *(PRODUCTION_JVM_OPTS if self.production else JVM_OPTS),
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            f"-Dzookeeper.log.dir={self.data_dir}",
            "-cp", classpath(),
            MAIN_CLASS,
            str(self.config_path),
        ]

    def start(self, timeout: float = 30):
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        self._write_config()
        cmd = self.command()
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"=== starting: {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        kwargs = {}
        if self.detached:
            kwargs["start_new_session"] = True
        else:
            kwargs["preexec_fn"] = _set_pdeathsig
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
            stderr=subprocess.STDOUT, cwd=str(self.data_dir), close_fds=True,
            **kwargs,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        expected = str(self.zk_data_dir)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper exited with code {self.process.returncode} "
                    f"during startup; log tail:\n{_tail(self.log_path)}"
                )
            if four_letter_word(self.host, self.port, "ruok", 1.0) == "imok":
                # Make sure it is *our* server answering on that port.
                conf = four_letter_word(self.host, self.port, "conf", 1.0)
                if expected in conf:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ZooKeeper did not answer 'ruok' on {self.hosts} within "
                    f"{timeout}s; log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 10):
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def restart(self, timeout: float = 30):
        self.stop()
        return self.start(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"<ZooKeeperServer {self.data_dir} port={self.port} running={self.running}>"


# command line (detached server managed through a pid file) -----------------

def _is_our_zk(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and MAIN_CLASS.encode() in cmdline


def cli_start(directory: Path, port: int | None, timeout: float, production: bool = False) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    pid_file = directory / PID_FILE
    port_file = directory / PORT_FILE
    if port is None and port_file.exists():
        port = int(port_file.read_text().strip())
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid and _is_our_zk(pid) and port and \
                four_letter_word("127.0.0.1", port, "ruok") == "imok":
            print(f"127.0.0.1:{port}")
            return 0
        pid_file.unlink()
    server = ZooKeeperServer(directory, port=port, detached=True, production=production)
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    pid_file.write_text(f"{server.pid}\n")
    port_file.write_text(f"{server.port}\n")
    # Leave the JVM running; drop our handles without terminating it.
    server._log_fh.close()
    server.process = None
    print(server.hosts)
    return 0


def cli_stop(directory: Path, timeout: float = 10) -> int:
    pid_file = directory / PID_FILE
    if not pid_file.exists():
        return 0
    pid = int(pid_file.read_text().strip() or 0)
    if pid and _is_our_zk(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_our_zk(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_our_zk(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _is_our_zk(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.zkserver",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", required=True, type=Path,
                   help="state directory (config, data, log, pid file)")
    p.add_argument("--port", type=int, default=None,
                   help="client port (default: a free one, reused on restart)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--production", action="store_true",
                   help="JVM and fsync settings as deployed (benchmarks), not the tests' fast start")
    args = p.parse_args(argv)
    directory = args.dir.resolve()
    if args.action == "start":
        return cli_start(directory, args.port, args.timeout, args.production)
    return cli_stop(directory)


if __name__ == "__main__":
    sys.exit(main())
