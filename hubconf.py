"""torch.hub entry points: the nine DeiT models with iRPE and the plain DeiT baselines.

Example::

    model = torch.hub.load("/path/to/this/checkout", "deit_small_patch16_224_ctx_product_50_shared_k",
                           source="local", pretrained=True)

Every entry point takes ``pretrained`` and the keyword arguments of
:class:`rpe_vision_transformer.VisionTransformer` (``img_size``, ``num_classes``, ``drop_path_rate``, ...).
``pretrained=True`` is available for the released iRPE models (see ``rpe_models.MODEL_ZOO``) and all baselines.
"""

from models import (  # noqa: F401  (re-exported as hub entry points)
    deit_base_distilled_patch16_224,
    deit_base_distilled_patch16_384,
    deit_base_patch16_224,
    deit_base_patch16_384,
    deit_small_distilled_patch16_224,
    deit_small_patch16_224,
    deit_tiny_distilled_patch16_224,
    deit_tiny_patch16_224,
)
from rpe_models import (  # noqa: F401
    deit_base_patch16_224_ctx_product_50_shared_k,
    deit_base_patch16_224_ctx_product_50_shared_qkv,
    deit_small_patch16_224_ctx_cross_56_shared_k,
    deit_small_patch16_224_ctx_euc_20_shared_k,
    deit_small_patch16_224_ctx_product_50_shared_k,
    deit_small_patch16_224_ctx_product_50_shared_qk,
    deit_small_patch16_224_ctx_product_50_shared_qkv,
    deit_small_patch16_224_ctx_quant_51_shared_k,
    deit_tiny_patch16_224_ctx_product_50_shared_k,
)

dependencies = ["torch", "timm"]
