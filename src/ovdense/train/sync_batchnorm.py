"""BatchNorm over the whole global batch under torchrun, on CUDA (torch's SyncBatchNorm) and on the CPU (gloo).

F-ViT trains its pyramid, FPN and heads with SyncBN: the statistics of a step are those of every image of every
process, so one process with batch B and N processes with B / N each normalise alike. torch's ``SyncBatchNorm``
accepts only accelerator tensors; :class:`DistributedBatchNorm2d` does the same on the CPU by all-reducing the
per-channel count, sum and sum of squares (autograd flows through the reduction, as in SyncBN's backward).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DistributedBatchNorm2d", "convert_sync_batchnorm"]


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics cover every process of the default group (B x C x H x W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)
        total = stats[-1]
        shape = (1, c, 1, 1)
        if float(total) == 0:  # no process has an element (e.g. no positive RoI for a mask head): nothing to learn,
            # statistics unchanged (torch's BatchNorm skips them on empty input), the parameters still in the graph
            out = xf * self.weight.view(shape) + self.bias.view(shape) if self.affine else xf
            return out.to(x.dtype)
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            unbiased = var.detach() * total / (total - 1).clamp_min(1)
            self.running_var.mul_(1 - m).add_(unbiased * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` synchronised across processes: torch's ``SyncBatchNorm`` on CUDA,
    :class:`DistributedBatchNorm2d` on the CPU (same weights and statistics)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            synced = DistributedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            synced.load_state_dict(child.state_dict())
            synced.to(child.weight.device if child.affine else device)
            setattr(module, name, synced)
        else:
            convert_sync_batchnorm(child, device)
    return module
