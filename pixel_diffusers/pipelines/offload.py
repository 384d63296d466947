"""A fix shared by every pipeline of the package for diffusers' sequential CPU offload on a CPU execution device."""

from __future__ import annotations

import torch


class SequentialOffloadMixin:
    """`enable_sequential_cpu_offload(device="cpu")` that works.

    diffusers gives accelerate's hooks the device `cpu:0`; torch's `Parameter.to("cpu:0")` returns a plain tensor, which
    accelerate then stores in place of the parameter, and the next forward of that layer (an `Embedding` first) fails
    with a TypeError. The hooks here run on the index-free device `cpu`, which is the same memory."""

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if self._offload_device.type != "cpu":
            return
        self._offload_device = torch.device("cpu")
        for component in self.components.values():
            if isinstance(component, torch.nn.Module):
                for module in component.modules():
                    hook = getattr(module, "_hf_hook", None)
                    if getattr(hook, "execution_device", None) is not None:
                        hook.execution_device = self._offload_device
