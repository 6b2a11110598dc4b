"""SGLang's ``Engine(server_args=...)`` (``entrypoints/engine.py``: a ``ServerArgs`` replaces
every other keyword), and a TP engine started from a script without a ``__main__`` guard."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from engine_core import Engine, EngineConfig, InvalidConfigError

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
IDS = [5, 9, 13, 2, 7]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ServerArgs:
    """A few of SGLang's ``ServerArgs`` fields with SGLang's defaults."""

    model_path: str
    tp_size: int = 1
    random_seed: int | None = None
    max_total_tokens: int | None = None
    device: str | None = None
    enable_lora: bool | None = None  # fixed here: accepted at its default
    speculative_eagle_topk: int | None = None  # unknown here: fine while at its default


def outputs(engine: Engine) -> list[int]:
    return engine.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]


@pytest.fixture(scope="module")
def expected(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=256, random_seed=3) as engine:
        return outputs(engine)


@pytest.mark.parametrize("form", ["dataclass", "dict", "engine_config"])
def test_server_args_object_configures_the_engine(tiny_model, expected, form):
    fields = dict(model_path=tiny_model, device="cpu", max_total_tokens=256)
    server_args = {
        "dataclass": lambda: ServerArgs(random_seed=3, **fields),
        "dict": lambda: dict(fields, random_seed=3),
        "engine_config": lambda: EngineConfig(seed=3, **fields),
    }[form]()
    with Engine(server_args=server_args) as engine:
        assert engine.config.seed == 3 and engine.config.max_total_tokens == 256
        assert engine.served["model_path"] == tiny_model
        assert outputs(engine) == expected


def test_server_args_errors_name_the_field(tiny_model):
    unknown = ServerArgs(tiny_model, device="cpu", speculative_eagle_topk=4)
    with pytest.raises(InvalidConfigError, match="speculative_eagle_topk=4"):
        Engine(server_args=unknown)
    with pytest.raises(InvalidConfigError, match=r"server_args.*also got \['tp_size'\]"):
        Engine(server_args=ServerArgs(tiny_model, device="cpu"), tp_size=2)
    with pytest.raises(InvalidConfigError, match="server_args"):
        Engine(server_args="--tp-size 2")
    with pytest.raises(InvalidConfigError, match="model_path=None"):
        Engine(server_args={"device": "cpu"})


SCRIPT = """\
import sys
from engine_core import Engine

# No `if __name__ == "__main__":` guard: rank processes must not re-run this file.
print("SCRIPT-START", flush=True)
engine = Engine(sys.argv[1], device="cpu", tp_size=2, max_total_tokens=256, random_seed=3)
out = engine.generate(input_ids=%r, sampling_params=%r)
print("OUT", out["output_ids"], flush=True)
engine.shutdown()
"""


def test_tp_engine_from_a_script_without_main_guard(tiny_model, expected, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT % (IDS, GREEDY))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    done = subprocess.run(
        [sys.executable, str(script), tiny_model],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SCRIPT-START") == 1  # the ranks never imported the script
    assert f"OUT {expected}" in done.stdout
