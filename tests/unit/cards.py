"""Cards the planning tests reason about, described once."""

from renderfarm.planning.devices import device_from_spec

H100 = device_from_spec("NVIDIA H100 80GB HBM3", 80, "9.0")
L40S = device_from_spec("NVIDIA L40S", 48, "8.9")
RTX4090 = device_from_spec("NVIDIA GeForce RTX 4090", 24, "8.9")
RTX4070 = device_from_spec("NVIDIA GeForce RTX 4070", 12, "8.9")
RTX3070 = device_from_spec("NVIDIA GeForce RTX 3070", 8, "8.6")
QUADRO = device_from_spec("Quadro RTX 6000", 24, "7.5")
CPU = device_from_spec("CPU", 24, None)
