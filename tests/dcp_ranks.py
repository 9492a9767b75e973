"""Ranks of real torch.distributed jobs on CPU (gloo), for the DCP tests.

Importing torch takes seconds per process on a small machine, so the ranks
are kept warm: a :class:`RankPool` spawns its processes once, and each
:meth:`RankPool.run` has the first ``world`` of them run one scenario as a
fresh process group (a new TCP rendezvous, destroyed afterwards). A rank
that dies (the SIGKILL test) is replaced by a new process.

Scenarios are module-level functions ``scenario(rank, world, *args)`` run
inside the group; what they return comes back to the test, and so does
what they raise, as text.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import async_save, save

from cas.integrations.dcp import CasReader, CasWriter

GROUP_TIMEOUT = timedelta(seconds=60)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Outcome:
    """What one rank's scenario did: its value, its error as text, or its death."""

    value: Any = None
    error: str | None = None
    exitcode: int | None = None  # set when the process died

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(slot: int, commands: Any, results: Any) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    while (command := commands.get()) is not None:
        name, rank, world, port, env, args = command
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            value = _in_group(globals()[name], rank, world, port, args)
            results.put((slot, Outcome(value=value)))
        except BaseException as err:  # sent back to the test whatever it is
            text = "".join(traceback.format_exception(err))
            results.put((slot, Outcome(error=f"{type(err).__name__}: {err}\n{text}")))
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _in_group(
    scenario: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...]
) -> Any:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GROUP_TIMEOUT,
    )
    try:
        return scenario(rank, world, *args)
    finally:
        dist.destroy_process_group()


class RankPool:
    """``size`` warm processes that run scenarios as ranks of a process group."""

    def __init__(self, size: int) -> None:
        self.context = mp.get_context("spawn")
        self.results = self.context.Queue()
        self.slots = [self._spawn(slot) for slot in range(size)]

    def _spawn(self, slot: int) -> tuple[Any, Any]:
        commands = self.context.Queue()
        process = self.context.Process(
            target=_serve, args=(slot, commands, self.results), daemon=True
        )
        process.start()
        return process, commands

    def run(
        self,
        world: int,
        scenario: Callable[..., Any],
        *args: Any,
        env: Mapping[str, str] | None = None,
        rank_env: Mapping[int, Mapping[str, str]] | None = None,
        timeout: float = 240.0,
    ) -> list[Outcome]:
        """Run ``scenario`` on ranks 0..world-1; one outcome per rank, in rank order.

        ``env`` is set in every rank while it runs, ``rank_env[r]`` in rank r on top.
        """
        port = free_port()
        for rank in range(world):
            _, commands = self.slots[rank]
            environment = {**(env or {}), **(rank_env or {}).get(rank, {})}
            commands.put((scenario.__name__, rank, world, port, environment, args))
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < world:
            try:
                slot, outcome = self.results.get(timeout=0.5)
                outcomes[slot] = outcome
            except queue.Empty:
                self._bury_the_dead(world, outcomes)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{scenario.__name__}: ranks did not finish") from None
        return [outcomes[rank] for rank in range(world)]

    def _bury_the_dead(self, world: int, outcomes: dict[int, Outcome]) -> None:
        for rank in range(world):
            process, _ = self.slots[rank]
            if rank not in outcomes and not process.is_alive():
                outcomes[rank] = Outcome(exitcode=process.exitcode)
                self.slots[rank] = self._spawn(rank)

    def close(self) -> None:
        for _, commands in self.slots:
            commands.put(None)
        for process, _ in self.slots:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()  # our own process, by its handle


def check(outcomes: list[Outcome]) -> list[Any]:
    """The values of a run in which every rank must have succeeded."""
    failed = [
        f"rank {r}: {o.error or f'died ({o.exitcode})'}" for r, o in enumerate(outcomes) if not o.ok
    ]
    assert not failed, "\n".join(failed)
    return [o.value for o in outcomes]


# -- models ------------------------------------------------------------------------------


#: Width of the hidden layers: 4 of them, 64 KiB of fp32 weights each.
WIDTH = 128


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear layers at 0, 2, 4, 6, 8 and 10 (the hidden ones are WIDTH x WIDTH)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 8))
    return nn.Sequential(*layers).to(dtype)


def shard(model: nn.Sequential, world: int) -> nn.Sequential:
    """FSDP2 over all ranks: every parameter a DTensor sharded on its first dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def stepped_model(steps: int) -> nn.Sequential:
    """A bf16 model after ``steps`` full fine-tuning steps: every fp32 master weight
    moved by 1e-4 * N(0, 1) per step, then cast (about half the bf16 elements change)."""
    model = make_model(0)
    with torch.no_grad():
        for step in range(steps):
            torch.manual_seed(1000 + step)
            for parameter in model.parameters():
                parameter.add_(1e-4 * torch.randn_like(parameter))
    return model.to(torch.bfloat16)


def train(model: nn.Module, seed: int, steps: int = 1) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        torch.manual_seed(seed + step)
        model(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The whole model (and optimizer) state, gathered on rank 0 (empty elsewhere)."""
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model, options=FULL)}
    model_state, optim_state = get_state_dict(model, optimizer, options=FULL)
    return {"model": model_state, "optim": optim_state}


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def differences(expected: Any, got: Any, where: str = "") -> list[str]:
    """Where two state dicts differ, bit for bit (tensors by dtype, shape and bytes)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in expected.keys() - got.keys()]
        out += [f"{where}/{k}: unexpected" for k in got.keys() - expected.keys()]
        for key in expected.keys() & got.keys():
            out += differences(expected[key], got[key], f"{where}/{key}")
        return out
    if isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        if len(expected) != len(got):
            return [f"{where}: {len(expected)} items, got {len(got)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(expected, got, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    if isinstance(expected, torch.Tensor):
        same = (
            isinstance(got, torch.Tensor)
            and expected.dtype == got.dtype
            and expected.shape == got.shape
            and torch.equal(
                expected.reshape(-1).view(torch.uint8),
                got.contiguous().reshape(-1).view(torch.uint8),
            )
        )
        return [] if same else [f"{where}: tensors differ"]
    return [] if expected == got else [f"{where}: {expected!r} != {got!r}"]


# -- scenarios -------------------------------------------------------------------------------


def save_trained(
    rank: int,
    world: int,
    location: str,
    key: str,
    expected: str,
    parents: tuple[str, ...] = (),
) -> str:
    """FSDP-train a step and save model and optimizer; rank 0 keeps the whole state."""
    model = shard(make_model(0), world)
    optimizer = train(model, seed=10)
    model_state, optim_state = get_state_dict(model, optimizer)
    writer = CasWriter(location, key, parents=parents, metrics={"loss": 0.5}, tags=["fsdp"])
    metadata = save({"model": model_state, "optim": optim_state}, storage_writer=writer)
    state = full_state(model, optimizer)
    if rank == 0:
        torch.save(state, expected)
    assert metadata.storage_meta is not None
    return str(metadata.storage_meta.checkpoint_id)


def load_trained(rank: int, world: int, location: str, ref: str, expected: str) -> list[str]:
    """Load into a differently initialised and trained FSDP model; compare on rank 0."""
    model = shard(make_model(1), world)
    optimizer = train(model, seed=99)
    model_state, optim_state = get_state_dict(model, optimizer)
    load({"model": model_state, "optim": optim_state}, storage_reader=CasReader(location, ref))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    got = full_state(model, optimizer)
    if rank != 0:
        return []
    return differences(torch.load(expected, weights_only=True), got)


def save_layers(
    rank: int, world: int, location: str, key: str, bump: tuple[int, ...], parents: tuple[str, ...]
) -> str:
    """Save a model (no optimizer) whose layers ``bump`` moved a little since seed 0."""
    model = shard(make_model(0), world)
    with torch.no_grad():
        for index in bump:
            for parameter in model[index].parameters():
                parameter.add_(1e-3)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    writer = CasWriter(location, key, parents=parents)
    metadata = save({"model": get_model_state_dict(model)}, storage_writer=writer)
    assert metadata.storage_meta is not None
    return str(metadata.storage_meta.checkpoint_id)


def save_stepped(
    rank: int,
    world: int,
    location: str,
    key: str,
    steps: int,
    parents: tuple[str, ...] = (),
    delta: bool | None = None,
) -> str:
    """Save the model of :func:`stepped_model` (no optimizer), sharded over the ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = shard(stepped_model(steps), world)
    writer = CasWriter(location, key, parents=parents, delta=delta)
    metadata = save({"model": get_model_state_dict(model)}, storage_writer=writer)
    assert metadata.storage_meta is not None
    return str(metadata.storage_meta.checkpoint_id)


def save_async(rank: int, world: int, location: str, key: str, expected: str) -> dict[str, Any]:
    """async_save, then keep training while it uploads; the save holds the state it was given."""
    model = shard(make_model(0), world)
    optimizer = train(model, seed=10)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = full_state(model, optimizer)
    started = time.perf_counter()
    future = started_async(
        {"model": model_state, "optim": optim_state}, storage_writer=CasWriter(location, key)
    )
    blocked = time.perf_counter() - started
    with torch.no_grad():  # training goes on: the staged copy must not see it
        for parameter in model.parameters():
            parameter.add_(1.0)
    future.result()
    if rank == 0:
        torch.save(state, expected)
    # A failing upload reports through the future, on every rank.
    broken = started_async(
        {"model": get_state_dict(model, optimizer)[0]},
        storage_writer=CasWriter(expected + ".not-a-store", key),
    )
    try:
        broken.result()
        error = None
    except BaseException as err:  # DCP's CheckpointException is not an Exception
        error = f"{type(err).__name__}: {err}"
    return {"blocked": blocked, "error": error}


def started_async(state: dict[str, Any], **options: Any) -> Future[Any]:
    """``dcp.async_save``, which returns a plain future unless asked to stage in the background."""
    future = async_save(state, **options)
    assert isinstance(future, Future)
    return future


def save_and_die(
    rank: int, world: int, location: str, key: str, after: int, how: str = "kill"
) -> str:
    """Save; rank 1 is killed (SIGKILL), or raises, after ``after`` of its chunk uploads."""
    if rank == 1:
        from cas.backends.local import LocalBackend

        original = LocalBackend.put
        uploads = []

        def put(self: LocalBackend, key: str, data: Any, **kwargs: Any) -> None:
            original(self, key, data, **kwargs)
            if key.startswith("chunks/"):
                uploads.append(key)
                if len(uploads) >= after and how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if len(uploads) >= after:
                    raise OSError(28, "No space left on device (injected)")

        LocalBackend.put = put  # type: ignore[method-assign]
    return save_layers(rank, world, location, key, (), ())


def save_plain(rank: int, world: int, location: str, key: str, expected: str) -> str:
    """Round trip on any store: FSDP save, then load back on the same ranks."""
    ref = save_trained(rank, world, location, key, expected)
    differences_seen = load_trained(rank, world, location, ref, expected)
    assert not differences_seen, differences_seen
    return ref


def make_writer(rank: int, world: int, location: str, key: str) -> str:
    """Only build the writer: a bad key or location fails here, on every rank alike."""
    CasWriter(location, key)
    return "made"


def save_model(rank: int, world: int, location: str, key: str) -> str:
    """Save a model (no optimizer) as it is made."""
    return save_layers(rank, world, location, key, (), ())
