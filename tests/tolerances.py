"""Float32 tolerances derived from the computation a test compares (no JAX or kd_jax import)."""

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: one float32 ulp at 1.0.
BF16_EPS = 2.0**-7  # ~ 7.8e-3: one bfloat16 ulp at 1.0 (8 significand bits).


def f32_tol(n: int = 1, scale: float = 1.0, c: float = 8.0) -> float:
    """Tolerance for float32 work whose longest accumulation (sum, mean, dot) has `n` terms.

    The rounding error of an n-term float32 sum or dot product stays below
    lambda * sqrt(n) * u * sum|terms| with overwhelming probability (Higham & Mary, SIAM J. Sci.
    Comput. 2019; u = eps / 2); elementwise exp / log / divide add a few ulps each. `c` (in units
    of eps) covers both: c = 8 is lambda = 16. `scale` is sum|terms| relative to the quantity the
    tolerance is compared with: 1 for an rtol on a sum of like-signed terms, the condition number
    sum|terms| / |result| when terms cancel (KL divergences, differences), or the magnitude of
    the terms for an atol. f32_tol() ~ 1e-6, f32_tol(100) ~ 1e-5.
    """
    return float(c * F32_EPS * np.sqrt(n) * scale)
