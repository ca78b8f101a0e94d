"""A pipeline stage: consecutive greedy modules, each with its own optimizer and its own RNG stream.

Per-module optimizers and generators make the numbers independent of how modules are grouped into
stages: a 1-stage reference run and a 4-stage pipeline draw the same noise and take the same steps.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from vgim_dist.config import Config, ModelConfig, RunConfig
from vgim_dist.errors import UserError
from vgim_dist.model import build_module, loss_terms
from vgim_dist.parallel.data_parallel import GroupBatchNorm1d, ReplicaGroup
from vgim_dist.seeding import derive_seed


def metric_names(model: ModelConfig, module_ids: list[int]) -> list[str]:
    """What `Stage.train_step` returns for modules ``module_ids``, in order: each module's loss terms (its
    KL only where it is not 0 by construction)."""
    return [f"module.{i}.{t}" for i in module_ids for t in loss_terms(model, i)]


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a torch device: ``auto`` is a GPU when one is visible."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible", "torch.cuda.is_available() is False",
                        "use run.device=cpu (or auto), or run on a machine with an NVIDIA GPU and driver")
    return torch.device(name)


def configure_torch(run: RunConfig, device: torch.device) -> None:
    """This process's torch settings that a run's numbers depend on: the thread count (oneDNN splits some
    reductions by thread) and, with ``run.deterministic``, deterministic kernels. Call it before the first
    CUDA operation: cuBLAS reads its workspace setting when it starts."""
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(run.deterministic)


def stage_generator(seed: int, module: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "train", module))


class Stage:
    """Trains modules ``module_ids`` on whatever the previous stage hands it; sends nothing back."""

    index: int
    replicas: ReplicaGroup | None   # data-parallel group of this stage, if replicated
    module_ids: list[int]
    metric_names: list[str]         # the keys of train_step's metrics, in order
    modules: nn.ModuleList          # GreedyModule per id
    optimizers: list[torch.optim.Adam]
    engines: list | None            # DeepSpeed engine per module (stage.engine: deepspeed)
    generators: list[torch.Generator]
    step: int                       # optimizer steps taken
    device: torch.device

    def __init__(self, cfg: Config, index: int, device: torch.device | str = "cpu",
                 replicas: ReplicaGroup | None = None):
        self.cfg, self.index, self.replicas = cfg, index, replicas
        self.module_ids = cfg.stage_modules()[index]
        self.metric_names = metric_names(cfg.model, self.module_ids)
        self.device = torch.device(device)
        self.modules = nn.ModuleList([build_module(cfg.model, i, cfg.seed) for i in self.module_ids]).to(self.device)
        if replicas is not None:
            GroupBatchNorm1d.replace_in(self.modules, replicas)
        o = cfg.optim
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                            weight_decay=o.weight_decay) for m in self.modules]
        self.engines = None
        if cfg.stage.engine == "deepspeed":
            from vgim_dist.parallel.deepspeed_engine import build_engines  # noqa: PLC0415 - optional

            self.engines = build_engines(cfg, self.modules, self.optimizers, self.device,
                                         replicas.group if replicas else None)
        self.generators = [stage_generator(cfg.seed, i, self.device) for i in self.module_ids]
        self.step = 0
        self.autocast = cfg.run.precision == "bf16"

    @property
    def zero_partitioned(self) -> bool:
        """Optimizer state split over the replicas (DeepSpeed ZeRO 1/2): each replica saves its own part."""
        return self.engines is not None and self.cfg.stage.zero > 0

    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * o.lr_decay ** (step // o.decay_every) if o.decay_every else o.lr

    def train_step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step of every module on batch ``x``; returns the detached output and loss terms.

        Module k trains on module k-1's output computed before k-1's update (the greedy reference order).
        Metrics stay 0-dim tensors so that a GPU stage never waits on a host sync here.
        """
        if self.device.type == "cuda" and not x.is_cuda:
            x = x.pin_memory()      # page-locked, so the copy below runs asynchronously
        x = x.to(self.device, non_blocking=True)
        lr = self.lr(self.step)
        metrics: dict[str, torch.Tensor] = {}
        for pos, (i, module, gen) in enumerate(zip(self.module_ids, self.modules, self.generators)):
            module.train()
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                out = module(x, gen, self.replicas)
            if self.engines is not None:
                self._deepspeed_update(self.engines[pos], out.loss, lr)
            else:
                self._torch_update(module, self.optimizers[pos], out.loss, lr)
            metrics.update({f"module.{i}.{t}": getattr(out, t).detach() for t in loss_terms(self.cfg.model, i)})
            x = out.output
        self.step += 1
        if self.replicas is not None:  # each replica holds its share of every loss term: report the sums
            total = torch.stack([metrics[n] for n in self.metric_names])
            dist.all_reduce(total, group=self.replicas.group)
            metrics = dict(zip(self.metric_names, total.unbind()))
        return x, metrics

    def _torch_update(self, module: nn.Module, opt: torch.optim.Adam, loss: torch.Tensor, lr: float) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.replicas is not None:
            self.replicas.sum_gradients(module)
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    def _deepspeed_update(self, engine, loss: torch.Tensor, lr: float) -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        # DeepSpeed averages gradients over the replicas; each replica's loss is a share of the batch's loss,
        # whose gradient is the SUM of the shares' gradients.
        engine.backward(loss * (self.replicas.world if self.replicas else 1))
        engine.step()

    # ----------------------------------------------------------------------------------- state

    def module_state(self, pos: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(weights, optimizer + RNG tensors, JSON metadata) of the stage's ``pos``-th module.

        Keys name the module, not the stage (``module.2.layers.0.0.weight``), so checkpoints of runs with
        different stage splits compare key by key.
        """
        i, module, opt, gen = self.module_ids[pos], self.modules[pos], self.optimizers[pos], self.generators[pos]
        prefix = f"module.{i}."
        weights = {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        train = {prefix + "rng": gen.get_state().cpu()}
        meta = {"module": i, "step": self.step}
        if not self.zero_partitioned:  # ZeRO 1/2 moments live in each replica's partition file instead
            names = [n for n, _ in module.named_parameters()]
            sd = opt.state_dict()
            train.update({f"{prefix}optim.{names[idx]}.{key}": t.detach().cpu().contiguous()
                          for idx, state in sd["state"].items() for key, t in state.items()})
            meta["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return weights, train, meta

    def load_module_state(self, pos: int, weights: dict, train: dict, meta: dict) -> None:
        i, module, opt, gen = self.module_ids[pos], self.modules[pos], self.optimizers[pos], self.generators[pos]
        prefix = f"module.{i}."
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items()}, strict=True)
        gen.set_state(train[prefix + "rng"])
        self.step = int(meta["step"])
        if self.zero_partitioned:
            return
        names = [n for n, _ in module.named_parameters()]
        state: dict[int, dict] = {}
        for idx, name in enumerate(names):
            keys = {k[len(f"{prefix}optim.{name}."):]: v for k, v in train.items()
                    if k.startswith(f"{prefix}optim.{name}.")}
            if keys:
                state[idx] = keys
        groups = [dict(g, params=list(range(len(names)))) for g in meta["param_groups"]]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups})

