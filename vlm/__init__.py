"""GPT-4V-style tiled vision-language models (Flamingo / BLIP-2 family) on frozen transformers LLMs.

One shape vocabulary, in every module's legend, shape comment and einops pattern:
    B samples   T text tokens (n of them new, in a decode)   I images   V views (global views + tiles of all images)
    F video frames (a video's views)   C channels   S view side   h x w image pixels   gh x gw feature grid
    P patches per view   L tokens per view (queries + class token: Lg = 65 global, Lt = 129 tile)
    N visual tokens of the batch (flat)   K visual tokens per sample (padded)   E examples (stage 0)   G clips
    Dv vision width   D resampler width   Dl LM hidden width   De LM embedding width   W vocabulary
    H heads   d head width   M queries and R keys of a generic attention   A answer classes (stage 0)
"""

__version__ = "0.1.0"
