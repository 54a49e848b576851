"""Built-in synthetic tasks: small problems whose answers can be checked exactly.

They let fastalign train and *measure* a model end to end on a CPU with nothing downloaded: the
embedded demo fine-tunes a tiny model on :mod:`fastalign.tasks.sort_digits` and scores it with
an exact-match metric; the task also gives preference pairs and a graded reward for the
preference and RL stages. :mod:`fastalign.tasks.compressibility` is DDPO's: JPEG
(in)compressibility of generated images, and simple animal prompts. :mod:`fastalign.tasks.registry`
names them (and any ``package.module:function``) for configs: ``reward_function``, ``prompt_function``.
"""

from . import compressibility, registry, sort_digits

__all__ = ["compressibility", "registry", "sort_digits"]
