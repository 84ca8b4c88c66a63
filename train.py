#!/usr/bin/env python
"""Train any family with any method from a YAML config. See README.md."""
import sys

from glm_training.cli import main

if __name__ == "__main__":
    sys.exit(main())
