"""Undo what a failed ``quantize`` did to the caller's model.

``quantize`` changes a model in two ways: it swaps layers for their quantized
twins (``setattr`` on the parent module; the original layer object itself is
left as it was), and block-wise tuning trains float parts of a block in
place (norms; the quantized layers' scale, zero and bias are new tensors).
``Journal`` records both as they happen, so that on any exception (including
``KeyboardInterrupt``) ``restore()`` puts back the original modules and the
original values, dtypes and identities of every tensor it saw, leaving the
model as it was given.

Memory: one copy of each snapshotted block's tensors other than those of the
layers being quantized (norms, biases of unquantized layers), the layers
themselves are kept by reference only.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class Journal:
    """Module swaps and tensor snapshots, to restore in reverse order."""

    def __init__(self, root: nn.Module):
        self.root = root
        self._swaps: list = []  # (parent, attribute, original module)
        self._tensors: list = []  # (module, "p" | "b", attribute, tensor object, saved copy)
        self._seen: set = set()

    def swap(self, name: str, new: nn.Module) -> None:
        """Replace the submodule ``name`` (dotted, non-empty) by ``new``, remembering the original."""
        parent_name, _, child = name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        self._swaps.append((parent, child, getattr(parent, child)))
        setattr(parent, child, new)

    def originals(self) -> list:
        """The modules swapped out so far (what ``restore`` would put back)."""
        return [original for _, _, original in self._swaps]

    def snapshot(self, block: nn.Module, exclude=()) -> None:
        """Copy every parameter and buffer of ``block`` not owned by a module in ``exclude``.

        A tensor shared by several modules (tied weights) is copied once.
        """
        skip = set()
        for m in exclude:
            skip.update(id(mod) for mod in m.modules())
        for mod in block.modules():
            if id(mod) in skip:
                continue
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for attr, t in table.items():
                    if t is None or (id(mod), kind, attr) in self._seen:
                        continue
                    self._seen.add((id(mod), kind, attr))
                    self._tensors.append((mod, kind, attr, t, t.detach().clone()))

    def restore(self) -> None:
        """Put everything back: tensor values (and dtypes), then the original modules."""
        with torch.no_grad():
            for mod, kind, attr, t, saved in reversed(self._tensors):
                if kind == "p":
                    # Same Parameter object (an optimizer or a tie may hold it), its old data.
                    t.data = saved
                    mod._parameters[attr] = t
                else:
                    mod._buffers[attr] = saved
        for parent, child, original in reversed(self._swaps):
            setattr(parent, child, original)
        log.info("quantize failed: %d swapped layers and %d tensors restored", len(self._swaps), len(self._tensors))
        self._swaps.clear()
        self._tensors.clear()
        self._seen.clear()
