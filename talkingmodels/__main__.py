import sys

from talkingmodels.cli import main

sys.exit(main())
