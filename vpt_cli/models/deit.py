"""DeiT with a distillation token (timm's VisionTransformerDistilled).

Its layout is the plain ViT's with a second prefix token: `_pos_embed` puts [CLS, distillation]
ahead of the patches, so prompts (appended after everything) come after both, as the method doc
asks. timm's own head averages the CLS and distillation outputs, so under the backbone's own
pooling, which prompt.pool calls "prefix", the last layer computes those two rows (prompt.pool
"token" reads the CLS output alone).
"""
from __future__ import annotations

from timm.models.deit import VisionTransformerDistilled

from vpt_cli.models.registry import register_adapter
from vpt_cli.models.vit import ViTAdapter


@register_adapter(VisionTransformerDistilled)
class DistilledViTAdapter(ViTAdapter):
    family = "deit-distilled"

    def own_pool_name(self) -> str | None:
        return "prefix"  # the mean of the CLS and distillation outputs

    def own_pooling_rows(self, length: int) -> int:
        return self.model.num_prefix_tokens
