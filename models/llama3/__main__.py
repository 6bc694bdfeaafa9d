import sys

from models.generation.cli import main

sys.exit(main())
