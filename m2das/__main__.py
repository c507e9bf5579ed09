import sys

from m2das.cli import main

sys.exit(main())
