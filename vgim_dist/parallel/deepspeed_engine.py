"""``stage.engine: deepspeed``: one DeepSpeed engine per greedy module, data-parallel over the stage's replicas.

Each engine sees only its stage's replica group (never the pipeline's other stages) through a small MPU
adapter. ZeRO 0 keeps a plain torch Adam, so its state goes into the usual checkpoint files. ZeRO 1 and 2
partition the fp32 master weights and Adam moments over the replicas; each replica saves its own flat
partition (``module-<i>.zero-<r>.safetensors``), so a ZeRO checkpoint resumes with the same replica count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from vgim_dist.config import Config


class ReplicaMPU:
    """DeepSpeed's view of the process groups: data parallel = this stage's replicas, no model parallelism."""

    def __init__(self, data_group: dist.ProcessGroup, single_group: dist.ProcessGroup):
        self.data_group, self.single_group = data_group, single_group

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.data_group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.data_group)

    def get_model_parallel_group(self):
        return self.single_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


def single_process_group() -> bool:
    """Start a one-process gloo group if none exists (the reference runner); True if this call started it."""
    if dist.is_initialized():
        return False
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def engine_config(cfg: Config, device: torch.device) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,   # batches are split upstream; DeepSpeed never sees their size
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.stage.zero},
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.run.precision == "bf16" and device.type == "cuda"},
        "torch_adam": True,                     # no fused-Adam compile; the same optimizer as engine: torch
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def announce_op_build() -> bool:
    """Say so when DeepSpeed is about to JIT-compile its C++ ops (a minute or two, silent otherwise): no
    compiled op in torch's extension cache yet. True when it said so."""
    from torch.utils.cpp_extension import get_default_build_root  # noqa: PLC0415

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    if root.is_dir() and any(root.rglob("*.so")):
        return False
    print(f"compiling DeepSpeed ops (once, 1-2 minutes; cached in {root}, set TORCH_EXTENSIONS_DIR to keep "
          "it elsewhere)", file=sys.stderr, flush=True)
    return True


_engines_built = False   # set once this process has built a DeepSpeed engine; read by end_process


def end_process(code: int) -> NoReturn | None:
    """End a program that built DeepSpeed engines without C++ static teardown; return if it built none.

    DeepSpeed keeps gloo transport threads (``pt_gloo_runloop``) alive past ``destroy_process_group``. Tearing
    them down in the C++ static destructors at exit aborts now and then (``terminate called without an active
    exception``, exit 134) after a run that succeeded. Python's own shutdown still runs: atexit handlers
    (tracking, Ray, logging) and the flushed standard streams; only the native teardown is skipped.
    """
    if not _engines_built:
        return None
    import atexit  # noqa: PLC0415 - only on this rare path

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_engines(cfg: Config, modules: nn.ModuleList, optimizers: list[torch.optim.Optimizer],
                  device: torch.device, data_group: dist.ProcessGroup | None) -> list:
    """Wrap each module and its Adam in a DeepSpeed engine over ``data_group`` (a group of one if None)."""
    announce_op_build()
    import deepspeed  # noqa: PLC0415 - optional dependency, imported only for engine: deepspeed

    if not dist.is_initialized():
        raise RuntimeError("stage.engine: deepspeed needs torch.distributed initialised (the runners do it)")
    os.environ.setdefault("LOCAL_RANK", "0")  # read by DeepSpeed's sanity checks; devices are set by Ray
    single = dist.new_group([dist.get_rank()])
    mpu = ReplicaMPU(data_group or single, single)
    global _engines_built
    _engines_built = True
    engines = []
    for module, opt in zip(modules, optimizers):
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=engine_config(cfg, device), mpu=mpu,
                                          dist_init_required=False)
        engines.append(engine)
    return engines


def zero_partition_state(engine) -> dict[str, torch.Tensor]:
    """This replica's flat fp32 master partition and Adam moments (ZeRO 1/2), keyed by param group."""
    zero = engine.optimizer
    out = {}
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        out[f"group.{g}.fp32"] = flat.detach().cpu().clone()
        for key, value in zero.optimizer.state.get(flat, {}).items():
            out[f"group.{g}.{key}"] = value.detach().cpu().clone()
    return out


def load_zero_partition_state(engine, state: dict[str, torch.Tensor]) -> None:
    zero = engine.optimizer
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        saved = state[f"group.{g}.fp32"]
        if saved.shape != flat.shape:
            raise ValueError(f"ZeRO partition {g} holds {flat.numel()} values, the checkpoint {saved.numel()}: "
                             "resume a ZeRO checkpoint with the replica count it was saved with")
        flat.data.copy_(saved)
        slot = zero.optimizer.state.setdefault(flat, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if f"group.{g}.{key}" in state:
                slot[key] = state[f"group.{g}.{key}"].to(flat.device)
