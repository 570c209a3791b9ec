"""`python -m app`: the same as `flatlora-diffusion app`."""

import sys

from app import main

sys.exit(main(sys.argv[1:]))
