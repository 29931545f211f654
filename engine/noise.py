"""Initial noise from a generator we define, not a framework's.

Definition (docs/bitstream.md, "Initial noise"): PCG64 seeded with `seed` (numpy's
`PCG64(seed)` seeding, which is fixed by NumPy's seed-sequence specification) produces raw
64-bit outputs u_0, u_1, ... Each pair gives two uniforms in (0, 1]:
U = ((u >> 11) + 1) * 2^-53, and Box-Muller in float64 gives
z0 = sqrt(-2 ln U1) cos(2 pi U2), z1 = sqrt(-2 ln U1) sin(2 pi U2), rounded to float32,
filled in C order.
"""

import numpy as np


def gaussian_noise(seed: int, shape: tuple) -> np.ndarray:
    """Standard normal float32 array of `shape`, determined by `seed` alone.

    >>> a = gaussian_noise(7, (2, 3)); b = gaussian_noise(7, (2, 3))
    >>> bool((a == b).all()), a.dtype.name
    (True, 'float32')
    """
    count = int(np.prod(shape))
    pairs = (count + 1) // 2
    raw = np.random.PCG64(seed).random_raw(2 * pairs).astype(np.uint64)
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
    angle = 2.0 * np.pi * uniform[1::2]
    z = np.empty(2 * pairs, dtype=np.float64)
    z[0::2] = radius * np.cos(angle)
    z[1::2] = radius * np.sin(angle)
    return z[:count].astype(np.float32).reshape(shape)
