"""Build the optional compiled kernels: every qkd/native/<name>.c becomes `_qkdgw_<name>`.

They are top-level modules (not inside `qkd`) so that a source checkout placed first on
sys.path, as the tests do, still finds the build that `pip install` made. `optional=True`:
a machine without a C compiler still installs, and qkd falls back to the numpy references
(loudly; see qkd/native/__init__.py).
"""

from glob import glob
from pathlib import Path

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(f"_qkdgw_{Path(src).stem}", [src], optional=True,
              extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"])
    for src in sorted(glob("qkd/native/*.c"))
])
