# Runs first at every reset. Kept tiny: all checks live in main.py so that a
# broken application can never stop the board from reaching its REPL.
import gc

gc.collect()
