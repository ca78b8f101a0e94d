from vgim_dist.model.modules import GreedyModule, ModuleStep, build_module, describe, loss_terms

__all__ = ["GreedyModule", "ModuleStep", "build_module", "describe", "loss_terms"]
