"""A 3-node RabbitMQ cluster on this machine, started from the installed server.

Each node has its own name (``hcN-<id>@localhost``), AMQP port (127.0.0.1 only), data,
log and config files under one temporary directory owned by the broker's user, and no
plugins. Nodes 2 and 3 join node 1. The machine's own broker (``rabbit@localhost``) is
not touched. Stopped and removed afterwards, whatever the test did.

Needs the server's scripts (``/usr/lib/rabbitmq/bin``, Debian's rabbitmq-server) and
root or the broker's user to run them as; skipped with the reason elsewhere, failed under
CI (which installs the server), unless ``RABBIT_URL`` names a broker elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .requires import missing

SERVER_BIN = Path("/usr/lib/rabbitmq/bin")
BROKER_USER = "rabbitmq"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    home: Path

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


@dataclass
class Cluster:
    base: Path
    nodes: list[Node] = field(default_factory=list)

    def url(self, *order: int) -> str:
        """The node list URL, in ``order`` (default: 1, 2, 3; 1-based)."""
        return ",".join(self.nodes[i - 1].url() for i in order or range(1, len(self.nodes) + 1))

    def env(self, node: Node) -> dict[str, str]:
        return {
            "HOME": pwd.getpwnam(BROKER_USER).pw_dir,  # the Erlang cookie the CLI shares
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.home / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(node.home / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.home / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    async def run(self, node: Node, tool: str, *args: str) -> str:
        """Run one of the server's scripts for ``node``, as the broker's user."""
        env = self.env(node)
        argv = [str(SERVER_BIN / tool), *args]
        if os.geteuid() == 0:
            argv = [
                "runuser",
                "-u",
                BROKER_USER,
                "--",
                "env",
                *(f"{k}={v}" for k, v in env.items()),
                *argv,
            ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=node.home,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 90)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {node.name}: {text[-500:]}")
        return text

    async def ctl(self, node: Node, *args: str) -> str:
        return await self.run(node, "rabbitmqctl", "-n", node.name, *args)

    async def start_node(self, node: Node) -> None:
        await self.run(node, "rabbitmq-server", "-detached")
        for _ in range(60):  # -detached returns at once; the node takes a few seconds
            try:
                await self.ctl(node, "await_startup", "--timeout", "60")
                return
            except RuntimeError:
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{node.name} did not start; see {node.home / 'log'}")

    async def stop_node(self, node: Node) -> None:
        await self.ctl(node, "stop")

    async def start(self) -> None:
        for node in self.nodes:
            await self.start_node(node)
        for node in self.nodes[1:]:
            await self.ctl(node, "stop_app")
            await self.ctl(node, "join_cluster", self.nodes[0].name)
            await self.ctl(node, "start_app")

    async def remove(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(RuntimeError, TimeoutError):  # stopped already
                await self.stop_node(node)
            kill_if_running(node)
        shutil.rmtree(self.base, ignore_errors=True)


def kill_if_running(node: Node) -> None:
    """Kill the VM of a node that would not stop (its pid file's process, if its
    environment names the node, as the server's scripts set it: never a process that
    reused the pid)."""
    pid_file = node.home / "mnesia" / f"{node.name}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RABBITMQ_NODENAME={node.name}".encode() in environ:
            os.kill(pid, signal.SIGKILL)


def make_cluster(count: int = 3) -> Cluster:
    """The cluster's files (nothing started); skips (fails under CI) where it cannot run."""
    __tracebackhide__ = True
    install = "apt-get install rabbitmq-server"
    ci = not os.environ.get("RABBIT_URL")  # .ci/run installs the server unless RABBIT_URL is set
    if not (SERVER_BIN / "rabbitmq-server").exists():
        why = "starts the test's 3-node cluster"
        missing(str(SERVER_BIN / "rabbitmq-server"), why, install, ci=ci)
    try:
        broker_user = pwd.getpwnam(BROKER_USER)
    except KeyError:
        missing(f"user {BROKER_USER}", "runs the cluster's nodes", install, ci=ci)
    if os.geteuid() not in (0, broker_user.pw_uid):
        missing("root or the rabbitmq user", "runs the cluster's nodes", "run the tests as root")
    base = Path(tempfile.mkdtemp(prefix="hc-cluster-"))
    run_id = uuid.uuid4().hex[:6]
    cluster = Cluster(base)
    for number in range(1, count + 1):
        home = base / f"n{number}"
        home.mkdir()
        port = free_port()
        (home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq-env.conf").write_text("")
        cluster.nodes.append(Node(f"hc{number}-{run_id}@localhost", port, free_port(), home))
    for path in [base, *base.rglob("*")]:
        os.chown(path, broker_user.pw_uid, broker_user.pw_gid)
    return cluster
