"""Tests of hnm.data.preprocess: shorter-side resize, crops, flips, the SCT recipe."""
import numpy as np
from absl.testing import absltest, parameterized

from hnm import data


class PreprocessTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.image = np.arange(300 * 400 * 3, dtype=np.int64).reshape(300, 400, 3) % 251
        self.image = self.image.astype(np.uint8)

    def test_resize_shorter_side(self):
        self.assertEqual(data.resize_shorter(self.image, 281).shape, (281, 374, 3))
        self.assertEqual(data.resize_shorter(self.image.transpose(1, 0, 2), 256).shape,
                         (341, 256, 3))
        self.assertIs(data.resize_shorter(self.image, 300), self.image)
        gray = self.image[..., :1]
        self.assertEqual(data.resize_shorter(gray, 30).shape, (30, 40, 1))

    def test_crop_and_flip_positions(self):
        img = self.image
        np.testing.assert_array_equal(data.crop_and_flip(img, (5, 7), np.array([0, 0, 0.9])),
                                      img[:5, :7])
        np.testing.assert_array_equal(
            data.crop_and_flip(img, (5, 7), np.array([0.9999, 0.9999, 0.1])),
            img[-5:, -7:][:, ::-1])
        np.testing.assert_array_equal(data.center_crop(img[:6, :8], (2, 4)), img[2:4, 2:6])

    def test_recipe_shapes_and_deterministic_eval(self):
        prep = data.Preprocess(256, 281, 256, augment=True)
        rng = np.random.default_rng(0)
        outs = [prep.train(self.image, rng.random(3)) for _ in range(6)]
        for out in outs:
            self.assertEqual(out.shape, (256, 256, 3))
        self.assertGreater(len({o.tobytes() for o in outs}), 1)
        ev1, ev2 = prep.eval(self.image), prep.eval(self.image.copy())
        self.assertEqual(ev1.shape, (256, 256, 3))
        np.testing.assert_array_equal(ev1, ev2)
        # Eval = resize the shorter side to 256 (-> 256 x 341), then the central 256 columns.
        np.testing.assert_array_equal(ev1, data.resize_shorter(self.image, 256)[:, 42:298])
        # augment=False: training pre-processing is the evaluation one.
        plain = data.Preprocess(256, 281, 256, augment=False)
        np.testing.assert_array_equal(plain.train(self.image, np.array([0.3, 0.7, 0.1])), ev1)


if __name__ == "__main__":
    absltest.main()
