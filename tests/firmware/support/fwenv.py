# What the pytest harness set up for this firmware test module.
import json


def env():
    with open("/fwtest_env.json") as f:
        return json.load(f)
