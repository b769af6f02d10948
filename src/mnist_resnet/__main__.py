"""`python -m mnist_resnet` (also what torchrun launches)."""

import os
import sys

from mnist_resnet.cli import main
from mnist_resnet.distributed import env_from_os

code = main()
if env_from_os().enabled:
    # A torchrun worker leaves without the interpreter's teardown. Its results are written and
    # its process group destroyed by now, but tearing down torch's C++ state at exit aborted
    # now and then ("terminate called without an active exception", docs/distributed.md),
    # which made torchrun report a finished job as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
