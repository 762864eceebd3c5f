# The node application. Nothing here touches hardware at import time.
VERSION = "0.1.0"
