# Starts the node on a real board. Bad configuration puts the node in safe
# mode: it prints why and returns to the REPL, reachable for repair over USB
# (mpremote), instead of boot-looping. Holding GPIO 0 low at reset does too.
import asyncio
import machine

from node.config import ConfigError, load_identity, load_profile

PROFILE = "/board.json"
IDENTITY = "/identity.json"


def _wifi(identity):
    import network
    w = network.WLAN(network.STA_IF)
    w.active(True)
    cred = identity.get("wifi")
    if cred and not w.isconnected():
        w.connect(cred["ssid"], cred["password"])
    return w


def start():
    if machine.Pin(0, machine.Pin.IN, machine.Pin.PULL_UP).value() == 0:
        print("safe mode: GPIO 0 held low at reset")
        return
    try:
        profile = load_profile(PROFILE)
        identity = load_identity(IDENTITY)
    except ConfigError as e:
        print("safe mode: bad configuration:", e)
        return
    from node.app import Node
    from node.clock import Clock

    wlan = _wifi(identity)
    node = Node(machine, Clock(), profile, identity, "", asyncio.open_connection,
                rssi=lambda: wlan.status("rssi") if wlan.isconnected() else None)
    asyncio.run(node.run())


start()
