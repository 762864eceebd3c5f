# A virtual node: the real firmware (node.app.Node) on a simulated board whose
# devices follow a simple model of the weather and the people around them.
# Runs under CPython (after sim.cpython.install()) and in the MicroPython VM.
import asyncio
import math
import random

from node.app import Node
from sim.devices.bme280 import BME280Device
from sim.devices.pms5003 import PMS5003Device
from sim.devices.scd4x import SCD4xDevice
from sim.machine import Machine


def make_board(profile, clock, uid):
    """A simulated Machine with the profile's devices attached at their addresses."""
    m = Machine(clock, uid=uid)
    devices = {}
    for s in profile["sensors"]:
        kind, ref = s["kind"], s["bus"]
        bus_kind, name = ref.split(".", 1)
        if kind == "bme280":
            d = BME280Device()
        elif kind == "scd4x":
            d = SCD4xDevice(clock)
        elif kind == "pms5003":
            d = PMS5003Device(clock)
        else:
            raise ValueError("no simulated device for %s" % kind)
        if bus_kind == "i2c":
            m.i2c_bus(profile["i2c"][name]["id"]).attach(s["address"], d)
        else:
            m.uart_port(profile["uart"][name]["id"]).attach(d)
        devices[kind] = d
    return m, devices


class Weather:
    """Iwaki in late autumn: a daily temperature swing, humidity opposite to
    it, slow pressure changes, CO2 from people nearby, particulates."""

    def __init__(self, seed):
        self.rng = random.Random(seed) if hasattr(random, "Random") else None
        self.seed = seed
        self.offset = (seed % 17) * 0.1

    def _noise(self, scale):
        r = self.rng.random() if self.rng else random.random()
        return (r - 0.5) * 2 * scale

    def at(self, hour):
        day = math.sin((hour - 9) / 24 * 2 * math.pi)
        return {
            "temp_c": 12.0 + 6.0 * day + self.offset + self._noise(0.05),
            "rh_pct": max(5.0, min(95.0, 65.0 - 15.0 * day + self._noise(0.3))),
            "pressure_pa": 101325.0 + 300 * math.sin(hour / 30) + self._noise(3),
            "co2_ppm": 420 + 300 * max(0.0, math.sin((hour - 7) / 12 * math.pi)) + self._noise(5),
            "pm25": max(0.0, 8 + 4 * day + self._noise(1)),
        }


class VirtualNode:
    def __init__(self, profile, identity, root, clock, connect, seed=0, hour=None):
        self.clock = clock
        uid = bytes([0x24, 0x6F, 0x28, (seed >> 16) & 255, (seed >> 8) & 255, seed & 255])
        self.machine, self.devices = make_board(profile, clock, uid)
        self.weather = Weather(seed)
        self.hour0 = 10.0 if hour is None else hour
        self.t0 = clock.ticks_ms()
        self.update()
        self.node = Node(self.machine, clock, profile, identity, root, connect)

    def update(self):
        # one step of the environment, in accelerated time (1 s = 1 min)
        h = self.hour0 + self.clock.ticks_diff(self.clock.ticks_ms(), self.t0) / 60000.0
        w = self.weather.at(h % 24)
        d = self.devices
        if "bme280" in d:
            d["bme280"].set(temp_c=w["temp_c"], pressure_pa=w["pressure_pa"], rh_pct=w["rh_pct"])
        if "scd4x" in d:
            d["scd4x"].set(co2_ppm=int(w["co2_ppm"]), temp_c=w["temp_c"], rh_pct=w["rh_pct"])
        if "pms5003" in d:
            p = w["pm25"]
            d["pms5003"].set(pm1=int(p * 0.7), pm25=int(p), pm10=int(p * 1.4))

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
