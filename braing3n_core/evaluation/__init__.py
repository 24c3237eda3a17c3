"""How good an encoder or a generator is: probe tasks and protocol, probe heads, image and distribution metrics."""
