"""What TRL scripts read from a trainer's ``accelerator`` (an ``accelerate.Accelerator`` there):
the device, the process layout, ``unwrap_model``, ``gather``, ``print`` and ``log``. fastalign
runs its own engine (plain torch or DeepSpeed), so this is a view of it, not an Accelerator."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastalign.engine import distributed


class AcceleratorView:
    def __init__(self, device: torch.device, log=None):
        self.device = device
        self._log = log
        self.num_processes = distributed.world_size()
        self.process_index = distributed.rank()
        self.local_process_index = distributed.local_rank()
        self.is_main_process = distributed.is_main()
        self.is_local_main_process = self.local_process_index == 0
        self.use_distributed = self.num_processes > 1
        self.state = SimpleNamespace(deepspeed_plugin=None, device=device, num_processes=self.num_processes)
        self.trackers = []

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True):
        return getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along the first dimension."""
        tensor = torch.as_tensor(tensor).to(self.device)
        if self.num_processes == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat([p.reshape(-1, *tensor.shape[1:]) if tensor.dim() else p.reshape(1) for p in parts])

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()

    def print(self, *args, **kwargs) -> None:
        if self.is_main_process:
            print(*args, **kwargs)

    def log(self, values: dict, step: int | None = None, log_kwargs=None) -> None:
        if self._log is not None:
            self._log(values, step)

    def get_tracker(self, name: str, unwrap: bool = False):
        return None
