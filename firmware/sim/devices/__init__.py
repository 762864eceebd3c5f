"""Simulated parts at register/frame level, attached to a sim.machine bus."""
