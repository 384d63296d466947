"""Engine choice and refusals, the sharded EMA, and checkpoints: pickle-free resume, strict RNG state, disk full."""

import errno
import os
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils.other import load

from pixel_diffusers.training_utils import CheckpointManager, Engine, ShardedEMA, TrainingState
from pixel_diffusers.training_utils.checkpointing import check_resumable, load_data_only
from pixel_diffusers.training_utils.engines import check_launch, requested_engine
from pixel_diffusers.training_utils.loop import check_engine_options

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "pixel_diffusers_payload_ran"


class Payload:
    """Unpickling this runs code: it creates MARKER."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_run(accelerator, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer


def _train_step(model, optimizer, ema):
    loss = model(torch.randn(3, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.step()


def test_engine_requests_and_launches_that_cannot_engage_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version=1 is not supported"):
        requested_engine()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested_engine() == "fsdp2"
    with pytest.raises(RuntimeError, match="asked for fsdp2 but accelerate prepared ddp"):
        Engine("ddp", 2).check_requested("fsdp2", 2)
    with pytest.raises(RuntimeError, match="started 2 processes but accelerate formed a group of 1"):
        Engine("single", 1).check_requested(None, 2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="starts only ONE process"):
        check_launch()


def test_deepspeed_refuses_the_guards_it_cannot_run_naming_flag_and_engine():
    args = Namespace(zclip_threshold=2.5, spike_rollback_every=0)
    with pytest.raises(ValueError, match=r"--zclip_threshold 2.5 is not supported under DeepSpeed \(zero3\)"):
        check_engine_options(args, Engine("zero3", 2))
    args = Namespace(zclip_threshold=0, spike_rollback_every=100)
    with pytest.raises(ValueError, match="--spike_rollback_every 100"):
        check_engine_options(args, Engine("zero2", 2))
    with pytest.raises(ValueError, match="trains a single model"):
        check_engine_options(Namespace(zclip_threshold=0, spike_rollback_every=0), Engine("zero2", 2), (torch.nn.Linear(1, 1),))
    check_engine_options(Namespace(zclip_threshold=2.5, spike_rollback_every=100), Engine("fsdp2", 2), (torch.nn.Linear(1, 1),))


def test_fsdp2_reshard_lets_writes_into_the_shards_reach_the_next_forward(tmp_path):
    """After a forward without backward (sampling) FSDP2 keeps its root group whole, as plain tensors: the EMA
    swapped out of the shards would not reach the next forward, and the final state dict would read freed copies."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root group holds the second layer
        engine, inputs = Engine("fsdp2", 1), torch.ones(1, 4)
        with torch.no_grad():
            model(inputs)
            engine.reshard(model)
            for param in model.parameters():
                engine.local_shard(param).fill_(0.5)
            assert torch.equal(model(inputs), torch.full((1, 4), 5.5))  # 4 * 0.5 * (4 * 0.5 + 0.5) + 0.5
            state = engine.full_state_dict(model)  # right after a forward, as the final save after sampling
        assert all(torch.equal(value, torch.full_like(value, 0.5)) for value in state.values())
    finally:
        dist.destroy_process_group()


def test_resume_refuses_other_engines_and_deepspeed_world_sizes():
    check_resumable({"engine": "ddp", "world_size": 2}, Engine("single", 1))
    check_resumable({"engine": "fsdp2", "world_size": 2}, Engine("fsdp2", 1))
    check_resumable({"engine": "zero2", "world_size": 2}, Engine("zero2", 2))
    with pytest.raises(ValueError, match="resumes only on the same world size"):
        check_resumable({"engine": "zero3", "world_size": 2}, Engine("zero3", 1))
    with pytest.raises(ValueError, match="written by fsdp2 and this run uses ddp"):
        check_resumable({"engine": "fsdp2", "world_size": 2}, Engine("ddp", 2))
    with pytest.raises(ValueError, match="written by zero2 and this run uses zero3"):
        check_resumable({"engine": "zero2", "world_size": 2}, Engine("zero3", 2))


def test_sharded_ema_on_one_process_equals_diffusers_ema_model(accelerator):
    from diffusers.training_utils import EMAModel

    model, optimizer = _tiny_run(accelerator)
    ema = ShardedEMA(model, Engine.of(accelerator), decay=0.9)
    reference = EMAModel(list(model.parameters()), decay=0.9)
    for _ in range(15):
        _train_step(model, optimizer, ema)
        reference.step(list(model.parameters()))
    for ours, theirs in zip(ema.shadow.values(), reference.shadow_params):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow.values()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _checkpoint(accelerator, tmp_path):
    model, optimizer = _tiny_run(accelerator)
    ema = ShardedEMA(model, Engine.of(accelerator), decay=0.9)
    state = TrainingState(step=3, images_seen=12)
    manager = CheckpointManager(tmp_path)
    _train_step(model, optimizer, ema)
    path = manager.save(accelerator, 3, {"state": state}, ema, Engine.of(accelerator))
    return manager, path, ema, state


def test_checkpoint_extras_are_json_and_safetensors_and_resume(accelerator, tmp_path):
    manager, path, ema, state = _checkpoint(accelerator, tmp_path)
    assert not list(path.glob("custom_checkpoint_*"))
    assert {"training_state.json", "ema.safetensors", "run.json"} <= {p.name for p in path.iterdir()}
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    fresh_state = TrainingState(step=0, images_seen=0)
    for shadow in ema.shadow.values():
        shadow.zero_()
    assert manager.resume(accelerator, "latest", {"state": fresh_state}, ema, Engine.of(accelerator)) == 3
    assert fresh_state.images_seen == 12 and ema.optimization_step == 1
    assert all(torch.equal(expected[k], ema.shadow[k]) for k in expected)


@pytest.mark.parametrize("target", ["optimizer.bin", "random_states_0.pkl", "scheduler_extra.pt"])
def test_a_tampered_pickle_in_a_checkpoint_is_refused_and_never_runs(accelerator, tmp_path, target):
    manager, path, ema, state = _checkpoint(accelerator, tmp_path)
    MARKER.unlink(missing_ok=True)
    torch.save({"state": Payload()}, path / target)
    with pytest.raises(ValueError, match=f"Refusing to resume: .*{target}"):
        manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))
    assert not MARKER.exists()


def test_a_tampered_raw_pickle_index_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="not plain data"):
        load_data_only(tmp_path / ".metadata")
    assert not MARKER.exists()
    plain = {"size": torch.Size([2, 3]), "dtype": torch.float32}
    (tmp_path / "plain.metadata").write_bytes(pickle.dumps(plain))
    assert load_data_only(tmp_path / "plain.metadata") == plain
    (tmp_path / "run.json").write_text("{}")
    assert load_data_only(tmp_path / "run.json") is None


def test_resume_reads_each_pickled_file_once_before_accelerate(accelerator, tmp_path, monkeypatch):
    manager, path, ema, state = _checkpoint(accelerator, tmp_path)
    loads, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kwargs: loads.append(Path(getattr(f, "name", f)).name)
                        or torch_load(f, *args, **kwargs))
    manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pkl"))
    assert pickled == ["optimizer.bin", "random_states_0.pkl"]
    assert loads[: len(pickled)] == pickled and sorted(loads[len(pickled):]) == pickled  # ours first, then accelerate's


def test_a_missing_rng_state_or_training_state_is_an_error(accelerator, tmp_path):
    manager, path, ema, state = _checkpoint(accelerator, tmp_path)
    (path / "training_state.json").rename(tmp_path / "moved.json")
    with pytest.raises(ValueError, match="training_state.json is missing or unreadable"):
        manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))
    (tmp_path / "moved.json").rename(path / "training_state.json")
    rng = path / "random_states_0.pkl"
    saved = load(rng)
    torch.save({k: v for k, v in saved.items() if k != "torch_manual_seed"}, rng)
    with pytest.raises(ValueError, match="lacks \\['torch_manual_seed'\\]: the resumed run could not continue exactly"):
        manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))
    rng.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="unreadable .*could not continue exactly"):
        manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))
    rng.unlink()
    with pytest.raises(FileNotFoundError, match="could not continue exactly"):
        manager.resume(accelerator, "latest", {"state": state}, ema, Engine.of(accelerator))


def test_a_disk_full_save_says_so_cleans_up_and_keeps_the_previous_checkpoint(accelerator, tmp_path, monkeypatch):
    manager, previous, ema, state = _checkpoint(accelerator, tmp_path)
    save_state = accelerator.save_state

    def full_disk(output_dir, **kwargs):
        save_state(output_dir, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: basic_ios::clear",
                           ) from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(OSError, match="No space left on the device of .* checkpoint-3 is intact") as caught:
        manager.save(accelerator, 4, {"state": state}, ema, Engine.of(accelerator))
    assert caught.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".checkpoint-*")) and manager.latest() == previous
    assert (previous / "model.safetensors").exists()
