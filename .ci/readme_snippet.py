"""Prints the README's Flax example (the Python block of "Use it in a Flax
training step"), for CI to run against the installed wheel."""

import pathlib
import re

readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
section = readme.split("## Use it in a Flax training step", 1)[1]
print(re.search(r"```python\n(.*?)```", section, re.S).group(1))
