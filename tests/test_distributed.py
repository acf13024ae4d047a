"""Several processes through torch.distributed (gloo on 127.0.0.1, two spawned ranks): the sharded analysis gives
one process' scores, self-influence, top influences and token scores for every estimator and store; a rank that
dies, hangs or holds other data gives a clear error on the others."""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from helpers import assert_close

from infkit import Analysis, InfkitError, tasks

pytestmark = pytest.mark.filterwarnings("ignore:datainf is designed for LoRA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, mode: str, world: int = 2, timeout: float = 240) -> list[int]:
    """Spawn ``world`` ranks of ``worker.rank_main``; their exit codes."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=worker.rank_main, args=(rank, world, port, str(out), mode))
             for rank in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in ranks]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    codes = run_ranks(out, "equal")
    errors = [p.read_text() for p in sorted(out.glob("*.error"))]
    assert codes == [0, 0], "\n".join(errors)
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    return worker.single_process(str(tmp_path_factory.mktemp("alone")))


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_ranks_equal_one_process(case, sharded, alone):
    _, sharded = sharded
    for rank, computed in enumerate(sharded):
        got, want = computed[case], alone[case]
        assert_close(got["scores"], want["scores"], rel=1e-5)
        assert_close(got["self_influence"], want["self_influence"], rel=1e-5)
        assert torch.equal(got["top"], want["top"]), f"rank {rank}: top proponents differ"
        # the token split of an example on the last rank sums to its (gathered) score, as in one process
        assert_close(got["token_sum"], want["token_sum"], rel=1e-5)
        if case in worker.SAVED:  # each rank saved its shard and loaded it back
            assert torch.equal(got["loaded_scores"], got["scores"]), f"rank {rank}: loaded scores differ"
    assert torch.equal(sharded[0][case]["scores"], sharded[1][case]["scores"]), "the ranks disagree"


def test_sharded_save_loads_only_with_its_world_size(sharded):
    out, _ = sharded
    saved = out / "saves" / "ekfac-empirical"
    assert sorted(p.name for p in saved.iterdir()) == ["rank0-of-2", "rank1-of-2", "shards.json"]
    with pytest.raises(InfkitError, match=r"saved by a job of 2 ranks .* and this is one process: load it in a job "
                                          r"of 2 \(torchrun --nproc-per-node 2"):
        Analysis.load(saved, worker.tiny_gpt2(), tasks.CausalLM(), worker.TRAIN, progress=False)


def test_killed_rank_fails_the_others_clearly(tmp_path):
    codes = run_ranks(tmp_path, "killed")
    assert codes[1] == 3 and codes[0] != 0
    message = (tmp_path / "rank0.error").read_text()
    assert "InfkitError: rank 0 of 2: the collective" in message and "another rank died" in message
    assert float((tmp_path / "seconds").read_text()) < 30


def test_hung_rank_times_out(tmp_path):
    codes = run_ranks(tmp_path, "hung", timeout=120)
    assert codes[0] != 0
    message = (tmp_path / "rank0.error").read_text()
    assert "did not reach it within the process group's timeout" in message
    assert float((tmp_path / "seconds").read_text()) < 40  # the group's timeout is 6 s


def test_rank_with_other_data_is_refused(tmp_path):
    codes = run_ranks(tmp_path, "other-data")
    assert codes == [1, 1]
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.error").read_text()
        assert "the ranks do not agree: rank 1's train data differ(s) from rank 0's" in message


def test_fsdp_is_refused_clearly():
    class FSDPGPT2(torch.nn.Linear):  # what FSDP2's fully_shard makes of a module's class
        pass

    with pytest.raises(InfkitError, match="FSDP-wrapped models are not supported: FSDP shards each layer"):
        Analysis(FSDPGPT2(2, 2), tasks.Classification(), [(torch.zeros(2), 0)])


def test_distributed_true_without_a_process_group():
    with pytest.raises(InfkitError, match="no torch.distributed process group is initialised: launch with torchrun"):
        Analysis(torch.nn.Linear(2, 2), tasks.Classification(), [(torch.zeros(2), 0)], distributed=True)
