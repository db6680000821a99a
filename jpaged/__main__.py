import sys

from jpaged.cli import main

sys.exit(main())
