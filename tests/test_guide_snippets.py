"""docs/GUIDE_MODELS.md: every Python snippet runs, in order, without a warning (Python warnings and
transformers' logged warnings) under the installed torch and transformers. The Hugging Face
snippet's placeholders (`name`, `ids`, `mask`) become a tiny random Llama saved to a temporary
folder and a left-padded batch. Runs in a subprocess: the snippets register backends globally."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "GUIDE_MODELS.md")


def guide_snippets():
    with open(GUIDE) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    out = []
    for b in blocks:
        if b.lstrip().startswith(">>>"):  # an interactive session: its input lines
            b = "\n".join(line[4:] for line in b.splitlines() if line.startswith((">>> ", "... ")))
        out.append(b)
    return out


RUNNER = textwrap.dedent(
    """
    import json, logging, sys, warnings

    blocks = json.loads(sys.argv[1])
    placeholders_dir = sys.argv[2]
    caught = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                caught.append(f"{record.name}: {record.getMessage()}")

    logging.getLogger("transformers").addHandler(Catch())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import torch, transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            eos_token_id=2, bos_token_id=1,
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(placeholders_dir)
        del w[:]
        caught.clear()
        ns = {
            "name": placeholders_dir,
            "ids": torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]]),
            "mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        }
        for i, b in enumerate(blocks):
            exec(compile(b, f"GUIDE_MODELS.md snippet {i + 1}", "exec"), ns)
        caught += [f"{x.category.__name__}: {x.message} ({x.filename}:{x.lineno})" for x in w]
    print("WARNINGS=" + json.dumps(caught))
    """
)


def test_guide_has_snippets():
    snippets = guide_snippets()
    assert len(snippets) >= 4
    assert any("swap_attention" in s for s in snippets) and any("SeqkernelsCache" in s for s in snippets)


def test_guide_snippets_run_without_warnings(tmp_path):
    pytest.importorskip("transformers")
    env = dict(os.environ, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(guide_snippets()), str(tmp_path / "tiny-llama")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("WARNINGS=")]
    assert json.loads(line[len("WARNINGS=") :]) == []
