"""CI runs exactly the README's test command; every `hnm` command the README shows runs (a
tiny epoch count), and its Python example computes what it says."""
import json
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    test = _readme_commands()[1]
    pytest_cmd = test.split("&&")[-1].strip()
    install_cmd = test.split("&&")[-2].strip()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert pytest_cmd in ci, (pytest_cmd, ci)
    assert install_cmd.replace("pip install", "python -m pip install -q") in ci, ci


def test_readme_python_example_runs_and_its_two_paths_agree():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("print(", "(")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (our own README)
    # The named objective and the hand-composed miner -> loss path compute the same joint
    # SCT loss here: random embeddings give no duplicates and no cosine at exactly +-1.
    objective_loss = float(ns["sct"](ns["emb"], ns["labels"])[0])
    hand = ns["losses"].masked_mean(ns["losses"].sct_loss(*ns["miners"].gather_sims(
        ns["sim"], ns["t"])), ns["t"].valid)
    assert abs(objective_loss - float(hand)) < 1e-5, (objective_loss, float(hand))
    assert objective_loss > 0
    assert ns["grads"].shape == ns["emb"].shape


def _hnm_commands():
    """Every `hnm ...` command of the README's bash blocks, in order (the multi-process
    examples, with placeholders for the hosts, are tested by tests/test_multiprocess.py)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("hnm ") and "--coordinator_address" not in part and \
                        "--distributed" not in part:
                    out.append(part)
    return out


def _has_faiss() -> bool:
    from hnm import search
    return search.faiss_available()


def _run_use_command(argv, capsys):
    """`hnm embed / search / export` as the README shows them, on the trained runs/digits:
    images.npz and queries.npz from the run's own image shape, photos/ as PNG files."""
    from PIL import Image

    from hnm import cli, inference

    wd = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "runs/digits")
    shape = inference.image_shape(inference.load_config(wd).data)
    rng = np.random.default_rng(1)
    if not os.path.exists("images.npz"):
        images = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
        np.savez("images.npz", images=images, labels=np.repeat(np.arange(4), 3))
        os.makedirs("photos", exist_ok=True)
        for i, im in enumerate(images[:5]):
            Image.fromarray(im[..., 0] if shape[-1] == 1 else im).save(f"photos/{i}.png")
    code = cli.run(argv)
    out = capsys.readouterr()
    assert code == 0, (argv, out.err[-3000:])
    if argv[0] == "embed":
        emb = np.load("emb.npy")
        n = 5 if any("photos" in a for a in argv) else 12
        assert emb.shape == (n, inference.load(wd).embedding_dim), emb.shape
        # The CLI writes what the Python API computes.
        src = (np.load("images.npz")["images"] if n == 12 else
               np.stack([np.asarray(Image.open(f"photos/{i}.png")) for i in range(5)]))
        np.testing.assert_allclose(emb, inference.load(wd).embed(
            src.reshape(n, *shape)), rtol=1e-5, atol=1e-6)
        if n == 12:
            np.savez("queries.npz", embeddings=emb[:4])
    elif argv[0] == "search":
        result = np.load("nbrs.npz")
        k = int(argv[argv.index("-k") + 1])
        assert result["indices"].shape == (4, k)
        # The queries are gallery rows 0-3: each finds itself first.
        np.testing.assert_array_equal(result["indices"][:, 0], np.arange(4))
    else:  # export: the optional SavedModel as shown, then the default jax format
        out_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--output="))
        assert os.path.exists(os.path.join(out_dir, "contract.json"))
        if "--format=saved_model" in argv:
            assert os.path.exists(os.path.join(out_dir, "saved_model.pb"))
            out_dir += "_jax"
            argv = [f"--output={out_dir}" if a.startswith("--output=") else a
                    for a in argv if not a.startswith("--format=")]
            assert cli.run(argv) == 0, capsys.readouterr().err[-3000:]
        assert os.path.getsize(os.path.join(out_dir, "embedder.jax")) > 1000


TINY = ["--config.train.num_epochs=1", "--config.train.num_devices=1",
        "--config.train.eval_every_epochs=100", "--no_progress"]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    import shlex

    import tensorflow_datasets as tfds

    from hnm import cli

    commands = _hnm_commands()
    assert commands[0] == "hnm train --config=experiments/digits.py --workdir=runs/digits"
    assert any(c.startswith("hnm eval") for c in commands)
    assert any(c.startswith("hnm config") for c in commands)
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "experiments"), "experiments")
    rng = np.random.default_rng(0)  # mine.npz: 24 classes of noisy 8x8 prototypes
    protos = rng.integers(0, 256, size=(24, 1, 8, 8))
    images = np.clip(protos + rng.normal(0, 30, (24, 6, 8, 8)), 0, 255).astype(np.uint8)
    np.savez("mine.npz", images=images.reshape(-1, 8, 8), labels=np.repeat(np.arange(24), 6))
    ran = []
    for command in commands:
        # Absolute work directories (/tmp/smoke) move under this test's folder; optional
        # flags shown as [--flag=...] are used (except --backend=faiss without faiss).
        argv = [f"--workdir={os.path.basename(a.split('=', 1)[1])}"
                if a.startswith("--workdir=/") else a.strip("[]")
                for a in shlex.split(command)[1:]]
        argv = [a for a in argv if a != "--backend=faiss" or _has_faiss()]
        if argv[0] == "train":
            needs_download = "cub_sct.py" in command and ":smoke" not in command
            if needs_download:  # the full recipe downloads CUB and ImageNet weights: the
                # same arguments must resolve to the recipe's config
                code = cli.run(["config"] + [a.split("=", 1)[1] for a in argv[1:]
                                             if a.startswith("--config=")])
                assert code == 0, command
                ran.append((command, "resolved"))
                continue
            wd = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
            if "cub_sct.py:smoke" in command:
                with tfds.testing.mock_data(num_examples=64):
                    code = cli.run(argv + TINY)
            else:
                code = cli.run(argv + TINY)
            out = capsys.readouterr()
            assert code == 0, (command, out.err[-3000:])
            assert "| recall@1 |" in out.out, command
            with open(os.path.join(wd, "eval.json")) as f:
                results = json.load(f)
            # Above the untrained network (0.28 on the glyphs of the default config, 1 epoch
            # here), above chance elsewhere (glyphs ~70 classes, mine.npz 12, mock 1/64).
            floor = {"digits": 0.45, "glyphs": 0.3, "mine": 0.3}.get(
                os.path.basename(wd.rstrip("/")), 0.0)
            assert results["recall@1"] > floor, (command, results["recall@1"])
            assert results["step"] >= 1
            ran.append((command, results["recall@1"]))
        elif argv[0] == "eval":
            wd = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
            with open(os.path.join(wd, "eval.json")) as f:
                trained = json.load(f)
            code = cli.run(argv + ["--config.train.num_devices=1", "--no_progress"])
            out = capsys.readouterr()
            assert code == 0, (command, out.err[-3000:])
            with open(os.path.join(wd, "eval.json")) as f:
                evaluated = json.load(f)
            assert evaluated["step"] == trained["step"]
            assert abs(evaluated["recall@1"] - trained["recall@1"]) < 1e-6
            ran.append((command, evaluated["recall@1"]))
        elif argv[0] in ("embed", "search", "export"):
            _run_use_command(argv, capsys)
            ran.append((command, argv[0]))
        elif argv[0] == "config":
            code = cli.run(argv)
            out = capsys.readouterr()
            assert code == 0, (command, out.err)
            assert "objective.margin" in out.out  # the switched objective's options
            ran.append((command, "printed"))
        else:
            raise AssertionError(f"README command not covered by this test: {command}")
    assert len(ran) == len(commands)
