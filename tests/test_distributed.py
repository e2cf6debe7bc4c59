"""DDP on 2 CPU processes (gloo, launched with torchrun): ranks agree on every weight, including the
regime's and the objective's own parameters, and gathered predictions cover the set exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrlab.engine import distributed as dist

WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, sys.argv[1])
    from test_trainer import LABELS, ToySet, noisy, toy_parts, toy_recipe

    from cxrlab.engine import distributed as dist
    from cxrlab.engine.trainer import Trainer, make_loader
    from cxrlab.losses.base import LossTerm, masked_mean
    from cxrlab.output import Output
    from cxrlab.registry import LOSSES
    from cxrlab.regimes.base import Supervised
    import torch.nn.functional as F


    @LOSSES.register("bce_with_bias")
    class BiasedBCE(LossTerm):
        """A term with its own trainable parameter (as ROLE's label matrix)."""
        lr_multiplier = 10.0

        def __init__(self, ctx):
            super().__init__(ctx)
            self.bias = torch.nn.Parameter(torch.zeros(ctx.num_labels))

        def forward(self, output, batch):
            loss = F.binary_cross_entropy_with_logits(output.logits + self.bias, batch["target"], reduction="none")
            return masked_mean(loss, batch["mask"])


    class Mixing(Supervised):
        """A regime with a training-only module."""
        def __init__(self):
            super().__init__(noisy, noisy)
            self.modules["mix"] = torch.nn.Linear(3, 3)

        def step(self, model, batch):
            out = super().step(model, batch)
            return Output(out.logits + 0.1 * self.modules["mix"](out.logits.detach() * 0 + 1), out.extras)


    out = Path(sys.argv[2])
    recipe = toy_recipe(epochs=2, batch_size=8, ema=0.9)
    recipe.loss = {"bce_with_bias": 1.0}
    train_set, val_set = ToySet(64, 1, unknown=0.1), ToySet(13, 2)
    model, objective, _ = toy_parts(recipe, train_set)
    info = dist.init_distributed()
    assert info.world_size == 2
    trainer = Trainer(recipe, model, objective, Mixing(), out / "run", LABELS)
    train = make_loader(train_set, 8, shuffle=True, seed=0)
    val = make_loader(val_set, 4, shuffle=False, seed=0)
    assert type(train.sampler).__name__ == "DistributedSampler"
    result = trainer.fit(train, val)
    probs, targets, masks = trainer.predict(val)
    tensors = {f"model.{k}": v.contiguous() for k, v in trainer.model.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in trainer.ema.module.state_dict().items()})
    tensors.update({f"objective.{k}": v.detach().clone() for k, v in trainer.objective.state_dict().items()})
    tensors.update({f"regime.{k}": v.detach().clone() for k, v in trainer.regime.modules.state_dict().items()})
    tensors.update(probs=torch.from_numpy(probs), targets=torch.from_numpy(targets), masks=torch.from_numpy(masks),
                   best_val_loss=torch.tensor(result.best["val_loss"], dtype=torch.float64))
    save_file(tensors, str(out / f"rank{info.rank}.safetensors"))
    torch.distributed.destroy_process_group()
''')


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(Path(__file__).parent), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return tmp, [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(2)]


def test_ranks_end_with_identical_weights(ddp_run):
    _, (a, b) = ddp_run
    weights = [k for k in a if k.split(".")[0] in ("model", "ema", "objective", "regime")]
    assert any(k.startswith("objective.") for k in weights) and any(k.startswith("regime.") for k in weights)
    for key in weights:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["objective.terms.bce_with_bias.bias"], torch.zeros(3))  # it was trained


def test_gathered_predictions_cover_the_set_once(ddp_run):
    from test_trainer import ToySet

    _, (a, b) = ddp_run
    expected = ToySet(13, 2)
    for r in (a, b):
        assert r["probs"].shape == (13, 3)  # 13 samples on 2 ranks: the sampler's padding repeat dropped
        np.testing.assert_array_equal(r["targets"].numpy(), expected.target)
        np.testing.assert_array_equal(r["masks"].numpy(), expected.mask)
    assert torch.equal(a["probs"], b["probs"])
    # Validation scored the very model the checkpoint holds (ranks agree on BatchNorm statistics).
    p = a["probs"].double().clamp(1e-12, 1 - 1e-12)
    y = a["targets"].double()
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    assert float(bce.mean()) == pytest.approx(float(a["best_val_loss"]), abs=1e-5)


def test_only_rank0_writes_and_checkpoint_holds_every_rank_rng(ddp_run):
    tmp, _ = ddp_run
    run = tmp / "run"
    assert (run / "log.csv").is_file() and len((run / "log.csv").read_text().splitlines()) == 3
    info = json.loads((run / "last" / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["step"] == 2 * (32 // 8)  # 64 samples / 2 ranks / batch 8
    from safetensors import safe_open

    with safe_open(str(run / "last" / "state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"rng.0.torch", "rng.1.torch"} <= keys


def test_single_process_helpers_pass_through():
    t = torch.arange(6).reshape(3, 2)
    assert dist.info() == dist.DistInfo() and dist.is_main()
    assert torch.equal(dist.all_gather_cat(t), t)
    loader = dist.make_loader(torch.utils.data.TensorDataset(torch.arange(10)), 4, shuffle=True, seed=3)
    assert isinstance(loader.sampler, dist.SeededSampler) and loader.drop_last
    orders = []
    for epoch in (0, 1, 0):
        dist.set_epoch(loader, epoch)
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    assert orders[0] == orders[2] != orders[1] and len(orders[0]) == 8
