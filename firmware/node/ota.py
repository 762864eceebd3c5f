# Over-the-air updates, the node's side (docs/ota.md): a signed manifest,
# SHA-256 per file, a resumable download into the inactive slot, an atomic
# switch to a trial boot, a commit only after the health check, and rollback
# otherwise. Image updates stream a MicroPython image into the next app
# partition through esp32.Partition, with the bootloader's rollback rule.
#
# On flash, under <root>/ota/: state.json (which slot runs, the pending trial,
# the last outcome; replaced atomically through state.tmp), progress.json
# (which manifest the partial download belongs to), and the slots a/ and b/,
# each a full copy of the root layout (main.py, node/...). boot.py reads
# state.json at reset and puts the chosen slot first on sys.path.
import asyncio
import hashlib
import json
import os
from binascii import hexlify, unhexlify

from micropython import const

from node import http

_CHUNK = const(4096)
_DEADLINE_S = const(120)  # a trial must pass its health check within this
_TICKS = const(10)  # sampling-loop ticks the trial must run
_RETRIES = const(4)  # attempts per download before the update fails
_MANIFEST_MAX = const(65536)
_MARGIN = const(8192)  # free flash kept beyond the download itself
_SAVE_BLOCKS = const(16)  # image: progress saved every 16 blocks (64 KiB)
_HEX = "0123456789abcdef"
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


class OTAError(Exception):
    """An update refused or failed; args[0] is the reason the fleet sees. It
    starts with one of: bad manifest, bad signature, unknown key, no keys,
    wrong board, downgrade, below min_version, rolled back before, hash
    mismatch, no space, network, flash."""


def version_tuple(v):
    """'1.10.0' -> (1, 10) (trailing zeros dropped, so 1.2 == 1.2.0);
    OTAError unless v is dotted non-negative integers."""
    if not isinstance(v, str) or not 0 < len(v) <= 32:
        raise OTAError("bad manifest: version %r is not dotted integers" % (v,))
    t = []
    for p in v.split("."):
        if not p or not p.isdigit():
            raise OTAError("bad manifest: version %r is not dotted integers" % (v,))
        t.append(int(p))
    while len(t) > 1 and t[-1] == 0:
        t.pop()
    return tuple(t)


def _own_tuple(v):
    # the running version: a development build ("<dev>") is older than any release
    try:
        return version_tuple(v)
    except OTAError:
        return (0,)


def _is_hex(s, n):
    if not isinstance(s, str) or len(s) != n:
        return False
    for ch in s:
        if ch not in _HEX:
            return False
    return True


def _safe_path(p):
    # relative, no empty, "." or ".." part, plain characters, not our temp suffix
    if not isinstance(p, str) or not 0 < len(p) <= 128 or p.endswith(".part"):
        return False
    for part in p.split("/"):
        if not part or part == "." or part == "..":
            return False
        for ch in part:
            if ch not in _NAME_CHARS:
                return False
    return True


def key_id(raw):
    """The key id of a 32-byte public key: first 16 hex digits of its SHA-256."""
    return hexlify(hashlib.sha256(raw).digest()[:8]).decode()


def parse_manifest(data):
    """Check a manifest (the exact signed bytes) and return it as a dict;
    OTAError("bad manifest: ...") saying what is wrong."""
    try:
        m = json.loads(data)
    except ValueError:
        raise OTAError("bad manifest: not JSON")
    if not isinstance(m, dict) or m.get("v") != 1:
        raise OTAError("bad manifest: not a version 1 manifest")
    kind = m.get("kind")
    if kind not in ("bundle", "image"):
        raise OTAError("bad manifest: kind %r is not bundle or image" % (kind,))
    version_tuple(m.get("version"))
    if m.get("min_version") is not None:
        version_tuple(m["min_version"])
    boards = m.get("boards")
    if not isinstance(boards, list) or not boards or not all(isinstance(b, str) for b in boards):
        raise OTAError("bad manifest: boards must be a list of board names")
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise OTAError("bad manifest: no files")
    seen = set()
    total = 0
    for f in files:
        p = f.get("path") if isinstance(f, dict) else None
        if not _safe_path(p) or p in seen:
            raise OTAError("bad manifest: file path %r" % (p,))
        seen.add(p)
        size = f.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OTAError("bad manifest: size of %s" % p)
        if not _is_hex(f.get("sha256"), 64):
            raise OTAError("bad manifest: sha256 of %s" % p)
        total += size
    if kind == "image" and len(files) != 1:
        raise OTAError("bad manifest: an image release has exactly one file")
    if m.get("total_size") != total:
        raise OTAError("bad manifest: total_size is not the sum of the file sizes")
    keys = m.get("ota_keys")
    if keys is not None and (not isinstance(keys, list) or not 0 < len(keys) <= 8
                             or not all(_is_hex(k, 64) for k in keys)):
        raise OTAError("bad manifest: ota_keys must be 1 to 8 keys of 64 lowercase hex digits")
    return m


def check_signature(data, sig_text, keys, kid):
    """Raise OTAError unless sig_text (128 hex digits) is an Ed25519
    signature of data by one of keys (hex) — the one named kid, if given."""
    sig = sig_text.strip()
    if isinstance(sig, bytes):
        sig = sig.decode()
    if not _is_hex(sig, 128):
        raise OTAError("bad signature: manifest.sig is not 128 lowercase hex digits")
    if not keys:
        raise OTAError("no keys: identity.json has no ota_keys, this node cannot verify updates")
    raws = [unhexlify(k) for k in keys]
    if kid is not None:
        raws = [r for r in raws if key_id(r) == kid]
        if not raws:
            raise OTAError("unknown key: signed with key %s, this node trusts %s"
                           % (kid, ", ".join(key_id(unhexlify(k)) for k in keys)))
    from node.ed25519 import verify
    s = unhexlify(sig)
    for raw in raws:
        if verify(raw, data, s):
            return
    raise OTAError("bad signature: the manifest is not signed by a trusted key")


def read_json(path):
    """A JSON file as a dict, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            d = json.loads(f.read())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path, d):
    """Replace path (x.json) atomically: write x.tmp, then rename it over."""
    tmp = path[:-5] + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(d))
    os.rename(tmp, path)


def read_state(root):
    """<root>/ota/state.json with every key present (the factory state when missing)."""
    st = read_json(root + "/ota/state.json") or {}
    for k, v in (("active", "root"), ("version", None), ("trial", None), ("previous", None),
                 ("last", None)):
        if k not in st:
            st[k] = v
    return st


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def _is_dir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def _mkdirs(path):
    p = ""
    for part in path.split("/"):
        p = p + "/" + part if p or path.startswith("/") else part
        if part and not _is_dir(p):
            os.mkdir(p)


def _sha_file(path, buf, h=None):
    # stream a file through SHA-256 (h continues a hash when given)
    h = h or hashlib.sha256()
    mv = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h


def _rm_tree(path, keep):
    # remove everything under path whose relative name is not in keep
    # (a set of files and the directories leading to them)
    def walk(d, rel):
        for name in os.listdir(d):
            p = d + "/" + name
            r = rel + name
            if _is_dir(p):
                walk(p, r + "/")
                if r not in keep:
                    os.rmdir(p)
            elif r not in keep:
                os.remove(p)
    walk(path, "")


class Ota:
    """The OTA state machine of one node. node is the running Node (uplink
    for replies, profile, drivers, clock, fw, reboot()); root its flash root
    ("" on a board); connect opens TCP streams; esp32 is the esp32 module (a
    simulation on the host), imported on a board when first needed."""

    def __init__(self, node, root, identity, connect, esp32=None):
        self.node = node
        self.root = root
        self.dir = root + "/ota"
        self.connect = connect
        self.esp32 = esp32
        self.keys = identity.get("ota_keys") or []
        self.fleet_url = identity.get("fleet_url")
        self.statvfs = os.statvfs  # the free-space source (tests hand in a full disk)
        self.backoff_ms = 1000  # first retry after a network failure, doubling
        self.deadline_s = _DEADLINE_S  # for the next trial's health check
        self.st = read_state(root)
        self.task = None
        self.job = None
        self.stats = {}
        t = self.st["trial"]
        # boots >= 1: boot.py counted this boot into the trial
        self.trial = t if t and t.get("boots", 0) >= 1 else None

    def trusted(self):
        """The public keys (hex) a release must be signed with: those the last
        committed release listed ("ota_keys", a key rotation), else the
        identity's -- and the identity's again once it is re-provisioned."""
        st = self.st
        if st.get("ota_keys") and st.get("ota_keys_over") == self.keys:
            return st["ota_keys"]
        return self.keys

    # -- what the node says about updates
    def birth(self):
        """The birth's "ota" object, or None."""
        if self.trial:
            return {"state": "trial", "version": self.trial["version"]}
        last = self.st["last"]
        if last:
            o = {"state": last["state"], "version": last["version"]}
            if last.get("reason"):
                o["reason"] = last["reason"]
            return o
        return None

    def _reply(self, cid, state, version, frm, done=0, total=0, reason=None):
        o = {"state": state, "version": version, "from": frm, "done": done, "total": total}
        if reason:
            o["reason"] = reason
        body = {"id": cid, "ok": state not in ("failed", "rolled_back"), "result": {"ota": o}}
        if not body["ok"]:
            body["error"] = "ota %s: %s" % (state, reason)
        self.node.uplink.publish("reply", body)

    def _say(self, state=None, reason=None):
        j = self.job
        if state:
            j["state"] = state
        self._reply(j["id"], j["state"], j["version"], j["from"], j["done"], j["total"], reason)

    def _write(self, name, d):
        write_json(self.dir + "/" + name, d)
        self.stats["records"] = self.stats.get("records", 0) + 1

    def _save(self, st):
        self._write("state.json", st)
        self.st = st

    def _tell(self):
        # the last outcome's reply, once (boot.py records crash-loop rollbacks)
        last = self.st["last"]
        if last and not last.get("told"):
            self._reply(last.get("id") or "?", last["state"], last["version"], last.get("from"),
                        last.get("total", 0), last.get("total", 0), last.get("reason"))
            st = dict(self.st)
            st["last"] = dict(last)
            st["last"]["told"] = True
            self._save(st)

    def start(self):
        """Called once the node runs: report the outcome of the last update
        and, during a trial, start the health check (a task)."""
        t = self.trial
        if t and t.get("kind") == "image":
            P = self._partitions()
            running = P(P.RUNNING).info()[4]
            if running != t["part"]:
                self.trial = None
                self._end(t, "rolled_back", "the new image did not start: the bootloader runs %s" % running)
        self._tell()
        if self.trial:
            t = self.trial
            self._reply(t.get("id") or "?", "trial", t["version"], t.get("from"), t.get("total", 0),
                        t.get("total", 0))
            return asyncio.create_task(self.run_trial())
        return None

    # -- the command
    def on_message(self, msg):
        """An ota command as received (docs/mqtt.md): answer on the reply topic."""
        cid = "?"
        try:
            d = json.loads(msg)
            cid = str(d["id"])
            result = self.command(cid, d.get("args") or {})
            self.node.uplink.publish("reply", {"id": cid, "ok": True, "result": result})
        except Exception as e:  # a bad command must never stop the node
            self.node.uplink.publish("reply", {"id": cid, "ok": False, "error": "ota: %s" % e})

    def command(self, cid, args):
        """Start an update (args: url, version, kind, force); returns the first
        reply's result. ValueError for bad arguments or when busy."""
        if not isinstance(args, dict):
            raise ValueError("args must be an object")
        version = args.get("version")
        try:
            version_tuple(version)
        except OTAError:
            raise ValueError("version %r is not dotted integers" % (version,))
        kind = args.get("kind", "bundle")
        if kind not in ("bundle", "image"):
            raise ValueError("kind %r is not bundle or image" % (kind,))
        force = args.get("force", False)
        if force is not True and force is not False:
            raise ValueError("force must be true or false")
        url = args.get("url")
        if not url and self.fleet_url:
            url = "/ota/releases/%s/" % version
        if isinstance(url, str) and url.startswith("/") and self.fleet_url:
            url = self.fleet_url.rstrip("/") + url
        if not isinstance(url, str):
            raise ValueError("url missing (and no fleet_url in identity.json)")
        if not url.endswith("/"):
            url += "/"
        try:
            http.split_url(url)
        except http.HTTPError as e:
            raise ValueError(str(e))
        t = self.trial
        if t:
            if t["version"] != version:
                raise ValueError("busy: the trial of %s must commit or roll back first" % t["version"])
            return {"ota": {"state": "trial", "version": version, "from": t.get("from"),
                            "done": t.get("total", 0), "total": t.get("total", 0)}}
        j = self.job
        if self.task is not None and not self.task.done():
            if j["version"] != version or j["kind"] != kind:
                raise ValueError("busy: updating to %s" % j["version"])
            j["id"] = cid  # the fleet asked again: later replies use the new id
        else:
            j = self.job = {"id": cid, "version": version, "kind": kind, "state": "downloading",
                            "from": self.node.fw, "done": 0, "total": 0}
            self.task = asyncio.create_task(self._run(url, force))
        return {"ota": {"state": j["state"], "version": version, "from": j["from"],
                        "done": j["done"], "total": j["total"]}}

    async def _run(self, url, force):
        clock = self.node.clock
        t0 = clock.ticks_ms()
        self.stats = {"requests": 0, "fetched": 0, "writes": 0, "written": 0, "files": 0}
        self._buf = bytearray(_CHUNK)
        try:
            m, raw = await self._manifest(url, force)
            self.job["total"] = m["total_size"]
            self._next = m["total_size"] // 4
            if m["kind"] == "bundle":
                await self._bundle(url, m, raw)
            else:
                await self._image(url, m, raw)
        except OTAError as e:
            self._say("failed", str(e))
        except http.HTTPError as e:
            self._say("failed", "network: %s" % e)
        except OSError as e:
            self._say("failed", ("no space: flash full (%s)" if e.args and e.args[0] == 28
                                 else "flash: %s") % e)
        except Exception as e:  # a bug must not take the node down with it
            self._say("failed", "internal error: %r" % (e,))
        finally:
            self._buf = None
            self.stats["ms"] = clock.ticks_diff(clock.ticks_ms(), t0)

    async def _retry(self, fn, *args):
        # fn(*args) again after a network failure, backing off; the last failure raised
        for attempt in range(_RETRIES):
            try:
                return await fn(*args)
            except http.HTTPError as e:
                if e.status or attempt == _RETRIES - 1:
                    raise
                await self.node.clock.sleep_ms(self.backoff_ms << attempt)

    async def _fetch(self, url, limit):
        self.stats["requests"] += 1
        data = await http.fetch(self.connect, url, limit)
        self.stats["fetched"] += len(data)
        return data

    async def _manifest(self, url, force):
        raw = await self._retry(self._fetch, url + "manifest.json", _MANIFEST_MAX)
        sig = await self._retry(self._fetch, url + "manifest.sig", 256)
        m = parse_manifest(raw)
        check_signature(raw, sig, self.trusted(), m.get("key_id"))
        j = self.job
        v = m["version"]
        if v != j["version"] or m["kind"] != j["kind"]:
            raise OTAError("bad manifest: it is for %s %s, the command asked for %s %s"
                           % (m["kind"], v, j["kind"], j["version"]))
        board = self.node.profile["name"]
        if board not in m["boards"]:
            raise OTAError("wrong board: %s is for %s, this node is %s" % (v, ", ".join(m["boards"]), board))
        own = self.st.get("image") if m["kind"] == "image" and self.st.get("image") else self.node.fw
        if m.get("min_version") and _own_tuple(own) < version_tuple(m["min_version"]):
            raise OTAError("below min_version: %s needs %s or later, this node runs %s"
                           % (v, m["min_version"], own))
        if not force and version_tuple(v) <= _own_tuple(own):
            raise OTAError("downgrade: %s is not newer than the running %s (force to override)" % (v, own))
        last = self.st["last"]
        if not force and last and last["state"] == "rolled_back" and last["version"] == v:
            raise OTAError("rolled back before: %s (%s); force to try again" % (v, last.get("reason")))
        return m, raw

    def _progress(self, n):
        j = self.job
        j["done"] += n
        if j["done"] >= self._next and j["done"] < j["total"]:
            self._next += j["total"] // 4 or 1
            self._say()

    # -- bundles: files into the inactive slot
    async def _bundle(self, url, m, raw):
        slot = "b" if self.st["active"] == "a" else "a"
        d = self.dir + "/" + slot
        _mkdirs(d)
        sha = hexlify(hashlib.sha256(raw).digest()).decode()
        prog = read_json(self.dir + "/progress.json")
        same = prog is not None and prog.get("sha") == sha and prog.get("slot") == slot
        keep = set()
        for f in m["files"]:
            p = f["path"]
            keep.add(p)
            if same:
                keep.add(p + ".part")  # a partial download of this very release
            i = p.find("/")
            while i > 0:
                keep.add(p[:i])
                i = p.find("/", i + 1)
        _rm_tree(d, keep)  # older releases' files (a stale .py would shadow a new .mpy)
        if not same:
            self._write("progress.json", {"version": m["version"], "sha": sha, "slot": slot})
        todo = []
        buf = self._buf
        for f in m["files"]:
            p = d + "/" + f["path"]
            if _size(p) == f["size"] and hexlify(_sha_file(p, buf).digest()).decode() == f["sha256"]:
                self.job["done"] += f["size"]  # already there (resumed, or unchanged)
            else:
                todo.append(f)
        s = self.statvfs(self.root or "/")
        bs = s[0] or _CHUNK
        need = _MARGIN
        for f in todo:
            need += (f["size"] + bs - 1) // bs * bs - max(0, _size(d + "/" + f["path"] + ".part"))
        if need > s[0] * s[4]:
            raise OTAError("no space: the update needs %d bytes of flash, %d are free" % (need, s[0] * s[4]))
        self._say("downloading")
        for f in todo:
            await self._file(url, d, f)
            self.stats["files"] += 1
        self._say("verifying")
        for f in m["files"]:
            if hexlify(_sha_file(d + "/" + f["path"], buf).digest()).decode() != f["sha256"]:
                raise OTAError("hash mismatch: %s reads back wrong from flash" % f["path"])
            await asyncio.sleep_ms(0)
        await self._stage(m, {"kind": "bundle", "slot": slot})

    async def _file(self, url, d, f):
        path = d + "/" + f["path"]
        part = path + ".part"
        i = path.rfind("/")
        _mkdirs(path[:i])
        size = f["size"]
        fresh = False  # one more try from byte 0 when a resumed file does not match
        attempt = 0
        base = self.job["done"]
        while True:
            have = _size(part)
            if have > size:
                os.remove(part)
                have = -1
            h = _sha_file(part, self._buf) if have > 0 else hashlib.sha256()
            self.job["done"] = base + max(have, 0)
            try:
                if have < size:
                    await self._get(url + "files/" + f["path"], part, max(have, 0), size, h)
            except http.HTTPError as e:
                attempt += 1
                if e.status or attempt >= _RETRIES:
                    raise
                await self.node.clock.sleep_ms(self.backoff_ms << (attempt - 1))
                continue
            if hexlify(h.digest()).decode() == f["sha256"]:
                os.rename(part, path)
                return
            os.remove(part)
            if have <= 0 or fresh:
                raise OTAError("hash mismatch: %s" % f["path"])
            fresh = True

    async def _get(self, url, part, have, size, h):
        self.stats["requests"] += 1
        resp = await http.get(self.connect, url, have)
        try:
            if resp.start != have:  # a 200 to a Range request: start this file over
                os.remove(part)
                raise http.HTTPError("the server ignored the Range request")
            if resp.length is not None and resp.length != size - have:
                raise OTAError("hash mismatch: %s is %d bytes on the server, the manifest says %d"
                               % (url, resp.start + resp.length, size))
            st = self.stats
            with open(part, "ab" if have else "wb") as out:
                while have < size:
                    data = await resp.read(_CHUNK)
                    if not data:
                        raise http.HTTPError("connection closed at byte %d of %d" % (have, size))
                    out.write(data)
                    h.update(data)
                    have += len(data)
                    st["fetched"] += len(data)
                    st["writes"] += 1
                    st["written"] += len(data)
                    self._progress(len(data))
        finally:
            resp.close()

    # -- images: the next app partition
    def _partitions(self):
        if self.esp32 is None:
            import esp32  # a board: the real module, looked up only when needed
            self.esp32 = esp32
        return self.esp32.Partition

    async def _image(self, url, m, raw):
        f = m["files"][0]
        P = self._partitions()
        part = P(P.RUNNING).get_next_update()
        label = part.info()[4]
        bs = part.ioctl(5, 0)
        size = f["size"]
        if size > bs * part.ioctl(4, 0):
            raise OTAError("no space: the image is %d bytes, partition %s holds %d"
                           % (size, label, bs * part.ioctl(4, 0)))
        sha = hexlify(hashlib.sha256(raw).digest()).decode()
        prog = read_json(self.dir + "/progress.json")
        if prog is not None and prog.get("sha") == sha and prog.get("part") == label:
            have = min(prog.get("blocks", 0) * bs, size // bs * bs)
        else:
            have = 0
            _mkdirs(self.dir)
            self._write("progress.json", {"version": m["version"], "sha": sha, "part": label, "blocks": 0})
        buf = bytearray(bs)
        h = hashlib.sha256()
        for b in range(have // bs):
            part.readblocks(b, buf)
            h.update(buf)
        self.job["done"] = have
        self._say("downloading")
        attempt = 0
        while have < size:
            try:
                have = await self._blocks(url + "files/" + f["path"], part, buf, have, size, h, sha, label, m)
            except http.HTTPError as e:
                attempt += 1
                if e.status or attempt >= _RETRIES:
                    raise
                await self.node.clock.sleep_ms(self.backoff_ms << (attempt - 1))
        if hexlify(h.digest()).decode() != f["sha256"]:
            os.remove(self.dir + "/progress.json")
            raise OTAError("hash mismatch: %s" % f["path"])
        self._say("verifying")
        h = hashlib.sha256()
        n = 0
        while n < size:
            part.readblocks(n // bs, buf)
            h.update(buf if size - n >= bs else memoryview(buf)[:size - n])
            n += bs
            if n % (bs * _SAVE_BLOCKS) == 0:
                await asyncio.sleep_ms(0)
        if hexlify(h.digest()).decode() != f["sha256"]:
            raise OTAError("hash mismatch: %s reads back wrong from partition %s" % (f["path"], label))
        await self._stage(m, {"kind": "image", "slot": None, "part": label}, part)

    async def _blocks(self, url, part, buf, have, size, h, sha, label, m):
        # one request: whole blocks into the partition from byte `have` (a block boundary)
        bs = len(buf)
        self.stats["requests"] += 1
        resp = await http.get(self.connect, url, have)
        mv = memoryview(buf)
        try:
            if resp.start != have:
                raise http.HTTPError("server ignored the Range request", 0)
            if resp.length is not None and resp.length != size - have:
                raise OTAError("hash mismatch: the image is %d bytes on the server, the manifest says %d"
                               % (resp.start + resp.length, size))
            st = self.stats
            while have < size:
                n = min(bs, size - have)
                fill = 0
                while fill < n:
                    data = await resp.read(n - fill)
                    if not data:
                        raise http.HTTPError("connection closed at byte %d of %d" % (have + fill, size))
                    mv[fill:fill + len(data)] = data
                    fill += len(data)
                for i in range(n, bs):
                    buf[i] = 0xFF  # erased flash past the image's end
                part.writeblocks(have // bs, buf)
                h.update(mv[:n])
                have += n
                st["fetched"] += n
                st["writes"] += 1
                st["written"] += bs
                self._progress(n)
                if have % (bs * _SAVE_BLOCKS) == 0 and have < size:
                    self._write("progress.json", {"version": m["version"], "sha": sha, "part": label,
                                                  "blocks": have // bs})
            return have
        finally:
            resp.close()

    # -- the switch, the trial, commit and rollback
    async def _stage(self, m, where, part=None):
        j = self.job
        n = self.node
        t = {"kind": where["kind"], "slot": where["slot"], "version": m["version"], "boots": 0,
             "deadline_s": self.deadline_s, "id": j["id"], "from": j["from"], "total": m["total_size"],
             "failed_before": [d.KIND for d in n.drivers if d.status == "failed"]}
        if "part" in where:
            t["part"] = where["part"]
        if m.get("ota_keys"):
            t["ota_keys"] = m["ota_keys"]
        st = dict(self.st)
        st["trial"] = t
        _mkdirs(self.dir)
        self._save(st)  # the switch: boot.py boots the trial from the next reset
        if part is not None:
            try:
                part.set_boot()
            except OSError as e:
                st = dict(self.st)
                st["trial"] = None
                self._save(st)
                raise OTAError("flash: the bootloader refused the image (%s)" % e)
        try:
            os.remove(self.dir + "/progress.json")
        except OSError:
            pass
        j["done"] = j["total"]
        self._say("staged")
        n.reboot("ota: trial of %s" % m["version"])

    async def run_trial(self):
        """The trial's health check: commit once the broker was reached, no
        sensor has failed (that had not before) and the sampling loop ran
        10 ticks; roll back on a failed sensor, the wrong code running, or
        when deadline_s passes first."""
        t = self.trial
        n = self.node
        clock = n.clock
        t0 = clock.ticks_ms()
        limit = t.get("deadline_s", _DEADLINE_S)
        reached = False
        while self.trial is t:
            if t.get("kind") != "image" and n.fw != t["version"]:
                return self.roll_back("the trial slot runs %s, not %s" % (n.fw, t["version"]))
            bad = [d.KIND for d in n.drivers
                   if d.status == "failed" and d.KIND not in t.get("failed_before", ())]
            if bad:
                return self.roll_back("health check: sensor %s failed" % ", ".join(bad))
            reached = reached or n.uplink.client.connected
            if reached and n.loop_ticks >= _TICKS:
                return self.commit()
            if clock.ticks_diff(clock.ticks_ms(), t0) >= limit * 1000:
                return self.roll_back("health check not passed within %d s: %s" % (
                    limit, "broker not reached" if not reached else
                    "sampling loop ran %d of %d ticks" % (n.loop_ticks, _TICKS)))
            await clock.sleep_ms(n.base_ms)  # once per sampling tick

    def _end(self, t, state, reason=None):
        st = dict(self.st)
        st["trial"] = None
        st["last"] = {"state": state, "version": t["version"], "id": t.get("id"), "from": t.get("from"),
                      "total": t.get("total", 0), "told": False}
        if reason:
            st["last"]["reason"] = reason[:200]
        if state == "committed":
            if t.get("kind") == "image":
                st["image"] = t["version"]
            else:
                st["previous"] = {"active": st["active"], "version": st["version"] or t.get("from")}
                st["active"] = t["slot"]
                st["version"] = t["version"]
            if t.get("ota_keys"):
                st["ota_keys"] = t["ota_keys"]
                st["ota_keys_over"] = self.keys  # the identity's keys they replace
        self._save(st)

    def commit(self):
        """Make the trial permanent (image: confirm it to the bootloader first)."""
        t = self.trial
        if t.get("kind") == "image":
            self._partitions().mark_app_valid_cancel_rollback()
        self._end(t, "committed")
        self.trial = None
        self._tell()

    def roll_back(self, reason):
        """Give up the trial and reboot into the previous code (image: the new
        partition was never confirmed, so the bootloader boots the previous one)."""
        t = self.trial
        self._end(t, "rolled_back", reason)
        self.trial = None
        self._tell()
        self.node.reboot("ota: rolled back %s" % t["version"])
