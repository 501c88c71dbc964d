import sys

from awqnb.cli import main

sys.exit(main())
