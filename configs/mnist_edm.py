"""Plain EDM training on the embedded MNIST-5k digits with a tiny CPU network (a few minutes)."""

from configs import default


def get_config():
    c = default.get_config()
    c.train.total_images = 48_000
    return c
