"""
Wiring, one module per twistd plugin: C{Options} (parse only) and
C{makeService(config, reactor)}, which builds the service's
L{MultiService} from the layers below.
"""
