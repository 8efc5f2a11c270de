"""Replay of a block's already-quantized outputs across the block's later passes."""
from __future__ import annotations

import torch
from torch import nn


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a module output (a tensor, or a tuple / list holding some)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


class QuantizedOutputMemo:
    """Outputs of a block's already-quantized linears, per calibration batch, replayed by later passes.

    Each group's statistics pass re-runs the block up to that group's input, and the block's final
    pass runs it whole. Linears solved earlier in the block see the same input in every later
    pass (everything upstream is fixed and the call is the same), so their output is computed once
    and reused. Three more kinds of output are replayed the same way, all identical to recomputing:
    - a submodule whose linears are all solved (an attention module once q/k/v and out_proj are):
      its whole output, attention included;
    - a submodule without parameters or buffers (an activation function) called on a replayed
      output of the same batch (the same tensor object): a pure function of a fixed input;
    - the attention module in the pass that collects its last linear's input (out_proj's): that
      pass lets the module finish with a placeholder for out_proj's output (`stub`) and records the
      module's output with the placeholder in it and out_proj's input (`defer`). Once out_proj is
      solved, the module's output is that record with out_proj(input) put in, so attention runs
      once per block instead of twice. Only done when the module returns out_proj's output
      untouched (the same object, unmodified) and nothing else but None beside it.
    Entries beyond `budget_bytes` are not kept (those outputs are recomputed). Install after the
    block's full-precision twin is copied (a deep copy would carry the wrapped forwards) and close
    before packing.

    Usage: memo.batch = batch index before each block call; memo.fix(names) once a group is
    solved; memo.invalidate(name) when a solved linear is changed again (AWQ's scale folding);
    memo.storing = False before the block's last pass, whose new outputs nothing would replay."""

    def __init__(self, block: nn.Module, names: list[str], budget_bytes: int):
        self.modules = {name: block.get_submodule(name) for name in names}
        # Submodules (not the block) whose every nn.Linear is one of `names`: name -> their linears.
        self.containers: dict[str, set[str]] = {}
        self.pure: set[str] = set()
        for name, module in block.named_modules():
            if not name or name in self.modules:
                continue
            linears = {f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, nn.Linear)}
            if linears and linears <= set(names):
                self.containers[name] = linears
                self.modules[name] = module
            elif next(module.parameters(), None) is None and next(module.buffers(), None) is None:
                self.pure.add(name)
                self.modules[name] = module
        self.budget_bytes, self.stored_bytes = budget_bytes, 0
        self.fixed: set[str] = set()
        # (name, batch) -> (output, its bytes, input): input is the call's input for pure modules, else None.
        self.outputs: dict[tuple[str, int], tuple] = {}
        # (container, batch) -> (output with the placeholder, its position, linear name, linear input, bytes)
        self.deferred: dict[tuple[str, int], tuple] = {}
        self.batch: int | None = None
        self.storing = True
        self.stub: str | None = None          # linear answering with a placeholder (see stub_container)
        self.stub_call: tuple | None = None   # (placeholder, the linear's input) of the last stub call
        self.resolved: list[str] = []         # containers completed from a deferred record, in order
        for name, module in self.modules.items():
            # An instance attribute shadows the class forward; close() deletes it again.
            module.forward = self._memo_forward(name, module, module.forward)

    def _store(self, key, output, input_=None) -> None:
        size = tensor_bytes(output)
        if self.storing and key not in self.outputs and self.stored_bytes + size <= self.budget_bytes:
            self.outputs[key] = (output, size, input_)
            self.stored_bytes += size

    def _drop(self, key) -> None:
        entry = self.outputs.pop(key, None)
        if entry is not None:
            self.stored_bytes -= entry[1]

    def _is_replayed(self, tensor) -> bool:
        return any(entry[0] is tensor for (_, batch), entry in self.outputs.items() if batch == self.batch)

    def _memo_forward(self, name: str, module: nn.Module, forward):
        def memo_forward(*args, **kwargs):
            if self.batch is None:
                return forward(*args, **kwargs)
            key = (name, self.batch)
            if name == self.stub:
                # out_features wide like the real output; its values are never read (see defer).
                placeholder = args[0].new_empty(*args[0].shape[:-1], module.out_features)
                self.stub_call = (placeholder, args[0])
                return placeholder
            if name in self.pure:
                hit = self.outputs.get(key)
                if hit is not None and len(args) == 1 and not kwargs and hit[2] is args[0]:
                    return hit[0]
                out = forward(*args, **kwargs)
                if len(args) == 1 and not kwargs and self._is_replayed(args[0]):
                    self._store(key, out, args[0])
                return out
            if name not in self.fixed:
                return forward(*args, **kwargs)
            hit = self.outputs.get(key)
            if hit is not None:
                return hit[0]
            if key in self.deferred:
                out = self._resolve(key)
            else:
                out = forward(*args, **kwargs)
            self._store(key, out)
            if name in self.containers and key in self.outputs:
                # The container now answers for its linears: their outputs are never asked for again.
                for linear in self.containers[name]:
                    self._drop((linear, self.batch))
            return out
        return memo_forward

    def stub_container(self, names) -> str | None:
        """The container that solving `names` (one linear) completes, when there is one: set
        self.stub to that linear for the statistics pass and return the container's name."""
        if len(names) != 1:
            return None
        for container, linears in self.containers.items():
            if names[0] in linears and linears - self.fixed == {names[0]}:
                self.stub = names[0]
                return container
        return None

    def defer(self, container: str, output) -> None:
        """Record the stub pass's container output (holding the placeholder) for later resolution."""
        if self.stub_call is None:
            return
        placeholder, linear_input = self.stub_call
        self.stub_call = None
        if output is placeholder:
            position = None
        elif type(output) in (tuple, list) and sum(item is placeholder for item in output) == 1 and all(
                item is placeholder or item is None for item in output):
            position = next(i for i, item in enumerate(output) if item is placeholder)
        else:
            return   # the container did more with the linear's output: recompute it later
        size = tensor_bytes(linear_input)
        if placeholder._version or not self.storing or self.stored_bytes + size > self.budget_bytes:
            return   # written to in place, or no room
        self.deferred[(container, self.batch)] = (output, position, self.stub, linear_input, size)
        self.stored_bytes += size

    def _pop_deferred(self, key) -> tuple:
        entry = self.deferred.pop(key)
        self.stored_bytes -= entry[4]
        return entry

    def _resolve(self, key):
        output, position, linear, linear_input, _ = self._pop_deferred(key)
        self.resolved.append(key[0])
        result = self.modules[linear](linear_input)   # the solved linear, through its own memo
        if position is None:
            return result
        return type(output)(result if i == position else item for i, item in enumerate(output))

    def fix(self, names) -> None:
        self.fixed.update(name for name in names if name in self.modules)
        self.fixed.update(name for name, linears in self.containers.items() if linears <= self.fixed)

    def invalidate(self, name: str) -> None:
        """Forget `name`'s outputs and those of every container holding it (recorded or deferred)."""
        stale = {name} | {container for container, linears in self.containers.items() if name in linears}
        for key in [key for key in self.outputs if key[0] in stale]:
            self._drop(key)
        for key in [key for key in self.deferred if key[0] in stale]:
            self._pop_deferred(key)

    def replayed_names(self) -> set[str]:
        """Names of the modules whose outputs are currently kept for replay."""
        return {name for name, _ in self.outputs}

    def close(self) -> None:
        for module in self.modules.values():
            del module.forward
        self.outputs.clear()
        self.deferred.clear()
        self.stored_bytes = 0


# Default RAM for QuantizedOutputMemo (a quarter of max_memory when that is smaller): 16 large-v3
# utterances need ~1 GB to replay every encoder linear.
MEMO_BUDGET_BYTES = 1536 << 20
