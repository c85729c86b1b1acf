"""Plain EDM training on the embedded MNIST-5k digits with a tiny CPU network.

About 8 minutes on a 2-core CPU (400 steps of 64 images at ~62 images/s on 2 host devices,
plus compiles and two sample grids).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.train.total_images = 25_600
    c.train.sample_every_steps = 200
    return c
