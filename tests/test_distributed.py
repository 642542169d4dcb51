"""torch.distributed.checkpoint: the round-trip format, and a real two-process save."""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from test_roundtrip import LossyLoad, trained
from torch import nn

from pytest_statedict import StateDictError, roundtrip, schema_of
from pytest_statedict.bitwise import difference

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed"),
]


def test_dcp_roundtrip_is_exact_with_optimizer_and_resume() -> None:
    model, optimizer = trained(torch.optim.AdamW, lr=1e-2)
    result = roundtrip(model, optimizer, format="dcp")
    assert result.ok, str(result)
    assert result.label == "cpu->cpu (dcp)"


def test_dcp_roundtrip_catches_a_lossy_load() -> None:
    result = roundtrip(nn.Sequential(nn.Linear(4, 4), LossyLoad()), format="dcp")
    assert [m.split(":")[0] for m in result.mismatches] == ["1.calibration"]


def test_dcp_failure_is_a_mismatch_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP raises CheckpointException, a BaseException: it must be reported, not escape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def failing_load(*args: object, **kwargs: object) -> None:
        failure = (RuntimeError("disk on fire"), traceback.extract_stack())
        raise CheckpointException("load failed", {0: failure})

    monkeypatch.setattr(dcp, "load", failing_load)
    result = roundtrip(nn.Linear(2, 2), format="dcp")
    assert not result.ok
    assert result.mismatches[0].startswith("torch.distributed.checkpoint failed: Checkpoint")


def test_dcp_refuses_an_optimizer_without_state() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(StateDictError, match="step it once"):
        roundtrip(model, torch.optim.Adam(model.parameters()), format="dcp")


# One rank of a two-process save: each writes its half of every tensor (Shard(0)).
SHARDED_SAVE = textwrap.dedent(
    """
    import os, sys, warnings
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")


    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


    if __name__ == "__main__":
        rank, world, folder = int(sys.argv[1]), 2, sys.argv[2]
        init = "file://" + os.path.join(folder, "rendezvous")
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", (world,))
            sharded = {
                key: distribute_tensor(value, mesh, [Shard(0)])
                for key, value in model().state_dict().items()
            }
            local = sharded["0.weight"].to_local().shape
            print(f"rank {rank} holds 0.weight rows {tuple(local)}", flush=True)
            dcp.save({"model": sharded}, checkpoint_id=os.path.join(folder, "ckpt"))
        finally:
            dist.destroy_process_group()
    """
)


def test_two_process_sharded_save_loads_whole_bit_for_bit(tmp_path: Path) -> None:
    """Two processes, one per rank, save; this one (no process group) loads the whole."""
    import torch.distributed.checkpoint as dcp

    script = tmp_path / "sharded_save.py"
    script.write_text(SHARDED_SAVE)
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            ranks.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(rank), str(tmp_path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a timeout kills it all
                )
            )
    try:
        for proc in ranks:
            proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for proc in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail("the two-process DCP save did not finish in 240 s; its processes were killed")
    output = "".join(log.read_text() for log in logs)
    assert [proc.returncode for proc in ranks] == [0, 0], output
    for rank in (0, 1):
        assert f"rank {rank} holds 0.weight rows (8, 8)" in output  # half the rows each

    saved = importlib.util.spec_from_file_location("sharded_save", script)
    assert saved is not None and saved.loader is not None
    module = importlib.util.module_from_spec(saved)
    saved.loader.exec_module(module)  # its model(), not its __main__
    with torch.random.fork_rng(devices=[]):
        expected = module.model().state_dict()
    whole = {"model": {k: torch.empty_like(v) for k, v in expected.items()}}
    single = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
    dcp.load(whole, checkpoint_id=tmp_path / "ckpt", **single)
    problems = [
        f"{k}: {difference(v, whole['model'][k])}"
        for k, v in expected.items()
        if difference(v, whole["model"][k])
    ]
    assert not problems, problems
    # the DCP folder's schema, from its .metadata alone, is the unsharded model's
    from_dcp = schema_of(tmp_path / "ckpt", part="model")
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    assert [(t.key, t.shape, t.dtype) for t in from_dcp] == [
        (t.key, t.shape, t.dtype) for t in schema_of(model.state_dict())
    ]
