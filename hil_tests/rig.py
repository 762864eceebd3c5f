"""The test rig: a board (the virtual one, tools.vboard, when there is no real one) and a private
fleet (a real mosquitto that checks passwords, the registry, the ingest service and the API on
loopback) that provisioning talks to. Used by hil_tests/ and tests/tools/.

    with LocalFleet(tmp / "fleet") as fleet, VirtualBoard("boards/env-station.toml", tmp / "vb") as vb:
        tools.provision.provision(vb.port, "boards/env-station.toml", "bench", fleet.url, fleet.token)
        vb.control("power-cycle")
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def api(fleet, path: str, token: str | None = None) -> dict:
    """GET from the fleet's API (`fleet.url`) with the technician's token (or `token`)."""
    from tools.provision import Fleet
    client = Fleet(fleet.url, token or fleet.token)
    try:
        return client.json("GET", path)
    finally:
        client.close()


def wait_until(check, timeout: float, what: str, every: float = 0.5):
    """check() until it returns something true (returned); AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(every)


def vboard_unavailable() -> str | None:
    """Why the virtual board cannot run here, or None when it can."""
    try:
        import tools.vboard  # noqa: F401
    except ImportError as exc:
        return f"the virtual board (tools.vboard) is not available: {exc}"
    from tools.mpvm import vm_available
    return vm_available()


class VirtualBoard:
    """`python -m tools.vboard` as a child process: `port` is its pty, `control()` the rig's socket
    (docs/hil.md: power-cycle, reset, unplug, plug, pin, adc, fault, status)."""

    def __init__(self, board, state_dir, link: str | os.PathLike | None = None, scenario: str = "live"):
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state / "vboard.log"
        args = [sys.executable, "-m", "tools.vboard", "--board", str(board), "--state", str(self.state),
                "--scenario", scenario]
        if link:
            args += ["--link", str(link)]
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.port = self._next_line(20)

    def _next_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"the virtual board did not start: {self.log_path.read_text()[-2000:]}")
        return line

    def control(self, cmd: str, **args) -> dict:
        from tools.vboard.control import request
        answer = request(self.state / "control.sock", cmd, **args)
        if cmd == "plug":
            self.port = answer["port"]
            self._next_line(5)  # the vboard prints the new port too
        return answer

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class LocalFleet:
    """A private fleet: mosquitto with per-device accounts and the ACL (reloaded by the API when a
    board is provisioned), the registry, Ingest and the API, and with `rollouts` the OTA rollout engine
    (ticking every second). `token` is a technician's, `admin` an admin's; `settings` overrides the
    fleet's Settings fields."""

    def __init__(self, state_dir, rollouts: bool = False, **settings):
        from fleet import credentials, tokens
        from fleet.api import create_app
        from fleet.ingest import Ingest
        from fleet.mosquitto import Mosquitto
        from fleet.registry import Registry
        from fleet.server import ApiServer
        from fleet.settings import Settings

        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "fleet.db"
        conf = self.dir / "broker-conf"
        with Registry(self.db) as reg:
            fleet_password = credentials.issue(reg, "iwaki-fleet", "fleet", "rig")
            passwd, acl = credentials.broker_config(reg, conf)
            self.token = tokens.issue(reg, "bench-tech", "technician", "rig")
            self.admin = tokens.issue(reg, "bench-admin", "admin", "rig")
        self.broker = Mosquitto(self.dir / "broker", extra_conf=f"password_file {passwd}\nacl_file {acl}\n"
                                                                "allow_anonymous false\n").start()
        pid_file = self.dir / "mosquitto.pid"
        pid_file.write_text(f"{self.broker.proc.pid}\n")
        self.settings = Settings(db=str(self.db), mqtt_host=self.broker.host, mqtt_port=self.broker.port,
                                 mqtt_user="iwaki-fleet", mqtt_password=fleet_password,
                                 client_id=f"iwaki-fleet-{os.getpid()}", broker_conf_dir=str(conf),
                                 broker_pid_file=str(pid_file)).override(**settings)
        self.ingest = Ingest(self.settings, reconnect_delay=(0.1, 0.5)).start()
        self.server = ApiServer(create_app(self.settings, ingest=self.ingest, dashboard=None)).start()
        self.url = self.server.url
        self.rollouts = None
        if rollouts:
            from fleet.rollouts import Rollouts
            self.rollouts = Rollouts(self.settings, self.ingest, base_url=self.url, step_timeout_s=120,
                                     trial_s=60).start(every_s=1)

    def registry(self):
        from fleet.registry import Registry
        return Registry(self.db, create=False)

    def node(self, node_id: str) -> dict | None:
        with self.registry() as reg:
            return reg.node(node_id)

    def wait_for(self, predicate, timeout: float, what: str, every: float = 0.25):
        """predicate(registry) until it returns something true; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.registry() as reg:
                found = predicate(reg)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f} s")
            time.sleep(every)

    def stop(self) -> None:
        if self.rollouts is not None:
            self.rollouts.stop()
        self.server.stop()
        self.ingest.stop()
        self.broker.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
