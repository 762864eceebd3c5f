"""A stand-in for the city data platform, for tests, benchmarks and the demo.

It takes what the fleet's relay delivers, the way an NGSI-LD context broker
with a temporal store would, and keeps count:

    store = EntityStore()
    with NgsiLdServer(store) as server:          # HTTP: POST /ngsi-ld/v1/entityOperations/upsert
        ... IWAKI_UPSTREAM_HTTP = server.url
    with MqttCollector(store, port=1884, prefix="city/iwaki"):   # MQTT: <prefix>/<type>/<id>
        ...

`EntityStore.upsert(entity)` merges the entity's attributes into the
current entity of that id and records each (entity id, attribute,
observedAt) once: the history an idempotent upsert leaves. `received`
counts every delivery, `redelivered` those already in the history, so a
test sees both that nothing was lost and that at-least-once delivery
left no duplicate behind.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert"


class EntityStore:
    """Current entities by id, and the history of observations (see the module docstring)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entities: dict[str, dict] = {}
        self.history: dict[tuple[str, str, str], object] = {}
        self.received = 0
        self.redelivered = 0
        self.order: list[tuple[str, str]] = []   # (entity id, observedAt) of first arrivals, in arrival order

    def upsert(self, entity: dict) -> None:
        if not isinstance(entity, dict) or not isinstance(entity.get("id"), str) or "type" not in entity:
            raise ValueError("an entity needs an id and a type")
        with self.lock:
            self.received += 1
            current = self.entities.setdefault(entity["id"], {"id": entity["id"], "type": entity["type"]})
            new = None
            for name, attr in entity.items():
                if name in ("id", "type", "@context"):
                    continue
                current[name] = attr
                if isinstance(attr, dict) and "observedAt" in attr:
                    key = (entity["id"], name, attr["observedAt"])
                    if key not in self.history:
                        new = max(new or "", attr["observedAt"])
                        self.history[key] = attr.get("value", attr.get("object"))
            if new is not None:
                self.order.append((entity["id"], new))
            else:
                self.redelivered += 1

    def observations(self, entity_id: str | None = None) -> set[tuple[str, str, str]]:
        with self.lock:
            return {k for k in self.history if entity_id is None or k[0] == entity_id}


class _Handler(BaseHTTPRequestHandler):
    store: EntityStore
    refuse: set

    def do_POST(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path != UPSERT_PATH:
            return self._answer(404, {"type": "https://uri.etsi.org/ngsi-ld/errors/ResourceNotFound",
                                      "title": f"no {path}"})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(body, list):
                raise ValueError("the body must be a JSON array of entities")
        except ValueError as exc:
            return self._answer(400, {"type": "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
                                      "title": str(exc)})
        errors, ok = [], []
        for entity in body:
            try:
                if entity.get("type") in self.refuse:
                    raise ValueError(f"type {entity['type']} is not accepted here")
                self.store.upsert(entity)
                ok.append(entity["id"])
            except (ValueError, AttributeError, TypeError) as exc:
                errors.append({"entityId": entity.get("id") if isinstance(entity, dict) else None,
                               "error": {"type": "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
                                         "title": str(exc)}})
        if errors:
            return self._answer(207, {"success": ok, "errors": errors})
        self.send_response(204)
        self.end_headers()

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


class NgsiLdServer:
    """An NGSI-LD broker's batch upsert endpoint on loopback; `refuse` names entity types it
    answers with a per-entity error (207), to test permanent refusals. Restartable on its port."""

    def __init__(self, store: EntityStore, port: int = 0, refuse: set[str] | None = None):
        self.store = store
        self.port = port
        self.refuse = set(refuse or ())
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NgsiLdServer":
        handler = type("Handler", (_Handler,), {"store": self.store, "refuse": self.refuse})
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="ngsi-ld-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class MqttCollector:
    """The platform's side of its MQTT broker: subscribes to `<prefix>/#` with a persistent
    session (QoS 1) and upserts every entity into the store."""

    def __init__(self, store: EntityStore, port: int, prefix: str = "iwaki/ngsi-ld", host: str = "127.0.0.1",
                 client_id: str = "platform-collector", user: str | None = None, password: str | None = None):
        self.store = store
        self.prefix = prefix
        self.bad = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        if user:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def _on_message(self, client, userdata, message) -> None:
        try:
            entity = json.loads(message.payload)
            if message.topic != f"{self.prefix}/{entity['type']}/{entity['id']}":
                raise ValueError(f"entity {entity['id']} on the wrong topic {message.topic}")
            self.store.upsert(entity)
        except (ValueError, KeyError, TypeError):
            self.bad += 1

    def start(self, timeout: float = 5.0) -> "MqttCollector":
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError(f"could not subscribe on the platform broker at {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
