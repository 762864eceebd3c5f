"""`python -m fleet <command>`: the fleet manager's command line.

Commands are a table of name -> (module, add_arguments, run, help), as in
mpremote. A command's module is imported only when that command runs, so a
command whose module is missing (or broken) does not break the others.
Each handler is a thin layer over a documented Python API (`fleet.ingest`,
`fleet.registry`).

Errors: each layer has one exception type; here they become
`fleet: <message>` on stderr and exit status 1 (2 for bad usage or
settings), without a traceback. A traceback means a bug.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from datetime import datetime

from fleet.output import print_rows
from fleet.registry import Registry, RegistryError, parse_iso, utc_now
from fleet.settings import SettingsError, get_settings

PROG = "fleet"

#: name -> (module, add_arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "serve": ("fleet.cli", "add_serve_arguments", "run_serve",
              "receive the nodes' MQTT messages and store them in the registry"),
    "nodes": ("fleet.cli", "add_nodes_arguments", "run_nodes",
              "list the nodes in the registry"),
    "credentials": ("fleet.cli", "add_credentials_arguments", "run_credentials",
                    "issue, rotate, revoke and list per-device MQTT accounts"),
    "alerts": ("fleet.cli", "add_alerts_arguments", "run_alerts",
               "list open health alerts, or acknowledge one"),
    "broker-config": ("fleet.cli", "add_broker_config_arguments", "run_broker_config",
                      "write mosquitto's password and ACL files from the registry"),
    "tokens": ("fleet.cli", "add_tokens_arguments", "run_tokens",
               "issue, revoke and list the HTTP API's bearer tokens"),
    "keys": ("fleet.keys", "add_arguments", "run",
             "create, rotate and show the Ed25519 key that signs OTA releases"),
    "release": ("fleet.releases", "add_arguments", "run",
                "build, list, show and verify signed OTA releases"),
    "rollout": ("fleet.rollouts", "add_arguments", "run",
                "start, list, show, pause, resume and abort OTA rollouts"),
    # -- demo: written separately in fleet/demo.py (add_arguments(parser), run(args) -> int).
    # -- Imported only when chosen; `fleet demo` says so if the module is not there.
    "demo": ("fleet.demo", "add_arguments", "run",
             "run the Iwaki New Town demo (broker, fleet, virtual nodes)"),
}


class UsageError(Exception):
    """The command line or the settings are wrong (exit status 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are a user's or the environment's problem, not a bug."""
    from fleet.ingest import IngestError
    from fleet.mosquitto import BrokerError
    from fleet.schemas import PayloadError
    from fleet.credentials import CredentialError
    from fleet.health import AlertError
    from fleet.tokens import TokenError
    from fleet.keys import KeysError
    from fleet.releases import ReleaseError
    from fleet.rollouts import RolloutError
    return (KeysError, ReleaseError, RolloutError, TokenError, AlertError, CredentialError, RegistryError,
            IngestError, BrokerError, PayloadError, OSError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=PROG, description="Iwaki fleet manager")
    sub = parser.add_subparsers(dest="command", metavar="command")
    subparsers = {name: sub.add_parser(name, help=entry[3], description=entry[3])
                  for name, entry in COMMANDS.items()}
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        parser.parse_args(argv)  # prints help or the usage error and exits
        parser.print_usage(sys.stderr)
        return 2
    module_name, add_name, run_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module_name
        _error(f"{name} is not available" + ("" if missing else f" ({exc})"))
        return 1
    getattr(module, add_name)(subparsers[name])
    args = parser.parse_args(argv)
    try:
        return int(getattr(module, run_name)(args) or 0)
    except (UsageError, SettingsError) as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except _user_errors() as exc:
        _error(str(exc))
        return 1


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _settings(**flags):
    """The environment's settings with the given command-line values over them."""
    return get_settings().override(**flags)


# -- serve ----------------------------------------------------------------------

def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--host", help="MQTT broker host (IWAKI_MQTT_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="MQTT broker port (IWAKI_MQTT_PORT, default 1883)")
    p.add_argument("--user", help="MQTT user name (IWAKI_MQTT_USER)")
    p.add_argument("--password", help="MQTT password (IWAKI_MQTT_PASSWORD; prefer the variable)")
    p.add_argument("--root", help="topic root (IWAKI_ROOT, default iwaki)")
    p.add_argument("--client-id", help="MQTT client id; keep it stable (IWAKI_MQTT_CLIENT_ID, default iwaki-fleet)")
    p.add_argument("--offline-after", type=float, metavar="S",
                   help="seconds of silence before a node is offline (IWAKI_OFFLINE_AFTER_S, default 180)")
    p.add_argument("--upstream-mqtt", metavar="URL",
                   help="relay to the platform's MQTT broker, mqtt://[user:pass@]host[:port][/prefix] "
                        "(IWAKI_UPSTREAM_MQTT)")
    p.add_argument("--upstream-http", metavar="URL",
                   help="relay to the platform's NGSI-LD broker by batch upserts, http(s)://host[:port] "
                        "(IWAKI_UPSTREAM_HTTP)")
    p.add_argument("--share-group", metavar="NAME",
                   help="share the nodes' messages with the other workers of this group "
                        "($share/NAME/...; IWAKI_SHARE_GROUP); give each worker its own --client-id")
    p.add_argument("--api-host", help="address for the HTTP API and dashboard (IWAKI_API_HOST, default 127.0.0.1)")
    p.add_argument("--api-port", type=int, metavar="PORT",
                   help="port for the HTTP API and dashboard, 0 for none (IWAKI_API_PORT, default 8080)")
    p.add_argument("--report-every", type=float, default=60.0, metavar="S",
                   help="log the message counts every S seconds (default 60)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_serve(args: argparse.Namespace) -> int:
    """Run the ingest, the relay (when an upstream is set) and the API until SIGINT or SIGTERM."""
    from fleet.ingest import Ingest

    settings = _settings(db=args.db, mqtt_host=args.host, mqtt_port=args.port, mqtt_user=args.user,
                         mqtt_password=args.password, root=args.root, client_id=args.client_id,
                         offline_after_s=args.offline_after, upstream_mqtt=args.upstream_mqtt,
                         upstream_http=args.upstream_http, share_group=args.share_group,
                         api_host=args.api_host, api_port=args.api_port)
    if args.report_every <= 0:
        raise UsageError("--report-every must be positive")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log = logging.getLogger("fleet.serve")
    log.info("serving: broker %s:%d, root %r, registry %s%s", settings.mqtt_host, settings.mqtt_port,
             settings.root, settings.db, f", share group {settings.share_group}" if settings.share_group else "")
    ingest = Ingest(settings)
    relay = api = None
    if settings.relays:
        from fleet.relay import Relay, redact
        relay = Relay(settings, process=True).start()  # its own process: storing and delivering on two cores
        ingest.after_commit = relay.wake
        log.info("relaying to %s", " and ".join(redact(u) for u in (settings.upstream_mqtt, settings.upstream_http)
                                                  if u))
    rollouts = None
    try:
        if settings.api_port:
            # the process that serves the API also runs the OTA rollouts (one engine per fleet)
            from fleet.rollouts import Rollouts
            from fleet.server import serve_in_thread
            api = serve_in_thread(settings, ingest=ingest, relay=relay)
            log.info("API and dashboard on http://%s:%d/", settings.api_host, api.port)
            rollouts = Rollouts(settings, ingest).start(every_s=5.0)
        ingest.run(stop, report_every=args.report_every)
    finally:
        if rollouts is not None:
            rollouts.stop()
        if api is not None:
            api.stop()
        if relay is not None:
            relay.stop()
    return 0


# -- nodes ----------------------------------------------------------------------

def add_nodes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the nodes' records")


def run_nodes(args: argparse.Namespace) -> int:
    settings = _settings(db=args.db)
    with Registry(settings.db, create=False) as registry:
        rows = registry.nodes()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(nodes_table(rows), end="")
    return 0


def add_credentials_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("issue", "revoke", "list"),
                   help="issue: a new account (or --rotate its password); revoke; list")
    p.add_argument("account", nargs="?", help="account name: the node id, or the fleet's or platform's")
    p.add_argument("--kind", choices=("node", "fleet", "platform"), default="node",
                   help="account kind for issue (default node)")
    p.add_argument("--rotate", action="store_true", help="replace an existing account's password")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"),
                   help="who does this, for the audit log (default $USER)")


def run_credentials(args: argparse.Namespace) -> int:
    from fleet import credentials
    settings = _settings(db=args.db)
    if args.action != "list" and not args.account:
        raise UsageError(f"credentials {args.action} needs an account name")
    with Registry(settings.db) as registry:
        if args.action == "issue":
            password = credentials.issue(registry, args.account, args.kind, args.actor, args.rotate)
            print(f"{args.account}: {password}")
            print("shown once: give it to the device now; only its hash is kept", file=sys.stderr)
        elif args.action == "revoke":
            credentials.revoke(registry, args.account, args.actor)
            print(f"{args.account}: revoked; run `fleet broker-config` and reload the broker", file=sys.stderr)
        else:
            for a in credentials.accounts(registry):
                state = "revoked " + a["revoked_at"] if a["revoked_at"] else "active"
                print(f"{a['account']:<32} {a['kind']:<9} {state}")
    return 0


def add_alerts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("list", "ack"), default="list",
                   help="list (default) or ack ALERT_ID")
    p.add_argument("alert_id", nargs="?", type=int, help="the alert to acknowledge")
    p.add_argument("--all", action="store_true", help="closed alerts too")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"),
                   help="who acknowledges, for the audit log (default $USER)")


def run_alerts(args: argparse.Namespace) -> int:
    from fleet import health
    settings = _settings(db=args.db)
    with Registry(settings.db, create=False) as registry:
        if args.action == "ack":
            if args.alert_id is None:
                raise UsageError("alerts ack needs an alert id")
            a = health.acknowledge(registry, args.alert_id, args.actor)
            print(f"alert {a['id']} ({a['node']} {a['kind']}) acknowledged by {a['acked_by']}")
            return 0
        health.evaluate(registry)
        rows = health.alerts(registry, include_closed=args.all)
    def line(a: dict) -> str:
        state = "closed" if a["closed_at"] else ("acked" if a["acked_at"] else "OPEN")
        return (f"{a['id']:>5}  {state:<6}  {a['severity']:<8}  {a['node']:<12}  {a['kind']:<15}  "
                f"{a['opened_at']}  {a['message']}")

    print_rows(rows, args.json, "alerts", line)
    return 0


def add_broker_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the passwd and acl files")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--root", help="topic root (IWAKI_ROOT, default iwaki)")


def run_broker_config(args: argparse.Namespace) -> int:
    from fleet.credentials import broker_config
    settings = _settings(db=args.db, root=args.root)
    with Registry(settings.db, create=False) as registry:
        passwd, acl = broker_config(registry, args.out, settings.root)
    print(f"wrote {passwd} and {acl}; mosquitto.conf: password_file {passwd}, acl_file {acl}, "
          "allow_anonymous false; then reload mosquitto (SIGHUP)")
    return 0


# -- tokens ---------------------------------------------------------------------

def add_tokens_arguments(p: argparse.ArgumentParser) -> None:
    from fleet.tokens import ROLES
    p.add_argument("action", choices=("issue", "revoke", "list"),
                   help="issue: a token for NAME with --role; revoke NAME; list")
    p.add_argument("name", nargs="?", help="the token's name: who uses it (a person, grafana, the platform)")
    p.add_argument("--role", choices=ROLES, help="the token's role, for issue")
    p.add_argument("--json", action="store_true", help="list: print a JSON list of the tokens' records")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"),
                   help="who does this, for the audit log (default $USER)")


def run_tokens(args: argparse.Namespace) -> int:
    """`fleet.tokens` issue / revoke / list; an issued token is printed once, alone on stdout."""
    from fleet import tokens
    settings = _settings(db=args.db)
    if args.action != "list" and not args.name:
        raise UsageError(f"tokens {args.action} needs a token name")
    if args.action == "issue" and not args.role:
        raise UsageError(f"tokens issue needs --role ({', '.join(tokens.ROLES)})")
    with Registry(settings.db, create=args.action == "issue") as registry:
        if args.action == "issue":
            token = tokens.issue(registry, args.name, args.role, args.actor)
            print(token)
            print(f"{args.name} ({args.role}): shown once: send it as 'Authorization: Bearer <token>'; "
                  "only its hash is kept", file=sys.stderr)
        elif args.action == "revoke":
            tokens.revoke(registry, args.name, args.actor)
            print(f"{args.name}: revoked; the API refuses it from now on", file=sys.stderr)
        else:
            print_rows(tokens.tokens(registry), args.json, "tokens",
                       lambda t: f"{t['name']:<24} {t['role']:<10} "
                                 f"{'revoked ' + t['revoked_at'] if t['revoked_at'] else 'active':<32} "
                                 f"last used {t['last_used_at'] or 'never'}")
    return 0


#: (header, minimum width, value of a row); a wider value widens its column.
_COLUMNS = (
    ("NODE", 12, lambda r, now: r["id"]),
    ("STATE", 7, lambda r, now: r["state"]),
    ("LAST SEEN", 9, lambda r, now: age(r["last_seen"], now)),
    ("FW", 8, lambda r, now: r["fw"] or "-"),
    ("BOARD", 12, lambda r, now: r["board"] or "-"),
    ("BOOT", 5, lambda r, now: _num(r["boot"])),
    ("SEQ", 7, lambda r, now: _num(r["last_seq"])),
    ("GAPS", 5, lambda r, now: _num(r["gaps"])),
    ("DUPS", 5, lambda r, now: _num(r["duplicates"])),
)
_NUMERIC = {"BOOT", "SEQ", "GAPS", "DUPS"}


def nodes_table(rows: list[dict], now: datetime | None = None) -> str:
    """The `fleet nodes` table: one line per node, aligned columns, "(no nodes)" when empty."""
    now = now or utc_now()
    cells = [[value(r, now) for _, _, value in _COLUMNS] for r in rows]
    widths = [max([minimum] + [len(c[i]) for c in cells]) for i, (_, minimum, _) in enumerate(_COLUMNS)]

    def line(values):
        parts = [v.rjust(w) if h in _NUMERIC else v.ljust(w)
                 for v, w, (h, _, _) in zip(values, widths, _COLUMNS)]
        return "  ".join(parts).rstrip() + "\n"

    out = line([h for h, _, _ in _COLUMNS])
    out += "".join(line(c) for c in cells) if cells else "(no nodes)\n"
    return out


def age(when: str | None, now: datetime) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`, or `never`."""
    if not when:
        return "never"
    s = max(0, int((now - parse_iso(when)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _num(value) -> str:
    return "-" if value is None else str(value)
