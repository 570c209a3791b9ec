"""`python -m flatlora_diffusion.export ...`: the same command as `flatlora-diffusion export ...`."""

from .command import main

raise SystemExit(main())
