import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillava.cli import main

IMAGE = "examples/images/chelsea.jpg"


@pytest.fixture(scope="module")
def built(asset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    code = main(
        [
            "build",
            "--vision",
            str(asset_dir("vision", "clip")),
            "--llm",
            str(asset_dir("llm", "llama")),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_build_then_generate(built, capsys):
    assert (
        main(
            ["generate", "--model", str(built), "--image", IMAGE, "--prompt", "What is this?", "--max-new-tokens", "5"]
        )
        == 0
    )
    greedy = capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--model",
                str(built),
                "--image",
                IMAGE,
                "--prompt",
                "What is this?",
                "--max-new-tokens",
                "5",
                "--stream",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == greedy


def test_template_none_uses_prompt_verbatim(built, capsys):
    args = ["generate", "--model", str(built), "--image", IMAGE, "--max-new-tokens", "3", "--template", "none"]
    assert main([*args, "--prompt", "<image> a photo of"]) == 0
    assert main([*args, "--prompt", "a photo of"]) == 1  # one image, no <image> in a verbatim prompt
    assert "0 <image> markers but 1 images" in capsys.readouterr().err


def test_info_reports_counts(built, capsys):
    assert main(["info", "--model", str(built)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens_per_image"] == 16 and info["projector"] == "mlp2x_gelu"
    assert info["parameters"]["vision"]["trainable"] == 0 and info["parameters"]["projector"]["trainable"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/nonexistent/dir", "--prompt", "x"], "/nonexistent/dir"),
        (
            ["generate", "--model", "{model}", "--image", "/nonexistent.png", "--prompt", "x"],
            "/nonexistent.png: cannot open",
        ),
        (
            ["generate", "--model", "{model}", "--image", "pyproject.toml", "--prompt", "x"],
            "pyproject.toml: not a readable image",
        ),
        (["generate", "--model", "{model}", "--prompt", "x", "--dtype", "float16"], "float16 needs a CUDA device"),
        (["build", "--vision", "builtin:nope", "--llm", "x", "--out", "/tmp/x"], "builtin"),
    ],
)
def test_errors_are_one_line_without_traceback(built, capsys, argv, message):
    argv = [a.replace("{model}", str(built)) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_from_a_model_dir_parses(built, tmp_path, capsys):
    """`train --model DIR` has no --vision: the CLI must not trip over the build command's flags."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "nope.png", "caption": "x"}\n')
    code = main(
        ["train", "--model", str(built), "--data", str(data), "--image-root", str(tmp_path), "--max-steps", "1",
         "--out", str(tmp_path / "run")]  # not the default ./runs/minillava: an earlier run there is refused
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "nope.png" in err and "Traceback" not in err


def test_help_imports_neither_torch_nor_transformers():
    """`minillava --help` used to take 5-7 s importing torch and transformers; commands import them when they run."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "minillava", "--help"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "train" in proc.stdout and "merge-lora" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "minillava.cli" in imported  # -X importtime did report this checkout's imports
    assert not imported & {"torch", "transformers", "minillava.model"}
    probe = ("import sys; from minillava.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
