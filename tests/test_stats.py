"""The Student-t table behind every interval in the reports, checked by integrating the pdf."""

import math

import pytest

from rnndrop.analysis import mean_ci, t_quantile


def t_cdf(x: float, df: int, n: int = 20000) -> float:
    """P(T <= x) for x > 0: 1/2 plus Simpson's rule on the pdf over [0, x]."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(t: float) -> float:
        return c * (1 + t * t / df) ** (-(df + 1) / 2)

    h = x / n
    s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13, 21, 30])
def test_table_is_the_975_quantile(df):
    assert t_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=2e-5)


def test_large_df_is_the_normal_quantile_and_mean_ci_uses_it():
    assert t_quantile(1000) == 1.960 and math.isnan(t_quantile(0))
    xs = [1.0, 2.0, 4.0]
    sd = math.sqrt(sum((x - 7 / 3) ** 2 for x in xs) / 2)
    assert mean_ci(xs) == pytest.approx((7 / 3, t_quantile(2) * sd / math.sqrt(3)))
