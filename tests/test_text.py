"""pipeline.text: EMP-Net's templates, raw text features, and template files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import TINY_MODEL, load_clip
from pipeline.text import EMP16_TEMPLATES, TemplateError, encode_class_texts, load_templates

torch.set_num_threads(1)

EXPECTED = [
    "a photo of action {}",
    "a picture of action {}",
    "Human action of {}",
    "{}, an action",
    "{} this is an action",
    "{}, a video of action",
    "Playing action of {}",
    "{}",
    "Playing a kind of action, {}",
    "Doing a kind of action, {}",
    "Look, the human is {}",
    "Can you recognize the action of {}?",
    "Video classification of {}",
    "A video of {}",
    "The man is {}",
    "The woman is {}",
]


def test_emp16_templates_exact():
    assert len(EMP16_TEMPLATES) == 16
    assert list(EMP16_TEMPLATES) == EXPECTED


def test_encode_class_texts_raw_features():
    clip = load_clip(TINY_MODEL, "none")
    tok = clip.tokenizer()
    names = ["brush hair", "ride bike", "{odd} name"]
    feats = encode_class_texts(clip.model, tok, names)
    assert feats.shape == (3, 16, 32) and feats.dtype == np.float32
    with torch.no_grad():
        ref = clip.model.encode_text(tok(["Look, the human is ride bike"]))[0].numpy()
    np.testing.assert_allclose(feats[1, 10], ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        odd = clip.model.encode_text(tok(["A video of {odd} name"]))[0].numpy()
    np.testing.assert_allclose(feats[2, 13], odd, rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(feats, axis=-1)
    assert not np.allclose(norms, 1.0), "features are stored raw, not L2-normalised"
    # batching does not change the result
    np.testing.assert_allclose(
        encode_class_texts(clip.model, tok, names, batch_size=5), feats, rtol=1e-5, atol=1e-6
    )


def test_load_templates_file(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("# my prompts\n\n  a clip of {}  \n{} happening\n", encoding="utf-8")
    assert load_templates(p) == ["a clip of {}", "{} happening"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (
            "a photo of {}\nno placeholder\n",
            r"mine\.txt:2: 'no placeholder' must contain exactly one \{\}",
        ),
        ("{} and {}\n", r"mine\.txt:1: .* must contain exactly one \{\}"),
        ("a {0} of {}\n", r"mine\.txt:1: .* has braces other than"),
        ("a {}\n# c\na {}\n", r"template 2 'a \{\}' is a duplicate"),
        ("\n# only comments\n", r"mine\.txt: no templates"),
    ],
)
def test_bad_template_files(tmp_path, content, pattern):
    p = tmp_path / "mine.txt"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(TemplateError, match=pattern) as err:
        load_templates(p)
    assert "\n" not in str(err.value)


def test_unreadable_template_files(tmp_path):
    with pytest.raises(TemplateError, match="template file not found"):
        load_templates(tmp_path / "absent.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 {}\n".encode("latin-1"))
    with pytest.raises(TemplateError, match="is not UTF-8 text"):
        load_templates(p)
