import sys
from llamagen.cli import main

sys.exit(main())
