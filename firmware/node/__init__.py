# The node application. Nothing here touches hardware at import time.
try:
    from node._version import VERSION  # written into each OTA bundle by `fleet release build`
except ImportError:
    VERSION = "0.1.0"  # a development tree (no bundle)
