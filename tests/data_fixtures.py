"""Small on-disk data sets shared by the tests of hnm.data (not collected by pytest)."""
import os
import tempfile

import numpy as np
from PIL import Image


def tmpdir(case):
    """A temporary directory removed after the test (absltest's create_tempdir needs parsed
    absl flags, which pytest does not give)."""
    tmp = tempfile.TemporaryDirectory()
    case.addCleanup(tmp.cleanup)
    return tmp.name


def write_npz(case, n_classes=6, per_class=5, hw=(6, 5)):
    """An npz whose every image is filled with its label (so rows can be checked)."""
    labels = np.repeat(np.arange(n_classes) * 3 + 1, per_class)
    images = np.broadcast_to(labels[:, None, None], (len(labels), *hw)).astype(np.uint8)
    path = os.path.join(tmpdir(case), "toy.npz")
    np.savez(path, images=images, labels=labels)
    return path, labels


COLOURS = {"ant": (200, 10, 10), "bee": (10, 200, 10), "cat": (10, 10, 200),
           "dog": (90, 90, 90)}


def write_folder(case):
    """4 classes x 3 solid-colour RGB images of different (non-square) sizes, and a .txt."""
    root = tmpdir(case)
    for k, (name, colour) in enumerate(COLOURS.items()):
        os.makedirs(os.path.join(root, name))
        for j in range(3):
            h, w = 20 + 3 * j, 26 - 2 * k
            Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(
                os.path.join(root, name, f"{j}.png"))
    with open(os.path.join(root, "ant", "notes.txt"), "w") as f:
        f.write("not an image")
    return root, COLOURS
