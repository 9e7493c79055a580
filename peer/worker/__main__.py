"""`python -m shoal.peer.worker`: the training worker (peer/worker/process.py).

Once main() has saved its checkpoint, closed its shared memory and told the daemon, the worker ends with
os._exit: the interpreter's teardown of torch alone takes 1-2 s on a 2-core VM, which a stopping peer
would otherwise wait for (docs/benchmarks.md, "Stopping and restarting")."""

import logging
import os
import sys

from shoal.peer.worker.process import main

code = main()
logging.shutdown()  # what the skipped teardown would have flushed
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
