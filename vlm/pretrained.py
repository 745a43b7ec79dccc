"""Where pretrained weights come from, and the error when they cannot be had.

Nothing is downloaded at run time by the tests or the default run. A real checkpoint comes from the Hugging Face cache
(filled once on a connected machine) or a local copy named in the config; offline without either, building the part
raises `MissingWeightsError`, naming the weights and both ways to provide them.
"""

from __future__ import annotations

import os


class MissingWeightsError(RuntimeError):
    pass


def missing_weights(what: str, name: str, key: str, err: Exception) -> MissingWeightsError:
    """A clear offline message: which weights, why, and the two ways to provide them."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    return MissingWeightsError(
        f"{what} weights for {name!r} are not available{' offline (HF_HUB_OFFLINE=1)' if offline else ''}: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"Either download them once on a connected machine (`huggingface-cli download {name}`) so they sit in "
        f"the Hugging Face cache, or point `{key}` at a local copy of the weights."
    )
