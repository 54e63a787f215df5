"""The ``tandem`` command line.

gRPC's C core logs at INFO unless ``GRPC_VERBOSITY`` says otherwise (a failed TLS handshake
prints its own line above the error and hint a person should read first), and only the
process's first ``import grpc`` reads the variable. Every ``tandem`` command imports this
package before grpc, so it sets the variable here to ERROR, gRPC's documented default, unless
the operator chose a level (``GRPC_VERBOSITY=DEBUG tandem …`` still works).
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
