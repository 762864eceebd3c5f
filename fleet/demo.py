"""`python -m fleet demo`: a broker, the fleet, N virtual nodes, the dashboard and a platform.

The virtual nodes are the real firmware (firmware/node) running under CPython
on simulated boards (firmware/sim) with the devices of the boards/ profiles,
talking MQTT to a private mosquitto on a loopback port, each on its own
account behind the ACL; the fleet ingests what they send into SQLite, serves
the API and dashboard (a token for it is printed), and relays every
message's NGSI-LD entities to a stand-in for the city platform: a second
mosquitto with a collector (tools/platform.py). With --seconds the demo
stops by itself and prints a JSON summary on its last line.

Over-the-air updates work as in production (docs/ota.md): the demo makes a
signing key in <state>/keys on its first run and keeps releases in
<state>/releases, gives every node the public key ("ota_keys") and the API's
URL ("fleet_url"), runs the rollout engine with demo timings, and each node
lives across resets (sim.virtual.NodeLife: boot.py's slot selection, the
trial boot, the rollback). It prints the commands that build a release and
start a rollout.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from fleet.api_provision import PREFIXES
from fleet.mosquitto import Mosquitto

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("fleet.demo")


#: how often each node's clock catches up with real time when its firmware is not
#: waiting on it (the firmware's own sleeps catch it up too)
PACER_MS = 20

#: the demo's board mix, with the node id prefix provisioning gives each board
BOARDS = PREFIXES


def add_arguments(p) -> None:
    p.add_argument("--nodes", type=int, default=8, help="virtual nodes to start (default 8)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this long and print a JSON summary (default: run until Ctrl-C)")
    p.add_argument("--boards", default=",".join(BOARDS),
                   help="board profiles the nodes take in turn, by name in boards/ or path "
                        "(default: the Iwaki New Town mix %s)" % ",".join(BOARDS))
    p.add_argument("--window-s", type=int, default=10,
                   help="reporting window of the virtual nodes in seconds (default 10; boards say 60)")
    p.add_argument("--state", default=None, help="directory for the broker, database and node flash "
                                                  "(default: a new temporary directory)")
    p.add_argument("--root", default="iwaki", help="MQTT topic root (default iwaki)")
    p.add_argument("--api-port", type=int, default=8080,
                   help="port of the API and dashboard on 127.0.0.1 (default 8080; 0: a free port)")


def firmware_on_path() -> None:
    fw = str(REPO / "firmware")
    if fw not in sys.path:
        sys.path.insert(0, fw)
    import sim.cpython  # noqa: E402  (the one place CPython is adapted)
    sim.cpython.install()


def board_path(board: str) -> Path:
    p = Path(board)
    return p if p.suffix == ".toml" else REPO / "boards" / (board + ".toml")


def demo_profile(board: str, window_s: int) -> dict:
    from tools.boards import compile_board
    firmware_on_path()
    from node.config import check_profile
    p = compile_board(board_path(board))
    p["report"]["window_s"] = window_s
    p["report"]["health_s"] = window_s
    p["report"]["max_silence_s"] = window_s * 3
    p["report"]["event_window_s"] = min(p["report"]["event_window_s"], window_s)
    return check_profile(p)


def node_identity(i: int, root: str, broker: Mosquitto, prefix: str = "env", password: str = "") -> dict:
    node = "%s-%04d" % (prefix, i)
    return {"node": node, "root": root, "broker": {"host": broker.host, "port": broker.port},
            "user": node, "password": password}


async def run_nodes(nodes_spec: list[tuple[dict, dict]], state: Path, seconds: float | None,
                    on_tick=None) -> list:
    """Run virtual nodes, one per (profile, identity), on clocks paced to
    real time, for `seconds` (None: until SIGINT/SIGTERM). Each node lives
    across resets (`sim.virtual.NodeLife`), so an update can reboot it.

    Every node has a clock of its own, as every board does: a clock finds
    its next event among the listeners of its devices, so one shared clock
    would cost each event a pass over the devices of every node."""
    firmware_on_path()
    from sim.clock import PacedClock
    from sim.virtual import NodeLife
    nodes, pacers = [], []
    for n, (profile, ident) in enumerate(nodes_spec):
        root = state / "nodes" / ident["node"]
        root.mkdir(parents=True, exist_ok=True)
        clock = PacedClock(step_ms=PACER_MS)
        pacers.append(asyncio.create_task(clock.run()))
        nodes.append(NodeLife(profile, ident, str(root), clock, asyncio.open_connection, seed=n))
    tasks = [asyncio.create_task(life.run()) for life in nodes]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await asyncio.wait_for(stop.wait(), seconds) if seconds else await stop.wait()
    except asyncio.TimeoutError:
        pass
    if on_tick:
        on_tick()
    for life in nodes:
        await life.stop()
    for t in tasks:
        t.cancel()
    for life, r in zip(nodes, await asyncio.gather(*tasks, return_exceptions=True)):
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            log.error("node %s crashed: %r", life.identity["node"], r)
    for pacer in pacers:
        pacer.cancel()
    return nodes


def ota_keys(state: Path) -> list[str]:
    """The demo's OTA setup: a signing key made on the first run in <state>/keys and
    releases in <state>/releases, set as IWAKI_KEYS_DIR / IWAKI_RELEASES_DIR (which
    fleet.keys and fleet.releases read, here and in the API). Returns the public keys for
    the nodes' identity "ota_keys"; raises KeysError when no key can be kept there."""
    from fleet import keys as K
    from fleet import releases as R
    keys_dir = state / "keys"
    if not (keys_dir / K.PUBLIC).exists():
        K.create(keys_dir)
    pub = list(K.public_keys(keys_dir).values())
    K.load_signer(keys_dir)  # readable, and private to this user
    os.environ[K.KEYS_DIR_ENV] = str(keys_dir)
    os.environ[R.RELEASES_DIR_ENV] = str(state / "releases")
    return pub


def next_version(db: Path) -> str:
    """A version newer than the firmware's and every release so far (for the printed commands)."""
    from fleet import releases as R
    from fleet.registry import Registry
    firmware_on_path()
    from node import VERSION
    with Registry(str(db)) as reg:
        known = [VERSION] + [r["version"] for r in R.releases(reg)]
    major, minor, _ = max(R.version_key(v) for v in known)
    return f"{major}.{minor + 1}.0"


def ota_help(state: Path, db: Path, url: str, version: str) -> list[str]:
    """The lines that tell an operator how to update the demo's nodes from another terminal."""
    py, q = shlex.quote(sys.executable), shlex.quote
    env = f"IWAKI_KEYS_DIR={q(str(state / 'keys'))} IWAKI_RELEASES_DIR={q(str(state / 'releases'))}"
    return ["demo: over-the-air updates: once the nodes are online, build a signed release and roll "
            "it out from another terminal:",
            f"demo:   {env} {py} -m fleet release build --version {version} --db {q(str(db))}",
            f"demo:   {py} -m fleet rollout start --release {version} --wave 1 --wave 100% --soak 10 "
            f"--db {q(str(db))}",
            f"demo: watch (pause, resume, abort) it on {url}/#/rollouts or with: "
            f"{py} -m fleet rollout list --db {q(str(db))}"]


def rollout_engine(settings, ingest, url: str, window_s: int):
    """The rollout engine with demo timings: a round every 2 s, a node that says nothing
    about its update for 2 minutes times out, and a trial of two reporting windows (a
    node normally commits after 10 good ticks and says so itself). Its changes are
    printed to stderr as "demo: rollout ..." lines."""
    from fleet.rollouts import Rollouts
    rlog = logging.getLogger("fleet.rollouts")
    rlog.setLevel(logging.ERROR)  # no warning about the loopback URL: the nodes are on this host
    engine = Rollouts(settings, ingest, base_url=url, step_timeout_s=120, offline_wait_s=300,
                      trial_s=2 * window_s)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("demo: %(message)s"))
    rlog.addHandler(handler)
    rlog.propagate = False
    rlog.setLevel(logging.INFO)
    return engine.start(every_s=2)


def run(args) -> int:
    from fleet import credentials, tokens
    from fleet.api import create_app
    from fleet.keys import KeysError
    from fleet.ingest import Ingest
    from fleet.registry import Registry
    from fleet.relay import Relay
    from fleet.server import ApiServer
    from fleet.settings import get_settings
    from tools.platform import EntityStore, MqttCollector

    if args.nodes < 1:
        print("fleet: --nodes must be at least 1", file=sys.stderr)
        return 2
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="iwaki-demo-"))
    state.mkdir(parents=True, exist_ok=True)
    boards = [b.strip() for b in args.boards.split(",") if b.strip()]
    for b in boards:
        if not board_path(b).exists():
            print(f"fleet: no board profile {b!r} (boards: {', '.join(BOARDS)})", file=sys.stderr)
            return 2
    profiles = {b: demo_profile(b, args.window_s) for b in boards}
    db = state / "fleet.db"
    try:
        pub = ota_keys(state)
    except KeysError as exc:
        pub = None
        print(f"demo: no over-the-air updates in this demo: {exc}", file=sys.stderr)
    # as in production: an account per device, hashes only, and the ACL
    names = ["%s-%04d" % (BOARDS.get(boards[i % len(boards)], "node"), i + 1) for i in range(args.nodes)]
    with Registry(str(db)) as reg:
        have = {a["account"] for a in credentials.accounts(reg) if a["revoked_at"] is None}
        passwords = {n: credentials.issue(reg, n, "node", "demo", rotate=n in have) for n in names}
        passwords["iwaki-fleet"] = credentials.issue(reg, "iwaki-fleet", "fleet", "demo",
                                                   rotate="iwaki-fleet" in have)
        passwd, acl = credentials.broker_config(reg, state / "broker-conf", args.root)
        token = tokens.issue(reg, f"demo-operator-{int(time.time())}", "operator", "demo")
    broker = Mosquitto(state / "broker", extra_conf=f"password_file {passwd}\nacl_file {acl}\n"
                                                    "allow_anonymous false\n").start()
    platform = Mosquitto(state / "platform-broker").start()
    store = EntityStore()
    collector = MqttCollector(store, platform.port, prefix="city/iwaki").start()
    settings = get_settings().override(db=str(db), mqtt_host=broker.host, mqtt_port=broker.port, root=args.root,
                                       mqtt_user="iwaki-fleet", mqtt_password=passwords["iwaki-fleet"],
                                       upstream_mqtt=f"mqtt://{platform.host}:{platform.port}/city/iwaki",
                                       client_id="iwaki-fleet-demo", api_port=args.api_port)
    relay = Relay(settings).start()
    ingest = Ingest(settings)
    ingest.after_commit = relay.wake
    ingest.start()
    try:
        api = ApiServer(create_app(settings, ingest=ingest, relay=relay), "127.0.0.1", args.api_port).start()
    except OSError:
        ingest.stop()
        relay.stop()
        collector.stop()
        for b in (broker, platform):
            b.stop()
        raise
    print(f"demo: broker on {broker.host}:{broker.port}, database {db}", file=sys.stderr)
    print(f"demo: city platform stand-in on {platform.host}:{platform.port} (topics city/iwaki/#)", file=sys.stderr)
    print(f"demo: {args.nodes} virtual nodes ({', '.join(boards)}), window {args.window_s} s; "
          f"watch them with: python -m fleet nodes --db {db}", file=sys.stderr)
    print(f"demo: dashboard on {api.url}/ - sign in with the operator token {token}", file=sys.stderr)
    engine = None
    if pub:
        for line in ota_help(state, db, api.url, next_version(db)):
            print(line, file=sys.stderr)
        engine = rollout_engine(settings, ingest, api.url, args.window_s)
    summary = {}
    with Registry(str(db)) as reg:
        delivered_before = reg.upstream_stats()["delivered"]  # by earlier runs on this --state

    def relayed():
        """The relay's figures once the outbox is empty and the platform has what was
        delivered (each wait at most 10 s)."""
        deadline = time.monotonic() + 10
        while relay.backlog() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Registry(str(db)) as reg:
            up = reg.upstream_stats()
        deadline = time.monotonic() + 10
        while store.received + collector.bad < up["delivered"] - delivered_before and time.monotonic() < deadline:
            time.sleep(0.1)
        summary.update({"delivered_upstream": up["delivered"], "upstream_backlog": up["backlog"],
                        "platform_entities": len(store.entities)})

    def snapshot():
        ingest.wait_idle(5)
        relayed()
        with Registry(str(db)) as reg:
            s = reg.stats()
        summary.update({"nodes": args.nodes, "nodes_online": s["nodes_online"],
                        "telemetry_stored": s["telemetry_stored"], "invalid": s["invalid"],
                        "duplicates": s["duplicates"]})

    spec = []
    for i in range(args.nodes):
        b = boards[i % len(boards)]
        prefix = BOARDS.get(b, "node")
        ident = node_identity(i + 1, args.root, broker, prefix, passwords[names[i]])
        if pub:
            ident.update(ota_keys=pub, fleet_url=api.url)
        spec.append((profiles[b], ident))
    t0 = time.monotonic()
    try:
        asyncio.run(run_nodes(spec, state, args.seconds, on_tick=snapshot))
    finally:
        if engine is not None:
            engine.stop()
        ingest.wait_idle(5)
        if summary:
            relayed()  # what the nodes said as they stopped is relayed too
        api.stop()
        ingest.stop()
        relay.stop()
        collector.stop()
        broker.stop()
        platform.stop()
    summary["seconds"] = round(time.monotonic() - t0, 1)
    order = ("nodes", "nodes_online", "telemetry_stored", "invalid", "duplicates", "delivered_upstream",
             "upstream_backlog", "platform_entities", "seconds")  # as docs/cli.md shows it
    print(json.dumps({k: summary[k] for k in order if k in summary}))
    return 0
