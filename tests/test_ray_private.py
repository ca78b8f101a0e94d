"""The one module that reaches into Ray's private API (vgim_dist/ray_private.py) against the installed Ray: each
check names what moved, so that a Ray upgrade that breaks one fails here, clearly, before any run does."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

import pytest
import ray


def test_the_adapter_imports_against_this_ray():
    try:
        importlib.import_module("vgim_dist.ray_private")
    except ImportError as e:
        pytest.fail(f"Ray {ray.__version__} moved a private name vgim_dist/ray_private.py uses: {e}")


def test_the_single_machine_switch_is_where_ray_reads_it():
    from ray._private import ray_constants

    from vgim_dist.ray_private import single_machine

    var = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", None)
    assert var, f"Ray {ray.__version__}: ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR is gone"
    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER"), f"Ray {ray.__version__}: ENABLE_RAY_CLUSTER is gone"
    before = (os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER)
    with single_machine():
        assert os.environ[var] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert (os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER) == before


def test_the_torch_setup_steps_take_what_the_file_store_backend_passes():
    from ray.train.backend import Backend

    from vgim_dist.ray_private import TorchBackend, set_torch_distributed_env_vars, setup_torch_process_group

    assert issubclass(TorchBackend, Backend) and callable(getattr(TorchBackend, "on_start", None)), \
        f"Ray {ray.__version__}: ray.train.torch.config._TorchBackend is no longer a Backend with on_start"
    params = inspect.signature(setup_torch_process_group).parameters
    missing = {"backend", "world_rank", "world_size", "init_method", "timeout_s"} - set(params)
    assert not missing, f"Ray {ray.__version__}: _setup_torch_process_group lost the parameters {missing}"
    assert not inspect.signature(set_torch_distributed_env_vars).parameters, \
        f"Ray {ray.__version__}: _set_torch_distributed_env_vars now takes arguments"


def test_startup_errors_arrive_inside_the_public_controller_error():
    from vgim_dist.ray_private import ControllerError, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    assert ControllerError is ray.train.ControllerError
    for cls in (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError):
        assert issubclass(cls, Exception)
    wrapped = ControllerError(WorkerGroupStartupTimeoutError.__new__(WorkerGroupStartupTimeoutError))
    assert isinstance(wrapped.controller_failure, WorkerGroupStartupTimeoutError), \
        f"Ray {ray.__version__}: ControllerError no longer carries controller_failure"


def test_the_start_line_loggers_exist():
    from vgim_dist.ray_private import START_LOGGERS

    for name in START_LOGGERS:
        assert importlib.util.find_spec(name) is not None, f"Ray {ray.__version__}: no module {name} logs its start"
