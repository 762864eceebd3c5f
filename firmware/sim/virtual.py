# A virtual node: the real firmware (node.app.Node) on a simulated board whose
# devices follow a scenario of the Iwaki New Town district: the weather over
# a day, people passing a gate, EV charging sessions, a storm that raises the
# river, an earthquake. Runs under CPython (after sim.cpython.install()) and
# in the MicroPython VM. Scenario time runs 60x faster than the clock for the
# slow things (a day in 24 minutes); pulses (people, tips, shaking) are real.
# NodeLife (CPython only) runs a VirtualNode across resets, as a board lives:
# boot.py's slot selection, then the app, then the reset an update ends in.
import asyncio
import json
import math
import random

from node.app import Node
from sim.machine import PWRON_RESET, SOFT_RESET, Machine, SimReset


def _device(kind, s, profile, m, clock, ble):
    # the simulated part for one [[sensors]] entry, attached where it sits
    opts = s.get("options") or {}
    if kind == "bme280":
        from sim.devices.bme280 import BME280Device
        return BME280Device()
    if kind == "scd4x":
        from sim.devices.scd4x import SCD4xDevice
        return SCD4xDevice(clock)
    if kind == "pms5003":
        from sim.devices.pms5003 import PMS5003Device
        return PMS5003Device(clock)
    if kind == "beam_pair":
        from sim.devices.beams import BeamGate
        return BeamGate(m, s["pins"]["a"], s["pins"]["b"], clock, active_low=opts.get("active_low", True))
    if kind == "ld2410":
        from sim.devices.ld2410 import LD2410Device
        return LD2410Device(clock)
    if kind == "ble_counter":
        return ble
    if kind == "sdm_meter":
        from sim.devices.sdm import SDMDevice
        return SDMDevice(clock, model=opts.get("model", "sdm120"), address=opts.get("address", 1))
    if kind == "a02yyuw":
        from sim.devices.ranger import RangerDevice
        return RangerDevice(clock)
    if kind == "level_4_20ma":
        return s["pin"]  # driven through machine.adc_source
    if kind == "rain_gauge":
        from sim.devices.rain import RainGaugeDevice
        return RainGaugeDevice(m, s["pins"]["tip"], mm_per_tip=opts.get("mm_per_tip", 0.5))
    if kind == "adxl345":
        from sim.devices.adxl345 import ADXL345Device
        return ADXL345Device(clock, noise_lsb=1)
    if kind in ("cp_pilot", "ct_clamp"):
        return None  # one EVSE drives both ADC pins, made below
    raise ValueError("no simulated device for %s" % kind)


def make_board(profile, clock, uid, ble=None):
    """A simulated Machine with the profile's parts attached: (machine, {kind: device})."""
    m = Machine(clock, uid=uid)
    devices = {}
    for s in profile["sensors"]:
        kind = s["kind"]
        d = _device(kind, s, profile, m, clock, ble)
        bus = s.get("bus", "")
        if bus.startswith("i2c."):
            m.i2c_bus(profile["i2c"][bus[4:]]["id"]).attach(s["address"], d)
        elif bus.startswith("uart."):
            m.uart_port(profile["uart"][bus[5:]]["id"]).attach(d)
        devices[kind] = d
    if "cp_pilot" in devices:
        from sim.devices.evse import EVSE
        cp = [s for s in profile["sensors"] if s["kind"] == "cp_pilot"][0]
        ct = [s for s in profile["sensors"] if s["kind"] == "ct_clamp"]
        o = cp.get("options") or {}
        kw = {"cp_volts_per_count": o["volts_per_count"], "cp_zero_count": o["zero_count"]}
        if ct:
            kw["ct_amps_per_count"] = ct[0]["options"]["amps_per_count"]
            # MicroPython's read_u16 takes tens of us on an ESP32: with 61 us (prime, so the
            # samples drift across the mains phase) a 200 ms CT burst is ~3,300 conversions
            # instead of ~28,600 at 7 us, and a demo keeps pace with hundreds of nodes
            kw["ct_conv_us"] = 61
        devices["evse"] = EVSE(m, clock, cp["pin"], ct[0]["pin"] if ct else 39, **kw)
    return m, devices


class Scenario:
    """What happens around one node, as a function of scenario time."""

    def __init__(self, seed, hour0):
        self.rng = random.Random(seed) if hasattr(random, "Random") else random
        self.seed = seed
        self.hour0 = hour0
        self.offset = (seed % 17) * 0.1
        self.ble_addrs = set()  # every address advertised, for privacy tests

    def noise(self, scale):
        return (self.rng.random() - 0.5) * 2 * scale

    def weather(self, hour):
        day = math.sin((hour - 9) / 24 * 2 * math.pi)
        return {
            "temp_c": 12.0 + 6.0 * day + self.offset + self.noise(0.05),
            "rh_pct": max(5.0, min(95.0, 65.0 - 15.0 * day + self.noise(0.3))),
            "pressure_pa": 101325.0 + 300 * math.sin(hour / 30) + self.noise(3),
            "co2_ppm": 420 + 300 * max(0.0, math.sin((hour - 7) / 12 * math.pi)) + self.noise(5),
            "pm25": max(0.0, 8 + 4 * day + self.noise(1)),
        }

    def river_m(self, minutes):
        # a storm: the river rises from 1.6 m past caution and falls back,
        # over a 40 min (scenario) cycle
        phase = (minutes % 40) / 40.0
        return 1.6 + 1.6 * max(0.0, math.sin(phase * math.pi)) ** 2

    def rain_mm_h(self, minutes):
        phase = (minutes % 40) / 40.0
        return 60.0 * max(0.0, math.sin(phase * math.pi * 1.2)) if phase < 0.8 else 0.0


class VirtualNode:
    def __init__(self, profile, identity, root, clock, connect, seed=0, hour=None):
        self.clock = clock
        self.profile = profile
        uid = bytes([0x24, 0x6F, 0x28, (seed >> 16) & 255, (seed >> 8) & 255, seed & 255])
        ble = None
        if any(s["kind"] == "ble_counter" for s in profile["sensors"]):
            from sim.ble import SimBLE
            ble = SimBLE(clock)
        self.machine, self.devices = make_board(profile, clock, uid, ble)
        self.scenario = Scenario(seed, 10.0 if hour is None else hour)
        self.t0 = clock.ticks_ms()
        self.tick = 0
        self.update()
        self.node = Node(self.machine, clock, profile, identity, root, connect, ble=ble)

    def minutes(self):
        # scenario minutes: one per second of the clock
        return self.clock.ticks_diff(self.clock.ticks_ms(), self.t0) / 1000.0

    def update(self):
        """One second of the scenario."""
        self.tick += 1
        mins = self.minutes()
        d = self.devices
        sc = self.scenario
        w = sc.weather((sc.hour0 + mins / 60.0) % 24)
        if "bme280" in d:
            d["bme280"].set(temp_c=w["temp_c"], pressure_pa=w["pressure_pa"], rh_pct=w["rh_pct"])
        if "scd4x" in d:
            d["scd4x"].set(co2_ppm=int(w["co2_ppm"]), temp_c=w["temp_c"], rh_pct=w["rh_pct"])
        if "pms5003" in d:
            p = w["pm25"]
            d["pms5003"].set(pm1=int(p * 0.7), pm25=int(p), pm10=int(p * 1.4))
        if "beam_pair" in d:
            self._people(d)
        if "evse" in d:
            self._charging(d)
        if "a02yyuw" in d:
            mount = [s for s in self.profile["sensors"] if s["kind"] == "a02yyuw"][0]["options"]["mount_m"]
            d["a02yyuw"].set(int((mount - sc.river_m(mins) + sc.noise(0.01)) * 1000))
        if "level_4_20ma" in d:
            self._transducer(d, sc.river_m(mins))
        if "rain_gauge" in d and self.tick % 60 == 1:
            d["rain_gauge"].rain(sc.rain_mm_h(mins), 60000)
        if "adxl345" in d and self.tick % 300 == 120:
            self._earthquake(d["adxl345"])

    def _people(self, d):
        sc = self.scenario
        r = sc.rng.random()
        if r < 0.25:
            d["beam_pair"].walk_in(sc.rng.randint(10, 900))
        elif r < 0.45:
            d["beam_pair"].walk_out(sc.rng.randint(10, 900))
        if "ld2410" in d:
            near = r < 0.45
            d["ld2410"].set(state=1 if near else 0, moving_cm=sc.rng.randint(50, 400) if near else 0,
                            moving_energy=60 if near else 0)
        ble = d.get("ble_counter")
        if ble is not None and self.tick % 10 == 1:
            ble.clear_devices()
            for _ in range(sc.rng.randint(0, 14)):
                addr = bytes([sc.rng.getrandbits(8) for _ in range(6)])
                sc.ble_addrs.add(addr)
                ble.add_device(addr, -60 - sc.rng.randint(0, 30), every_ms=1000)

    def _charging(self, d):
        # a session every 90 s: plug, charge at 16 A for 45 s, stop, unplug
        t = self.tick % 90
        evse = d["evse"]
        meter = d.get("sdm_meter")
        if t == 10:
            evse.plug()
        elif t == 15:
            evse.charge(16.0)
            if meter:
                meter.set(current_a=16.0)
        elif t == 60:
            evse.stop()
            if meter:
                meter.set(current_a=0.0)
        elif t == 65:
            evse.unplug()

    def _transducer(self, d, level_m):
        s = [x for x in self.profile["sensors"] if x["kind"] == "level_4_20ma"][0]
        o = s["options"]
        ma = 4.0 + 16.0 * max(0.0, level_m - o["datum_m"]) / o["range_m"]
        uv = ma * o["shunt_ohm"] * 1000.0
        # the simulated ADC reads 0..65535 for 0..2.45 V (11 dB attenuation)
        self.machine.adc_source(d["level_4_20ma"], min(65535, int(uv / 2450000.0 * 65535)))

    def _earthquake(self, dev):
        from sim.devices.adxl345 import sine
        start = dev._now_us / 1e6 + 1.0
        dev.wave = sine(60.0, 2.0, axis=0, start_s=start, dur_s=8.0)

    async def _environment(self):
        while self.node.running:
            self.update()
            await self.clock.sleep_ms(1000)

    async def run(self):
        env = asyncio.create_task(self._delayed_env())
        try:
            await self.node.run()
        finally:
            env.cancel()

    async def _delayed_env(self):
        await self.clock.sleep_ms(0)
        await self._environment()

    async def stop(self):
        await self.node.stop()


def slot_version(root, slot, trial, factory):
    """The version the code booted from `slot` reports. Under CPython every
    slot runs the repository's modules, so it is read from ota/state.json:
    the trial's version on a trial boot, else the committed one."""
    if slot == "root":
        return factory
    try:
        with open(root + "/ota/state.json") as f:
            st = json.loads(f.read())
    except (OSError, ValueError):
        return factory
    t = st.get("trial")
    if trial and t:
        return t.get("version") or factory
    return st.get("version") or factory


class NodeLife:
    """A virtual node across resets (CPython): each boot goes through the real
    boot.select(root) (slot, trial), then runs a new VirtualNode with the reset
    cause and the version of the slot it booted, until the board resets (an
    update's SimReset: booted again with SOFT_RESET). Run it as a task:

        life = NodeLife(profile, identity, root, clock, asyncio.open_connection, seed=3)
        task = asyncio.create_task(life.run())
        ...
        await life.stop()   # the node says offline; run() returns

    Fault hooks (tools/bench_ota.py):
      on_boot(life, slot, trial): return False and this boot dies before the
        app runs (a crash at import); the board resets with SOFT_RESET.
      on_start(life, v, slot, trial): called with the new VirtualNode once its
        task (life.task) exists and before it runs.
      kill(): the power goes: the app stops where it is, nothing is flushed,
        the next boot has PWRON_RESET.
    """

    def __init__(self, profile, identity, root, clock, connect, seed=0, hour=None, factory=None,
                 off_ms=300, on_boot=None, on_start=None):
        self.profile = profile
        self.identity = identity
        self.root = root
        self.clock = clock
        self.connect = connect
        self.seed = seed
        self.hour = hour
        self.factory = factory  # the factory install's version (default node.VERSION)
        self.off_ms = off_ms
        self.on_boot = on_boot
        self.on_start = on_start
        self.v = None  # the VirtualNode of the current (or last) boot
        self.task = None  # its run() task
        self.slot = None
        self.trial = False
        self.boots = 0
        self.stopping = False
        self._cut = False

    async def run(self):
        from boot import select
        if self.factory is None:
            from node import VERSION
            self.factory = VERSION
        cause = PWRON_RESET
        while not self.stopping:
            slot, trial = select(self.root)
            self.slot, self.trial = slot, trial
            self.boots += 1
            if self.on_boot is not None and self.on_boot(self, slot, trial) is False:
                cause = SOFT_RESET
                await self.clock.sleep_ms(200)
                continue
            v = VirtualNode(self.profile, self.identity, self.root, self.clock, self.connect,
                            seed=self.seed, hour=self.hour)
            v.machine._cause = cause
            v.node.fw = slot_version(self.root, slot, trial, self.factory)
            self.v = v
            self.task = asyncio.create_task(v.run())
            if self.on_start is not None:
                self.on_start(self, v, slot, trial)
            cause = PWRON_RESET
            try:
                await self.task
            except SimReset:
                cause = SOFT_RESET
            except asyncio.CancelledError:
                if not self._cut:
                    raise  # run() itself was cancelled
                self._cut = False
            if not self.stopping:
                await self.clock.sleep_ms(self.off_ms)  # off, then on again

    def kill(self):
        """Cut the power of the running boot (see the class docstring)."""
        if self.task is not None and not self.task.done():
            self._cut = True
            self.task.cancel()
            self.v.node.uplink.kill()

    async def stop(self):
        """Clean stop: no more boots; the running node stops and says offline."""
        self.stopping = True
        if self.task is not None and not self.task.done():
            await self.v.stop()
