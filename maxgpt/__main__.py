import sys

from maxgpt.cli import main

sys.exit(main())
