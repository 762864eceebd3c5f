# Runs first at every reset. Kept tiny, and never replaced over the air: it
# picks the code to run from /ota/state.json (docs/ota.md) and leaves every
# other check to main.py, so a broken application can never stop the board
# from reaching its REPL.
#
# The running code is the root layout (/main.py, /node/...: the factory
# install) or a slot, /ota/a or /ota/b, with the same layout. A pending trial
# is booted at most 3 times; each boot is counted on flash before any of its
# code runs, so a trial that crashes or hangs (a watchdog is armed for it)
# is rolled back at the 4th reset. The app commits the trial once healthy.
import gc
import json
import os
import sys

MAX_TRIAL_BOOTS = 3


def _save(root, st):
    # atomic: power lost here leaves the old state.json or the new one
    with open(root + "/ota/state.tmp", "w") as f:
        f.write(json.dumps(st))
    os.rename(root + "/ota/state.tmp", root + "/ota/state.json")


def _has_code(root, slot):
    try:
        os.stat(root + "/ota/" + slot + "/main.py")
        os.stat(root + "/ota/" + slot + "/node")
        return True
    except (OSError, TypeError):
        return False


def select(root=""):
    """Pick the code to boot: (slot, trial) with slot "root", "a" or "b" and
    trial True when this boot is one of a pending trial's (counted here)."""
    try:
        with open(root + "/ota/state.json") as f:
            st = json.loads(f.read())
        t = st.get("trial")
        slot = st.get("active", "root")
    except (OSError, ValueError, AttributeError):
        return "root", False  # no update ever committed (or unreadable: the factory code)
    if slot != "root" and not _has_code(root, slot):
        slot = "root"
    if t:
        boots = t.get("boots", 0)
        if boots < MAX_TRIAL_BOOTS:
            t["boots"] = boots + 1
            _save(root, st)
            new = t.get("slot")
            # (a missing slot boots the old code, whose version fails the health check)
            return (new if t.get("kind") != "image" and _has_code(root, new) else slot), True
        st["trial"] = None
        st["last"] = {"state": "rolled_back", "version": t.get("version"), "id": t.get("id"),
                      "from": t.get("from"), "total": t.get("total", 0), "told": False,
                      "reason": "%d trial boots without a commit (crash or hang)" % boots}
        _save(root, st)
    return slot, False


if __name__ == "__main__":  # on the board (tests import select)
    gc.collect()
    try:
        _slot, _trial = select()
        if _slot != "root":
            # first on the path, and the directory main.py is run from
            sys.path.insert(0, "/ota/" + _slot)
            os.chdir("/ota/" + _slot)
        if _trial:
            import machine
            machine.WDT(timeout=60000)  # a trial that crashes to the REPL or hangs is reset
    except Exception as e:  # never keep the board from main.py and its REPL
        print("boot: slot selection failed:", e)
    gc.collect()
