"""The CLIP embedder: preprocessing equal to transformers' CLIPImageProcessor, scores equal to
CLIPModel's own logits, and optional backends loaded only when asked for."""

import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from dsas_diffusion.eval import clip_scores, concept_probabilities, load_clip, preprocess_image
from dsas_diffusion.eval.clip_score import import_open_clip, open_clip_precision

from tests.cli.conftest import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def random_image(h, w, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("size, shape", [(32, (40, 60)), (32, (97, 33)), (32, (64, 64)), (224, (300, 500))])
def test_preprocessing_equals_transformers(size, shape):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = random_image(*shape)
    expected = proc(images=image, return_tensors="pt").pixel_values[0]
    assert torch.allclose(preprocess_image(image, size), expected, atol=1e-5)


def test_scores_equal_clip_model_logits(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    clip = load_clip("transformers", str(clip_dir))
    images, prompts = [random_image(32, 32, s) for s in range(3)], ["a banana", "a dog on a table", "a red car"]
    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    pixels = torch.stack([preprocess_image(im, 32) for im in images])
    with torch.no_grad():
        out = model(**tok(prompts, padding=True, return_tensors="pt"), pixel_values=pixels)
    cos = out.logits_per_image / model.logit_scale.detach().exp()
    img, txt = clip.image_embeddings(images), clip.text_embeddings(prompts)
    assert torch.allclose(clip_scores(img, txt), 100 * cos.diagonal().clamp_min(0), atol=1e-4)
    p = concept_probabilities(img, txt[:1], txt[1:], clip.logit_scale)
    assert torch.allclose(p, out.logits_per_image.softmax(-1)[:, 0], atol=1e-5)


def test_one_prompt_per_image():
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_scores(torch.ones(3, 4), torch.ones(2, 4))


def test_unknown_backend_and_missing_open_clip(monkeypatch):
    with pytest.raises(ValueError, match="CLIP backend 'openai' is unknown"):
        load_clip("openai")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r'pip install "dsas-diffusion\[openclip\]"'):
        import_open_clip()


def test_optional_packages_are_never_imported_up_front():
    code = ("import sys, dsas_diffusion.eval, dsas_diffusion.cli, dsas_diffusion.prompt_files; "
            "from dsas_diffusion.cli import build_parser; build_parser(); "
            "bad = [m for m in ('open_clip', 'torchvision', 'matplotlib', 'diffusers', 'transformers', 'nudenet', "
            "'onnxruntime', 'cv2') "
            "if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class FakeOpenClipModel(torch.nn.Module):
    """What open_clip's create_model_and_transforms gives for a precision: weights in that dtype."""

    def __init__(self, precision):
        super().__init__()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.visual = torch.nn.Linear(3 * 4 * 4, 8).to(dtype)
        self.text = torch.nn.Embedding(10, 8).to(dtype)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, pixels):
        return self.visual(pixels.flatten(1))

    def encode_text(self, ids):
        return self.text(ids).mean(1)


@pytest.fixture
def fake_open_clip(monkeypatch):
    made = []

    def create_model_and_transforms(arch, pretrained=None, device="cpu", precision="fp32"):
        made.append(precision)
        preprocess = lambda im: torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)
        return FakeOpenClipModel(precision), None, preprocess

    tokenizer = lambda texts: torch.zeros(len(texts), 3, dtype=torch.long)
    module = types.SimpleNamespace(create_model_and_transforms=create_model_and_transforms,
                                   get_tokenizer=lambda arch: tokenizer)
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return made


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "fp32"), (torch.float16, "fp16"),
                                              (torch.bfloat16, "bf16")])
def test_open_clip_runs_in_the_dtype_asked_for(fake_open_clip, dtype, precision):
    clip = load_clip("open_clip", dtype=dtype)
    assert fake_open_clip == [precision]
    emb = clip.image_embeddings([random_image(8, 8, s) for s in range(3)])  # pixels cast to the model's dtype
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert clip.text_embeddings(["a banana"]).shape == (1, 8)


def test_open_clip_refuses_other_dtypes():
    with pytest.raises(ValueError, match="cannot run in torch.float64; pass --dtype float32, float16 or bfloat16"):
        open_clip_precision(torch.float64)
