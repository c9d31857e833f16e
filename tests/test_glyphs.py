"""Tests of hnm.data.glyphs: the font-rendered many-class set (class list, split, cache, images).

One small generation (instances_per_font=1, about 2.7k images) is made per test class into a
temporary directory and shared; a second one into another directory checks determinism.
"""
import collections
import os
import tempfile
from unittest import mock

import numpy as np
import pytest
from absl.testing import absltest, parameterized

from hnm.data import glyphs

IPF = 1  # instances per font in the test generation: small and fast

# Homoglyph groups written by hand from Unicode's confusables (Latin, Greek, Cyrillic), first
# member first: exactly the first must survive as a class.
HOMOGLYPH_GROUPS = (
    "AΑА", "BΒВ", "CС", "EΕЕ", "HΗН", "IΙ", "KΚ", "MΜМ", "NΝ", "OΟО", "PΡР", "TΤТ", "XΧХ",
    "YΥ", "ZΖ", "ΓГ", "ΠП", "aа", "cс", "eе", "oοо", "pр", "xх", "yу",
)
# Similar but distinct characters: both must stay classes.
DISTINCT_PAIRS = ("ШЩ", "ИЙ", "EЁ", "3З", "O0", "lI", "nп", "κк", "KК", "pρ")


def _l1_ratio(a, b):
    """Normalised L1 distance of two clean renderings, written out from its definition."""
    num = 0.0
    den = 0.0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
        num += abs(x - y)
        den += x + y
    return num / den


class GlyphClassesTest(parameterized.TestCase):
    """The static class list, the split and the look-alike table (rendering, no distortion)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.clean = glyphs.render_clean()

    def test_class_list_as_documented(self):
        names = glyphs.class_names()
        self.assertLen(glyphs.CANDIDATES, 52 + 10 + 24 + 25 + 33 + 33)
        self.assertLen(set(glyphs.CANDIDATES), len(glyphs.CANDIDATES))
        self.assertEqual(glyphs.NUM_CLASSES, 143)
        self.assertLen(names, 143)
        self.assertLen(set(names), 143)
        self.assertEqual(names, [c for c in glyphs.CANDIDATES if c not in glyphs.LOOKALIKES])
        for dropped, kept in glyphs.LOOKALIKES.items():
            with self.subTest(dropped=dropped):
                self.assertIn(kept, names)
                self.assertLess(glyphs.CANDIDATES.index(kept),
                                glyphs.CANDIDATES.index(dropped))

    def test_split_is_class_disjoint_and_covering(self):
        train, test = set(glyphs.TRAIN_CLASSES), set(glyphs.TEST_CLASSES)
        self.assertEmpty(train & test)
        self.assertEqual(train | test, set(range(glyphs.NUM_CLASSES)))
        self.assertLen(train, 72)
        self.assertLen(test, 71)
        self.assertEqual(glyphs.split_classes("train"), glyphs.TRAIN_CLASSES)
        self.assertEqual(glyphs.split_classes("all"), tuple(range(glyphs.NUM_CLASSES)))
        # Every script is spread over both splits.
        for script, chars in glyphs.SCRIPTS.items():
            ids = {glyphs.CLASS_NAMES.index(c) for c in chars if c in glyphs.CLASS_NAMES}
            with self.subTest(script=script):
                self.assertNotEmpty(ids & train)
                self.assertNotEmpty(ids & test)

    @parameterized.parameters(*HOMOGLYPH_GROUPS)
    def test_homoglyph_group_keeps_only_its_first(self, group):
        present = [c for c in group if c in glyphs.CLASS_NAMES]
        self.assertEqual(present, [group[0]])

    @parameterized.parameters(*DISTINCT_PAIRS)
    def test_distinct_lookalikes_stay(self, pair):
        for c in pair:
            self.assertIn(c, glyphs.CLASS_NAMES)

    def test_lookalike_rule_reproduces_frozen_table(self):
        self.assertEqual(glyphs.find_lookalikes(clean=self.clean), glyphs.LOOKALIKES)

    def test_lookalike_margin_by_direct_loop(self):
        # Independent of find_lookalikes: a group's members render alike in most fonts, and a
        # few distinct pairs are well above the tolerance.
        fonts = sorted({f for f, _ in self.clean})

        def median_dist(a, b):
            d = [_l1_ratio(self.clean[f, a], self.clean[f, b]) for f in fonts
                 if (f, a) in self.clean and (f, b) in self.clean]
            self.assertGreaterEqual(len(d), glyphs.MIN_FONTS)
            return float(np.median(d))

        for dropped, kept in (("А", "A"), ("Г", "Γ"), ("у", "y"), ("Υ", "Y")):
            with self.subTest(dropped=dropped):
                self.assertLess(median_dist(dropped, kept), glyphs.LOOKALIKE_TOL)
        for a, b in ("ШЩ", "3З", "KК", "OQ"):
            with self.subTest(pair=a + b):
                self.assertGreater(median_dist(a, b), 1.5 * glyphs.LOOKALIKE_TOL)

    def test_every_class_renders_in_enough_fonts(self):
        fonts_per_char = collections.Counter(c for _, c in self.clean)
        for c in glyphs.CLASS_NAMES:
            with self.subTest(char=c):
                self.assertGreaterEqual(fonts_per_char[c], glyphs.MIN_FONTS)
        self.assertEqual(sum(fonts_per_char[c] for c in glyphs.CLASS_NAMES), 2744)
        self.assertNotIn("LastResortHE-Regular.ttf", glyphs.font_names())
        self.assertLen(glyphs.font_names(), 22)

    def test_baseline_and_cap_height(self):
        # Closed form: 'H' spans [BASELINE - CAP, BASELINE]; 'p' descends below the baseline,
        # 'o' does not; 'O' is taller than 'o'. Pixel centres sit at integer rows.
        def ink_rows(img):
            rows = np.nonzero((img > 0.25).any(axis=1))[0]
            return rows[0], rows[-1]

        base, cap = glyphs.BASELINE_ROW, glyphs.CAP_HEIGHT_PX
        for font in glyphs.font_names():
            with self.subTest(font=font):
                top, bottom = ink_rows(self.clean[font, "H"])
                self.assertBetween(top, base - cap - 0.5, base - cap + 1.5)
                self.assertBetween(bottom, base - 1.5, base + 0.5)
                self.assertGreater(ink_rows(self.clean[font, "p"])[1], base + 1.5)
                self.assertLess(ink_rows(self.clean[font, "o"])[1], base + 1.0)
                self.assertLess(ink_rows(self.clean[font, "O"])[0],
                                ink_rows(self.clean[font, "o"])[0] - 2)

    def test_fonts_render_differently(self):
        for c in "Aa5ΣжΩ":
            with self.subTest(char=c):
                views = [v for (f, ch), v in self.clean.items() if ch == c]
                self.assertGreaterEqual(len(views), glyphs.MIN_FONTS)
                dists = [_l1_ratio(views[0], v) for v in views[1:]]
                self.assertGreater(np.median(dists), 0.1)

    def test_cm_greek_codes_match_matplotlib_mathtext(self):
        try:
            from matplotlib._mathtext_data import latex_to_bakoma  # private: may move
        except ImportError:
            self.skipTest("matplotlib._mathtext_data.latex_to_bakoma is gone")
        tex = dict(zip("ΓΔΘΛΞΠΣΥΦΨΩαβγδεζηθικλμνξπρσςτυφχψω", (
            "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega alpha beta gamma delta "
            "varepsilon zeta eta theta iota kappa lambda mu nu xi pi rho sigma varsigma tau "
            "upsilon varphi chi psi omega").split()))
        for char, code in glyphs.CM_GREEK_CODES["cmmi10.ttf"].items():
            with self.subTest(char=char):
                font, expected = latex_to_bakoma["\\" + tex[char]]
                self.assertEqual(code, expected)
                self.assertEqual(font, "cmr10" if char.isupper() else "cmmi10")


class GlyphDataTest(parameterized.TestCase):
    """One generated set (instances_per_font=1) shared by the tests of this class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.cache_dir = os.path.join(cls._tmp.name, "a")
        cls.images, cls.labels = glyphs.load_glyphs("all", cls.cache_dir,
                                                    instances_per_font=IPF)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def test_shapes_and_dtypes(self):
        self.assertEqual(self.images.shape, (2744 * IPF, 32, 32, 1))
        self.assertEqual(self.images.dtype, np.uint8)
        self.assertEqual(self.labels.shape, (2744 * IPF,))
        self.assertEqual(self.labels.dtype, np.int32)

    @parameterized.parameters("train", "test")
    def test_split_labels(self, split):
        images, labels = glyphs.load_glyphs(split, self.cache_dir, instances_per_font=IPF)
        self.assertEqual(images.shape[1:], (32, 32, 1))
        self.assertLen(labels, len(images))
        self.assertEqual(set(labels.tolist()), set(glyphs.split_classes(split)))
        keep = np.isin(self.labels, glyphs.split_classes(split))
        np.testing.assert_array_equal(images, self.images[keep])

    def test_train_and_test_partition_all(self):
        n_train = len(glyphs.load_glyphs("train", self.cache_dir, instances_per_font=IPF)[1])
        n_test = len(glyphs.load_glyphs("test", self.cache_dir, instances_per_font=IPF)[1])
        self.assertEqual(n_train + n_test, len(self.labels))

    def test_instances_per_class(self):
        counts = collections.Counter(self.labels.tolist())
        fonts_per_char = collections.Counter(c for _, c in glyphs.render_clean("Aж5"))
        self.assertEqual(set(counts), set(range(glyphs.NUM_CLASSES)))
        self.assertGreaterEqual(min(counts.values()), glyphs.MIN_FONTS * IPF)
        for c in "Aж5":
            self.assertEqual(counts[glyphs.CLASS_NAMES.index(c)], fonts_per_char[c] * IPF)

    def test_rows_are_shuffled(self):
        # A capped loader takes a prefix: it must see many classes, not the first few.
        self.assertFalse(np.all(np.diff(self.labels) >= 0))
        self.assertGreater(len(set(self.labels[:300].tolist())), 100)

    def test_images_have_ink_and_are_centred(self):
        img = self.images[..., 0].astype(np.float64)
        ink = (img > 128).mean(axis=(1, 2))
        self.assertGreater(ink.min(), 0.004)  # never blank
        self.assertLess(ink.max(), 0.35)      # never a filled square
        self.assertBetween(float(np.median(ink)), 0.03, 0.12)
        border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
        self.assertLess(((border > 128).any(axis=1)).mean(), 0.01)  # glyphs are not cut off
        grid = np.arange(32.0)
        mass = img.sum(axis=(1, 2))
        col_centre = (img.sum(axis=1) * grid).sum(axis=1) / mass
        row_centre = (img.sum(axis=2) * grid).sum(axis=1) / mass
        self.assertBetween(float(np.median(col_centre)), 14.5, 16.5)
        self.assertBetween(float(np.median(row_centre)), 13.0, 19.0)
        self.assertLess(np.abs(col_centre - 15.5).max(), 6.0)

    def test_images_are_distinct(self):
        # Every (class, font, instance) differs from every other.
        unique = {im.tobytes() for im in self.images}
        self.assertLen(unique, len(self.images))

    @pytest.mark.slow  # a second full generation: about 6 s
    def test_second_generation_is_byte_identical(self):
        other = os.path.join(self._tmp.name, "b")
        images, labels = glyphs.load_glyphs("all", other, instances_per_font=IPF)
        np.testing.assert_array_equal(images, self.images)
        np.testing.assert_array_equal(labels, self.labels)
        self.assertTrue(os.path.exists(glyphs.cache_path(other, instances_per_font=IPF)))

    def test_cache_is_used(self):
        with mock.patch.object(glyphs, "_generate", side_effect=AssertionError("rendered")):
            images, labels = glyphs.load_glyphs("all", self.cache_dir, instances_per_font=IPF)
            np.testing.assert_array_equal(images, self.images)
            np.testing.assert_array_equal(labels, self.labels)
            with self.assertRaisesRegex(AssertionError, "rendered"):  # the patch is live
                glyphs.load_glyphs("all", os.path.join(self._tmp.name, "empty"),
                                   instances_per_font=IPF)

    def test_cache_path_hashes_parameters(self):
        path = glyphs.cache_path(self.cache_dir, instances_per_font=IPF, seed=0)
        self.assertEqual(os.path.dirname(path), self.cache_dir)
        self.assertRegex(os.path.basename(path), r"^glyphs-[0-9a-f]{16}\.npz$")
        self.assertTrue(os.path.exists(path))
        others = {glyphs.cache_path(self.cache_dir, instances_per_font=IPF, seed=1),
                  glyphs.cache_path(self.cache_dir, instances_per_font=IPF + 1, seed=0)}
        self.assertNotIn(path, others)
        self.assertLen(others, 2)
        default = glyphs.cache_path()
        self.assertEqual(os.path.dirname(default),
                         os.path.join(os.path.expanduser("~"), ".cache", "hnm"))

    def test_seed_changes_distortions(self):
        source = glyphs._sources(("R",))["DejaVuSans.ttf", "R"]
        a = glyphs._instances(source, 3, glyphs._source_rng(0, "R", "DejaVuSans.ttf"))
        b = glyphs._instances(source, 3, glyphs._source_rng(0, "R", "DejaVuSans.ttf"))
        c = glyphs._instances(source, 3, glyphs._source_rng(1, "R", "DejaVuSans.ttf"))
        np.testing.assert_array_equal(a, b)
        self.assertFalse(np.array_equal(a, c))

    def test_raw_pixel_floor_matches_slow_loop(self):
        images, labels = glyphs.load_glyphs("test", self.cache_dir, instances_per_font=IPF)
        r1 = glyphs.raw_pixel_recall_at_1("test", self.cache_dir, instances_per_font=IPF)
        x = images.reshape(len(images), -1).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims = x @ x.T  # the whole matrix at once (the library works in blocks)
        np.fill_diagonal(sims, -2.0)
        expected = np.mean(labels[np.argmax(sims, axis=1)] == labels)
        self.assertAlmostEqual(r1, expected, places=12)
        # The point of the set: raw pixels must not solve it, yet it is far above chance.
        self.assertBetween(r1, 0.3, 0.9)

    def test_plot_samples_shows_a_class_by_font_grid(self):
        from PIL import Image
        path = os.path.join(self._tmp.name, "sheet.png")
        out = glyphs.plot_samples(path, self.cache_dir, classes=(0, 70, 142), max_fonts=4,
                                  instances_per_font=IPF)
        self.assertEqual(out, path)
        pixels = np.asarray(Image.open(path).convert("L")).astype(int)
        # Every cell is a glyph image: a black square (white ink on black) on the white page.
        # Rows and columns of the page that are mostly black come in 3 runs (the classes)
        # and 4 runs (the fonts).
        dark = pixels < 30

        def runs(mask):
            return int(np.sum(np.diff(np.r_[0, mask.astype(int)]) == 1))
        self.assertEqual(runs(dark.mean(axis=1) > 0.3), 3)
        self.assertEqual(runs(dark.mean(axis=0) > 0.3), 4)
        # The cells hold ink, not only background.
        cells = pixels[dark.mean(axis=1) > 0.3][:, dark.mean(axis=0) > 0.3]
        self.assertGreater((cells > 128).mean(), 0.05)


class RecallAndArgsTest(parameterized.TestCase):

    def test_recall_at_1_hand_case(self):
        # Query 0's nearest is 1 (same class), 1's is 0, 2's nearest is 1 (other class).
        feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
        self.assertAlmostEqual(glyphs.recall_at_1(feats, np.array([0, 0, 1, 1])), 0.75)

    def test_recall_at_1_blocks_agree(self):
        rng = np.random.default_rng(0)
        feats = rng.normal(size=(50, 8))
        labels = rng.integers(0, 5, size=50)
        expected = np.mean([labels[np.argmax(np.where(np.arange(50) == i, -np.inf,
                                                      feats @ feats[i] / np.linalg.norm(feats,
                                                                                         axis=1)))]
                            == labels[i] for i in range(50)])
        for block in (7, 50, 1000):
            with self.subTest(block=block):
                self.assertAlmostEqual(glyphs.recall_at_1(feats, labels, block=block), expected)

    @parameterized.named_parameters(
        ("split", dict(split="val"), "`split`"),
        ("ipf_zero", dict(instances_per_font=0), "`instances_per_font`"),
        ("ipf_float", dict(instances_per_font=2.0), "`instances_per_font`"),
        ("seed", dict(seed=-1), "`seed`"),
    )
    def test_bad_arguments(self, kwargs, name):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(ValueError, name):
                glyphs.load_glyphs(cache_dir=tmp, **kwargs)
            self.assertEmpty(os.listdir(tmp))  # rejected before any rendering

    def test_recall_at_1_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "`labels`"):
            glyphs.recall_at_1(np.zeros((3, 2)), np.zeros(4))
        with self.assertRaisesRegex(ValueError, "`features`"):
            glyphs.recall_at_1(np.zeros(3), np.zeros(3))


if __name__ == "__main__":
    absltest.main()
