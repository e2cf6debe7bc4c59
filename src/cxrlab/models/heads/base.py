"""What every head is: ``forward(feature map(s)) -> Output``, and what it declares it can do.

A head states its contract as class attributes, so that the pipeline, the heatmaps and the recipe
check ask the class instead of probing for methods:

* ``provides``: the ``Output.extras`` keys its forward fills (see :mod:`cxrlab.output`), with its
  default ``head_args``; :meth:`Head.extras_for` refines that for a recipe's ``head_args``. Loss terms
  and regimes declare the keys they ``require``; ``check_parts`` compares the two at recipe load.
  ``tests/test_contracts.py`` builds every head and checks that it fills what it declares.
* ``capabilities``: a set of :class:`Capability`. Each one names a method the head overrides
  (``correlation``, ``set_label_text``, ``set_cooccurrence``, ``native_maps``) or, for
  ``several_maps``, that it takes a list of feature maps. The base class's versions do nothing (or
  refuse, where returning nothing would be a silent lie), so a caller may call the hooks on any head.
"""
from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

import torch
from torch import nn

from ...errors import CxrlabError
from ...output import Output


class Capability(StrEnum):
    CORRELATION = "correlation"    # correlation() -> the learned global label correlation G (L×L)
    LABEL_TEXT = "label_text"      # set_label_text(vectors, identity): label text vectors (L×T) in the weights
    COOCCURRENCE = "cooccurrence"  # set_cooccurrence(matrix): the training labels' co-occurrence (L×L)
    NATIVE_MAPS = "native_maps"    # native_maps(fmap, out) -> B×L×h×w maps of its own (attention or CAM)
    SEVERAL_MAPS = "several_maps"  # forward takes the list of maps of several backbones (model.backbones)


class Head(nn.Module):
    """Base class of the registered heads: ``Head(in_features, num_labels, **head_args)``, where
    ``in_features`` is the backbone's channel count, or the list of counts for ``several_maps``."""

    provides: ClassVar[frozenset[str]] = frozenset({"features"})
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    # why the head has no native map, for `cxrlab heatmap` (None: the generic sentence)
    heatmap_note: ClassVar[str | None] = None
    # what produced stored label text vectors (LABEL_TEXT heads set it; saved in checkpoint.json)
    text_identity: dict | None = None

    def forward(self, fmap) -> Output:
        raise NotImplementedError

    @classmethod
    def extras_for(cls, head_args: dict | None = None) -> frozenset[str]:
        """The extras keys this head fills when built with ``head_args`` (by default: ``provides``)."""
        return cls.provides

    @classmethod
    def args_for_weights(cls, head_args: dict, weight_names) -> dict:
        """``head_args`` completed from the names of a checkpoint's head weights (relative to the head),
        for a head whose defaults changed since the checkpoint was saved; by default unchanged."""
        return dict(head_args)

    @classmethod
    def takes_several_maps(cls) -> bool:
        return Capability.SEVERAL_MAPS in cls.capabilities

    # ------------------------------------------------------------------ hooks (defaults: nothing to do)
    def epoch_stats(self) -> dict:
        """Per-epoch diagnostics the trainer logs next to the regime's (a head with none: ``{}``)."""
        return {}

    def set_cooccurrence(self, matrix) -> None:
        """Receive the training labels' co-occurrence; heads without ``cooccurrence`` ignore it."""

    def set_label_text(self, vectors, identity: dict | None = None) -> None:
        raise CxrlabError(f"head {type(self).__name__} takes no label text vectors")

    def correlation(self) -> torch.Tensor:
        raise CxrlabError(f"head {type(self).__name__} has no label correlation G")

    def native_maps(self, fmap, out: Output) -> torch.Tensor | None:
        """Per-label maps B×L×h×w of the head's own (before upsampling), or None: by default the
        ``attention`` extra when the head fills one."""
        maps = out.extras.get("attention")
        return maps.float() if maps is not None else None

