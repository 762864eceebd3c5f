# Board profile and node identity: check, fill defaults, load, hash.
#
# The board file (boards/*.toml) is compiled on the host to compact JSON by
# tools/boards.py, which calls check_profile() from this module; the node
# reads the same JSON with load_profile(), which calls it again. The rules
# live here only. Every refusal is a ConfigError naming the field and why;
# boards/README.md documents every field.
#
# Runs on the board, in the MicroPython VM and in CPython: no f-strings,
# no typing, and only json, os and hashlib.
import hashlib
import json
import os

SCHEMA = 1

# Chips: GPIO numbers 0..gpios-1 minus `missing`; pins a profile may not use.
CHIPS = {
    "esp32": {
        "gpios": 40,
        "missing": (20, 24, 28, 29, 30, 31),
        "flash": (6, 7, 8, 9, 10, 11),
        "console": (1, 3),
        "strapping": (0, 2, 5, 12, 15),
        "input_only": (34, 35, 36, 37, 38, 39),
        "adc1": (32, 33, 34, 35, 36, 37, 38, 39),
        "i2c": 2,
        "uart": 3,
    },
    "esp32s3": {
        "gpios": 49,
        "missing": (22, 23, 24, 25),
        "flash": (26, 27, 28, 29, 30, 31, 32),
        "console": (19, 20, 43, 44),
        "strapping": (0, 3, 45, 46),
        "input_only": (),
        "adc1": (1, 2, 4, 5, 6, 7, 8, 9, 10),
        "i2c": 2,
        "uart": 3,
    },
    "esp32c3": {
        "gpios": 22,
        "missing": (),
        "flash": (12, 13, 14, 15, 16, 17),
        "console": (18, 19, 20, 21),
        "strapping": (2, 8, 9),
        "input_only": (),
        "adc1": (0, 1, 3, 4),
        "i2c": 1,
        "uart": 2,
    },
}

# Pin groups refused for any use, in the order they are checked.
_PIN_RULES = (
    ("flash", "is an SPI flash/PSRAM pin", ""),
    ("console", "is a REPL console pin", " (UART0/USB: the node must stay reachable)"),
    ("strapping", "is a strapping pin", " (it selects the boot mode at reset)"),
)

# Sensor kinds: what they sit on ("i2c", "uart", "pins": named GPIO inputs,
# "adc": one ADC1 pin, "ble": the radio), their I2C addresses (the first is
# the default), the UART speed they talk at, the default and shortest useful
# period, and their options: name -> (type, low, high, default); default
# None = required; type "choice" lists its values as low; type "stages" is
# the four river stages. A new kind is one entry here and one in CHANNELS.
_STAGES = ("standby", "caution", "evacuation", "danger")
_RIVER = {"stages": ("stages", None, None, None), "hysteresis_m": ("num", 0, 5, 0.05)}
KINDS = {
    "bme280": {"bus": "i2c", "addresses": (0x76, 0x77), "period_ms": 1000},
    "scd4x": {"bus": "i2c", "addresses": (0x62,), "period_ms": 5000, "min_period_ms": 5000},
    "pms5003": {"bus": "uart", "baud": 9600, "period_ms": 1000},
    # people counting
    "beam_pair": {"bus": "pins", "pins": ("a", "b"), "period_ms": 1000, "options": {
        "debounce_ms": ("int", 1, 1000, 30), "max_cross_ms": ("int", 100, 10000, 1500),
        "active_low": ("bool", None, None, True)}},
    "ld2410": {"bus": "uart", "baud": 256000, "period_ms": 500},
    "ble_counter": {"bus": "ble", "period_ms": 1000, "options": {
        "k_min": ("int", 1, 100, 5), "rssi_min": ("int", -127, 0, -85),
        "table": ("int", 16, 2048, 256)}},
    # EV charger
    "cp_pilot": {"bus": "adc", "period_ms": 1000, "options": {
        "volts_per_count": ("num", 0.00001, 1, None), "zero_count": ("int", 0, 65535, 32768),
        "burst_n": ("int", 20, 2000, 200)}},
    "ct_clamp": {"bus": "adc", "period_ms": 1000, "options": {
        "amps_per_count": ("num", 0.000001, 10, None), "burst_hz": ("int", 2000, 20000, 4000),
        "cycles": ("int", 1, 50, 10), "mains_hz": ("int", 50, 60, 50)}},
    "sdm_meter": {"bus": "uart", "period_ms": 5000, "options": {
        "model": ("choice", ("sdm120", "sdm630"), None, "sdm120"),
        "address": ("int", 1, 247, 1), "timeout_ms": ("int", 20, 2000, 200)}},
    # disaster level
    "a02yyuw": {"bus": "uart", "baud": 9600, "period_ms": 1000,
                "options": dict(_RIVER, mount_m=("num", 0, 100, None))},
    "level_4_20ma": {"bus": "adc", "period_ms": 1000, "options": dict(
        _RIVER, shunt_ohm=("num", 10, 500, 100), range_m=("num", 0.1, 200, None),
        oversample=("int", 1, 64, 8),
        datum_m=("num", -1000, 10000, 0))},
    "rain_gauge": {"bus": "pins", "pins": ("tip",), "period_ms": 1000, "options": {
        "mm_per_tip": ("num", 0.01, 10, 0.5), "debounce_ms": ("int", 1, 1000, 100),
        "alert_mm_h": ("num", 1, 500, 50)}},
    "adxl345": {"bus": "i2c", "addresses": (0x53, 0x1D), "period_ms": 250, "options": {
        "window_s": ("int", 10, 120, 60), "trigger_gal": ("num", 0.5, 2000, 20),
        "event_intensity": ("num", 0, 7, 3.5)}},
}

# Channels each kind reports per sample, in the order its driver fills them
# (kinds with a window summary add theirs: ble_devices, rain_10min_mm,
# rain_1h_mm, intensity, pga_gal).
CHANNELS = {
    "bme280": ("temp_c", "rh_pct", "pressure_hpa"),
    "scd4x": ("co2_ppm", "temp_c", "rh_pct"),
    "pms5003": ("pm1_ugm3", "pm25_ugm3", "pm10_ugm3"),
    "beam_pair": ("people_in", "people_out", "occupancy"),
    "ld2410": ("presence", "moving_cm", "static_cm"),
    "ble_counter": (),
    "cp_pilot": ("cp_state", "offered_a"),
    "ct_clamp": ("current_a",),
    "sdm_meter": ("voltage_v", "current_a", "power_w", "energy_kwh"),
    "a02yyuw": ("level_m", "distance_mm"),
    "level_4_20ma": ("level_m",),
    "rain_gauge": ("rain_mm",),
    "adxl345": (),
}

# Keys each table may hold; anything else is refused (a typo must not pass).
KEYS = {
    "profile": ("schema", "name", "description", "chip", "i2c", "uart", "sensors",
                "report", "mqtt", "outbox", "wdt"),
    "i2c": ("id", "sda", "scl", "freq_hz"),
    "uart": ("id", "tx", "rx", "baud"),
    "sensor": ("kind", "name", "period_ms", "options"),
    "sensor.i2c": ("bus", "address"),
    "sensor.uart": ("bus",),
    "sensor.pins": ("pins",),
    "sensor.adc": ("pin",),
    "sensor.ble": (),
    "report": ("window_s", "health_s", "max_silence_s", "deadband", "event_window_s", "quiet_s"),
    "mqtt": ("keepalive_s",),
    "outbox": ("limit_bytes",),
    "wdt": ("timeout_ms",),
    "identity": ("node", "root", "broker", "user", "password", "tls", "wifi", "ota_keys", "fleet_url"),
    "broker": ("host", "port"),
    "wifi": ("ssid", "password"),
}

_WANT = {
    "int": "an integer", "num": "a number", "str": "a string",
    "bool": "true or false", "table": "a table", "list": "an array",
}


class ConfigError(Exception):
    def __init__(self, field, reason):
        super().__init__(field + ": " + reason)
        self.field = field
        self.reason = reason


def _fail(field, reason):
    raise ConfigError(field, reason)


def _type_name(v):
    if v is True or v is False:
        return "boolean"
    for t, name in ((int, "integer"), (float, "float"), (str, "string"),
                    (dict, "table"), (list, "array")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _is(v, want):
    if v is True or v is False:
        return want == "bool"
    if want == "num":
        return isinstance(v, (int, float))
    return isinstance(v, {"int": int, "str": str, "bool": bool, "table": dict, "list": list}[want])


def _get(t, key, p, want, default=None):
    # p is the path prefix of table t ("" or "i2c.main."); default None = required
    v = t.get(key)
    if v is None:
        if default is None:
            _fail(p + key, "missing (required)")
        return default
    if not _is(v, want):
        _fail(p + key, "must be %s, not %s" % (_WANT[want], _type_name(v)))
    return v


def _int(t, key, p, lo, hi, default=None, unit=""):
    v = _get(t, key, p, "int", default)
    if v < lo or v > hi:
        _fail(p + key, "%d%s is out of range %d..%d%s" % (v, unit, lo, hi, unit))
    return v


def _keys(t, allowed, p):
    for k in sorted(t):
        if k not in allowed:
            _fail(p + k, "unknown key (expected one of: %s)" % ", ".join(allowed))


def _table(t, key, p):
    v = _get(t, key, p, "table", {})
    _keys(v, KEYS[key], p + key + ".")
    return v


def _is_id(s, shortest):
    # [a-z0-9][a-z0-9-]{shortest-1,31}, by hand: MicroPython's re is limited
    if not shortest <= len(s) <= 32 or s[0] == "-":
        return False
    for ch in s:
        if not ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "-"):
            return False
    return True


def _name(t, key, p, default=None):
    v = _get(t, key, p, "str", default)
    if not _is_id(v, 1):
        _fail(p + key, "%r is not a name (1-32 of a-z, 0-9, '-'; not starting with '-')" % v)
    return v


def _hex(a):
    return "0x%02x" % a if a >= 0 else str(a)


def _pin(c, chip, t, key, p, used, output):
    field = p + key
    g = _get(t, key, p, "int")
    if g < 0 or g >= c["gpios"] or g in c["missing"]:
        _fail(field, "GPIO %d does not exist on %s" % (g, chip))
    for group, what, why in _PIN_RULES:
        if g in c[group]:
            _fail(field, "GPIO %d %s on %s%s" % (g, what, chip, why))
    if output and g in c["input_only"]:
        _fail(field, "GPIO %d is input-only on %s and cannot drive %s" % (g, chip, key.upper()))
    if g in used:
        _fail(field, "GPIO %d is already used by %s" % (g, used[g]))
    used[g] = field
    return g


def _buses(d, kind, c, chip, used):
    # [i2c.<name>] / [uart.<name>]: each names a hardware controller by id
    tables = _get(d, kind, "", "table", {})
    out, ids = {}, {}
    for name in sorted(tables):
        p = kind + "." + name + "."
        t = tables[name]
        if not _is_id(name, 1):
            _fail(kind + "." + name, "%r is not a bus name (1-32 of a-z, 0-9, '-')" % name)
        if not isinstance(t, dict):
            _fail(kind + "." + name, "must be a table, not " + _type_name(t))
        _keys(t, KEYS[kind], p)
        n = c[kind]
        if kind == "i2c":
            bid = _get(t, "id", p, "int", 0)
            lo = 0
        else:
            bid = _get(t, "id", p, "int")
            lo = 1
            if bid == 0:
                _fail(p + "id", "UART0 is the REPL console; use UART1..%d" % (n - 1))
        if bid < lo or bid >= n:
            _fail(p + "id", "%s has %s%d..%d only, not %d" % (chip, kind.upper(), lo, n - 1, bid))
        if bid in ids:
            _fail(p + "id", "%s%d is already used by %s" % (kind.upper(), bid, ids[bid]))
        ids[bid] = kind + "." + name
        if kind == "i2c":
            out[name] = {
                "id": bid,
                "sda": _pin(c, chip, t, "sda", p, used, True),
                "scl": _pin(c, chip, t, "scl", p, used, True),
                "freq_hz": _int(t, "freq_hz", p, 10000, 1000000, 100000, " Hz"),
            }
        else:
            out[name] = {
                "id": bid,
                "tx": _pin(c, chip, t, "tx", p, used, True),
                "rx": _pin(c, chip, t, "rx", p, used, False),
                "baud": _int(t, "baud", p, 1200, 5000000, None, " baud"),
            }
    return out


def _sensor(s, p, buses, taken, c, chip, used):
    # one [[sensors]] entry; taken records names, I2C addresses, UARTs and the radio
    if not isinstance(s, dict):
        _fail(p[:-1], "must be a table, not " + _type_name(s))
    kind = _get(s, "kind", p, "str")
    k = KINDS.get(kind)
    if k is None:
        _fail(p + "kind", "unknown sensor kind %r (known: %s)" % (kind, ", ".join(sorted(KINDS))))
    bus_type = k["bus"]
    _keys(s, KEYS["sensor"] + KEYS["sensor." + bus_type], p)
    name = _name(s, "name", p, kind.replace("_", "-"))
    if ("name", name) in taken:
        _fail(p + "name", "%r is already used by %s; give each sensor its own name"
              % (name, taken[("name", name)]))
    taken[("name", name)] = p[:-1]
    out = {"kind": kind, "name": name}
    if bus_type in ("i2c", "uart"):
        out["bus"] = bus = _bus_ref(s, p, kind, bus_type, buses)
    if bus_type == "i2c":
        a = _get(s, "address", p, "int", k["addresses"][0])
        if a < 0 or a > 0x7F:
            _fail(p + "address", "%s is not a 7-bit I2C address" % _hex(a))
        if a not in k["addresses"]:
            _fail(p + "address", "%s answers at %s, not %s"
                  % (kind, " or ".join([_hex(x) for x in k["addresses"]]), _hex(a)))
        if (bus, a) in taken:
            _fail(p + "address", "%s on %s is already used by %s" % (_hex(a), bus, taken[(bus, a)]))
        taken[(bus, a)] = p[:-1]
        out["address"] = a
    elif bus_type == "uart":
        if bus in taken:
            _fail(p + "bus", "%s is already used by %s (one sensor per UART)" % (bus, taken[bus]))
        taken[bus] = p[:-1]
        bt, bn = bus.split(".", 1)
        baud = buses[bt][bn]["baud"]
        if "baud" in k and k["baud"] != baud:
            _fail(p + "bus", "%s talks at %d baud, %s is set to %d" % (kind, k["baud"], bus, baud))
    elif bus_type == "pins":
        t = _get(s, "pins", p, "table")
        _keys(t, k["pins"], p + "pins.")
        out["pins"] = dict((n, _pin(c, chip, t, n, p + "pins.", used, False)) for n in k["pins"])
    elif bus_type == "adc":
        g = _pin(c, chip, s, "pin", p, used, False)
        if g not in c["adc1"]:
            _fail(p + "pin", "GPIO %d is not an ADC1 pin on %s (ADC2 cannot be read while "
                  "Wi-Fi is on; ADC1: %s)" % (g, chip, ", ".join([str(x) for x in c["adc1"]])))
        out["pin"] = g
    else:  # ble: one radio per board
        if "ble" in taken:
            _fail(p + "kind", "the radio is already used by %s" % taken["ble"])
        taken["ble"] = p[:-1]
    period = _int(s, "period_ms", p, 10, 3600000, k["period_ms"], " ms")
    if period < k.get("min_period_ms", 10):
        _fail(p + "period_ms", "%s gives a new reading only every %d ms" % (kind, k["min_period_ms"]))
    out["period_ms"] = period
    spec = k.get("options")
    if spec:
        out["options"] = _options(_get(s, "options", p, "table", {}), spec, p + "options.")
    elif "options" in s:
        _fail(p + "options", "%s takes no options" % kind)
    return out


def _bus_ref(s, p, kind, bus_type, buses):
    bus = _get(s, "bus", p, "str")
    bt, bn = (bus.split(".", 1) + [""])[:2]
    if bn not in buses.get(bt, ()):
        defined = [t + "." + n for t in sorted(buses) for n in sorted(buses[t])]
        _fail(p + "bus", "no bus %r is defined (buses: %s)" % (bus, ", ".join(defined) or "none"))
    if bt != bus_type:
        _fail(p + "bus", "%s needs a bus from [%s], not %s" % (kind, bus_type, bus))
    return bus


def _options(t, spec, p):
    _keys(t, sorted(spec), p)
    out = {}
    for key in sorted(spec):
        want, lo, hi, default = spec[key]
        if want == "stages":
            out[key] = _stages(_get(t, key, p, "table"), p + key + ".")
            continue
        if want == "choice":
            v = _get(t, key, p, "str", default)
            if v not in lo:
                _fail(p + key, "%r is not one of: %s" % (v, ", ".join(lo)))
        elif want == "bool":
            v = _get(t, key, p, "bool", default)
        else:
            v = _get(t, key, p, want, default)
            if v < lo or v > hi:
                _fail(p + key, "%s is out of range %s..%s" % (v, lo, hi))
            if want == "num":
                v = float(v)
        out[key] = v
    return out


def _stages(t, p):
    # the four river stages, in metres above the datum, strictly rising
    _keys(t, _STAGES, p)
    out, prev = {}, None
    for name in _STAGES:
        v = float(_get(t, name, p, "num"))
        if prev is not None and v <= prev[1]:
            _fail(p + name, "%s m must be above %s (%s m)" % (v, prev[0], prev[1]))
        out[name] = v
        prev = (name, v)
    return out


def _report(d, sensors):
    p = "report."
    r = _table(d, "report", "")
    longest = max([s["period_ms"] for s in sensors])
    who = "sensors[%d].period_ms = %d ms" % (
        [s["period_ms"] for s in sensors].index(longest), longest)
    window = _int(r, "window_s", p, 1, 86400, 60, " s")
    if window * 1000 < longest:
        _fail(p + "window_s", "%d s is shorter than the longest sensor period (%s)" % (window, who))
    if window * 1000 % longest:
        _fail(p + "window_s", "%d s is not a whole multiple of the longest sensor period (%s)"
              % (window, who))
    health = _int(r, "health_s", p, 1, 86400, 60, " s")
    silence = _int(r, "max_silence_s", p, 1, 604800, 300, " s")
    if silence % window:
        _fail(p + "max_silence_s", "%d s is not a whole multiple of report.window_s (%d s)"
              % (silence, window))
    channels = []
    for s in sensors:
        for ch in CHANNELS[s["kind"]]:
            if ch not in channels:
                channels.append(ch)
    db = _get(r, "deadband", p, "table", {})
    deadband = {}
    for ch in sorted(db):
        if ch not in channels:
            _fail(p + "deadband." + ch, "%r is not a channel of the configured sensors (channels: %s)"
                  % (ch, ", ".join(sorted(channels))))
        v = _get(db, ch, p + "deadband.", "num")
        if v < 0:
            _fail(p + "deadband." + ch, "must not be negative")
        deadband[ch] = v
    ev = _int(r, "event_window_s", p, 1, window, min(10, window), " s")
    quiet = _int(r, "quiet_s", p, 0, 86400, 600, " s")
    return {"window_s": window, "health_s": health, "max_silence_s": silence, "deadband": deadband,
            "event_window_s": ev, "quiet_s": quiet}


def check_profile(d):
    """Check a board profile dict; return a new dict with every default filled."""
    if not isinstance(d, dict):
        _fail("profile", "must be a table, not " + _type_name(d))
    _keys(d, KEYS["profile"], "")
    schema = _get(d, "schema", "", "int", SCHEMA)
    if schema != SCHEMA:
        _fail("schema", "this firmware reads schema %d, not %d" % (SCHEMA, schema))
    out = {"schema": schema, "name": _name(d, "name", ""),
           "description": _get(d, "description", "", "str", "")}
    chip = _get(d, "chip", "", "str")
    c = CHIPS.get(chip)
    if c is None:
        _fail("chip", "unknown chip %r (known: %s)" % (chip, ", ".join(sorted(CHIPS))))
    out["chip"] = chip
    used = {}
    buses = {"i2c": _buses(d, "i2c", c, chip, used), "uart": _buses(d, "uart", c, chip, used)}
    out.update(buses)
    listed = _get(d, "sensors", "", "list")
    if not listed:
        _fail("sensors", "at least one sensor is required")
    taken = {}
    sensors = [_sensor(s, "sensors[%d]." % i, buses, taken, c, chip, used)
               for i, s in enumerate(listed)]
    out["sensors"] = sensors
    out["report"] = _report(d, sensors)
    out["mqtt"] = {"keepalive_s": _int(_table(d, "mqtt", ""), "keepalive_s", "mqtt.",
                                       10, 3600, 60, " s")}
    out["outbox"] = {"limit_bytes": _int(_table(d, "outbox", ""), "limit_bytes", "outbox.",
                                         16384, 16777216, 262144, " bytes")}
    out["wdt"] = {"timeout_ms": _int(_table(d, "wdt", ""), "timeout_ms", "wdt.",
                                     1000, 600000, 30000, " ms")}
    return out


def _is_topic_root(s):
    if not s or len(s) > 64 or s[0] == "$":
        return False
    for level in s.split("/"):
        if not level or "+" in level or "#" in level or "\x00" in level:
            return False
    return True


def check_identity(d):
    """Check a node identity dict; return a new dict with every default filled."""
    if not isinstance(d, dict):
        _fail("identity", "must be a table, not " + _type_name(d))
    _keys(d, KEYS["identity"], "")
    node = _get(d, "node", "", "str")
    if not _is_id(node, 2):
        _fail("node", "%r is not a node id (2-32 of a-z, 0-9, '-'; not starting with '-')" % node)
    root = _get(d, "root", "", "str", "iwaki")
    if not _is_topic_root(root):
        _fail("root", "%r is not an MQTT topic root (no +, #, empty level or leading $)" % root)
    tls = _get(d, "tls", "", "bool", False)
    b = _get(d, "broker", "", "table")
    _keys(b, KEYS["broker"], "broker.")
    host = _get(b, "host", "broker.", "str")
    if not host or " " in host:
        _fail("broker.host", "%r is not a host name" % host)
    port = _int(b, "port", "broker.", 1, 65535, 8883 if tls else 1883)
    user = _get(d, "user", "", "str")
    if not user:
        _fail("user", "must not be empty (every node has its own credentials)")
    out = {"node": node, "root": root, "broker": {"host": host, "port": port},
           "user": user, "password": _get(d, "password", "", "str"), "tls": tls}
    if "wifi" in d:
        w = _get(d, "wifi", "", "table")
        _keys(w, KEYS["wifi"], "wifi.")
        ssid = _get(w, "ssid", "wifi.", "str")
        if not 0 < len(ssid) <= 32:
            _fail("wifi.ssid", "must be 1 to 32 characters")
        out["wifi"] = {"ssid": ssid, "password": _get(w, "password", "wifi.", "str", "")}
    if "ota_keys" in d:
        keys = _get(d, "ota_keys", "", "list")  # empty: this node takes no updates
        if len(keys) > 8:
            _fail("ota_keys", "lists %d keys, at most 8" % len(keys))
        for i, k in enumerate(keys):
            if not isinstance(k, str) or len(k) != 64 or k.strip("0123456789abcdef"):
                _fail("ota_keys[%d]" % i, "%r is not an Ed25519 public key (64 lowercase hex digits)" % (k,))
        out["ota_keys"] = list(keys)
    if "fleet_url" in d:
        url = _get(d, "fleet_url", "", "str")
        if not url.startswith("http://") or len(url) < 8 or " " in url:
            _fail("fleet_url", "%r is not an http:// URL (the node fetches signed updates over plain "
                  "HTTP: the signature, not TLS, protects them)" % url)
        out["fleet_url"] = url
    return out


def _read_json(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        # errno differs between ports (the VM says 44 for ENOENT): look instead
        i = path.rfind("/")
        try:
            present = path[i + 1:] in os.listdir(path[:i] if i > 0 else "/" if i == 0 else ".")
        except OSError:
            present = False
        _fail(path, "cannot read (OSError %s)" % e.args[0] if present else "file not found")
    try:
        return json.loads(text)
    except ValueError:
        _fail(path, "not valid JSON")


def load_profile(path):
    """Read the compiled board profile (JSON) from the node's filesystem and check it."""
    return check_profile(_read_json(path))


def load_identity(path):
    """Read the node identity (JSON) from the node's filesystem and check it."""
    return check_identity(_read_json(path))


def _quote(s):
    r = ['"']
    for ch in s:
        if ch == '"' or ch == "\\":
            r.append("\\" + ch)
        elif ch < " ":
            r.append("\\u%04x" % ord(ch))
        else:
            r.append(ch)
    r.append('"')
    return "".join(r)


def _canon(v, h):
    # canonical JSON: sorted keys, no spaces, UTF-8, floats as %.6g (the
    # board's single-precision floats print the same as CPython's doubles)
    if v is None or v is True or v is False:
        h.update(("null" if v is None else "true" if v else "false").encode())
    elif isinstance(v, int):
        h.update(str(v).encode())
    elif isinstance(v, float):
        h.update(("%.6g" % v).encode())
    elif isinstance(v, str):
        h.update(_quote(v).encode())
    elif isinstance(v, dict):
        sep = b"{"
        for k in sorted(v):
            h.update(sep + _quote(k).encode() + b":")
            _canon(v[k], h)
            sep = b","
        h.update(b"}" if sep == b"," else b"{}")
    elif isinstance(v, (list, tuple)):
        sep = b"["
        for x in v:
            h.update(sep)
            _canon(x, h)
            sep = b","
        h.update(b"]" if sep == b"," else b"[]")
    else:
        _fail("profile", "cannot hash a " + _type_name(v))


def profile_hash(d):
    """First 12 hex digits of the SHA-256 of d as canonical JSON: the config hash."""
    h = hashlib.sha256()
    _canon(d, h)
    return "".join(["%02x" % b for b in h.digest()[:6]])
