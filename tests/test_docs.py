"""The docs stay in step with the code: every command and option of every
CLI is in docs/cli.md, every payload schema and topic kind in docs/mqtt.md."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_DOC = (REPO / "docs" / "cli.md").read_text()
MQTT_DOC = (REPO / "docs" / "mqtt.md").read_text()

COMMANDS = [("fleet", "serve"), ("fleet", "nodes"), ("fleet", "demo"), ("fleet", "credentials"), ("fleet", "alerts"),
            ("fleet", "broker-config"), ("fleet", "tokens"),
            ("fleet", "keys"), ("fleet", "release"), ("fleet", "rollout"),
            ("tools.boards", "check"), ("tools.boards", "compile"), ("tools.bench", "sampler"),
            ("tools.bench", "sensors"), ("tools.bench", "relay"), ("tools.bench", "ota"),
            ("tools.flash", None), ("tools.provision", None), ("tools.monitor", None)]  # None: no subcommands


def help_text(*argv):
    argv = [a for a in argv if a is not None]
    proc = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("prog,cmd", COMMANDS)
def test_every_cli_option_is_documented(prog, cmd):
    section = re.search(r"^### `(?:%s )?%s\b.*?(?=^##|\Z)" % (re.escape(prog), cmd or re.escape(prog)),
                        CLI_DOC, re.S | re.M)
    assert section, f"docs/cli.md has no section for {prog} {cmd}"
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", help_text(prog, cmd))) - {"--help"}
    missing = [o for o in sorted(options) if f"`{o}`" not in section.group(0)]
    assert not missing, f"{prog} {cmd}: undocumented options {missing}"


@pytest.mark.parametrize("prog", sorted({p for p, c in COMMANDS if c}))
def test_every_cli_command_is_documented(prog):
    text = help_text(prog)
    listed = re.search(r"\{([a-z,-]+)\}", text)
    names = listed.group(1).split(",") if listed else re.findall(r"^    ([a-z][a-z-]+)\s", text, re.M)
    assert names, text
    for name in names:
        assert (prog, name) in COMMANDS, f"{prog} {name} is not in this test's list"
        assert re.search(r"^### `[^`]*%s\b" % re.escape(name), CLI_DOC, re.M), f"{prog} {name} undocumented"


def test_every_schema_and_topic_kind_is_in_the_mqtt_contract():
    for schema in (REPO / "fleet" / "schemas").glob("*.json"):
        if schema.stem != "common":
            assert f"`{schema.name}`" in MQTT_DOC, f"{schema.name} missing from docs/mqtt.md"
            kind = "cmd/<name>" if schema.stem == "command" else schema.stem
            assert f"<root>/<node>/{kind}" in MQTT_DOC
