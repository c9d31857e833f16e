"""Distances, similarities, masks and the cross-device reference set vs NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

from hnm import distances


def _np_cosine(x, y):
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            nx, ny = np.linalg.norm(x[i]), np.linalg.norm(y[j])
            out[i, j] = x[i] @ y[j] / (max(nx, 1e-12) * max(ny, 1e-12))
    return out


def _np_euclid(x, y):
    return np.array([[np.linalg.norm(a - b) for b in y] for a in x])


class DistancesTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(7, 5)).astype(np.float32)
        self.y = rng.normal(size=(4, 5)).astype(np.float32)

    def test_cosine_matches_loop(self):
        np.testing.assert_allclose(distances.cosine_similarity(self.x, self.y),
                                   _np_cosine(self.x, self.y), atol=1e-5)
        np.testing.assert_allclose(distances.cosine_similarity(self.x),
                                   _np_cosine(self.x, self.x), atol=1e-5)

    def test_euclidean_matches_loop(self):
        np.testing.assert_allclose(distances.euclidean_distance(self.x, self.y),
                                   _np_euclid(self.x, self.y), atol=1e-4)
        np.testing.assert_allclose(distances.euclidean_distance(self.x, self.y, squared=True),
                                   _np_euclid(self.x, self.y) ** 2, atol=1e-4)
        np.testing.assert_allclose(distances.negative_euclidean(self.x, self.y),
                                   -_np_euclid(self.x, self.y), atol=1e-4)

    def test_dot_and_hand_case(self):
        np.testing.assert_allclose(distances.dot_similarity(self.x, self.y), self.x @ self.y.T,
                                   rtol=1e-5, atol=1e-5)
        # Points at known angles: 0, 90 and 180 degrees.
        p = jnp.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
        np.testing.assert_allclose(distances.cosine_similarity(p),
                                   [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-6)

    def test_l2_normalize_zero_row_is_finite(self):
        x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
        np.testing.assert_allclose(distances.l2_normalize(x), [[0.6, 0.8], [0, 0]], atol=1e-7)
        g = jax.grad(lambda x: jnp.sum(distances.l2_normalize(x) ** 2 * jnp.arange(2.0)))(x)
        self.assertTrue(np.isfinite(np.asarray(g)).all())

    def test_l2_normalize_extreme_magnitudes(self):
        """Scaled before squaring: exact unit vectors and closed-form gradients at 1e+-20."""
        u = np.array([3.0, 4.0, -12.0]) / 13.0
        w = np.array([1.0, -2.0, 0.5])                   # upstream cotangent

        def value_and_grad(x, **kw):
            f = lambda x: jnp.sum(distances.l2_normalize(x, **kw) * w)  # noqa: E731
            return distances.l2_normalize(x, **kw), jax.grad(f)(x)

        for scale, kw in ((1e20, {}), (1e30, {}), (1.0, {}), (1e-20, dict(eps=1e-30)),
                          (1e-30, dict(eps=1e-36))):
            with self.subTest(scale=scale):
                x = jnp.asarray([u * 13.0 * scale], jnp.float32)
                y, g = value_and_grad(x, **kw)
                np.testing.assert_allclose(y, [u], rtol=1e-6)
                # d(x/|x|)^T w = (I - u u^T) w / |x|, in float64.
                want = (w - u * (u @ w)) / (13.0 * scale)
                self.assertTrue(np.isfinite(np.asarray(g)).all())
                np.testing.assert_allclose(np.asarray(g, np.float64)[0], want, rtol=1e-4,
                                           atol=1e-6 * np.abs(want).max())
        # Below eps the official formula x / eps holds (SCIENCE.md: x / max(|x|, 1e-12)).
        x = jnp.asarray([u * 13.0 * 1e-20], jnp.float32)
        y, g = value_and_grad(x)
        np.testing.assert_allclose(y, [u * 13.0 * 1e-8], rtol=1e-6)
        np.testing.assert_allclose(g, [w * 1e12], rtol=1e-6)
        # Half precision: 300 would overflow float16 when squared (max 65504).
        for dtype in (jnp.float16, jnp.bfloat16):
            h = distances.l2_normalize(jnp.asarray([[300.0, 400.0], [3e-4, 4e-4]], dtype))
            np.testing.assert_allclose(np.asarray(h, np.float32), [[0.6, 0.8]] * 2, atol=5e-3)

    def test_l2_normalize_non_finite_stays_non_finite(self):
        x = jnp.array([[np.nan, 1.0], [np.inf, 1.0], [-np.inf, 0.0], [1.0, 1.0]])
        y = np.asarray(distances.l2_normalize(x))
        self.assertTrue(np.isnan(y[:3]).all())
        np.testing.assert_allclose(y[3], [2 ** -0.5] * 2, rtol=1e-6)

    def test_finite_gradients_for_duplicates_and_zeros(self):
        x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
        for fn in (distances.euclidean_distance, distances.cosine_similarity,
                   distances.negative_euclidean):
            g = jax.grad(lambda x: jnp.sum(fn(x)))(x)
            self.assertTrue(np.isfinite(np.asarray(g)).all(), fn.__name__)

    def test_check_grads(self):
        x = jnp.asarray(self.x[:4])
        check_grads(lambda x: distances.cosine_similarity(x, self.y), (x,), order=1,
                    atol=1e-2, rtol=1e-2)
        check_grads(lambda x: distances.euclidean_distance(x, self.y), (x,), order=1,
                    atol=1e-2, rtol=1e-2)

    def test_label_masks_with_offset(self):
        labels = np.array([0, 1, 0])
        ref = np.array([1, 0, 1, 0, 0, 1])
        pos, neg = distances.label_masks(labels, ref, query_offset=3)
        for i in range(3):
            for j in range(6):
                self.assertEqual(bool(pos[i, j]), labels[i] == ref[j] and j != i + 3)
                self.assertEqual(bool(neg[i, j]), labels[i] != ref[j])

    def test_bad_input_names_argument(self):
        with self.assertRaisesRegex(ValueError, "`x`"):
            distances.cosine_similarity(jnp.ones(3))
        with self.assertRaisesRegex(TypeError, "`x`.*floating"):
            distances.euclidean_distance(jnp.ones((3, 2), jnp.int32))
        with self.assertRaisesRegex(ValueError, "feature dimension"):
            distances.dot_similarity(jnp.ones((3, 2)), jnp.ones((3, 4)))
        with self.assertRaisesRegex(TypeError, "`labels`"):
            distances.label_masks(jnp.ones(3, jnp.float32))
        with self.assertRaisesRegex(ValueError, "unknown `distance`"):
            distances.get_similarity("manhattan")

    def test_reference_set_all_gather(self):
        n_dev = 4
        emb = np.arange(n_dev * 3 * 2, dtype=np.float32).reshape(n_dev, 3, 2)
        lab = np.arange(n_dev * 3, dtype=np.int32).reshape(n_dev, 3)

        def f(e, l):
            r = distances.reference_set(e, l, "i")
            return r.embeddings, r.labels, r.query_offset

        e, l, off = jax.pmap(f, axis_name="i", devices=jax.devices()[:n_dev])(emb, lab)
        for d in range(n_dev):
            np.testing.assert_array_equal(e[d], emb.reshape(-1, 2))
            np.testing.assert_array_equal(l[d], lab.reshape(-1))
            self.assertEqual(int(off[d]), 3 * d)

    def test_global_mean_of(self):
        self.assertEqual(float(distances.global_mean_of(3.0, 0)), 3.0)  # no count -> /1, no NaN
        self.assertAlmostEqual(float(distances.global_mean_of(3.0, 4)), 0.75)
        shares = jax.pmap(lambda t, c: distances.global_mean_of(t, c, "i"), axis_name="i",
                          devices=jax.devices()[:2])(jnp.array([1.0, 5.0]), jnp.array([1, 3]))
        self.assertAlmostEqual(float(jnp.sum(shares)), 6.0 / 4.0, places=6)


if __name__ == "__main__":
    absltest.main()
