"""`python -m kd_jax.export`: see `kd_jax.export.cli`."""

import sys

from kd_jax.export.cli import main

sys.exit(main())
