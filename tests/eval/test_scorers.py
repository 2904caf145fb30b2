"""Scorers: the registry and the concept judge, and each scorer on small fixtures against its oracle
(CLIP: the embedder's own scores; toy: scenes drawn by the world's renderer; NudeNet: its own
detector and image reader, or a stand-in detector for the counting rule)."""

import sys

import numpy as np
import pytest
from PIL import Image

from dsas_diffusion.eval import (NUDITY_CLASSES, SCORERS, ClipScorer, NudeNetScorer, Scorer, ScorerOptions, ToyScorer,
                                 clip_scores, concept_judge, concept_probabilities, embedding_drift, load_clip,
                                 load_scorers, register_scorer)
from dsas_diffusion.eval.nudity import import_nudenet
from dsas_diffusion.toy import t2i_world

from tests.cli.conftest import save_tiny_clip

CONCEPT, ANTI = ("a photo of a banana",), ("a photo of an apple", "a photo of a dog")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def random_image(seed, size=32):
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def test_registry_and_loading_by_name():
    assert {"clip", "nudenet", "toy"} <= set(SCORERS)
    with pytest.raises(ValueError, match="scorer 'toy' is already registered to ToyScorer"):
        register_scorer("toy")(type("Other", (Scorer,), {}))
    with pytest.raises(ValueError, match="needs a name that is an identifier"):
        register_scorer("not a name")
    with pytest.raises(ValueError, match=r"'clipp' is not a scorer; choose from \['clip', 'nudenet', 'toy'"):
        load_scorers(["toy", "clipp"], ScorerOptions())
    scorers = load_scorers(["toy", "toy"], ScorerOptions(toy_concept="red"))
    assert [s.name for s in scorers] == ["toy"] and scorers[0].toy_concept == "red"


def test_options_are_checked_where_they_enter():
    with pytest.raises(ValueError, match=r"nudity_threshold must be a finite number in \(0, 1\), got 1.5; pass e"):
        ScorerOptions(nudity_threshold=1.5)
    with pytest.raises(ValueError, match="anti-concept texts are empty"):
        ScorerOptions(concept=CONCEPT)
    with pytest.raises(ValueError, match="toy concept 'purple' is not a colour or shape of the toy world"):
        ToyScorer("purple")


def test_the_concept_judge_is_chosen_before_loading():
    texts = ScorerOptions(concept=CONCEPT, anti_concept=ANTI)
    assert concept_judge(["clip", "toy"], ScorerOptions()) is None  # no texts, no toy concept
    assert concept_judge(["clip", "toy"], texts) == "clip"
    assert concept_judge(["toy", "clip"], ScorerOptions(concept=CONCEPT, anti_concept=ANTI, toy_concept="red")) == "toy"
    assert concept_judge(["clip", "nudenet"], ScorerOptions()) == "nudenet"
    assert concept_judge(["clip", "nudenet"], texts, "nudenet") == "nudenet"
    with pytest.raises(ValueError, match=r"'toy' is not among the scorers \['clip'\]"):
        concept_judge(["clip"], texts, "toy")
    with pytest.raises(ValueError, match="cannot judge the concept: pass a concept of the toy world"):
        concept_judge(["toy"], texts, "toy")


def test_clip_scorer_equals_the_embedders_scores(clip_dir):
    embedder = load_clip("transformers", str(clip_dir))
    options = ScorerOptions(clip_model=str(clip_dir), concept=CONCEPT, anti_concept=ANTI, concept_threshold=0.3)
    scorer, = load_scorers(["clip"], options)
    images, prompts = [random_image(s) for s in range(3)], ["a banana", "a dog on a table", "a red car"]
    fields = scorer.score(images, prompts, twins=[0, 0, None])
    emb = embedder.image_embeddings(images)
    cs = clip_scores(emb, embedder.text_embeddings(prompts))
    cp = concept_probabilities(emb, embedder.text_embeddings(CONCEPT), embedder.text_embeddings(ANTI),
                               embedder.logit_scale)
    assert [f["clip_score"] for f in fields] == pytest.approx(cs.tolist(), abs=1e-4)
    assert [f["clip_concept_prob"] for f in fields] == pytest.approx(cp.tolist(), abs=1e-4)
    assert fields[0]["drift_clip"] is None and fields[2]["drift_clip"] is None  # its own twin; no twin
    assert fields[1]["drift_clip"] == pytest.approx(float(embedding_drift(emb[1:2], emb[:1])[0]), abs=1e-6)
    p, shows = scorer.concept(fields[1])
    assert p == fields[1]["clip_concept_prob"] and shows == (p > 0.3)
    assert scorer.settings()["clip_model"] == str(clip_dir) and scorer.settings()["concept_threshold"] == 0.3
    plain = ClipScorer(embedder)
    assert "clip_concept_prob" not in plain.score(images[:1], prompts[:1], [None])[0]
    with pytest.raises(ValueError, match="pass concept and anti-concept texts"):
        plain.concept(fields[0])


def test_clip_scorer_that_cannot_load_says_which_option_to_change(tmp_path):
    with pytest.raises(OSError, match="pass --clip-model with a local CLIP folder"):
        load_scorers(["clip"], ScorerOptions(clip_model=str(tmp_path / "no-clip")))


def test_toy_scorer_reads_every_scene_the_world_draws():
    scorer = ToyScorer("red")
    scenes = t2i_world.all_scenes()
    images = [t2i_world.render(s, jitter=(i % 3 - 1, 1 - i % 3)) for i, s in enumerate(scenes)]
    fields = scorer.score(images, [s.caption for s in scenes], [None] * len(scenes))
    for scene, f in zip(scenes, fields):
        assert (f["toy_colour"], f["toy_shape"], f["toy_faithful"]) == (scene.colour, scene.shape, True), scene
        assert f["toy_concept"] == (scene.colour == "red") and scorer.concept(f) == (float(f["toy_concept"]),
                                                                                   f["toy_concept"])
    # the caption asks for blue; the pixels show red: unfaithful, and the concept is seen
    red = t2i_world.Scene("red", "circle", "large", "white")
    f, = scorer.score([t2i_world.render(red)], ["a large blue circle on a white background"], [None])
    assert f == {"toy_colour": "red", "toy_shape": "circle", "toy_faithful": False, "toy_concept": True}
    blank = Image.new("RGB", (32, 32), t2i_world.BACKGROUNDS["white"])
    f, = ToyScorer().score([blank], [red.caption], [None])
    assert f == {"toy_colour": None, "toy_shape": None, "toy_faithful": False}
    with pytest.raises(ValueError, match="cannot judge the concept: pass a concept of the toy world"):
        ToyScorer().concept(f)


@pytest.mark.parametrize("prompt", ["a photo of a banana", "a small purple circle on a white background",
                                    "a small red circle on a white background, detailed", ""])
def test_toy_scorer_refuses_prompts_that_are_not_captions(prompt):
    ToyScorer().check_prompts(["a small red circle on a white background"])
    with pytest.raises(ValueError, match=f"the prompt {prompt!r} is not one: use the toy world's captions"):
        ToyScorer().check_prompts(["a small red circle on a white background", prompt])


class StandInDetector:
    """NudeNet's `detect_batch` answer, given in advance; records what it was shown."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def detect_batch(self, arrays, batch_size=4):
        self.seen += arrays
        return self.answers[:len(arrays)]


def test_nudity_counts_exposed_classes_at_the_threshold():
    det = StandInDetector([
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61, "box": [0, 0, 1, 1]},
         {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}],
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]},
         {"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
        [],
    ])
    scorer = NudeNetScorer(det, threshold=0.6)
    image = Image.fromarray(np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3))
    fields = scorer.score([image] * 3, ["a"] * 3, [None] * 3)
    assert fields == [{"nude": True, "nudity_score": 0.61, "nudity_classes": ["FEMALE_BREAST_EXPOSED"]},
                      {"nude": False, "nudity_score": 0.59, "nudity_classes": []},
                      {"nude": False, "nudity_score": 0.0, "nudity_classes": []}]
    assert [scorer.concept(f) for f in fields] == [(0.61, True), (0.59, False), (0.0, False)]
    assert np.array_equal(det.seen[0], np.asarray(image)[..., ::-1])  # BGR, as cv2.imread gives NudeNet
    assert "FACE_FEMALE" not in NUDITY_CLASSES and "FEET_EXPOSED" not in NUDITY_CLASSES


def test_missing_nudenet_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r'pip install "dsas-diffusion\[nudenet\]"\` \(its wheel carries an AGPL'):
        import_nudenet()
    with pytest.raises(ImportError, match="the nudenet scorer needs the nudenet package"):
        load_scorers(["nudenet"], ScorerOptions())


def test_nudenet_sees_what_it_sees_when_reading_the_file(tmp_path):
    pytest.importorskip("nudenet", reason='the nudenet extra is not installed (pip install "dsas-diffusion[nudenet]")')
    from nudenet.nudenet import _read_image

    image = random_image(0, size=48)
    image.save(tmp_path / "a.png")
    scorer, = load_scorers(["nudenet"], ScorerOptions())
    arrays = []
    scorer.detector.detect_batch = lambda batch, batch_size: arrays.extend(batch) or [[] for _ in batch]
    scorer.score([image], ["a"], [None])
    assert np.array_equal(_read_image(arrays[0])[0], _read_image(str(tmp_path / "a.png"))[0])
    del scorer.detector.detect_batch  # the real detector: nothing exposed in noise
    assert scorer.score([image, Image.new("RGB", (48, 48))], ["a", "b"], [None, None]) == [
        {"nude": False, "nudity_score": 0.0, "nudity_classes": []}] * 2
