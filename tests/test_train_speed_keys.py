"""train.channels_last and train.compile take effect (on CPU; benchmarks/gpu_check.sh measures their
speed on a GPU), stay off by default, keep checkpoints as they are, and reject unknown values."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import toy_recipe, toy_run

from cxrlab.config import load_recipe
from cxrlab.engine.trainer import compile_args
from cxrlab.errors import CxrlabError
from cxrlab.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _convs(model):
    """Conv layers whose weights differ between the two formats (more than one input channel, k > 1)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
            and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1]


def _nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_channels_last_puts_weights_and_activations_in_nhwc(tmp_path):
    for on in (False, True):
        trainer, _, loaders = toy_run(tmp_path, toy_recipe(epochs=1, channels_last=on), n_train=32, n_val=16,
                                      out=f"cl{on}")
        convs = _convs(trainer.model)
        assert convs and all(_nhwc(m.weight) == on for m in convs)
        seen = []  # a 1-channel batch is both formats; the next convs' inputs tell them apart
        hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(_nhwc(args[0])) if args[0].shape[-1] > 1
                                             else None) for m in convs]  # a 1×1 map is both formats too
        trainer.train_epoch(loaders[0])
        for h in hooks:
            h.remove()
        assert seen and all(f == on for f in seen)


_CALLS = {"graphs": 0}


def _counting_backend(gm, example_inputs):
    """A torch.compile backend that counts the graphs dynamo hands it and runs them unchanged."""
    _CALLS["graphs"] += 1
    return gm.forward


def test_compile_runs_the_model_through_torch_compile_and_keeps_checkpoint_names(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.register_backend(name="cxrlab_counting_test", compiler_fn=_counting_backend)
    recipe = toy_recipe(epochs=1, compile="cxrlab_counting_test")
    plain = build_model(recipe.model.backbone, recipe.model.head, 3)
    assert plain._compiled_call_impl is None
    trainer, result, _ = toy_run(tmp_path, recipe, n_train=32, n_val=16, out="compiled")
    assert trainer.model._compiled_call_impl is not None
    assert _CALLS["graphs"] >= 1  # dynamo captured the model's forward and handed it to the backend
    # compiled in place: the same module with the same parameter names, so checkpoints do not change
    assert type(trainer.model) is type(plain)
    assert list(trainer.model.state_dict()) == list(plain.state_dict())
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    torch._dynamo.reset()


def test_compile_values():
    assert compile_args(True) == {}
    assert compile_args("max-autotune") == {"mode": "max-autotune"}
    assert compile_args("eager") == {"backend": "eager"}
    with pytest.raises(CxrlabError, match="train.compile.*'inductr'.*did you mean 'inductor'"):
        compile_args("inductr")
    assert load_recipe(None, ["train.compile=true"]).train.compile is True
    assert load_recipe(None, []).train.compile is False and load_recipe(None, []).train.channels_last is False


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], capture_output=True,
                         text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for line in ("densenet121", "resnet50", "compile", "pipeline", "pipeline / model", "lcl", "mpc"):
        assert line in out.stdout, (line, out.stdout[-3000:])
