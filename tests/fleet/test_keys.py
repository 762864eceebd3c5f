"""fleet/keys.py: the OTA signing key pair on disk, rotation, refusals, and `fleet keys`."""
import hashlib
import json
import os
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet import cli
from fleet import keys as K


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_a_pkcs8_private_key_and_a_hex_public_key(tmp_path):
    d = tmp_path / "keys"
    info = K.create(d)
    private = serialization.load_pem_private_key((d / K.PRIVATE).read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert (d / K.PRIVATE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert mode(d / K.PRIVATE) == 0o600 and mode(d) == 0o700
    text = (d / K.PUBLIC).read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    raw = bytes.fromhex(text.strip())
    assert raw == private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert info == {"key_id": hashlib.sha256(raw).hexdigest()[:16], "public": text.strip(), "dir": str(d)}
    assert K.show(d) == {"dir": str(d), "current": {"key_id": info["key_id"], "public": info["public"]},
                         "retired": []}


def test_the_signer_signs_what_the_public_key_verifies(tmp_path):
    K.create(tmp_path)
    signer = K.load_signer(tmp_path)
    sig = signer.sign(b"manifest bytes")
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer.public)).verify(sig, b"manifest bytes")
    assert K.verify_signature(signer.public, sig, b"manifest bytes")
    assert not K.verify_signature(signer.public, sig, b"manifest bytes!")
    assert not K.verify_signature(signer.public, b"\0" * 64, b"manifest bytes")


def test_create_refuses_to_replace_a_key(tmp_path):
    first = K.create(tmp_path)
    with pytest.raises(K.KeysError, match=f"already has a signing key \\({first['key_id']}\\).*keys rotate"):
        K.create(tmp_path)
    assert K.show(tmp_path)["current"]["key_id"] == first["key_id"]


def test_rotate_retires_the_old_pair_and_still_names_it(tmp_path):
    old = K.create(tmp_path)
    old_signer = K.load_signer(tmp_path)
    new = K.rotate(tmp_path)
    assert new["retired"] == old["key_id"] and new["key_id"] != old["key_id"]
    assert (tmp_path / f"ota-signing.{old['key_id']}.key").exists()
    assert (tmp_path / f"ota-signing.{old['key_id']}.pub").read_text().strip() == old["public"]
    assert mode(tmp_path / f"ota-signing.{old['key_id']}.key") == 0o600
    assert list(K.public_keys(tmp_path).items()) == [(new["key_id"], new["public"]), (old["key_id"], old["public"])]
    assert K.load_signer(tmp_path).key_id == new["key_id"]
    retired = K.load_signer(tmp_path, old["key_id"])
    assert retired.key_id == old["key_id"] and retired.sign(b"x") == old_signer.sign(b"x")
    third = K.rotate(tmp_path)
    assert [k["key_id"] for k in K.show(tmp_path)["retired"]] == sorted([old["key_id"], new["key_id"]])
    assert K.show(tmp_path)["current"]["key_id"] == third["key_id"]
    assert sorted(p.name for p in tmp_path.iterdir() if ".new" in p.name) == []


def test_no_key_yet_says_how_to_make_one(tmp_path):
    for call in (K.load_signer, K.public_keys, K.show, K.rotate):
        with pytest.raises(K.KeysError, match=r"no signing key in .*run `python -m fleet keys create`"):
            call(tmp_path / "empty")
    K.create(tmp_path)
    with pytest.raises(K.KeysError, match="no signing key 'abcdef0123456789'.*known: "):
        K.load_signer(tmp_path, "abcdef0123456789")


def test_a_key_directory_in_a_git_work_tree_is_refused_except_under_var(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(K.KeysError, match=r"inside the git work tree .*repo: a private key there could be "
                                          r"committed; use .*repo/var/keys"):
        K.create(repo / "keys")
    assert not (repo / "keys").exists()
    assert K.create(repo / "var" / "keys")["key_id"]


def test_a_private_key_others_can_read_is_refused(tmp_path):
    K.create(tmp_path)
    os.chmod(tmp_path / K.PRIVATE, 0o644)
    with pytest.raises(K.KeysError, match=r"can be read by other users \(mode 644\); run `chmod 600 "):
        K.load_signer(tmp_path)


def test_a_damaged_public_key_is_reported(tmp_path):
    K.create(tmp_path)
    (tmp_path / K.PUBLIC).write_text("not hex\n")
    with pytest.raises(K.KeysError, match="is not a public key"):
        K.public_keys(tmp_path)


def test_the_directory_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(K.KEYS_DIR_ENV, raising=False)
    assert str(K.directory()) == "var/keys"
    monkeypatch.setenv(K.KEYS_DIR_ENV, str(tmp_path / "env"))
    assert K.directory() == tmp_path / "env"
    assert K.directory(tmp_path / "arg") == tmp_path / "arg"


def test_cli_create_rotate_show(tmp_path, capsys):
    d = str(tmp_path / "k")
    assert cli.main(["keys", "show", "--dir", d]) == 1
    assert "fleet: no signing key in" in capsys.readouterr().err
    assert cli.main(["keys", "create", "--dir", d]) == 0
    out = capsys.readouterr()
    key_id, public = out.out.split()
    assert "keep it off the nodes" in out.err and "PRIVATE" not in out.out
    assert cli.main(["keys", "create", "--dir", d]) == 1
    assert "already has a signing key" in capsys.readouterr().err
    assert cli.main(["keys", "rotate", "--dir", d]) == 0
    assert f"--sign-with {key_id}" in capsys.readouterr().err
    assert cli.main(["keys", "show", "--dir", d, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["retired"] == [{"key_id": key_id, "public": public}]
    assert cli.main(["keys", "show", "--dir", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("current  ") and lines[1] == f"retired  {key_id}  {public}"
