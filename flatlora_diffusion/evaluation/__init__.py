"""Scores of trained runs (`flatlora-diffusion evaluate`): what Flat-LoRA changes, measured.

    sharpness.py   the loss increase under Flat-LoRA's filter-wise noise, for any model and loss closure
    evalset.py     the fixed (image, timestep, noise) triples and the denoising loss on them
    heldout.py     instance vs held-out images, the generalization gap, held-out subject renders for toy-world runs
    toyscores.py   the toy-world judge's scores: subject / scene / class collapse / colour shift / diversity
    images.py      image scores: the plug-in interface, CLIP-T / CLIP-I / DINO
    runs.py        run folders: checked without loading, base model + LoRA loaded
    report.py      eval.json, paired comparison of runs, the printed table
    evaluate.py    the whole evaluation of one or more runs
    cli.py         the command line
"""

from .sharpness import PlainLayer, lora_layers, perturbed, plain_layers, sharpness_curve

__all__ = ["PlainLayer", "lora_layers", "perturbed", "plain_layers", "sharpness_curve"]
