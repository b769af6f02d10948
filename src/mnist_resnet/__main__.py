"""`python -m mnist_resnet` (also what torchrun launches)."""

import sys

from mnist_resnet.cli import main

sys.exit(main())
