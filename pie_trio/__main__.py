import sys

from pie_trio.cli import main

sys.exit(main())
