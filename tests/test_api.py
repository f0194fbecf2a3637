"""The notebook API: pocketgpt.prepare / train / load with the same typed configs as the CLI."""

import torch

import pocketgpt
from pocketgpt import PrepareConfig

from helpers import tiny_config


def test_prepare_train_load_generate_logits(tmp_path, corpus_text):
    (tmp_path / "book.txt").write_text(corpus_text, encoding="utf-8")
    data = pocketgpt.prepare(PrepareConfig(inputs=[str(tmp_path / "book.txt")], out=str(tmp_path / "data")))
    result = pocketgpt.train(tiny_config(max_iters=20), data, tmp_path / "run", echo=lambda s: None)
    assert result.iters == 20 and result.out == tmp_path / "run"

    m = pocketgpt.load(tmp_path / "run")
    text = m.generate("ROMEO:", max_new_tokens=30, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    assert isinstance(text, str) and text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30
    assert m.generate("ROMEO:", max_new_tokens=30, temperature=0.8, top_k=10, top_p=0.9, seed=3) == text
    assert len(m.generate_many("A", max_new_tokens=5, num_samples=3, seed=1)) == 3

    ids = m.tokenizer.encode("To be, or not")
    logits = m.logits(ids)
    assert logits.shape == (len(ids), m.tokenizer.vocab_size)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    direct, _ = m.model(torch.tensor([ids]))
    torch.testing.assert_close(logits, direct[0])
    # greedy generation picks the argmax of the logits at the last position
    greedy = m.generate("To be, or not", max_new_tokens=1, temperature=0)
    assert m.tokenizer.encode(greedy[-1])[0] == int(logits[-1].argmax())


def test_importing_pocketgpt_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pocketgpt; print('torch' in sys.modules, pocketgpt.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_no_module_is_named_like_a_function_of_the_package_face():
    """A module pocketgpt/prepare.py would replace the function pocketgpt.prepare by itself once anything
    imported it (the import system sets the package's attribute), so the face's names are no module's."""
    from pathlib import Path

    modules = {p.stem for p in Path(pocketgpt.__file__).parent.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert not modules & set(pocketgpt.__all__)
