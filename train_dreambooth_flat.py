#!/usr/bin/env python
"""Drop-in for diffusers' train_dreambooth_lora.py / train_dreambooth_lora_sdxl.py, with Flat-LoRA.

Same flags (the architecture is detected from the model), plus --flat_sigma, --flat_schedule, ... and
--config FILE. Equivalent to `flatlora-diffusion train ...`; works with `accelerate launch` too.
"""

import sys

from flatlora_diffusion.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
