"""``python -m hooked_vit ...`` is ``hooked-vit ...`` (so ``torchrun -m hooked_vit impact ...`` works)."""

import sys

from hooked_vit.cli import main

sys.exit(main())
