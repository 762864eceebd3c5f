# The boot counter on flash: it is the node's boot id in every sequence number.
import os


def next_boot(path):
    """Increment and return the boot count kept in `path` (1 on first boot).
    Written to a temporary file and renamed, so power loss keeps the old or
    the new count, never a torn one."""
    n = 0
    try:
        with open(path) as f:
            n = int(f.read())
    except (OSError, ValueError):
        pass
    n += 1
    with open(path + ".tmp", "w") as f:
        f.write(str(n))
    os.rename(path + ".tmp", path)
    return n


RESET_CAUSES = {1: "power_on", 2: "hard", 3: "watchdog", 4: "deep_sleep", 5: "soft"}


def reset_cause_name(code):
    return RESET_CAUSES.get(code, "unknown")
