"""Two gloo processes on CPU: DDP training keeps the ranks' weights identical; reduce_dict
handles loss keys that exist on one rank only; a non-finite loss on one rank skips the step on
both."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg: dict, out: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from reproduce.training import distributed as du
    from reproduce.training.train import train
    try:
        info = du.init_distributed("cpu", timeout_s=120)
        assert info.distributed and info.rank == rank and info.world_size == WORLD
        # keys present on one rank only are reduced as 0 there, never dropped or mismatched
        local = {"a": torch.tensor(1.0 + 2 * rank)}
        if rank == 0:
            local["loss_dn"] = torch.tensor(4.0)
        reduced = du.reduce_dict(local)
        assert reduced == {"a": 2.0, "loss_dn": 2.0}, reduced
        assert du.any_true(rank == 1) and not du.any_true(False)

        # rank 1 alone sees a NaN loss in its first step: both ranks must skip that step together
        from models.criterion import SetCriterion
        original, calls = SetCriterion.forward, []

        def forward(self, outputs, targets):
            losses = original(self, outputs, targets)
            calls.append(1)
            if rank == 1 and len(calls) == 1:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses

        SetCriterion.forward = forward
        summary, distiller = train(cfg, out, resume="never", device="cpu", show_progress=False,
                                   return_distiller=True)
        assert summary["steps"] == 3 and summary["world_size"] == WORLD
        assert summary["skipped_nonfinite_steps"] == 1, summary["skipped_nonfinite_steps"]
        state = {k: v.detach().clone() for k, v in distiller.student.state_dict().items()}
        torch.save(state, os.path.join(result_dir, f"rank{rank}.pth"))
    finally:
        du.cleanup()


@pytest.mark.parametrize("detector", ["dab_detr", "deformable_detr", "dino"])
def test_two_process_gloo_training(tmp_path, detector):
    """Every detector under DDP: a parameter without gradient (say, a backbone stage after the
    last level read) would make DDP fail in the second step."""
    from reproduce.training import checkpoint as ckpt_io
    from reproduce.training.runconfig import resolve_run
    from tests.test_engine import make_toy_dataset, toy_params

    prepared = make_toy_dataset(tmp_path / "data", n=6)
    cfg = resolve_run(toy_params(prepared, steps=3, checkpoint_every=0, log_every=1), detector, "student",
                      world_size=WORLD)
    out = tmp_path / "run"
    # fork: the children inherit the imported modules (spawn would re-import torch in each, ~5 s)
    mp.start_processes(_worker, args=(_free_port(), cfg, str(out), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")

    s0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pth", weights_only=True)
    written = torch.load(out / "model.pth", weights_only=True)["model"]
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
        assert torch.equal(s0[key], written[key]), key      # rank 0 wrote the same weights
    ckpt = ckpt_io.load(out / "checkpoint.pth")
    assert len(ckpt["rng"]) == WORLD and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert (out / "train_log.csv").is_file() and (out / "train_summary.json").is_file()
