"""``trl.models.utils``: ``setup_chat_format``."""

from .modeling_value_head import setup_chat_format

__all__ = ["setup_chat_format"]
