"""``trl.models.modeling_base``: ``PreTrainedModelWrapper`` and ``create_reference_model``."""

from .modeling_value_head import PreTrainedModelWrapper, create_reference_model

__all__ = ["PreTrainedModelWrapper", "create_reference_model"]
