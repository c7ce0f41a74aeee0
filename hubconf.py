"""torch.hub entry points: the nine DeiT models with iRPE and timm's plain DeiT baselines.

Example::

    model = torch.hub.load("/path/to/this/checkout", "deit_small_patch16_224_ctx_product_50_shared_k",
                           source="local", pretrained=True)

Every entry point is ``timm.create_model(name, pretrained=pretrained, **kwargs)``: the iRPE models take the keyword
arguments of :class:`rpe_vision_transformer.VisionTransformer` (``img_size``, ``num_classes``, ``drop_path_rate``,
...), the baselines those of timm's ``deit_*``. ``pretrained=True`` is available for the released iRPE models (see
``rpe_models.MODEL_ZOO``) and all baselines (timm's weights, the DeiT release).
"""

from collections.abc import Callable as _Callable

import timm
from torch import nn

import rpe_models

dependencies = ["torch", "timm"]

# timm's own DeiT models (the DeiT release: tiny/small/base at 224, base at 384, plain and distilled).
DEIT_BASELINES = tuple(timm.list_models("deit_*", module="deit"))


def _entry_point(name: str) -> _Callable[..., nn.Module]:
    def entry_point(pretrained: bool = False, **kwargs) -> nn.Module:
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = f"``timm.create_model('{name}', pretrained=pretrained, **kwargs)``."
    return entry_point


globals().update({name: _entry_point(name) for name in (*rpe_models.MODEL_ZOO, *DEIT_BASELINES)})
