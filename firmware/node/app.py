# The node application: sensors from the board profile, the sampling loop,
# reporting windows, health, and the uplink, wired together. Hardware, clock,
# filesystem root and the network are handed in (see main.py, sim/virtual.py).
import asyncio

from node import VERSION
from node.bootinfo import next_boot, reset_cause_name
from node.clock import Uptime
from node.config import profile_hash
from node.health import health_body
from node.ota import Ota
from node.outbox import Outbox
from node.sampler import Sampler, Ticker
from node.sensors import SensorError
from node.uplink import Uplink

# sensor kind -> (module, class, how it is built): imported only when a
# board uses it. "bus": cls(bus[, address]); "delay": the same plus a
# blocking delay function; "opts": cls(hardware, clock, options).
DRIVERS = {
    "bme280": ("node.sensors.bme280", "BME280", "bus"),
    "scd4x": ("node.sensors.scd4x", "SCD4x", "delay"),
    "pms5003": ("node.sensors.pms5003", "PMS5003", "bus"),
    "beam_pair": ("node.sensors.beams", "BeamPair", "opts"),
    "ld2410": ("node.sensors.ld2410", "LD2410", "opts"),
    "ble_counter": ("node.sensors.blecount", "BLECounter", "opts"),
    "cp_pilot": ("node.sensors.ev", "CPPilot", "opts"),
    "ct_clamp": ("node.sensors.ev", "CTClamp", "opts"),
    "sdm_meter": ("node.sensors.sdm", "SDMMeter", "opts"),
    "a02yyuw": ("node.sensors.river", "A02YYUW", "opts"),
    "level_4_20ma": ("node.sensors.river", "Level420", "opts"),
    "rain_gauge": ("node.sensors.rain", "RainGauge", "opts"),
    "adxl345": ("node.sensors.seismic", "ADXL345", "opts"),
}


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _make_driver(s, hw, clock):
    mod, cls, how = DRIVERS[s["kind"]]
    c = getattr(__import__(mod, None, None, [cls]), cls)
    if how == "opts":
        opts = dict(s.get("options") or {})
        if "address" in s:
            opts["address"] = s["address"]
        return c(hw, clock, opts)
    args = [hw] if "address" not in s else [hw, s["address"]]
    return c(*args, delay_ms=clock.delay_ms) if how == "delay" else c(*args)


class Node:
    def __init__(self, hw, clock, profile, identity, root, connect, rssi=None, vbat_mv=None,
                 ble=None, esp32=None):
        self.hw = hw
        self.ble = ble  # bluetooth.BLE() on a board, a simulated radio on the host
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
            drv = _make_driver(s, self._hardware(s, buses), clock)
            self.drivers.append(drv)
            pairs.append((drv, s["period_ms"]))
        by_kind = dict((s["kind"], d) for s, d in zip(profile["sensors"], self.drivers))
        if "cp_pilot" in by_kind and "sdm_meter" in by_kind:
            by_kind["cp_pilot"].meter = by_kind["sdm_meter"]  # sessions need energy
        self.event_drivers = [(s["name"], d) for s, d in zip(profile["sensors"], self.drivers)
                              if hasattr(d, "take_events")]
        self.alert_drivers = [d for d in self.drivers if hasattr(d, "alert")]
        self.summary_drivers = [d for d in self.drivers if hasattr(d, "summary")]
        base = 0
        for _, p in pairs:
            base = _gcd(base, p)
        self.base_ms = base
        rep = profile["report"]
        self.window_ticks = max(1, rep["window_s"] * 1000 // base)
        self.event_ticks = max(1, rep["event_window_s"] * 1000 // base)
        self.quiet_ticks = rep["quiet_s"] * 1000 // base
        self.event_mode = False
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
        self.loop_ticks = 0
        self.reboot_reason = None
        # over-the-air updates (node.ota); esp32 is the esp32 module for image
        # updates (a simulation on the host; imported on a board when needed)
        self.ota = Ota(self, root, identity, connect, esp32)
        self._trial = None
        # the ota command replies several times under its id, which
        # Uplink.on_command does not pass on: its messages are taken here
        self.uplink.client.on_message = self._on_message

    def _hardware(self, s, buses):
        # what the driver is handed: its bus, its pins, its ADC or the radio
        hw = self.hw
        if "bus" in s:
            return self._bus(s["bus"], buses)
        if "pins" in s:
            return dict((n, hw.Pin(g, hw.Pin.IN, hw.Pin.PULL_UP)) for n, g in s["pins"].items())
        if "pin" in s:
            adc = hw.ADC(hw.Pin(s["pin"]))
            if hasattr(adc, "atten") and hasattr(hw.ADC, "ATTN_11DB"):
                adc.atten(hw.ADC.ATTN_11DB)  # full 0..3.1 V range
            return adc
        if self.ble is None:
            import bluetooth
            self.ble = bluetooth.BLE()
        return self.ble

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
            # 1 KiB of receive buffer: a radar frame burst must not overflow it
            bus = hw.UART(c["id"], baudrate=c["baud"], tx=c["tx"], rx=c["rx"], rxbuf=1024)
        buses[ref] = bus
        return bus

    def birth_body(self):
        s = self.sampler
        rep = self.profile["report"]
        b = {"fw": self.fw, "board": self.profile["name"], "chip": self.profile["chip"],
             "config_hash": self.config_hash, "reset_cause": self.reset_cause,
             "boot_count": self.boot,
             "channels": dict((n, {"sensor": s.owner[i]}) for i, n in enumerate(s.names)),
             "report": {"window_s": rep["window_s"], "health_s": rep["health_s"]}}
        ota = self.ota.birth()
        if ota:
            b["ota"] = ota
        return b

    def start_sensors(self):
        for d in self.drivers:
            try:
                d.begin()
            except (SensorError, OSError) as e:
                d.status = "failed"
                self.uplink.publish("event", {"event": "sensor.failed", "severity": "warning",
                                              "data": {"sensor": d.KIND, "reason": str(e)}})

    def _on_message(self, topic, msg):
        if topic.endswith(b"/cmd/ota"):
            self.ota.on_message(msg)
        else:
            self.uplink._on_message(topic, msg)

    def reboot(self, reason):
        """Stop the loop, let the replies out, say offline and reset the board
        (node.ota: after staging an update, or to roll a trial back)."""
        self.reboot_reason = reason
        self.running = False

    def command(self, name, args):
        if name == "ping":
            return {"up_ms": self.uptime.ms()}
        if name == "health":
            self.report_health()
            return {"queued": True}
        raise ValueError("unknown command")

    def report_window(self, ticks):
        agg, changed = self.sampler.close_window(force=self.event_mode)
        flags = {}
        for d in self.summary_drivers:
            extra = d.summary()
            if extra:
                agg.update(extra.get("ch") or {})
                flags.update(extra.get("flags") or {})
        if not agg and not flags:
            return
        self.windows_silent += 1
        if changed or flags or self.windows_silent >= self.silence_windows:
            body = {"window": {"s": ticks * self.base_ms // 1000, "end_up_ms": self.uptime.ms()},
                    "ch": agg,
                    "reason": "event" if self.event_mode else "change" if changed else "heartbeat"}
            if flags:
                body["flags"] = flags
            self.uplink.publish("telemetry", body)
            self.sampler.mark_reported(agg)
            self.windows_silent = 0
            self.windows_sent += 1

    def publish_events(self):
        for sensor, d in self.event_drivers:
            evs = d.take_events()
            if evs:
                for name, severity, data in evs:
                    data["sensor"] = sensor  # which part: a site may have two level sensors
                    self.uplink.publish("event", {"event": name, "severity": severity, "data": data})

    def update_event_mode(self, quiet):
        # event mode: while any alert is active, and quiet_ticks after the last
        if any(d.alert for d in self.alert_drivers):
            if not self.event_mode:
                self.event_mode = True
                self.uplink.publish("event", {"event": "node.event_mode", "severity": "info",
                                              "data": {"active": True}})
            return 0
        if self.event_mode:
            quiet += 1
            if quiet >= self.quiet_ticks:
                self.event_mode = False
                self.uplink.publish("event", {"event": "node.event_mode", "severity": "info",
                                              "data": {"active": False}})
                return 0
        return quiet

    def report_health(self):
        self.uplink.publish("health", health_body(self, self.ticker.stats() if self.ticker else
                                                  {"lag_max_ms": 0, "lag_mean_ms": 0, "overruns": 0, "ticks": 0}))

    async def sample_loop(self):
        clock = self.clock
        t = self.ticker = Ticker(clock, self.base_ms)
        wdt = self.hw.WDT(timeout=self.profile["wdt"]["timeout_ms"])
        limit = self.profile["wdt"]["timeout_ms"] // 2
        n = in_window = quiet = 0
        events = self.event_drivers
        alerts = self.alert_drivers
        while self.running:
            w = t.wait_ms()
            if w > 0:
                await clock.sleep_ms(w)
            lag = t.mark()
            self.sampler.step()
            n += 1
            self.loop_ticks = n
            in_window += 1
            if events:
                self.publish_events()
            if alerts:
                quiet = self.update_event_mode(quiet)
            if in_window >= (self.event_ticks if self.event_mode else self.window_ticks):
                self.report_window(in_window)
                in_window = 0
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
        self._trial = self.ota.start()
        try:
            await self.sample_loop()
            if self.reboot_reason is not None:
                await self._drain(5000)
                await self.uplink.stop()
        finally:
            # stopped or killed: the uplink goes with the loop; without a
            # clean stop() first, the broker sees a dead node (last will)
            self.running = False
            self.uplink.kill()
            self._up.cancel()
            for t in (self._trial, self.ota.task):
                if t is not None and not t.done():
                    t.cancel()
        if self.reboot_reason is not None:
            self.hw.reset()

    async def _drain(self, ms):
        # before a reset: give the outbox (the update's replies) a moment to go out
        for _ in range(ms // 20):
            if not self.outbox.depth or not self.uplink.client.connected:
                return
            await asyncio.sleep_ms(20)

    async def stop(self):
        # say offline and disconnect first: the loop, once it sees running
        # False, kills the uplink, which would cut that goodbye short (the
        # broker would then publish the last will, "lost")
        await self.uplink.stop()
        self.running = False
