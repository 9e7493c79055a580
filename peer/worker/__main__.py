import sys

from shoal.peer.worker.process import main

sys.exit(main())
