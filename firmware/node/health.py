# The health payload (docs/mqtt.md, health): the node's own vital signs.
import gc


def sensor_states(drivers):
    out = {}
    for d in drivers:
        key = d.KIND
        i = 2
        while key in out:
            key = "%s_%d" % (d.KIND, i)
            i += 1
        out[key] = {"status": d.status, "errors": d.errors}
    return out


def health_body(node, loop_stats):
    ob = node.outbox
    return {
        "fw": node.fw,
        "config_hash": node.config_hash,
        "boot_count": node.boot,
        "reset_cause": node.reset_cause,
        "heap_free": gc.mem_free(),
        "heap_alloc": gc.mem_alloc(),
        "rssi": node.rssi() if node.rssi else None,
        "vbat_mv": node.vbat_mv() if node.vbat_mv else None,
        "loop": loop_stats,
        "outbox": {"depth": ob.depth, "bytes": ob.bytes, "dropped": ob.dropped},
        "mqtt": {"reconnects": node.uplink.reconnects},
        "sensors": sensor_states(node.drivers),
    }
