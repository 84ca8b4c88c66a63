"""Block swap (`model.block_swap: N`): N transformer blocks of a trained denoiser keep their frozen
weights in pinned CPU memory; each is copied to the GPU on a side stream just before it runs
(the next swapped block is prefetched while the current one computes) and dropped again after.

Only frozen tensors move: LoRA weights (and anything else with `requires_grad`) stay on the GPU,
so the optimizer, gradient clipping and DDP's reducer see device tensors only. In training the
block is fetched again before its backward (full backward pre-hook; dropped when the block
before it starts its backward) and, with gradient
checkpointing, for the recomputed forward; autograd saves the Parameter objects, whose `.data`
points at the GPU copy again by the time backward reads them.

Two accelerate / DDP details: accelerate's `prepare` moves a model to the device unless it carries
an `hf_device_map` of several entries (how dispatched big models are marked), so the root gets one
naming the swapped blocks (all with the execution device); DDP is told to ignore the swapped
frozen tensors (identical on every rank; it would otherwise refuse parameters on two devices).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass, transform_subclass

#: Blocks that must stay resident: the one computing and the one being prefetched (as the planner).
SWAP_BUFFER_BLOCKS = 2


def _map_storage(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` on a plain tensor; on a quantized weight (torchao's Int8Tensor / Float8Tensor: tensor
    subclasses holding qdata + scale) on each inner tensor, rebuilt as the same subclass: pinning,
    non-blocking copies and record_stream are not ops those subclasses implement themselves."""
    if is_traceable_wrapper_subclass(tensor):
        return transform_subclass(tensor, lambda _name, inner: _map_storage(inner, fn))
    return fn(tensor)


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [t for name in names for t in _plain_tensors(getattr(tensor, name))]
    return [tensor]


def _point_at(tensor: torch.Tensor, source: torch.Tensor) -> None:
    """Make the (frozen) `tensor` use `source`'s storage, keeping the object autograd and the
    module hold. `.data =` does that for plain tensors; on a tensor subclass it would only replace
    the empty outer wrapper, so the subclass's inner tensors (qdata, scale) are replaced instead."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner, new = getattr(tensor, name), getattr(source, name)
            if is_traceable_wrapper_subclass(inner):
                _point_at(inner, new)
            else:
                setattr(tensor, name, new)
    else:
        tensor.data = source


def _storage(tensor: torch.Tensor) -> torch.Tensor:
    """What `_point_at` changed: the tensor itself, or a subclass as it now is."""
    return tensor if is_traceable_wrapper_subclass(tensor) else tensor.data


class BlockSwap:
    """Swap the last `count` of `blocks` (modules inside `root`) between `offload_device` and
    `device`. With `device` == `offload_device` == cpu it does the same bookkeeping (hooks, which
    blocks are in, transfer counts) synchronously without copying, which is what the CPU tests check;
    `copy_on_same_device` copies anyway (the CPU tests of the copying path, quantized weights included)."""

    def __init__(self, root: nn.Module, blocks: list[nn.Module], count: int, device: torch.device | str,
                 offload_device: torch.device | str = "cpu", copy_on_same_device: bool = False):
        if not 0 < count <= len(blocks):
            raise ValueError(f"block swap: cannot swap {count} of {len(blocks)} blocks.")
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.blocks = list(blocks)
        self.swapped = self.blocks[len(self.blocks) - count:]
        self.cuda = self.device.type == "cuda"
        self.copy = copy_on_same_device
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # block -> [(tensor whose .data swaps, its copy on the offload device)]
        self.tensors: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.resident: set[nn.Module] = set()
        self.events: dict[nn.Module, torch.cuda.Event] = {}
        self.in_backward: set[nn.Module] = set()
        self.transfers = 0  # copies to the device (tests count them)
        for block in self.swapped:
            pairs = []
            for tensor in list(block.parameters()) + list(block.buffers()):
                if tensor.requires_grad:
                    continue
                # Same device (the CPU tests): keep the tensor itself, so results stay bitwise equal
                # (a copy may change alignment, and so the last bit of CPU matmuls).
                same = self.offload_device == self.device and not copy_on_same_device
                host = tensor.detach() if same else _map_storage(
                    tensor.detach(), lambda t: t.to(self.offload_device, copy=True))
                if self.cuda and self.offload_device.type == "cpu":
                    # async host-to-device copies need page-locked memory
                    host = _map_storage(host, lambda t: t.pin_memory())
                _point_at(tensor, host)
                pairs.append((tensor, host))
            self.tensors[block] = pairs
            block.register_forward_pre_hook(self._before_forward)
            block.register_forward_hook(self._after_forward)
            block.register_full_backward_pre_hook(self._before_backward)
        root.register_forward_pre_hook(self._before_root)
        self._mark_for_accelerate_and_ddp(root)

    # -- moving ---------------------------------------------------------------------------------

    def fetch(self, block: nn.Module) -> None:
        """Start copying `block`'s frozen tensors to the device (on the side stream on CUDA)."""
        if block in self.resident:
            return
        self.resident.add(block)
        self.transfers += 1
        if self.stream is None:
            for tensor, host in self.tensors[block]:
                # synchronous (no CUDA); on one device the same tensor unless copy_on_same_device
                _point_at(tensor, _map_storage(host, lambda t: t.to(self.device, copy=self.copy)))
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for tensor, host in self.tensors[block]:
                _point_at(tensor, _map_storage(host, lambda t: t.to(self.device, non_blocking=True)))
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[block] = event

    def ready(self, block: nn.Module) -> None:
        """Make the compute stream wait until `block` is on the device."""
        self.fetch(block)
        event = self.events.pop(block, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor, _ in self.tensors[block]:
                for inner in _plain_tensors(_storage(tensor)):
                    inner.record_stream(current)  # freed only after compute is done with it

    def release(self, block: nn.Module) -> None:
        """Point `block`'s frozen tensors back at their offload copies (frozen: nothing to copy back)."""
        if block not in self.resident or block in self.in_backward:
            return
        self.ready(block)  # a pending prefetch must land before its memory can be dropped
        for tensor, host in self.tensors[block]:
            _point_at(tensor, host)
        self.resident.discard(block)

    def _neighbour(self, block: nn.Module, step: int) -> nn.Module | None:
        index = self.swapped.index(block) + step
        return self.swapped[index] if 0 <= index < len(self.swapped) else None

    # -- hooks ----------------------------------------------------------------------------------

    def _before_root(self, module, args):
        # A new pass (any earlier backward is over): the first swapped block starts its copy while
        # the resident ones compute.
        self.in_backward.clear()
        for block in list(self.resident):
            self.release(block)
        if self.swapped:
            self.fetch(self.swapped[0])

    def _before_forward(self, block, args):
        self.ready(block)
        if block not in self.in_backward:  # a recomputed forward (checkpointing) runs in backward order
            following = self._neighbour(block, 1)
            if following is not None:
                self.fetch(following)

    def _after_forward(self, block, args, output):
        self.release(block)  # skipped while its backward runs (checkpointing recomputes inside it)

    def _before_backward(self, block, grad_output):
        # The gradients of this block's outputs are complete, so the block after it is done: drop
        # it (not in a full backward hook: with keyword-only inputs torch fires that one early).
        following = self._neighbour(block, 1)
        if following is not None:
            self.in_backward.discard(following)
            self.release(following)
        self.in_backward.add(block)
        self.ready(block)
        previous = self._neighbour(block, -1)  # backward runs the blocks in reverse
        if previous is not None:
            self.fetch(previous)

    # -- accelerate / DDP -----------------------------------------------------------------------

    def _mark_for_accelerate_and_ddp(self, root: nn.Module) -> None:
        names = {id(m): n for n, m in root.named_modules()}
        swapped = [names[id(b)] for b in self.swapped if id(b) in names]
        root.hf_device_map = {"": str(self.device), **{name: str(self.device) for name in swapped}}
        ignore = []
        for block, name in zip(self.swapped, swapped):
            frozen = {id(t) for t, _ in self.tensors[block]}
            ignore += [f"{name}.{n}" for n, t in list(block.named_parameters()) + list(block.named_buffers())
                       if id(t) in frozen]
        previous = list(getattr(root, "_ddp_params_and_buffers_to_ignore", []))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, previous + ignore)
