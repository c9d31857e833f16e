"""Tests for hnm.plots: each figure holds the data it claims, in a PNG of the right size."""
import importlib.util
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest

from hnm import plots

try:
    from hnm import losses
except ImportError:
    losses = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 0.25


def hinge(s_ap, s_an):
    return jax.nn.relu(s_an - s_ap + M)


def soft(s_ap, s_an):
    return jax.nn.softplus((s_an - s_ap) / 0.5)


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_gid() == plots.PANEL_GID]


def _png_shape(path):
    from matplotlib import image  # pylint: disable=import-outside-toplevel
    return image.imread(path).shape


class PlotsTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path

    def assert_png(self, fig, path, dpi):
        self.assertGreater(os.path.getsize(path), 1000)
        w, h = fig.get_size_inches()
        rows, cols = _png_shape(path)[:2]
        self.assertAlmostEqual(rows, h * dpi, delta=1)   # Agg truncates fractional pixels
        self.assertAlmostEqual(cols, w * dpi, delta=1)

    def test_gradient_fields_arrows_are_the_descent_direction(self):
        path = os.path.join(self.dir, "sub", "fields.png")
        band = lambda a, n: (n < a) & (n > a - M)
        fig = plots.plot_gradient_fields(
            {"hinge": hinge, "soft": soft,
             "semihard": plots.LossPanel(hinge, region=band),
             "sct-like": plots.LossPanel(hinge, hlines=((0.8, "threshold"),))},
            path, grid=5, dpi=40)
        self.assert_png(fig, path, dpi=40)
        panels = _panels(fig)
        self.assertLen(panels, 4)
        self.assertEqual([ax.get_title() for ax in panels],
                         ["hinge", "soft", "semihard", "sct-like"])
        s = np.linspace(-1, 1, 5)
        a, n = np.meshgrid(s, s)
        active = (n - a + M) > 0
        quiver = [c for c in panels[0].collections if hasattr(c, "U")]
        self.assertLen(quiver, 1)
        self.assertEqual(quiver[0].N, active.sum())
        # Hinge: -grad = (+1, -1), drawn normalised.
        np.testing.assert_allclose(quiver[0].U, 1 / math.sqrt(2), rtol=1e-6)
        np.testing.assert_allclose(quiver[0].V, -1 / math.sqrt(2), rtol=1e-6)
        # Semihard: coloured arrows only inside the band, the other active cells grey.
        q_grey, q_col = [c for c in panels[2].collections if hasattr(c, "U")]
        self.assertEqual(q_col.N, (active & band(a, n)).sum())
        self.assertEqual(q_grey.N, (active & ~band(a, n)).sum())
        labels = fig.legends[0].get_texts()
        self.assertIn("hard triplets: S_an > S_ap", [t.get_text() for t in labels])
        self.assertIn("threshold", [t.get_text() for t in labels])

    def test_distance_rates_show_the_pull(self):
        path = os.path.join(self.dir, "rates.png")
        fig = plots.plot_distance_rates({"hinge": hinge, "soft": soft}, path, grid=8, dpi=40)
        self.assert_png(fig, path, dpi=40)
        panels = _panels(fig)
        self.assertLen(panels, 2)
        rate = np.asarray(panels[0].collections[0].get_array()).reshape(8, 8)
        # Row = S_an (bottom to top), column = S_ap, cell centres -0.875, -0.625, ..., 0.875.
        # S_ap = -0.125, S_an = 0.875 (on paper): 1.875 * 0.5 - sin_p sin_n / 0.5 < 0.
        sin_p, sin_n = math.sqrt(1 - 0.125 ** 2), math.sqrt(1 - 0.875 ** 2)
        self.assertAlmostEqual(float(rate[-1, 3]), 0.9375 - sin_p * sin_n / 0.5, places=5)
        self.assertLess(rate[-1, 3], 0.0)
        self.assertGreater(rate[4, 2], 0.0)
        self.assertEqual(rate[0, -1], 0.0)   # easy triplet: hinge inactive

    def test_training_curves(self):
        rows = [{"step": s, "loss": 1.0 / (s + 1), "frac_hard": 0.5} for s in range(0, 50, 5)]
        for r in rows[::3]:
            r["recall@1"] = 0.1 * r["step"] / 5
        rows[4]["loss"] = float("nan")   # a non-finite value is skipped, not drawn
        jsonl = os.path.join(self.dir, "metrics.jsonl")
        with open(jsonl, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
        rows = plots.read_metrics_jsonl(jsonl)
        self.assertLen(rows, 10)
        path = os.path.join(self.dir, "curves.png")
        fig = plots.plot_training_curves(rows, path, keys=("loss", "recall@1", "absent"),
                                         dpi=40)
        self.assert_png(fig, path, dpi=40)
        panels = _panels(fig)
        self.assertEqual([ax.get_title() for ax in panels], ["loss", "recall@1", "absent"])
        x, y = panels[0].lines[0].get_data()
        self.assertLen(x, 9)
        x, y = panels[1].lines[0].get_data()
        np.testing.assert_array_equal(x, [0, 15, 30, 45])
        np.testing.assert_allclose(y, [0.0, 0.3, 0.6, 0.9])
        self.assertEmpty(panels[2].lines)
        self.assertIn("not logged", panels[2].texts[0].get_text())

    def test_phase_diagram_grid_and_collapsed_cells(self):
        table = [
            dict(embedding_dim=8, classes_per_batch=4, **{"r@1": 0.5}, collapsed=False),
            dict(embedding_dim=8, classes_per_batch=16, **{"r@1": 0.05}, collapsed=True),
            dict(embedding_dim=64, classes_per_batch=4, **{"r@1": 0.7}, collapsed=False),
            dict(embedding_dim=64, classes_per_batch=4, **{"r@1": 0.6}, collapsed=False),
            dict(embedding_dim=16, classes_per_batch=16, **{"r@1": 0.2}, collapsed=True),
            dict(embedding_dim=16, classes_per_batch=16, **{"r@1": 0.4}, collapsed=False),
        ]
        path = os.path.join(self.dir, "phase.png")
        fig = plots.plot_phase_diagram(table, path, dpi=40)
        self.assert_png(fig, path, dpi=40)
        panels = _panels(fig)
        self.assertLen(panels, 1)
        ax = panels[0]
        grid = ax.images[0].get_array()
        # Rows: classes_per_batch (4, 16); columns: embedding_dim (8, 16, 64); seeds averaged.
        np.testing.assert_allclose(grid.filled(np.nan),
                                   [[0.5, np.nan, 0.65], [0.05, 0.3, np.nan]])
        self.assertEqual([t.get_text() for t in ax.get_xticklabels()], ["8", "16", "64"])
        collapsed = [p for p in ax.patches if p.get_gid() == "collapsed"]
        self.assertEqual(sorted(p.get_xy() for p in collapsed), [(-0.5, 0.5), (0.5, 0.5)])
        texts = [t.get_text() for t in ax.texts]
        self.assertEqual(sum("not run" in t for t in texts), 2)
        self.assertIn("0.3\ncollapsed\nn=2", texts)

    def test_bad_input(self):
        path = os.path.join(self.dir, "x.png")
        with self.assertRaisesRegex(ValueError, "loss_fns"):
            plots.plot_gradient_fields({}, path)
        with self.assertRaisesRegex(TypeError, "loss_fns"):
            plots.plot_gradient_fields({"a": 3}, path)
        with self.assertRaisesRegex(ValueError, "grid"):
            plots.plot_gradient_fields({"a": hinge}, path, grid=2)
        with self.assertRaisesRegex(ValueError, "path"):
            plots.plot_gradient_fields({"a": hinge}, os.path.join(self.dir, "x.pdf"), grid=3)
        with self.assertRaisesRegex(ValueError, "metrics_rows"):
            plots.plot_training_curves([], path)
        with self.assertRaisesRegex(ValueError, "step_key"):
            plots.plot_training_curves([{"loss": 1.0}], path)
        with self.assertRaisesRegex(ValueError, "r@1"):
            plots.plot_phase_diagram([{"embedding_dim": 8, "classes_per_batch": 4}], path)
        self.assertFalse(os.path.exists(path))

    @pytest.mark.slow
    @absltest.skipIf(losses is None, "hnm.losses is not importable yet")
    def test_loss_fields_experiment_script(self):
        spec = importlib.util.spec_from_file_location(
            "loss_fields", os.path.join(REPO, "experiments", "loss_fields.py"))
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        written = script.main(["--out", self.dir, "--grid", "5", "--rate_grid", "6",
                               "--notebook_grid", "20"])
        self.assertEqual([os.path.basename(p) for p in written],
                         ["gradient_fields.png", "distance_rates.png",
                          "similarity_changes.png"])
        with open(os.path.join(self.dir, "similarity_changes.json")) as f:
            table = json.load(f)
        self.assertLen(table, 6 * 2 * 2)   # losses x learning rates x entanglements
        shares = {(r["loss"], r["learning_rate"], r["entanglement"]): r for r in table}
        # SCT's hard branch has no gradient through S_ap: without entanglement no hard cell
        # of the grid pulls its negative in; the coplanar hinge does pull some in.
        sct = [r for k, r in shares.items() if k[0].startswith("SCT") and k[2] == 0.0]
        self.assertTrue(all(r["projection 0"] == 0.0 and r["projection 1"] == 0.0
                            for r in sct))
        hinge = shares[("hinge, m = 0.2", 0.01, 0.0)]
        self.assertGreater(hinge["projection 1"], 0.0)
        self.assertEqual(hinge["projection 0"], 0.0)
        for p in written[:2]:
            self.assertGreater(os.path.getsize(p), 1000)
            self.assertEqual(_png_shape(p)[1], 1848)   # 4 panels x 4.62 in x 100 dpi
        titles = list(plots.standard_loss_panels())
        self.assertLen(titles, 4)
        self.assertEqual([t.split(":")[0] for t in titles],
                         ["ephn", "batch_hard", "semihard", "sct"])


if __name__ == "__main__":
    absltest.main()
