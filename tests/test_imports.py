"""Imports run one way: config -> parts -> model -> glue (lit / training / eval / serve / ...), read off every import
statement of the package (function-level ones included), and the heavy parts a caller does not need stay unloaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"vlm.config"}
PARTS = {"vlm.tiling", "vlm.images", "vlm.layers", "vlm.pretrained", "vlm.tokenizer", "vlm.prompts", "vlm.vision",
         "vlm.resampler", "vlm.visual", "vlm.fusion", "vlm.lm", "vlm.processor", "vlm.hf_weights", "vlm.parallel",
         "vlm.feature_cache", "vlm.blip2"}
MODEL = {"vlm.model", "vlm.hf_import"}
GLUE = {"vlm.checkpoint", "vlm.throughput", "vlm.lit", "vlm.training", "vlm.callbacks", "vlm.vision_pretrain",
        "vlm.blip2_stage1", "vlm.explain",
        "vlm.compose", "vlm.report", "vlm.cli", "vlm.eval", "vlm.serve"}
LIGHTNING = ("lightning", "pytorch_lightning")
# (where, what it must never import, why)
BANS = [
    ("vlm.data", ("vlm.model", "vlm.lit", "vlm.eval", "vlm.serve", "vlm.training", "vlm.checkpoint", *LIGHTNING),
     "data never imports the model or the glue"),
    ("vlm.model", (*LIGHTNING, "torch.distributed", "vlm.data"), "the model: no Lightning, no distributed, no data"),
    ("vlm.checkpoint", ("vlm.data", *LIGHTNING), "weights I/O apart from resume state (vlm.training)"),
    ("vlm.eval", ("vlm.data.synthetic", *LIGHTNING), "entry points build the corpus, not the evaluation"),
    ("vlm.serve", ("vlm.data", "vlm.lit", "vlm.training", *LIGHTNING), "serving loads weights, not the data pipeline"),
    ("vlm.processor", ("vlm.model", *LIGHTNING), "the processor is data-side"),
]


def layer(module: str) -> int:
    """0 config, 1 parts (and vlm.data), 2 model, 3 glue."""
    def within(names):
        return any(module == n or module.startswith(n + ".") for n in names)

    if within(CONFIG):
        return 0
    if within(PARTS) or within({"vlm.data"}):
        return 1
    if within(MODEL):
        return 2
    if within(GLUE):
        return 3
    raise AssertionError(f"{module} has no layer: add it to tests/test_imports.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import; `from pkg import name` counts as pkg.name too (a submodule)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(module: str, source: str) -> list[str]:
    found = []
    for line, target in imports(source):
        hits = lambda names, target=target: any(target == n or target.startswith(n + ".") for n in names)
        if target.startswith("vlm.") and target != module and _is_module(target):
            if layer(target) > layer(module):
                found.append(f"{module}:{line} imports {target} (layer {layer(target)} > {layer(module)})")
            if layer(module) == 1 and not module.startswith("vlm.data") and target.startswith("vlm.data"):
                found.append(f"{module}:{line} imports {target} (parts never import data)")
        if layer(module) <= 1 and hits(LIGHTNING):
            found.append(f"{module}:{line} imports {target} (no Lightning below the glue)")
        if layer(module) <= 2 and module != "vlm.parallel" and hits(("torch.distributed",)):
            found.append(f"{module}:{line} imports {target} (torch.distributed only in vlm.parallel and the glue)")
        for where, banned, why in BANS:
            if (module == where or module.startswith(where + ".")) and hits(banned):
                found.append(f"{module}:{line} imports {target} ({why})")
    return found


def _is_module(name: str) -> bool:
    """A module or package of ours (not a name imported from one)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_imports_run_one_way():
    found = []
    for path in sorted((ROOT / "vlm").rglob("*.py")):
        found += violations(module_name(path), path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("module", "source"), [
    ("vlm.data.pipeline", "from vlm.model import VLM"),
    ("vlm.data.convert.vqa", "def f():\n    import lightning"),
    ("vlm.model", "import torch.distributed as dist"),
    ("vlm.model", "from vlm.data.pipeline import ShardStream"),
    ("vlm.model", "from vlm.lit import VLMLitModule"),
    ("vlm.fusion", "from vlm.model import VLM"),
    ("vlm.lm", "from vlm.data import prompts"),
    ("vlm.config", "from vlm.tiling import plan_tiles"),
    ("vlm.checkpoint", "from vlm.data.pipeline import StreamPosition"),
    ("vlm.eval.runner", "from vlm.data.synthetic import ensure_corpus"),
    ("vlm.serve.app", "from vlm.data.pipeline import ShardStream"),
    ("vlm.processor", "from vlm.model import IGNORE_INDEX"),
])
def test_a_backward_import_is_caught(module, source):
    assert violations(module, source)


def test_serving_and_weights_load_without_lightning_or_the_data_pipeline():
    """What a server process loads: the app and the checkpoint reader, never Lightning or the shard pipeline."""
    code = ("import sys, vlm.checkpoint, vlm.serve.app, vlm.eval.runner; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'vlm.data.pipeline', 'vlm.data.synthetic', "
            "'webdataset', 'vlm.lit', 'vlm.training') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
