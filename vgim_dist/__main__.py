import sys

from vgim_dist.cli import main

sys.exit(main())
