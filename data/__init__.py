from .build import DataError, build_loader

__all__ = ['build_loader', 'DataError']
