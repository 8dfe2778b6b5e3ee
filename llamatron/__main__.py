import sys

from llamatron.cli import main

sys.exit(main())
