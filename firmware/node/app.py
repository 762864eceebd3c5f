# The node application: sensors from the board profile, the sampling loop,
# reporting windows, health, and the uplink, wired together. Hardware, clock,
# filesystem root and the network are handed in (see main.py, sim/virtual.py).
import asyncio

from node import VERSION
from node.bootinfo import next_boot, reset_cause_name
from node.clock import Uptime
from node.config import profile_hash
from node.health import health_body
from node.outbox import Outbox
from node.sampler import Sampler, Ticker
from node.sensors import SensorError
from node.uplink import Uplink

# sensor kind -> (module, class, needs a blocking delay): imported only when
# a board uses it
DRIVERS = {
    "bme280": ("node.sensors.bme280", "BME280", False),
    "scd4x": ("node.sensors.scd4x", "SCD4x", True),
    "pms5003": ("node.sensors.pms5003", "PMS5003", False),
}


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _make_driver(kind, bus, address, clock):
    mod, cls, delay = DRIVERS[kind]
    c = getattr(__import__(mod, None, None, [cls]), cls)
    args = [bus] if address is None else [bus, address]
    return c(*args, delay_ms=clock.delay_ms) if delay else c(*args)


class Node:
    def __init__(self, hw, clock, profile, identity, root, connect, rssi=None, vbat_mv=None):
        self.hw = hw
        self.clock = clock
        self.profile = profile
        self.fw = VERSION
        self.rssi = rssi
        self.vbat_mv = vbat_mv
        self.boot = next_boot(root + "/bootcount")
        self.reset_cause = reset_cause_name(hw.reset_cause())
        self.config_hash = profile_hash(profile)
        self.uptime = Uptime(clock)
        self.drivers = []
        pairs = []
        buses = {}
        for s in profile["sensors"]:
            drv = _make_driver(s["kind"], self._bus(s["bus"], buses), s.get("address"), clock)
            self.drivers.append(drv)
            pairs.append((drv, s["period_ms"]))
        base = 0
        for _, p in pairs:
            base = _gcd(base, p)
        self.base_ms = base
        rep = profile["report"]
        self.window_ticks = max(1, rep["window_s"] * 1000 // base)
        self.health_ticks = max(1, rep["health_s"] * 1000 // base)
        self.silence_windows = max(1, rep.get("max_silence_s", rep["window_s"]) // rep["window_s"])
        self.sampler = Sampler(pairs, base, deadbands=rep.get("deadband"))
        self.ticker = None
        self.outbox = Outbox(root + "/outbox", max_bytes=profile["outbox"]["limit_bytes"])
        self.uplink = Uplink(identity, clock, self.uptime, self.outbox, self.boot, connect,
                             self.birth_body, keepalive=profile["mqtt"]["keepalive_s"],
                             on_command=self.command)
        self.running = False
        self._up = None
        self.windows_silent = 0
        self.windows_sent = 0

    def _bus(self, ref, buses):
        if ref in buses:
            return buses[ref]
        kind, name = ref.split(".", 1)
        hw = self.hw
        if kind == "i2c":
            c = self.profile["i2c"][name]
            bus = hw.I2C(c["id"], scl=hw.Pin(c["scl"]), sda=hw.Pin(c["sda"]), freq=c["freq_hz"])
        else:
            c = self.profile["uart"][name]
            bus = hw.UART(c["id"], baudrate=c["baud"], tx=c["tx"], rx=c["rx"])
        buses[ref] = bus
        return bus

    def birth_body(self):
        s = self.sampler
        rep = self.profile["report"]
        return {"fw": self.fw, "board": self.profile["name"], "chip": self.profile["chip"],
                "config_hash": self.config_hash, "reset_cause": self.reset_cause,
                "boot_count": self.boot,
                "channels": dict((n, {"sensor": s.owner[i]}) for i, n in enumerate(s.names)),
                "report": {"window_s": rep["window_s"], "health_s": rep["health_s"]}}

    def start_sensors(self):
        for d in self.drivers:
            try:
                d.begin()
            except (SensorError, OSError) as e:
                d.status = "failed"
                self.uplink.publish("event", {"event": "sensor.failed", "severity": "warning",
                                              "data": {"sensor": d.KIND, "reason": str(e)}})

    def command(self, name, args):
        if name == "ping":
            return {"up_ms": self.uptime.ms()}
        if name == "health":
            self.report_health()
            return {"queued": True}
        raise ValueError("unknown command")

    def report_window(self):
        agg, changed = self.sampler.close_window()
        if not agg:
            return
        self.windows_silent += 1
        if changed or self.windows_silent >= self.silence_windows:
            self.uplink.publish("telemetry", {
                "window": {"s": self.profile["report"]["window_s"], "end_up_ms": self.uptime.ms()},
                "ch": agg, "reason": "change" if changed else "heartbeat"})
            self.sampler.mark_reported(agg)
            self.windows_silent = 0
            self.windows_sent += 1

    def report_health(self):
        self.uplink.publish("health", health_body(self, self.ticker.stats() if self.ticker else
                                                  {"lag_max_ms": 0, "lag_mean_ms": 0, "overruns": 0, "ticks": 0}))

    async def sample_loop(self):
        clock = self.clock
        t = self.ticker = Ticker(clock, self.base_ms)
        wdt = self.hw.WDT(timeout=self.profile["wdt"]["timeout_ms"])
        limit = self.profile["wdt"]["timeout_ms"] // 2
        n = 0
        while self.running:
            w = t.wait_ms()
            if w > 0:
                await clock.sleep_ms(w)
            lag = t.mark()
            self.sampler.step()
            n += 1
            if n % self.window_ticks == 0:
                self.report_window()
            if n % self.health_ticks == 0:
                self.report_health()
            # fed only while the loop keeps time and the uplink task is alive
            if lag < limit and not (self._up and self._up.done()):
                wdt.feed()
            if w <= 0:
                await asyncio.sleep_ms(0)  # never starve the uplink

    async def run(self):
        self.running = True
        self.start_sensors()
        self._up = asyncio.create_task(self.uplink.run())
        try:
            await self.sample_loop()
        finally:
            # stopped or killed: the uplink goes with the loop; without a
            # clean stop() first, the broker sees a dead node (last will)
            self.running = False
            self.uplink.kill()
            self._up.cancel()

    async def stop(self):
        self.running = False
        await self.uplink.stop()
