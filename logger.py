"""Logging: rank 0 to the console, every rank to <output>/log_rank{rank}.txt."""
import functools
import logging
import os
import sys

try:
    from termcolor import colored
except ImportError:  # colour is optional
    def colored(text, *args, **kwargs):
        return text


@functools.lru_cache()
def create_logger(output_dir: str, dist_rank: int = 0, name: str = '') -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
    color_fmt = colored('[%(asctime)s %(name)s]', 'green') + \
        colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s'
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter(fmt=color_fmt, datefmt='%Y-%m-%d %H:%M:%S'))
        logger.addHandler(console)
    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(fmt=fmt, datefmt='%Y-%m-%d %H:%M:%S'))
    logger.addHandler(file_handler)
    # The kernel registry logs which implementation each flag got through this logger too.
    kernels_logger = logging.getLogger('kernels')
    kernels_logger.setLevel(logging.INFO)
    kernels_logger.handlers = list(logger.handlers)   # replace, so a second run's logger does not double lines
    return logger


class Scalars:
    """Optional TensorBoard scalars (EXTRA.TENSORBOARD, rank 0 only); a no-op when off."""

    def __init__(self, output_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError('EXTRA.TENSORBOARD True needs the tensorboard package: '
                                   'pip install tensorboard, or set EXTRA.TENSORBOARD False') from None
            self.writer = SummaryWriter(os.path.join(output_dir, 'tensorboard'))

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
