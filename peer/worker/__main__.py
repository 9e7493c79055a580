import sys

from peer.worker.process import main

sys.exit(main())
