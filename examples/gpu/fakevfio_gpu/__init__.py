"""fakevfio example driver ``gpu``: an accelerator with an mlx5-style tagged record stream."""

from __future__ import annotations

from fakevfio_gpu import records
from fakevfio_gpu.driver import GpuDriver, GpuLoadStream, GpuSaveStream

__all__ = ["GpuDriver", "GpuLoadStream", "GpuSaveStream", "records"]
