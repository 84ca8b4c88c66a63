#!/usr/bin/env python
"""Train only GLM-Image's DiT decoder (model.component=dit). Same flags as train.py."""
import sys

from glm_training.cli import main

if __name__ == "__main__":
    sys.exit(main(component="dit"))
